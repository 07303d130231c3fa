"""
4. Memory: what each method keeps between tasks, measured from its own state, as the model grows.
"""

import dataclasses

import matplotlib.pyplot as plt
import torch

import regularizers as reg
from data.tasks import build_task_suite
from data.tokenizer import VOCAB_SIZE
from evidence import save_figure
from jobs import progress
from model import GPT, GPTConfig
from sae import SAEConfig, TopKSAE


MEMORY_WIDTHS = (24, 48, 96, 192)  # the default model is 96 wide


def retained_bytes(name, config, model, saes, splits):
    """Bytes method `name` keeps after the tasks in `splits` (a list of TaskSplits): its hooks before and after each
    task, in order, on `model` (with LoRA adapters added first under finetune=lora), then tensor_bytes(retained).
    No training step is needed for the size of what a method keeps."""
    if config.finetune == "lora":
        model.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
    method = reg.METHODS[name](config, model, saes, seed=0)
    for t, split in enumerate(splits):
        method.before_task(model, split, t)
        method.after_task(model, split, t)
    return reg.tensor_bytes(method.retained())


def memory_by_width(config, widths, regimes=("full", "lora"), methods=None, n_tasks=None):
    """[{regime, width, n_params, method: bytes, ...}]: retained bytes after the config's task sequence (its first
    n_tasks tasks) for each model width (n_layer and n_head of the config) and fine-tuning regime. The SAEs are fresh
    ones of the width the pipeline would train (sae_expansion * n_embd): their size, not their quality, matters."""
    methods = [m for m in (methods or reg.METHODS) if not reg.METHODS[m].joint]  # multitask has no "between tasks"
    tasks = config.tasks[: n_tasks or len(config.tasks)]
    suite = build_task_suite(tasks, config.n_train, config.n_val, config.n_test, seed=0, block_size=config.block_size)
    splits = [suite[task]["train"] for task in tasks]
    rows = []
    for regime in regimes:
        for width in widths:
            run_config = dataclasses.replace(config, finetune=regime, n_embd=width)
            row = {"regime": regime, "width": width}
            for name in progress(methods, desc=f"memory {regime} width {width}", leave=False):
                torch.manual_seed(0)
                model = GPT(GPTConfig(vocab_size=VOCAB_SIZE, block_size=config.block_size, n_layer=config.n_layer,
                                      n_head=config.n_head, n_embd=width, dropout=0.0, bias=config.bias))
                row["n_params"] = model.num_params()
                points = config.sae_points or range(1, config.n_layer + 1)
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
        for i, name in enumerate(methods):  # markers and dashes tell apart the lines that coincide (SI, MAS)
            sizes = [(r["n_params"], r[name]) for r in mine if r[name] > 0]
            if sizes:
                ax.plot(*zip(*sizes), marker="osD^v<>p*"[i % 9], linestyle="-" if i % 2 else "--", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model parameters (widths " + ", ".join(str(r["width"]) for r in mine) + ")")
        ax.set_title(f"{regime} fine-tuning" if regime == "full" else "LoRA adapters")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("bytes kept between tasks (after the whole sequence)")
    axes[0][-1].legend(fontsize=8)
    save_figure(fig, path)


def memory_table(rows):
    methods = [k for k in rows[0] if k not in ("regime", "width", "n_params")]
    lines = ["| regime | width | parameters | " + " | ".join(methods) + " |", "|---" * (len(methods) + 3) + "|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['width']} | {r['n_params']:,} | "
                     + " | ".join(f"{r[m]:,}" for m in methods) + " |")
    return "\n".join(lines)
