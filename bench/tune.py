"""
Fair hyperparameter selection for the continual-learning methods, on the validation split only.

Each method gets the same number of trials (6). A trial is a full run of the task sequence with one seed, scored by
OP on the `val` split (carved from the training data); the test split is never looked at. The chosen values and
every trial's score are written to out/<run>/tune/tuning.md and tuning.json.

    python bench/tune.py                 # the default tiny-world benchmark
    python bench/tune.py --run=default   # any train.py override is passed through
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

GRIDS = {  # method -> list of trials, each a dict of config overrides; the same number of trials per method
    "ewc": [{"ewc_lambda": lam} for lam in (1, 10, 1e2, 1e3, 1e4, 1e5)],
    "sae": [
        {"sae_lambda_p": lp, "sae_lambda_g": lg, "sae_eps": eps, "sae_delta": delta}
        for lp in (1e2, 1e4, 1e6)
        for lg, eps, delta in ((0.0, 0.0, 0.0), (1.0, 0.02, 0.2))
    ],
}


def main(argv):
    base_config = train.parse_args(argv + ["--eval_split=val"])
    device = train.resolve_device(base_config)
    trials = {}
    t0 = time.time()
    for method, grid in GRIDS.items():
        trials[method] = []
        for i, overrides in enumerate(grid):
            args = argv + ["--eval_split=val", f"--methods={method}", f"--cl_dir=tune/{method}{i}"]
            args += [f"--{k}={v}" for k, v in overrides.items()]
            config = train.parse_args(args)
            base = train.pretrain(config, device)
            sae_checkpoint = train.train_sae_stage(config, device, base)
            summary = train.continual_learning(config, device, base, sae_checkpoint)
            trials[method].append({"overrides": overrides, "val_op": summary[method]["op"],
                                   "val_bwt": summary[method]["bwt"]})
    chosen = {m: max(ts, key=lambda t: t["val_op"]) for m, ts in trials.items()}  # ties: the first in grid order
    out_dir = os.path.join(base_config.out_dir, base_config.run, "tune")
    with open(os.path.join(out_dir, "tuning.json"), "w") as f:
        json.dump({"trials": trials, "chosen": chosen, "seconds": time.time() - t0, "argv": argv}, f, indent=2)
    lines = [f"Command: `python bench/tune.py {' '.join(argv)}` ({time.time() - t0:.0f} s)", "",
             "| method | trial | val OP | val BWT |", "|---|---|---|---|"]
    for method, ts in trials.items():
        for t in ts:
            mark = " **(chosen)**" if t is chosen[method] else ""
            setting = ", ".join(f"{k}={v:g}" for k, v in t["overrides"].items())
            lines.append(f"| {method} | {setting}{mark} | {t['val_op']:.3f} | {t['val_bwt']:.3f} |")
    with open(os.path.join(out_dir, "tuning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
