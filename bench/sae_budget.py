r"""
Is a sweep's fresh SAE trained long enough? Trains the SAE of one residual point of one sweep point of
bench/sae_reg.py's study again, on the same activations, with the same settings and schedule (the original sweep's
warmup stays a tenth of the steps), for each of --budget_steps step counts, and reports for each: its FVU and L0 on
held-out text, the model's CE increase with it spliced in, and its training FVU near every tenth of its steps. Where
more steps still lower FVU and L0 together, the sweep's SAEs are short of their budget, and a compound CE increase
made with them measures the SAEs' training as much as the model.

    python -m bench.sae_budget --preset=gpt_circuits_cpu --sweep=original --corpus=../shared/data/tinyshakespeare.txt \
        --run=gpt_circuits_cpu --seeds=0 --sweep_points=4 --sweep_steps=3000 --sweep_batch_size=4096 \
        --budget_point=2 --budget_steps=3000,9000

Its keys are bench/sae_reg.py's (the study; its model is the first of --seeds) and the four below; any other is the
pipeline's. It runs or reuses the study's model and its sweep up to that sweep point first. At the sweep's own step
count it retrains the sweep's SAE bit for bit on the CPU (same seed, same activations; the table says whether it did),
so that row is also a check. Each step count is cached on its own (out/<run>/sae_reg/<model>/budget_<sweep
point>_point<p>_<steps>.json); writes out/<run>/sae_reg/budget_<model>_<sweep point>_point<p>.md.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass

import cache
import configurator as cfg
import jobs
import train
from bench import sae_reg
from evaluate import sae_metrics
from model import model_from_checkpoint
from pretrain import corpus_hash, corpus_of, pretrain
from sae import collect_activations, train_sae


@dataclass
class Options(sae_reg.Options):
    # bench/sae_budget.py: bench/sae_reg.py's keys (not --estimate or --refit), and
    budget_model: str = "normal"  # the study's model whose SAE is retrained: 'normal' or 'regularized'
    budget_sweep_point: int = 0  # which sweep point's settings (0 = the first: --sweep=original's smallest L1s)
    budget_point: int = 2  # the residual point, 0..n_layer
    budget_steps: tuple[int, ...] = (3000, 9000)  # the step counts to train it for
    CHOICES = {**sae_reg.Options.CHOICES, "budget_model": ("normal", "regularized")}
    AT_LEAST_ZERO = sae_reg.Options.AT_LEAST_ZERO + ("budget_sweep_point", "budget_point")


def parse(argv):
    """(options, config), or None for --help; the study's keys are checked as bench/sae_reg.py checks them, then
    the point, the sweep point and the step counts."""
    args = cfg.parse_script_args(argv, Options, "python -m bench.sae_budget", __doc__)
    if args is None:
        return None
    options = args[0]
    mine = {f.name for f in dataclasses.fields(Options)} - {f.name for f in dataclasses.fields(sae_reg.Options)}
    config = sae_reg.parse([a for a in argv if a[2:].split("=", 1)[0] not in mine])[1]
    for key in ("estimate", "refit"):
        if getattr(options, key):
            raise ValueError(f"--{key} is not a key of this script (it trains one SAE, for each of --budget_steps)")
    if options.budget_point > config.n_layer:
        raise ValueError(f"--budget_point={options.budget_point}: the residual points are 0..{config.n_layer}")
    n_points = len(sae_reg.sweep(config, options, options.budget_model))
    if options.budget_sweep_point >= n_points:
        raise ValueError(f"--budget_sweep_point={options.budget_sweep_point}: the sweep has points 0..{n_points - 1}")
    if not options.budget_steps:
        raise ValueError("--budget_steps needs at least one step count")
    return options, config


def budget_runs(config, options, device):
    """(the sweep point as the study made it, [{steps, sweep_steps, l0, fvu, ce_increase, dead_fraction,
    training_fvu}] for each of options.budget_steps): the SAE of the chosen point and sweep point trained for that
    many steps on the sweep's activations (sae_reg.fresh_sae_sweep's: the same tokens and seed), measured as the sweep
    measures it (evaluate.sae_metrics, that point alone spliced in). The study's model and sweep are run or reused
    first."""
    model_config = sae_reg.variant_of(config, options.budget_model, options.seeds[0])
    i, p = options.budget_sweep_point, options.budget_point
    points_of_sweep = sae_reg.sweep(model_config, options, options.budget_model)[:i + 1]  # the ones up to it
    sweep_point = sae_reg.fresh_sae_sweep(model_config, points_of_sweep, device)["sweep"][i]
    label, sae_configs, schedule = points_of_sweep[i]
    base = pretrain(model_config, device)  # the study's model, read from its checkpoint
    model = model_from_checkpoint(base, device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    train_ids, val_ids = corpus_of(model_config)
    activations, results = None, []
    for steps in options.budget_steps:
        trained_as = {**schedule, "steps": steps, **({"warmup": steps // 10} if "warmup" in schedule else {})}
        settings = {"point": p, "sae": dataclasses.asdict(sae_configs[p]), "schedule": trained_as,
                    "sae_tokens": model_config.sae_tokens, "seed": model_config.seed}
        key = cache.result_key({**cache.stage_config(model_config, "pretrain"), "budget": settings},
                               cache.stage_code(model_config, "pretrain", "sae") + ["bench/sae_budget.py:budget_runs"],
                               device, corpus_hash(model_config), {"base": base["sha"]})
        path = os.path.join(model_config.out_dir, model_config.run, f"budget_{i}_point{p}_{steps}.json")
        cached = cache.load_json_result(path, key)
        if cached is None:
            if activations is None:  # the sweep's windows (the seed draws them, whatever points are read)
                activations = collect_activations(model, train_ids, (p,), model_config.sae_tokens,
                                                  model_config.block_size, model_config.seed)
            sae, history = train_sae(activations[p], sae_configs[p], seed=model_config.seed,
                                     desc=f"{label} point {p}, {steps} steps", progress=jobs.progress, **trained_as)
            point = sae_metrics(model, {p: sae}, val_ids, model_config.block_size, device)["points"][p]
            cache.save_json({"key": key, "label": label, "point": p, "steps": steps,
                             "sweep_steps": schedule["steps"],
                             **{m: point[m] for m in ("l0", "fvu", "ce_increase", "dead_fraction")},
                             "training_fvu": [[h["step"], h["fvu"]] for h in history]}, path)  # as train_sae logs it
            cached = cache.read_json(path)
        results.append(cached)
    return sweep_point, results


def tenths(curve, steps):
    """The points of a logged curve [[step, value]] nearest to steps 0, steps / 10, ..., steps (train_sae logs every
    100 steps and the last)."""
    return sorted({tuple(min(curve, key=lambda c: abs(c[0] - steps * t / 10))) for t in range(11)})


def table(results, sweep_point, model):
    """Markdown: one row per step count, then the sweep's own numbers for that SAE; the row at the sweep's own step
    count says whether it reproduced them."""
    first = results[0]
    own = sweep_point["points"][str(first["point"])]
    lines = [f"The {model} model's SAE at point {first['point']} of sweep point {first['label']}, trained for each "
             "step count (training FVU: one batch's, before that step's update):", "",
             "| steps | FVU (held out) | L0 | CE increase | dead fraction | training FVU along its steps |",
             "|---|---|---|---|---|---|"]
    for r in results:
        curve = ", ".join(f"{s}: {f:.3f}" for s, f in tenths(r["training_fvu"], r["steps"]))
        same = ("" if r["steps"] != r["sweep_steps"] else " (the sweep's, reproduced)"
                if all(r[m] == own[m] for m in ("fvu", "l0", "ce_increase")) else " (the sweep's, NOT reproduced)")
        lines.append(f"| {r['steps']}{same} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['ce_increase']:.3f} | "
                     f"{r['dead_fraction']:.3f} | {curve} |")
    lines += ["", f"The sweep's own SAE: FVU {own['fvu']:.4f}, L0 {own['l0']:.1f}, CE increase "
              f"{own['ce_increase']:.3f}."]
    return "\n".join(lines)


def main(argv):
    parsed = parse(argv)
    if parsed is None:
        return 0
    options, config = parsed
    train.check_inputs(dataclasses.replace(config, seed=options.seeds[0]), tasks=False)
    device = cfg.resolve_device(config)
    sweep_point, results = budget_runs(config, options, device)
    text = table(results, sweep_point, options.budget_model)
    name = f"budget_{options.budget_model}_{options.budget_sweep_point}_point{options.budget_point}.md"
    cache.save_text(f"Command: `python -m bench.sae_budget {' '.join(argv)}`\n\n{text}\n",
                    os.path.join(config.out_dir, config.run, "sae_reg", name))
    print(text)


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
