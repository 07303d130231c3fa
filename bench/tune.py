"""
Fair hyperparameter selection for the continual-learning methods, on the validation split only.

Each method gets the same number of trials (6): its penalty weight over a log grid (SAE-guided: three weights,
with and without the guide term; O-LoRA: 0, no orthogonality, and five weights); freeze has only its choices of
frozen blocks (three on the 2-block model, two under LoRA). A trial is a full run of the task
sequence with one seed, scored by OP on the `val` split (carved from the training data); the test split is never
looked at. Ties keep the first trial in grid order. Writes out/<run>/tune/tuning.md and tuning.json, whose
`chosen_args` are the overrides to give bench/cl_benchmark.py.

    python -m bench.tune                         # every method's grid, two trials at once (--jobs, one thread each)
    python -m bench.tune --methods=si,mas        # some methods only; any train.py key is passed through
"""

import os
import sys
import time
from dataclasses import dataclass

import cache
import configurator as cfg
import jobs
import sae_stage
import train
from pretrain import pretrain

# Each grid should span from no effect to learning frozen. The importances live on scales ten orders apart (mean w
# after one task on the default base: Fisher 3e-9, SI 4e-3, MAS 10), but the mean is a poor guide: a first pass
# with grids at equal lambda * mean(w) (SI 1e-5..1, MAS 1e-8..1e-3) changed nothing anywhere for SI and MAS, and
# EWC's best lay on its upper edge (1e5). These grids were placed from that pass (docs/tuning.md lists it).
GRIDS = {  # method -> trials, each a dict of config overrides; the same number of trials per method
    "ewc": [{"ewc_lambda": lam} for lam in (10, 1e2, 1e3, 1e4, 1e5, 1e6)],
    "si": [{"si_lambda": lam} for lam in (1, 10, 1e2, 1e3, 1e4, 1e5)],
    "mas": [{"mas_lambda": lam} for lam in (1e-3, 1e-2, 1e-1, 1, 10, 1e2)],
    "lwf": [{"lwf_lambda": lam} for lam in (1e-2, 1e-1, 1, 10, 1e2, 1e3)],
    # O-LoRA: 0 is plain stacked adapters (is it the orthogonality that helps?); the paper's value is 0.5. A first
    # pass (0, 1e-2, 1e-1, 1, 10, 1e2) under the paper preset chose 1e2, its upper edge: the grid moved up
    "o_lora": [{"o_lora_lambda": lam} for lam in (0.0, 1e-1, 10, 1e2, 1e3, 1e4)],
    # SAE-FD: the squared code distance per token is of order 1 to 10 once the model has moved
    "sae_fd": [{"sae_fd_lambda": lam} for lam in (1e-3, 1e-2, 1e-1, 1, 10, 1e2)],
    # with and without the guide term; eps 0.005 is of the order of the protected drift per point under the paper
    # preset (docs/tuning.md), so the protect hinge binds part of the time; the first pass used eps 0.02, delta 0.2
    "sae_guided": [
        {"sae_guided_lambda_p": lp, "sae_guided_lambda_g": lg, "sae_guided_eps": eps, "sae_guided_delta": delta}
        for lp in (1e2, 1e4, 1e6)
        for lg, eps, delta in ((0.0, 0.0, 0.0), (1.0, 0.005, 0.05))
    ],
}


def grid(method, config):
    """A method's trials. Freeze has every choice there is: 0 (the embeddings and the tied head only) to n_layer
    blocks, but under LoRA not all of them (with every block's adapters frozen nothing would train)."""
    if method == "freeze":
        return [{"freeze_layers": n} for n in range(config.n_layer + (config.finetune == "full"))]
    return GRIDS[method]


def trial_dir(overrides):
    """tune/<the trial's settings>: a trial is found again by what it is, whatever its place in a grid."""
    return "tune/" + ",".join(f"{k}={v:g}" for k, v in overrides.items())


@dataclass
class Options:
    # bench/tune.py (any other key is the pipeline's, for every trial)
    methods: tuple[str, ...] = tuple(GRIDS) + ("freeze",)  # the methods to tune
    CHOICES = {"methods": tuple(GRIDS) + ("freeze",)}


def main(argv):
    args = cfg.parse_script_args(argv, Options, "python -m bench.tune", __doc__)
    if args is None:
        return 0
    options, passthrough = args
    # tuning reads the val OP only: no relearning or forced choice (a key given on the command line still wins)
    passthrough = ["--relearn_steps=", "--forced_choice_k=0"] + passthrough
    methods = options.methods
    base_config = cfg.parse_args(passthrough + ["--eval_split=val"])
    device = cfg.resolve_device(base_config)
    t0 = time.time()
    # every trial is its own results folder; all of them go to the continual-learning stage as one list of jobs
    trials = [(method, i, overrides) for method in methods for i, overrides in enumerate(grid(method, base_config))]
    configs = [cfg.parse_args(passthrough + ["--eval_split=val", f"--methods={method}", f"--cl_dir={trial_dir(o)}"]
                                + [f"--{k}={v}" for k, v in o.items()]) for method, _, o in trials]
    base = pretrain(base_config, device)
    sae_checkpoint = sae_stage.train_sae_stage(base_config, device, base)
    summaries = train.continual_learning_many(configs, device, base, sae_checkpoint, jobs=base_config.jobs)
    results = {m: [] for m in methods}
    for (method, _, overrides), summary in zip(trials, summaries):
        results[method].append({"overrides": overrides, "val_op": summary[method]["op"],
                                "val_bwt": summary[method]["bwt"]})
    chosen = {m: max(ts, key=lambda t: t["val_op"]) for m, ts in results.items()}  # ties: the first in grid order
    out_dir = os.path.join(base_config.out_dir, base_config.run, "tune")
    chosen_args = [f"--{k}={v:g}" for t in chosen.values() for k, v in t["overrides"].items()]
    cache.save_json({"trials": results, "chosen": chosen, "chosen_args": chosen_args, "seconds": time.time() - t0,
                   "argv": argv}, os.path.join(out_dir, "tuning.json"))
    lines = [f"Command: `python -m bench.tune {' '.join(argv)}` ({time.time() - t0:.0f} s)", "",
             "| method | trial | val OP | val BWT |", "|---|---|---|---|"]
    for method, ts in results.items():
        for t in ts:
            mark = " **(chosen)**" if t is chosen[method] else ""
            setting = ", ".join(f"{k}={v:g}" for k, v in t["overrides"].items())
            lines.append(f"| {method} | {setting}{mark} | {t['val_op']:.3f} | {t['val_bwt']:.3f} |")
    lines += ["", "Chosen, as arguments: `" + " ".join(chosen_args) + "`"]
    cache.save_text("\n".join(lines) + "\n", os.path.join(out_dir, "tuning.md"))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
