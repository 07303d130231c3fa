"""
Calibrating the benchmark itself: which model width and fine-tuning learning rate make the tiny-world task
sequence show the phenomenon the methods are compared on: multitask learns every task, seqft learns each and
forgets the earlier ones?

For every (n_embd, cl_lr, steps_per_task) in the grid it runs seqft and multitask on the `val` split and reports the
three criteria (mean over `--seeds`): multitask average accuracy (want >= 0.9), the smallest R[t][t] under seqft
(each task learned when trained, want >= 0.8) and seqft's BWT (clear forgetting, want <= -0.3). No regularization
method is run, and the test split is never looked at. Each configuration is a `python train.py` run in its own
process; widths share a pretrained model and SAEs (out/calib_w<width>/), trained first.

    python bench/calibrate.py                                   # the grid below, one run at a time
    python bench/calibrate.py --jobs=8 --device=cuda            # 8 processes at once on one GPU
    python bench/calibrate.py --widths=64,128 --lrs=3e-4 --steps=200

Writes out/calibrate.md and out/calibrate.json.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from evaluate import cl_metrics  # noqa: E402


def floats(text):
    return [float(v) for v in text.split(",")]


def ints(text):
    return [int(v) for v in text.split(",")]


def run_train(job, env):
    """One `python train.py` in a subprocess; job = (its arguments, the folder its log goes to)."""
    args, log_dir = job
    os.makedirs(log_dir, exist_ok=True)
    log = os.path.join(log_dir, "log.txt")
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(args)} failed; see {log}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=ints, default=[64, 96, 128])
    parser.add_argument("--lrs", type=floats, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--steps", type=ints, default=[200])
    parser.add_argument("--jobs", type=int, default=1, help="train.py processes at once")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out_dir", default="out")
    args, passthrough = parser.parse_known_args()  # anything else goes to train.py as is
    seeds = train.parse_args(passthrough).seeds
    env = dict(os.environ, OMP_NUM_THREADS="1" if args.jobs > 1 else os.environ.get("OMP_NUM_THREADS", ""))
    env = {k: v for k, v in env.items() if v != ""}
    common = [f"--device={args.device}", f"--out_dir={args.out_dir}", "--eval_split=val", *passthrough]
    t0 = time.time()

    def run_dir(width):
        return os.path.join(args.out_dir, f"calib_w{width}")

    # 1. a base model and SAEs per width (the cl runs below share them)
    base_jobs = [([*common, f"--run=calib_w{w}", f"--n_embd={w}", "--stage=sae"], run_dir(w))
                 for w in args.widths]
    # 2. seqft and multitask for every (width, lr, steps)
    grid = list(itertools.product(args.widths, args.lrs, args.steps))
    cl_name = {(w, lr, s): f"calib/lr{lr:g}_steps{s}" for w, lr, s in grid}
    cl_jobs = [([*common, f"--run=calib_w{w}", f"--n_embd={w}", f"--cl_lr={lr}", f"--steps_per_task={s}",
                 "--methods=seqft,multitask", f"--cl_dir={cl_name[w, lr, s]}"],
                os.path.join(run_dir(w), cl_name[w, lr, s])) for w, lr, s in grid]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda a: run_train(a, env), base_jobs))
        list(pool.map(lambda a: run_train(a, env), cl_jobs))

    rows = []
    for w, lr, s in grid:
        folder = os.path.join(run_dir(w), cl_name[w, lr, s])
        per_seed = []
        for seed in seeds:
            with open(os.path.join(folder, f"seqft_seed{seed}.json")) as f:
                seqft = json.load(f)
            with open(os.path.join(folder, f"multitask_seed{seed}.json")) as f:
                multitask = json.load(f)
            R = seqft["R"]
            per_seed.append({"multitask": multitask["R"][-1], "bwt": cl_metrics(R)["bwt"],
                             "diagonal": [R[t + 1][t] for t in range(len(seqft["tasks"]))]})
        mean = lambda key: [sum(v) / len(seeds) for v in zip(*(r[key] for r in per_seed))]  # noqa: E731
        rows.append({"n_embd": w, "cl_lr": lr, "steps_per_task": s, "tasks": seqft["tasks"], "seeds": seeds,
                     "multitask_per_task": mean("multitask"), "seqft_diagonal": mean("diagonal"),
                     "seqft_bwt": sum(r["bwt"] for r in per_seed) / len(seeds)})
        rows[-1]["multitask_avg"] = sum(rows[-1]["multitask_per_task"]) / len(rows[-1]["multitask_per_task"])
    with open(os.path.join(args.out_dir, "calibrate.json"), "w") as f:
        json.dump({"rows": rows, "seconds": time.time() - t0, "argv": sys.argv[1:]}, f, indent=2)
    tasks = rows[0]["tasks"]
    lines = [f"Command: `python bench/calibrate.py {' '.join(sys.argv[1:])}` ({time.time() - t0:.0f} s). "
             f"Accuracy on the val split, mean over seeds {seeds}. "
             "Targets: multitask avg >= 0.9, seqft min R[t][t] >= 0.8, "
             "seqft BWT <= -0.3.", "",
             "| n_embd | cl_lr | steps/task | multitask avg | seqft min R[t][t] | seqft BWT | seqft R[t][t] ("
             + ", ".join(tasks) + ") | multitask per task |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_embd']} | {r['cl_lr']:g} | {r['steps_per_task']} | {r['multitask_avg']:.3f} | "
                     f"{min(r['seqft_diagonal']):.2f} | {r['seqft_bwt']:.3f} | "
                     + " ".join(f"{a:.2f}" for a in r["seqft_diagonal"]) + " | "
                     + " ".join(f"{a:.2f}" for a in r["multitask_per_task"]) + " |")
    with open(os.path.join(args.out_dir, "calibrate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
