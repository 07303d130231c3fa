"""
Metrics, plots and the report.

- Task accuracy: exact match of the greedy-decoded answer.
- Continual-learning metrics from the accuracy matrix R, where R[t][i] is the accuracy on task i after training
  task t (row 0: before any task): OP, plasticity, BWT, forgetting.
- SAE metrics on held-out text: L0, FVU, explained variance, dead fraction, cosine(x, xhat), CE increase when a
  reconstruction is spliced into the model, compound CE increase with every point spliced at once.
- Plots (PNG) and a markdown report. `python evaluate.py out/<run>` rebuilds the report from the saved JSON.
"""

import json
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt
import torch

from data.tasks import format_example
from data.tokenizer import NEWLINE, decode, encode

# ----------------------------------------------------------------------------------------------------------------
# task accuracy


@torch.no_grad()
def task_accuracy(model, split, device, max_answer_len=12):
    """Exact-match accuracy of greedy decoding on a TaskSplit.

    Prompts of equal length are decoded together as one batch (no padding, so no attention mask is needed)."""
    was_training = model.training
    model.eval()
    by_length = defaultdict(list)
    for question, answer in split.examples:
        prompt, _ = format_example(question, answer)
        by_length[len(prompt)].append((prompt, answer))
    correct = 0
    for group in by_length.values():
        idx = torch.tensor([encode(prompt) for prompt, _ in group], device=device)
        out = model.generate(idx, max_answer_len + 1, stop_token=NEWLINE)[:, idx.size(1) :]
        for row, (_, answer) in zip(out.tolist(), group):
            correct += decode(row).split("\n")[0] == answer
    model.train(was_training)
    return correct / len(split.examples)


# ----------------------------------------------------------------------------------------------------------------
# SAE metrics


def l0(z):
    """Mean number of nonzero latents per token: (1/N) sum_n |{j : z_nj != 0}|."""
    return (z != 0).float().sum(-1).mean().item()


def fvu(x, xhat):
    """Fraction of variance unexplained: sum ||x - xhat||^2 / sum ||x - mean(x)||^2 (a ratio of sums)."""
    return ((x - xhat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


@torch.no_grad()
def sae_metrics(model, saes, ids, block_size, device, n_batches=20, batch_size=32, seed=1234):
    """Metrics of {point: sae} on fixed random windows of held-out ids.

    Per point: L0, FVU, explained variance (1 - FVU), dead fraction (latents that never fire on these tokens),
    mean cosine(x, xhat), and CE increase = CE(model with that point's reconstruction spliced in) - CE(model).
    For the whole set: compound CE increase, every point spliced at once (each SAE reads the already-patched
    stream). Losses are in nats per token."""
    from data.corpus import get_batch

    model.eval()
    points = sorted(saes)
    generator = torch.Generator().manual_seed(seed)
    acc = {p: {"sq_err": 0.0, "sum_x": 0.0, "sum_x2": 0.0, "n": 0, "l0": 0.0, "cos": 0.0, "ce": 0.0,
               "fired": torch.zeros(saes[p].config.d_sae, dtype=torch.bool, device=device)} for p in points}
    clean_ce = compound_ce = 0.0
    for _ in range(n_batches):
        x, y = get_batch(ids, batch_size, block_size, generator, device)
        _, loss, residuals = model(x, y, read=points)
        clean_ce += loss.item()
        compound_ce += model(x, y, patch=dict(saes))[1].item()
        for p in points:
            sae, a = saes[p], acc[p]
            act = residuals[p].reshape(-1, residuals[p].size(-1)).double()
            z = sae.encode(act.float())
            xhat = (sae.decode(z) / sae.input_scale).double()
            a["sq_err"] += (act - xhat).pow(2).sum().item()
            a["sum_x"] = a["sum_x"] + act.sum(0)
            a["sum_x2"] += act.pow(2).sum().item()
            a["n"] += act.size(0)
            a["l0"] += (z != 0).float().sum(-1).sum().item()
            a["cos"] += torch.nn.functional.cosine_similarity(act, xhat, dim=-1).sum().item()
            a["fired"] |= (z > 0).any(0)
            a["ce"] += model(x, y, patch={p: sae})[1].item()
    results = {"clean_ce": clean_ce / n_batches, "compound_ce_increase": (compound_ce - clean_ce) / n_batches,
               "total_l0": 0.0, "points": {}}
    for p in points:
        a = acc[p]
        # sum ||x - mean||^2 = sum ||x||^2 - N ||mean||^2
        total_var = a["sum_x2"] - (a["sum_x"].pow(2).sum() / a["n"]).item()
        point = {"l0": a["l0"] / a["n"], "fvu": a["sq_err"] / total_var, "cos": a["cos"] / a["n"],
                 "dead_fraction": 1.0 - a["fired"].float().mean().item(),
                 "ce_increase": (a["ce"] - clean_ce) / n_batches}
        point["explained_variance"] = 1.0 - point["fvu"]
        results["points"][p] = point
        results["total_l0"] += point["l0"]
    return results


def plot_sae_metrics(results, run_dir):
    """sae_metrics.png: L0, FVU, dead fraction and CE increase per point (first k); with several k, also
    sae_k_sweep.png: CE increase against L0 per point, and FVU against k."""
    ks = list(results["by_k"])
    first = results["by_k"][ks[0]]["points"]
    points = list(first)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, (key, title) in zip(axes, [("l0", "L0"), ("fvu", "FVU"), ("dead_fraction", "dead fraction"),
                                       ("ce_increase", "CE increase (nats)")]):
        ax.bar([str(p) for p in points], [first[p][key] for p in points], color="tab:blue")
        ax.set_title(title)
        ax.set_xlabel("residual point")
    fig.suptitle(f"TopK SAEs, k={ks[0]}, held-out base-corpus text")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "sae_metrics.png"), dpi=120)
    plt.close(fig)
    if len(ks) < 2:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for p in points:
        l0s = [results["by_k"][k]["points"][p]["l0"] for k in ks]
        ce = [results["by_k"][k]["points"][p]["ce_increase"] for k in ks]
        ax1.plot(l0s, ce, "o-", label=f"point {p}")
        ax2.plot([int(k) for k in ks], [results["by_k"][k]["points"][p]["fvu"] for k in ks], "o-", label=f"point {p}")
    ax1.set(xscale="log", xlabel="L0", ylabel="CE increase (nats)", title="CE increase vs L0")
    ax2.set(xscale="log", yscale="log", xlabel="k", ylabel="FVU", title="FVU vs k")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "sae_k_sweep.png"), dpi=120)
    plt.close(fig)
