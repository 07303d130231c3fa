"""
Calibrating the benchmark itself, as a map: which base model and fine-tuning regime make the tiny-world task
sequence show the phenomenon the methods are compared on, as LLMs on TRACE show it: multitask learns every task,
seqft learns each task when trained on it, and seqft forgets the earlier ones clearly but partially?

The map's axes: the instruction phase of the base (number of auxiliary tags, 0 = none), the model (depth x width),
full fine-tuning or LoRA (rank), the learning rate and the steps per task. For every point it runs seqft and
multitask on the `val` split and reports the criteria (mean over `--seeds`): multitask average accuracy (want
>= 0.9), the smallest R[t][t] under seqft (want >= 0.8) and seqft's BWT (want between -0.8 and -0.3), with the
auxiliary (instruction-following) accuracy before the sequence and after it under seqft. No method under test is
run, and the test split is never looked at. Each point is a `python train.py` run in its own process; a (model,
instruction phase) pair shares one base model and its SAEs (out/calib_<model>_i<tags>/), trained first. Finished
runs are cached by train.py, so an interrupted map resumes where it stopped.

    python -m bench.calibrate                                         # the map below, two runs at a time
    python -m bench.calibrate --jobs=1                                # one process at a time
    python -m bench.calibrate --models=2x96 --instruct=0,32 --lrs=3e-4 --lora_lrs= --steps=200
    python -m bench.calibrate --jobs=8 --device=cuda --models=2x96,4x128,6x256   # a larger map on one GPU

    python -m bench.calibrate --suite=things --out_dir=out/things --multitask=0.8 --lost=0.2,0.8   # the second suite

Writes <out_dir>/calibrate.md and <out_dir>/calibrate.json.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cache
import configurator as cfg
import jobs
from evaluate import cl_metrics
from report import fmt

ROOT = cache.ROOT


def model_args(model):
    """'4x128' -> the train.py arguments of a 4-block, 128-wide model."""
    depth, width = model.split("x")
    return [f"--n_layer={depth}", f"--n_embd={width}"]


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


def read_point(folder, seeds, targets):
    """The criteria of one map point from its seqft and multitask results, mean over seeds; targets: the Options
    holding the thresholds."""
    per_seed = []
    for seed in seeds:
        with open(os.path.join(folder, f"seqft_seed{seed}.json")) as f:
            seqft = json.load(f)
        with open(os.path.join(folder, f"multitask_seed{seed}.json")) as f:
            multitask = json.load(f)
        R = seqft["R"]
        last = seqft["diagnostic"][-1] if seqft.get("diagnostic") else {}  # after the last task, on each earlier one
        per_seed.append({"multitask": multitask["R"][-1], "bwt": cl_metrics(R)["bwt"],
                         "diagonal": [R[t + 1][t] for t in range(len(seqft["tasks"]))],
                         "final": R[-1], "aux": seqft["aux_accuracy"],
                         "confusion": sum(d["format_confusion"] for d in last.values()) / len(last) if last else None})
    mean = lambda key: [sum(v) / len(seeds) for v in zip(*(r[key] for r in per_seed))]  # noqa: E731
    row = {"tasks": seqft["tasks"], "multitask_per_task": mean("multitask"), "seqft_diagonal": mean("diagonal"),
           "seqft_final": mean("final"), "seqft_bwt": sum(r["bwt"] for r in per_seed) / len(seeds),
           "seqft_aux": mean("aux") if per_seed[0]["aux"] else [],
           "seqft_format_confusion": None if per_seed[0]["confusion"] is None else
           sum(r["confusion"] for r in per_seed) / len(seeds)}
    row["multitask_avg"] = sum(row["multitask_per_task"]) / len(row["multitask_per_task"])
    least, most = targets.lost
    row["fits"] = (row["multitask_avg"] >= targets.multitask and min(row["seqft_diagonal"]) >= targets.diagonal
                   and -most <= row["seqft_bwt"] <= -least)
    return row


@dataclass
class Options:
    # bench/calibrate.py: the map's axes (any other key is the pipeline's, for every train.py run: --jobs of them
    # run at once, one thread each)
    models: tuple[str, ...] = ("2x96", "4x128")  # depth x width
    instruct: tuple[int, ...] = (0, 8, 32)  # auxiliary tags of the base
    lrs: tuple[float, ...] = (1e-4, 3e-4)  # cl_lr of full fine-tuning
    lora_lrs: tuple[float, ...] = (1e-3,)  # cl_lr of LoRA (empty = no LoRA)
    lora_ranks: tuple[int, ...] = (8,)  # LoRA ranks
    steps: tuple[int, ...] = (200,)  # steps per task
    # the targets a point must meet ('fits'); the knowledge suite's (--suite=things): --multitask=0.8 --lost=0.2,0.8
    multitask: float = 0.9  # multitask's average accuracy at least this
    diagonal: float = 0.8  # seqft's smallest R[t][t] at least this
    lost: tuple[float, ...] = (0.3, 0.8)  # seqft's BWT between minus these (low,high: -0.8 <= BWT <= -0.3)
    AT_LEAST_ZERO = ("instruct",)


def main(argv):
    parsed = cfg.parse_script_args(argv, Options, "python -m bench.calibrate", __doc__)
    if parsed is None:
        return 0
    args, passthrough = parsed
    config = cfg.parse_args(passthrough)
    for model in args.models:
        if not re.fullmatch(r"\d+x\d+", model):
            raise ValueError(f"--models: {model!r} is not depth x width (e.g. 4x128)")
    if len(args.lost) != 2 or args.lost[0] > args.lost[1]:
        raise ValueError(f"--lost={','.join(map(str, args.lost))}: give the range as low,high (e.g. 0.3,0.8)")
    args.jobs, args.device, args.out_dir = config.jobs, config.device, config.out_dir
    seeds = cfg.parse_args(passthrough).seeds
    env = dict(os.environ, OMP_NUM_THREADS="1" if args.jobs > 1 else os.environ.get("OMP_NUM_THREADS", ""))
    env = {k: v for k, v in env.items() if v != ""}
    common = [f"--device={args.device}", f"--out_dir={args.out_dir}", "--eval_split=val", *passthrough, "--jobs=1"]
    t0 = time.time()

    bases = list(itertools.product(args.models, args.instruct))
    run = {(m, i): f"calib_{m}_i{i}" for m, i in bases}
    regimes = [("full", 0, lr) for lr in args.lrs] + [("lora", r, lr) for r in args.lora_ranks for lr in args.lora_lrs]
    grid = [(m, i, f, r, lr, s) for m, i in bases for f, r, lr in regimes for s in args.steps]

    def base_args(m, i):
        return [*common, f"--run={run[m, i]}", *model_args(m), f"--instruct_tags={i}"]

    def cl_dir(f, r, lr, s):
        return f"calib/{f}{r or ''}_lr{lr:g}_steps{s}"

    # 1. a base model and SAEs per (model, instruction phase); the cl runs below share them
    base_jobs = [([*base_args(m, i), "--stage=sae"], os.path.join(args.out_dir, run[m, i])) for m, i in bases]
    # 2. seqft and multitask at every point of the map
    cl_jobs = [([*base_args(m, i), f"--finetune={f}", f"--lora_rank={r or 8}", f"--cl_lr={lr}",
                 f"--steps_per_task={s}", "--methods=seqft,multitask", f"--cl_dir={cl_dir(f, r, lr, s)}"],
                os.path.join(args.out_dir, run[m, i], cl_dir(f, r, lr, s))) for m, i, f, r, lr, s in grid]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda a: run_train(a, env), base_jobs))
        list(pool.map(lambda a: run_train(a, env), cl_jobs))

    rows = []
    for m, i, f, r, lr, s in grid:
        folder = os.path.join(args.out_dir, run[m, i], cl_dir(f, r, lr, s))
        rows.append({"model": m, "instruct_tags": i, "finetune": f"lora r{r}" if f == "lora" else f, "cl_lr": lr,
                     "steps_per_task": s, "seeds": seeds, **read_point(folder, seeds, args)})
    cache.save_json({"rows": rows, "seconds": time.time() - t0, "argv": argv}, os.path.join(args.out_dir,
                                                                                          "calibrate.json"))
    tasks = rows[0]["tasks"]
    lines = [f"Command: `python -m bench.calibrate {' '.join(argv)}` ({time.time() - t0:.0f} s). "
             f"Accuracy on the val split, mean over seeds {seeds}. Targets: multitask avg >= {args.multitask}, seqft "
             f"min R[t][t] >= {args.diagonal}, seqft BWT between -{args.lost[1]} and -{args.lost[0]} (fits: all "
             "three). "
             "Format confusion: the share of the earlier tasks' greedy answers in the last task's format and not "
             "their own, after the sequence (the forgetting diagnostic). Auxiliary accuracy: held-out prompts of the "
             "instruction phase's tasks, before the sequence -> after it under seqft.", "",
             "| model | instruct tags | fine-tuning | cl_lr | steps/task | multitask avg | seqft min R[t][t] | "
             "seqft BWT | seqft format confusion | fits | auxiliary acc. | seqft final row (" + ", ".join(tasks)
             + ") |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        aux = f"{r['seqft_aux'][0]:.2f} -> {r['seqft_aux'][-1]:.2f}" if r["seqft_aux"] else "-"
        lines.append(f"| {r['model']} | {r['instruct_tags']} | {r['finetune']} | {r['cl_lr']:g} | "
                     f"{r['steps_per_task']} | {r['multitask_avg']:.3f} | {min(r['seqft_diagonal']):.2f} | "
                     f"{r['seqft_bwt']:.3f} | {fmt(r['seqft_format_confusion'])} | {'yes' if r['fits'] else 'no'} | "
                     f"{aux} | "
                     + " ".join(f"{a:.2f}" for a in r["seqft_final"]) + " |")
    cache.save_text("\n".join(lines) + "\n", os.path.join(args.out_dir, "calibrate.md"))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
