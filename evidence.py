"""
Measurements behind the paper's thesis that are not benchmark scores: what each continual-learning method keeps
between tasks as the model grows.

    python evidence.py                     # retained bytes per method at widths 48, 96, 192, 384, full and LoRA: out/evidence/

Memory is measured from the methods' own state (`Method.retained()`), never from a formula: each method runs its
task hooks over a sequence of tasks on a model of the given width (no training steps are needed for the size of
what it keeps), and the bytes of every tensor it holds afterwards are counted. The SAEs are fresh ones of the
width the pipeline would train (sae_expansion * n_embd): their size, not their quality, is what is measured here.
"""

import dataclasses
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from data.tasks import build_task_suite  # noqa: E402
from data.tokenizer import VOCAB_SIZE  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from regularizers import METHODS, tensor_bytes  # noqa: E402
from sae import SAEConfig, TopKSAE  # noqa: E402


def retained_bytes(name, config, model, saes, splits):
    """Bytes method `name` keeps after the tasks in `splits` (a list of TaskSplits): its hooks before and after each
    task, in order, on `model` (with LoRA adapters added first under finetune=lora), then tensor_bytes(retained)."""
    if config.finetune == "lora":
        model.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
    method = METHODS[name](config, model, saes, seed=0)
    for t, split in enumerate(splits):
        method.before_task(model, split, t)
        method.after_task(model, split, t)
    return tensor_bytes(method.retained())


def memory_by_width(config, widths, regimes=("full", "lora"), methods=None, n_tasks=None):
    """[{regime, width, n_params, method: bytes, ...}]: retained bytes after the config's task sequence (its first
    n_tasks tasks) for each model width (n_layer and n_head of the config) and fine-tuning regime."""
    methods = [m for m in (methods or METHODS) if not METHODS[m].joint]  # multitask has no "between tasks"
    tasks = config.tasks[: n_tasks or len(config.tasks)]
    suite = build_task_suite(tasks, config.n_train, config.n_val, config.n_test, seed=0, block_size=config.block_size)
    splits = [suite[task]["train"] for task in tasks]
    rows = []
    for regime in regimes:
        for width in widths:
            run_config = dataclasses.replace(config, finetune=regime, n_embd=width)
            row = {"regime": regime, "width": width}
            for name in methods:
                torch.manual_seed(0)
                model = GPT(GPTConfig(vocab_size=VOCAB_SIZE, block_size=config.block_size, n_layer=config.n_layer,
                                      n_head=config.n_head, n_embd=width, bias=config.bias))
                row["n_params"] = model.num_params()
                points = range(1, config.n_layer + 1)
                saes = {p: TopKSAE(SAEConfig(width, config.sae_expansion * width, config.sae_k[0]))
                        for p in points}
                row[name] = retained_bytes(name, run_config, model, saes, splits)
            rows.append(row)
    return rows


def plot_memory(rows, path):
    """Retained bytes against model parameters, log-log, one panel per regime and one line per method."""
    regimes = sorted({r["regime"] for r in rows}, key=["full", "lora"].index)
    methods = [k for k in rows[0] if k not in ("regime", "width", "n_params")]
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False, sharey=True)
    for ax, regime in zip(axes[0], regimes):
        mine = [r for r in rows if r["regime"] == regime]
        for name in methods:
            sizes = [(r["n_params"], r[name]) for r in mine if r[name] > 0]
            if sizes:
                ax.plot(*zip(*sizes), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model parameters (widths " + ", ".join(str(r["width"]) for r in mine) + ")")
        ax.set_title(f"{regime} fine-tuning" if regime == "full" else "LoRA adapters")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("bytes kept between tasks (after the whole sequence)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory_table(rows):
    methods = [k for k in rows[0] if k not in ("regime", "width", "n_params")]
    lines = ["| regime | width | parameters | " + " | ".join(methods) + " |", "|---" * (len(methods) + 3) + "|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['width']} | {r['n_params']:,} | "
                     + " | ".join(f"{r[m]:,}" for m in methods) + " |")
    return "\n".join(lines)


def main(argv):
    import train

    config = train.parse_args(["--ewc_fisher_examples=8", "--mas_examples=8", "--sae_guided_mask_examples=32"] + argv)
    out_dir = os.path.join(config.out_dir, "evidence")
    os.makedirs(out_dir, exist_ok=True)
    rows = memory_by_width(config, widths=(48, 96, 192, 384))
    with open(os.path.join(out_dir, "memory.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot_memory(rows, os.path.join(out_dir, "memory.png"))
    print(memory_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
