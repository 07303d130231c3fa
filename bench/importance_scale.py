"""
The scale and spread of each weight-space importance (EWC's Fisher, SI's path integral, MAS's output sensitivity)
after one task learned from the base model: the numbers behind the placement of bench/tune.py's grids.

    python -m bench.importance_scale             # the default run's base model, the first task of --tasks
    python -m bench.importance_scale --run=default --tasks=add

Prints, per method, the mean, the median and the largest w_i, and the share of the total importance held by the
top 1% of the weights (how concentrated it is).
"""

import sys

import torch

import configurator as cfg
import jobs
import train
from jobs import progress
from model import model_from_checkpoint
from pretrain import pretrain
from regularizers import METHODS


def main(argv):
    args = cfg.parse_script_args(argv, cfg.NoOptions, "python -m bench.importance_scale", __doc__)
    if args is None:
        return 0
    config = cfg.parse_args(args[1])
    device = cfg.resolve_device(config)
    base = pretrain(config, device)
    split = train.task_suite(config)[config.tasks[0]]["train"]
    print(f"| importance after learning {config.tasks[0]} | mean w | median w | max w | top 1% of weights hold |")
    print("|---|---|---|---|---|")
    for name in ("ewc", "si", "mas"):
        model = model_from_checkpoint(base, device)
        method = METHODS[name](config, model, None, config.seeds[0])
        with progress(total=config.steps_per_task, desc=name) as bar:
            method.before_task(model, split, 0)
            train.train_steps(model, split, config.steps_per_task, method, config=config, device=device,
                              generator=torch.Generator().manual_seed(config.seeds[0]), bar=bar)
            method.after_task(model, split, 0)
        w = method.anchors[0]["importance"].double()
        top = w.sort(descending=True).values[: max(1, len(w) // 100)].sum() / w.sum()
        print(f"| {name} | {w.mean():.2e} | {w.median():.2e} | {w.max():.2e} | {top:.0%} |")


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
