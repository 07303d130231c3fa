"""
3. Ground truth: do single SAE features track the tiny world's latent variables (which the paper cannot
have)?
"""


import matplotlib.pyplot as plt
import torch

from data.tokenizer import NEWLINE, encode
from data.world import generate_lines
from evidence import save_figure
from evidence.probe import best_unit_auc, cv_auc
from evidence.separability import example_features
from jobs import progress


VARIABLES = {"person": "fact", "pet": "fact", "colour": "fact", "place": "fact", "mood": "mood", "digit": "sum"}


def latent_lines(n_lines, seed):
    """(texts, {variable: [value or None per line]}): corpus lines with the generator's latent variables; 'digit'
    is the first operand of a sum line."""
    lines = generate_lines(n_lines, seed)
    texts = [text for text, _ in lines]
    values = {v: [] for v in VARIABLES}
    for _, latents in lines:
        for variable, kind in VARIABLES.items():
            key = "a" if variable == "digit" else variable
            values[variable].append(latents.get(key) if latents["kind"] == kind else None)
    return texts, values


def ground_truth(model, saes, n_lines=4000, seed=99, device="cpu"):
    """{variable: {point: {basis: AUC}}}: for each value of each variable, one against the others among the lines
    that have the variable, the held-out AUC of the best single SAE feature and of the best single MLP neuron
    (best_unit_auc), and the cross-validated AUC of a probe on the residual stream; each the mean over values."""
    texts, values = latent_lines(n_lines, seed)
    texts = [text[: model.config.block_size] for text in texts]  # a line longer than the model reads: its start
    length = max(len(t) for t in texts)
    x = torch.full((len(texts), length), NEWLINE, dtype=torch.long)
    mask = torch.zeros(len(texts), length)
    for i, text in enumerate(texts):
        x[i, : len(text)] = torch.tensor(encode(text))
        mask[i, : len(text)] = 1.0
    model.eval()
    features = example_features(model, saes, x.to(device), mask.to(device))
    result = {}
    for variable in progress(VARIABLES, desc="ground truth"):
        has = torch.tensor([v is not None for v in values[variable]])
        line_values = [v for v in values[variable] if v is not None]
        result[variable] = {}
        for p in sorted(saes):
            scores = {"sae": [], "neurons": [], "residual": []}
            for value in sorted(set(line_values), key=str):
                labels = torch.tensor([v == value for v in line_values])
                scores["sae"].append(best_unit_auc(features["sae"][p][has].cpu(), labels)[0])
                scores["neurons"].append(best_unit_auc(features["neurons"][p][has].cpu(), labels)[0])
                scores["residual"].append(cv_auc(features["residual"][p][has].cpu(), labels))
            result[variable][p] = {basis: sum(s) / len(s) for basis, s in scores.items()}
            result[variable][p]["values"] = len(scores["sae"])
            result[variable][p]["lines"] = int(has.sum())
    return result


def plot_ground_truth(result, path):
    points = list(next(iter(result.values())))
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4), sharey=True, squeeze=False)
    bases = ("sae", "neurons", "residual")
    names = {"sae": "best single SAE feature", "neurons": "best single MLP neuron", "residual": "residual probe"}
    for ax, p in zip(axes[0], points):
        for j, basis in enumerate(bases):
            ax.bar([i + (j - 1) * 0.27 for i in range(len(result))], [result[v][p][basis] for v in result], 0.27,
                   label=names[basis])
        ax.set_xticks(range(len(result)), list(result))
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(0.4, 1.02)
        ax.set_title(f"point {p}: the world's variables, one value against the rest")
    axes[0][0].set_ylabel("held-out AUC (mean over the values)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    save_figure(fig, path)


def ground_truth_table(result):
    points = list(next(iter(result.values())))
    header = " | ".join(f"point {p}: SAE feature | neuron | residual probe" for p in points)
    lines = [f"| variable | values (lines) | {header} |", "|---|---" + "|---|---|---" * len(points) + "|"]
    for variable, by_point in result.items():
        first = by_point[points[0]]
        lines.append(f"| {variable} | {first['values']} ({first['lines']}) | " + " | ".join(
            f"{by_point[p]['sae']:.3f} | {by_point[p]['neurons']:.3f} | {by_point[p]['residual']:.3f}"
            for p in points) + " |")
    return "\n".join(lines)
