"""
What the measuring passes of one continual-learning run cost under the run's settings: one row of the accuracy
matrix R (every task's eval split) and forced choice with its question-blind control, one thread, best of a few
rounds; under LoRA, with the adapters folded into the weight (model.LoRALinear.fold, the default)
and without. The adapters are given random nonzero B, as after training (the time does not depend on the values).
Then what a sequence measures before its first task (train.start_measures: R's first row on both splits, the
auxiliary accuracy, the LM loss), which a worker process measures once per setting, not once per sequence.

    python -m bench.eval_cost --preset=paper --run=paper
"""

import sys
import time

import torch

import configurator as cfg
import evaluate
import jobs
import train
from model import LoRALinear
from pretrain import corpus_of, pretrain

ROUNDS = 3


def best_seconds(fn):
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv):
    args = cfg.parse_script_args(argv, cfg.NoOptions, "python -m bench.eval_cost", __doc__)
    if args is None:
        return 0
    torch.set_num_threads(1)
    config = cfg.parse_args(args[1])
    base = pretrain(config, cfg.resolve_device(config))
    suite = train.task_suite(config)
    model = train.start_model(base, config, "cpu", seed=0)
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.B.normal_(0, 0.01)
    passes = {"one row of R": lambda: train.evaluate_tasks(model, suite, config, "cpu"),
              "forced choice and its control": lambda: evaluate.forced_choice(
                  model, suite, config.tasks, config.eval_split, "cpu", config.forced_choice_k)}
    try:
        for fold in ((True, False) if model.has_adapters() else (True,)):
            LoRALinear.fold = fold
            label = ("adapters folded: " if fold else "adapters as thin products: ") if model.has_adapters() else ""
            print(label + ", ".join(f"{name} {best_seconds(fn):.3f} s" for name, fn in passes.items()))
    finally:
        LoRALinear.fold = True
    start, lm_val_ids = train.start_model(base, config, "cpu", seed=0), corpus_of(config)[1]

    def start_measures():
        train.START_MEASURES.clear()  # measured afresh each round
        train.start_measures(start, config=config, device="cpu", base=base, suite=suite, lm_val_ids=lm_val_ids)
    print(f"a sequence's start measures {best_seconds(start_measures):.3f} s (once per worker and setting)")
    return 0


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
