"""
1. Separability: can a linear probe tell two tasks' inputs apart in each basis (SAE features, MLP neurons,
the residual stream, gradient importance of the weights)? The per-example representations and the analysis.
"""


import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from data.tasks import trim_padding
from evidence import save_figure
from evidence.probe import best_unit_auc, cv_auc
from jobs import progress


@torch.no_grad()
def example_features(model, saes, x, mask, batch_size=128):
    """Per example, the mean over its positions where mask (N, T) is 1 of: the SAE codes z ('sae', (N, d_sae)),
    the MLP neurons gelu(c_fc x) of the block that writes the point ('neurons', (N, 4 C)) and the residual stream
    ('residual', (N, C)); each {point: tensor}. The neurons of point p are those of block p (a point after a block)."""
    points = sorted(saes)
    neurons, hooks = {}, []
    for p in points:
        if p > 0:
            hooks.append(model.blocks[p - 1].mlp.c_fc.register_forward_hook(
                lambda module, inputs, output, p=p: neurons.__setitem__(p, F.gelu(output))))
    features = {"sae": {p: [] for p in points}, "neurons": {p: [] for p in points if p > 0},
                "residual": {p: [] for p in points}}
    try:
        for start in range(0, len(x), batch_size):
            m = mask[start : start + batch_size].float()
            count = m.sum(1, keepdim=True).clamp(min=1)
            _, _, residuals = model(x[start : start + batch_size], read=points)
            for p in points:
                features["residual"][p].append((residuals[p] * m.unsqueeze(-1)).sum(1) / count)
                features["sae"][p].append((saes[p].encode(residuals[p]) * m.unsqueeze(-1)).sum(1) / count)
                if p > 0:
                    features["neurons"][p].append((neurons[p] * m.unsqueeze(-1)).sum(1) / count)
    finally:
        for hook in hooks:
            hook.remove()
    return {basis: {p: torch.cat(chunks) for p, chunks in by_point.items()} for basis, by_point in features.items()}


def gradient_importance(model, split, point):
    """(N, n_weights): per example, the squared gradient of its answer cross-entropy with respect to the MLP weights
    of the block that writes the point, (d CE_n / d theta_i)^2 -- the per-example Fisher that EWC sums, in the
    weight basis."""
    mlp = model.blocks[point - 1].mlp
    weights = [mlp.c_fc.weight, mlp.c_proj.weight]
    rows = []
    for i in range(len(split)):
        batch = trim_padding(split.rows(slice(i, i + 1)))
        _, ce, _ = model(batch.x, batch.y, batch.answer_mask)
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(ce, weights)]).square())
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# 1. separability: can a linear probe tell two tasks' inputs apart, in each basis?


def separability(model, saes, suite, tasks, n_examples=100, seed=0):
    """{'pairs': [[a, b], ...], 'auc': {basis: {point: [cross-validated AUC of each pair]}}, 'unit_auc': the same
    for the best single unit of the basis (best_unit_auc)} for every pair of tasks: the probe tells task a's
    training inputs from task b's, features averaged over the content tokens without the template (no tag, no
    ' > ': the probe must read the task's own text). Bases: SAE features, MLP neurons, and per-example gradient
    importance of the MLP weights (the weight basis EWC protects in)."""
    model.eval()
    n_examples = min([n_examples] + [len(suite[task]["train"]) for task in tasks])  # as many of each task
    features = {}
    for task in tasks:
        split = suite[task]["train"].subset(torch.arange(n_examples))
        basis = example_features(model, saes, split.x, split.content_mask)
        basis["gradient"] = {p: gradient_importance(model, split, p) for p in saes if p > 0}
        features[task] = basis
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    labels = torch.cat([torch.zeros(n_examples), torch.ones(n_examples)])
    result = {"pairs": pairs, "auc": {}, "unit_auc": {}}
    for name in ("sae", "neurons", "gradient"):
        result["auc"][name], result["unit_auc"][name] = {}, {}
        for p in features[tasks[0]][name]:
            aucs, unit_aucs = [], []
            for a, b in progress(pairs, desc=f"separability {name} point {p}", leave=False):
                X = torch.cat([features[a][name][p], features[b][name][p]])
                aucs.append(cv_auc(X, labels, seed=seed))
                unit_aucs.append(best_unit_auc(X, labels, seed=seed)[0])
            result["auc"][name][p], result["unit_auc"][name][p] = aucs, unit_aucs
    return result


BASIS_NAMES = {"sae": "SAE features", "neurons": "MLP neurons", "gradient": "gradient importance (weights)",
               "residual": "residual stream (probe)"}


def plot_separability(result, path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    bases = list(result["auc"])
    points = list(result["auc"][bases[0]])
    width = 0.8 / len(points)
    for ax, key, title in zip(axes, ("auc", "unit_auc"), ("a linear probe on the whole basis",
                                                           "the best single unit of the basis")):
        for j, p in enumerate(points):
            aucs = [torch.tensor(result[key][b][p]) for b in bases]
            means = [a.mean().item() for a in aucs]
            low = [m - a.min().item() for m, a in zip(means, aucs)]
            high = [a.max().item() - m for m, a in zip(means, aucs)]
            ax.bar([i + (j - (len(points) - 1) / 2) * width for i in range(len(bases))], means, width,
                   yerr=[low, high], capsize=3, label=f"point {p}")
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(range(len(bases)), [BASIS_NAMES[b] for b in bases], fontsize=8)
        ax.set_ylim(0.4, 1.02)
        ax.set_title(f"Tell two tasks' inputs apart with {title}", fontsize=10)
    axes[0].set_ylabel(f"held-out AUC\n(mean over {len(result['pairs'])} task pairs, bars: min to max)")
    axes[0].legend(fontsize=8, loc="lower left")
    save_figure(fig, path)


def separability_table(result):
    lines = ["| basis | point | probe: mean AUC | min | best single unit: mean AUC | min |",
             "|---|---|---|---|---|---|"]
    for name, by_point in result["auc"].items():
        for p, aucs in by_point.items():
            units = result["unit_auc"][name][p]
            lines.append(f"| {BASIS_NAMES[name]} | {p} | {sum(aucs) / len(aucs):.3f} | {min(aucs):.3f} | "
                         f"{sum(units) / len(units):.3f} | {min(units):.3f} |")
    return "\n".join(lines)
