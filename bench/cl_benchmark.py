"""
The continual-learning benchmark of the README: every method (seqft, EWC, SI, MAS, LwF, O-LoRA, SAE-FD,
SAE-guided, replay, multitask) over 3 seeds on the tiny-world task sequence, with the hyperparameters chosen on the
validation split by bench/tune.py (give them as overrides: tuning.json's `chosen_args`). Seeds change the
fine-tuning (batch order, importance samples, replay buffer, anchors); the base model and its SAEs are the run's.
Writes out/<run>/benchmark.md (command, wall time, the table) and the plots cl_matrix.png, cl_curves.png,
cl_bars.png beside it (in out/<run>/<cl_dir>/ with --cl_dir).

    python bench/cl_benchmark.py            # any train.py override may follow, e.g. --jobs=2
    python bench/cl_benchmark.py --cl_dir=cl_order2 --tasks=$SECOND_ORDER   # the second task order

The second task order, fixed before any result of the benchmark was seen: the default order reversed, so that
every task moves and the first task becomes the last.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from report import results_table  # noqa: E402
from regularizers import METHODS  # noqa: E402

ARGS = ["--methods=" + ",".join(METHODS), "--seeds=0,1,2"]
SECOND_ORDER = ("sort", "count", "translate", "reverse", "close", "add", "facts", "stance")


def main():
    argv = ARGS + sys.argv[1:]
    t0 = time.time()
    if train.main(argv) != 0:
        sys.exit(1)
    seconds = time.time() - t0
    config = train.parse_args(argv)
    run_dir = os.path.join(config.out_dir, config.run)
    if config.cl_dir != "cl":  # another results folder (e.g. another task order) has its summary there
        run_dir = os.path.join(run_dir, config.cl_dir)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    command = f"python bench/cl_benchmark.py {' '.join(sys.argv[1:])}"
    text = (f"Command: `{command}` (= `python train.py {' '.join(argv)}`), {seconds:.0f} s on this machine, "
            "with any stage that was not cached.\n\n"
            f"Accuracy on the test split; mean ± std over seeds {list(config.seeds)}; {config.jobs} run(s) at a time"
            f"{' (one thread each)' if config.jobs > 1 else ''}.\n\n{results_table(summary)}\n")
    with open(os.path.join(run_dir, "benchmark.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
