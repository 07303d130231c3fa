r"""
Two routes to a model that its SAEs decompose with less damage, side by side, at the same fresh SAEs' budget:

  1. SAE-regularized pretraining (bench/sae_reg.py): train the model jointly with SAEs, then train fresh SAEs on it.
     The joint term divides the SAEs' error by the mean norm (--sae_reg_norm=norm, the original study's) or by the
     token-to-token variance (var, which no constant vector in the residual stream lowers).
  2. Adapting a trained model to its fresh SAEs (bench/sae_adapt.py, after Chen, Engels and Tegmark 2025): LoRA
     adapters learn to make the spliced model predict what the original predicts, the model and SAEs frozen.

For each seed this script runs (or reuses) bench/sae_reg.py's study for the normal model and a regularized model
under each of --norms (the same models and sweeps that script makes under the same keys), adapts every model to
every one of its sweep points' SAEs, and reports each route (normal, regularized under each norm, and each of those
adapted): the compound CE increase at matched total L0, the model's CE on held-out text without SAEs, and the
minutes of this machine the model cost (pretraining, plus the adaptation for an adapted route; the fresh SAEs'
sweep, which every route needs once, is left out of all).

    python -m bench.sae_routes --preset=gpt_circuits_cpu --sweep=original --corpus=../shared/data/tinyshakespeare.txt \
        --run=gpt_circuits_cpu --seeds=0 --sweep_points=4 --sweep_steps=3000 --sweep_batch_size=4096

Its keys are bench/sae_reg.py's (the study: --seeds, --sweep, --sweep_points, ...; not --estimate or --refit),
bench/sae_adapt.py's (the adaptation: --adapt_steps, --adapt_lr, --adapt_batch_size, --adapt_points, --adapt_layers;
not --saes) and --norms; any other is the pipeline's. Every model, sweep point and adaptation is cached on its own,
so an interrupted run resumes (an adaptation is redone when its keys change: bench/sae_adapt.py run by hand with other
--adapt_* keys on the same sweep point replaces the file). Writes out/<run>/sae_reg/routes.json, routes.md and
routes.png.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import cache
import configurator as cfg
import jobs
import train
from bench import sae_adapt, sae_reg
from report import fmt, mean_std, save_figure


@dataclass
class Options(sae_reg.Options, sae_adapt.Options):
    # bench/sae_routes.py: bench/sae_reg.py's keys and bench/sae_adapt.py's (but --estimate and --saes), and
    norms: tuple[str, ...] = ("norm", "var")  # the regularized models, one per division of the joint SAEs' error;
    # empty (--norms=): the normal model alone
    CHOICES = {**sae_reg.Options.CHOICES, **sae_adapt.Options.CHOICES, "norms": cfg.CHOICES["sae_reg_norm"]}
    AT_LEAST_ZERO = sae_reg.Options.AT_LEAST_ZERO + sae_adapt.Options.AT_LEAST_ZERO


def parse(argv):
    """(options, config), or None for --help; the study's keys and the pipeline's are checked as bench/sae_reg.py
    checks them."""
    args = cfg.parse_script_args(argv, Options, "python -m bench.sae_routes", __doc__)
    if args is None:
        return None
    options = args[0]
    for key in ("estimate", "saes", "refit"):
        if getattr(options, key):
            raise ValueError(f"--{key} is not a key of this script (it runs every model's study and adapts each "
                             "model to each of its sweep points)")
    not_the_study = {f.name for f in dataclasses.fields(sae_adapt.Options)} | {"norms"}
    return options, sae_reg.parse([a for a in argv if a[2:].split("=", 1)[0] not in not_the_study])[1]


def models(config, norms, seed):
    """[(route name, config of its model)]: the normal model, then the regularized one under each norm."""
    normal = sae_reg.variant_of(config, "normal", seed)
    return [("normal", normal)] + [(f"regularized ({norm})", sae_reg.variant_of(
        dataclasses.replace(config, sae_reg_norm=norm), "regularized", seed)) for norm in norms]


def route_runs(config, options, device):
    """{route: {str(seed): [one dict per sweep point: total_l0, compound, clean_ce, spliced_ce, minutes (and, adapted,
    kl_first, kl_last)]}} for every model and the same model adapted to each sweep point's SAEs.

    compound is the CE of the spliced model the route delivers minus the CE of the model it started from, without
    SAEs: for a model, its compound CE increase; for an adapted one, CE(adapted model, SAEs spliced) - CE(the model
    before adaptation), as Chen et al. measure the gap. Not the adapted model's own increase: adaptation is trained
    with the SAEs in, so without them the adapted model can be far worse than the original (clean_ce says how much),
    and its own increase would credit that damage as a gain."""
    adapt_options = sae_adapt.Options(**{f.name: getattr(options, f.name)
                                         for f in dataclasses.fields(sae_adapt.Options)})
    runs = {}
    for seed in options.seeds:
        for name, model_config in models(config, options.norms, seed):
            variant = "normal" if name == "normal" else "regularized"
            study = sae_reg.fresh_sae_sweep(model_config, sae_reg.sweep(model_config, options, variant), device)
            summary = cache.read_json(os.path.join(model_config.out_dir, model_config.run, "pretrain.json"))
            minutes = summary["history"][-1]["iter"] * summary["ms_per_iter"] / 60_000  # its steps, at its time a step
            runs.setdefault(name, {})[str(seed)] = [
                {"total_l0": s["total_l0"], "compound": s["compound_ce_increase"], "clean_ce": s["clean_ce"],
                 "spliced_ce": s["clean_ce"] + s["compound_ce_increase"], "minutes": minutes} for s in study["sweep"]]
            adapted = []
            for i in range(len(study["sweep"])):
                saes = os.path.join(model_config.out_dir, model_config.run, f"sweep_{i}.pt")
                r = sae_adapt.adapt_to_saes(model_config, dataclasses.replace(adapt_options, saes=saes), device)
                before, after = r["before"], r["after"]
                spliced_ce = after["clean_ce"] + after["compound_ce_increase"]
                adapted.append({"total_l0": after["total_l0"], "compound": spliced_ce - before["clean_ce"],
                                "clean_ce": after["clean_ce"], "spliced_ce": spliced_ce,
                                "minutes": minutes + r["seconds"] / 60,
                                "kl_first": r["loss_first"], "kl_last": r["loss_last"]})
            runs.setdefault(f"{name} + adapted", {})[str(seed)] = adapted
    return runs


def matched_l0s(runs, n=3):
    """n total L0s spread evenly over the range every seed's curve of every route covers, largest first; where the
    routes share no range, over the normal model's (the other routes are read where they reach); [] if its seeds
    share none either."""
    for compared in (runs, {"normal": runs["normal"]}):
        curves = [sorted((s["total_l0"], 0.0) for s in run) for route in compared.values() for run in route.values()]
        l0s = sae_reg.common_l0s(curves, n)
        if l0s:
            return l0s
    return []


def at_l0(route, l0, field):
    """(mean, std) over seeds of a route's `field` at total L0 l0, linear between its sweep points; None where a seed's
    curve does not reach l0."""
    values = []
    for run in route.values():
        curve = sorted((s["total_l0"], s[field]) for s in run)
        if not curve[0][0] <= l0 <= curve[-1][0]:
            return None
        values.append(sae_reg.interpolate(curve, l0))
    return mean_std(values)


def table(runs):
    """Markdown: each route's compound CE increase at the matched total L0s, its CE without SAEs and its minutes;
    then every sweep point of every route."""
    l0s = matched_l0s(runs)
    lines = ["| route | seeds | " + " | ".join(f"compound CE increase at total L0 {l0:.0f}" for l0 in l0s) +
             " | CE without SAEs | minutes |", "|---|---|" + "---|" * len(l0s) + "---|---|"]
    for name, route in runs.items():
        cells = [at_l0(route, l0, "compound") for l0 in l0s]
        clean = mean_std([s["clean_ce"] for run in route.values() for s in run])
        minutes = mean_std([s["minutes"] for run in route.values() for s in run])[0]
        lines.append(f"| {name} | {len(route)} | " + " | ".join(fmt(*c) if c else "outside its sweep" for c in cells)
                     + f" | {fmt(*clean)} | {minutes:.1f} |")
    lines += ["", "Compound CE increase: the CE of the spliced model (every point's SAE in at once) minus the CE of "
              "the model the route starts from, without SAEs (an adapted route: the model before adaptation). CE "
              "without SAEs: on held-out text (evaluate.sae_metrics' windows); an adapted route's is the adapted "
              "model's, the mean over its adaptations, one to each sweep point's SAEs, and over seeds. Minutes: the "
              "model's pretraining steps at its measured time a step, plus the adaptation's wall time for an adapted "
              "route.",
              "", "| route | sweep point | total L0 (mean over seeds) | compound CE increase | CE without SAEs | CE "
              "with SAEs spliced | KL at the first / last adaptation step |", "|---|---|---|---|---|---|---|"]
    for name, route in runs.items():
        for i in range(len(next(iter(route.values())))):
            points = [run[i] for run in route.values()]
            kl = (" / ".join(f"{mean_std([p[k] for p in points])[0]:.3f}" for k in ("kl_first", "kl_last"))
                  if points[0].get("kl_first") is not None else "")
            lines.append(f"| {name} | {i} | {mean_std([p['total_l0'] for p in points])[0]:.1f} | " +
                         fmt(*mean_std([p["compound"] for p in points])) + " | " +
                         fmt(*mean_std([p["clean_ce"] for p in points])) + " | " +
                         fmt(*mean_std([p["spliced_ce"] for p in points])) + f" | {kl} |")
    return "\n".join(lines)


def plot(runs, path, published=False):
    """Compound CE increase against total L0: each route's sweep points (mean over seeds; an adapted route dashed in
    its model's colour), with the original study's published points (published=True: the original's sweep)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colors = {}
    for name, route in runs.items():
        model = name.removesuffix(" + adapted")
        color = colors.setdefault(model, f"C{len(colors)}")
        n = len(next(iter(route.values())))
        points = sorted((mean_std([run[i]["total_l0"] for run in route.values()])[0],
                         mean_std([run[i]["compound"] for run in route.values()])) for i in range(n))
        l0, ce = [l0 for l0, _ in points], [ce for _, ce in points]  # in order of L0, which adaptation reorders
        ax.errorbar(l0, [m for m, _ in ce], yerr=[s for _, s in ce], marker="o", color=color, capsize=3,
                    linestyle="--" if name.endswith("adapted") else "-", label=name)
    for variant, fill in (("normal", "white"), ("regularized", "black")):  # in black and white: its own SAEs
        if published:
            l0, ce = sae_reg.ORIGINAL["published"][variant]["compound"]
            ax.scatter([l0], [ce], marker="*", s=180, color=fill, edgecolor="black", zorder=3,
                       label=f"{variant}{', norm' if variant == 'regularized' else ''} (original, published)")
    ax.set(xlabel="total L0 (sum over points)", ylabel="compound CE increase (nats)",
           title="every point's SAE spliced in at once")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv):
    parsed = parse(argv)
    if parsed is None:
        return 0
    options, config = parsed
    train.check_inputs(dataclasses.replace(config, seed=options.seeds[0]), tasks=False)
    runs = route_runs(config, options, cfg.resolve_device(config))
    out = os.path.join(config.out_dir, config.run, "sae_reg")
    cache.save_json(runs, os.path.join(out, "routes.json"))
    plot(runs, os.path.join(out, "routes.png"), published=options.sweep == "original")
    text = table(runs)
    cache.save_text(f"Command: `python -m bench.sae_routes {' '.join(argv)}`\n\n{text}\n",
                    os.path.join(out, "routes.md"))
    print(text)


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
