"""
The continual-learning benchmark of the README: every method (seqft, EWC, SI, MAS, LwF, O-LoRA, SAE-FD,
SAE-guided, freeze, replay, multitask) over 3 seeds on the tiny-world task sequence, with the hyperparameters chosen
on the validation split by bench/tune.py (give them as overrides: tuning.json's `chosen_args`). Seeds change the
fine-tuning (batch order, importance samples, replay buffer, anchors); the base model and its SAEs are the run's.
Writes out/<run>/benchmark.md (command, wall time, the table) and the plots cl_matrix.png, cl_curves.png,
cl_bars.png beside it (in out/<run>/<cl_dir>/ with --cl_dir).

    python -m bench.cl_benchmark            # any train.py key may follow, e.g. --preset=paper --run=paper
    python -m bench.cl_benchmark --cl_dir=cl_order2 --tasks=$SECOND_ORDER   # the second task order

The second task order, fixed before any result of the benchmark was seen: the default order reversed, so that
every task moves and the first task becomes the last.
"""

import json
import os
import sys
import time

import cache
import configurator as cfg
import jobs
import train
from regularizers import METHODS
from report import results_table

ARGS = ["--methods=" + ",".join(METHODS), "--seeds=0,1,2"]
SECOND_ORDER = ("sort", "count", "translate", "reverse", "close", "add", "facts", "stance")


def main(argv):
    args = cfg.parse_script_args(argv, cfg.NoOptions, "python -m bench.cl_benchmark", __doc__)
    if args is None:
        return 0
    argv = ARGS + args[1]
    t0 = time.time()
    status = train.main(argv)
    if status != 0:
        return status
    seconds = time.time() - t0
    config = cfg.parse_args(argv)
    run_dir = os.path.join(config.out_dir, config.run)
    if config.cl_dir != "cl":  # another results folder (e.g. another task order) has its summary there
        run_dir = os.path.join(run_dir, config.cl_dir)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    command = f"python -m bench.cl_benchmark {' '.join(argv[len(ARGS):])}"
    text = (f"Command: `{command}` (= `python train.py {' '.join(argv)}`), {seconds:.0f} s on this machine, "
            "with any stage that was not cached.\n\n"
            f"Accuracy on the test split; mean ± std over seeds {list(config.seeds)}; {config.jobs} run(s) at a time"
            f"{' (one thread each)' if config.jobs > 1 else ''}.\n\n{results_table(summary)}\n")
    cache.save_text(text, os.path.join(run_dir, "benchmark.md"))
    print(text)


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
