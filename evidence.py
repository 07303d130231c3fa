"""
The analyses behind the paper's thesis, beyond benchmark scores, in the tiny setting: is a task visible in the
SAE's features and not in the weights (separability), does protecting a task in weight space also hold back what
the next task needs (collateral constraint), do SAE features line up with the world's true variables (ground truth,
which the paper cannot have), what does each method keep between tasks as the model grows (memory), and which
parts of SAE-guided regularization matter (ablations).

    python evidence.py --jobs=2                            # all five on the default run; ablations and collateral
                                                           # over seeds 0-2
    python evidence.py --parts=separability,ground_truth   # some of them (separability, collateral, ground_truth,
                                                           # memory, ablations); other keys: the pipeline's

The base model and SAEs are the pipeline's own (pretrain.pretrain, train.train_sae_stage: reused when cached); the
ablation runs are cached like any continual-learning run, under out/<run>/evidence_<variant>/, and go on in a
process of their own (with its --jobs workers) while the other analyses run, each on one thread. Results go to
out/<run>/evidence/ as <part>.json and <part>.png, with the tables in evidence.md.
"""

import copy
import dataclasses
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.utils import vector_to_parameters  # noqa: E402

import cache
import configurator as cfg  # noqa: E402
import jobs
import regularizers as reg  # noqa: E402
import report  # noqa: E402
import train  # noqa: E402
from jobs import progress  # noqa: E402
from data.tasks import build_task_suite, trim_padding  # noqa: E402
from data.tokenizer import NEWLINE, VOCAB_SIZE, encode  # noqa: E402
from data.world import generate_lines  # noqa: E402
from model import model_from_checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from pretrain import pretrain  # noqa: E402
from report import fmt, mean_std  # noqa: E402
from sae import SAEConfig, TopKSAE  # noqa: E402

PARTS = ("separability", "collateral", "ground_truth", "memory", "ablations")
MEMORY_WIDTHS = (24, 48, 96, 192)  # the default model is 96 wide


def save_figure(fig, path):
    fig.tight_layout()
    report.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# a linear probe and its score, written out (no scikit-learn)


def average_ranks(scores):
    """Ranks 1..n along dim 0 of scores, (n,) or (n, units) column by column, ties sharing the mean of their ranks:
    in sorted order, a value whose run of equal values spans positions start .. end - 1 (0-based) has `start`
    smaller values and `end` values <= it, so its rank is (start + 1 + end) / 2."""
    columns = scores.t() if scores.dim() == 2 else scores.unsqueeze(0)  # (units, n)
    ordered, order = columns.contiguous().sort(-1)  # contiguous: a sort along a strided dim is several times slower
    n = ordered.size(-1)
    position = torch.arange(n).expand_as(ordered)
    new_run = torch.ones_like(ordered, dtype=torch.bool)
    new_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # a run of equal values starts here
    start = torch.where(new_run, position, 0).cummax(-1).values
    run_ends = torch.ones_like(new_run)
    run_ends[:, :-1] = new_run[:, 1:]  # ... and the run ends here
    end = torch.where(run_ends, position + 1, n).flip(-1).cummin(-1).values.flip(-1)
    ranks = torch.empty_like(ordered, dtype=torch.float64).scatter_(-1, order, (start + end + 1).double() / 2.0)
    return ranks.t() if scores.dim() == 2 else ranks[0]


def auc(scores, labels):
    """Area under the ROC curve = P(score of a random positive > score of a random negative), a tie counting half:
    AUC = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)  (Mann-Whitney)."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    ranks = average_ranks(scores.double())
    return ((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def fit_logistic(X, y, l2=1e-2, max_iter=50, tol=1e-9):
    """(w, b) minimizing J = mean_i BCE(sigmoid(x_i w + b), y_i) + l2 ||w||^2; X (n, d) standardized.

    With more features than examples (the gradient basis has ~10^5), the minimizer lies in the span of the
    examples (the representer theorem: a component of w orthogonal to every x_i changes no logit and only adds to
    ||w||^2), so the problem is solved in an orthonormal basis of that span: from the Gram matrix K = X X^T =
    U diag(s^2) U^T, the examples' coordinates are Z = U diag(s), and w = X^T U diag(1/s) beta. Either way it is a
    small logistic regression (at most n + 1 unknowns), solved by Newton's method (newton_logistic)."""
    n, d = X.shape
    if d <= n:
        return newton_logistic(X, y, l2, max_iter, tol)
    eigenvalues, U = torch.linalg.eigh(X @ X.t())
    span = eigenvalues > 1e-10 * eigenvalues.max()  # standardizing centers X: its span has at most n - 1 dims
    U, s = U[:, span], eigenvalues[span].sqrt()
    beta, b = newton_logistic(U * s, y, l2, max_iter, tol)
    return X.t() @ (U @ (beta / s)), b


def newton_logistic(Z, y, l2, max_iter, tol):
    """(w, b) minimizing J = mean_i BCE(sigmoid(z_i w + b), y_i) + l2 ||w||^2 by Newton's method, theta = (w, b):
    gradient g = A^T (p - y) / n + 2 l2 P theta, Hessian H = A^T diag(p (1 - p)) A / n + 2 l2 P, with A = [Z, 1],
    p = sigmoid(A theta) and P the identity without the bias; each step theta -= t H^{-1} g, t halved until J
    falls enough (Armijo), until the step is below tol. J is convex, so this is its minimum."""
    n, m = Z.shape
    A = torch.cat([Z, torch.ones(n, 1, dtype=Z.dtype)], dim=1)
    y = y.to(Z.dtype)
    penalty = torch.ones(m + 1, dtype=Z.dtype)
    penalty[-1] = 0.0  # the bias is not penalized

    def objective(theta):
        return F.binary_cross_entropy_with_logits(A @ theta, y) + l2 * (penalty * theta.square()).sum()

    theta = torch.zeros(m + 1, dtype=Z.dtype)
    for _ in range(max_iter):
        p = torch.sigmoid(A @ theta)
        gradient = A.t() @ (p - y) / n + 2 * l2 * penalty * theta
        hessian = (A.t() * (p * (1 - p))) @ A / n + torch.diag(2 * l2 * penalty)
        step = torch.linalg.solve(hessian, gradient)
        t, current = 1.0, objective(theta)
        while objective(theta - t * step) > current - 0.25 * t * (gradient @ step) and t > 1e-8:
            t /= 2
        theta = theta - t * step
        if (t * step).abs().max() < tol:
            break
    return theta[:-1], theta[-1]


def stratified_folds(labels, folds, seed=0):
    """(n,) fold index of each example: each class shuffled and dealt round-robin, so every fold has both."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for value in (False, True):
        idx = torch.nonzero(labels.bool() == value).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        fold[idx] = torch.arange(len(idx)) % folds
    return fold


def cv_auc(X, labels, folds=5, seed=0, l2=1e-2):
    """The cross-validated AUC of a logistic-regression probe: for each fold, standardize with the other folds'
    mean and std, fit on them, score the fold; the mean of the folds' AUCs."""
    X, labels = X.double(), labels.bool()
    fold = stratified_folds(labels, folds, seed)
    aucs = []
    for k in range(folds):
        train, test = fold != k, fold == k
        X_train = X[train]
        variance, mean = torch.var_mean(X_train, dim=0)
        std = variance.sqrt().clamp(min=1e-8)
        w, b = fit_logistic(X_train.sub_(mean).div_(std), labels[train], l2)  # in place: X can be large
        w = w / std  # the test examples' logits (x - mean) / std @ w + b, without a standardized copy of them
        aucs.append(auc(X[test] @ w + (b - mean @ w), labels[test]))
    return sum(aucs) / len(aucs)


def best_unit_auc(X, labels, seed=0):
    """How well the best single unit (a column of X) predicts the labels, either sign, without selection bias:
    the unit is chosen on one half of the examples (the largest |AUC - 0.5|) and its AUC, in the chosen direction,
    is measured on the other half. Returns (auc, unit)."""
    labels = labels.bool()
    fold = stratified_folds(labels, 2, seed)
    select, held_out = fold == 0, fold == 1
    n_pos = int(labels[select].sum())
    ranks = average_ranks(X[select])  # (n_select, units)
    aucs = (ranks[labels[select]].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * (len(ranks) - n_pos))
    unit = int((aucs - 0.5).abs().argmax())
    sign = 1.0 if aucs[unit] >= 0.5 else -1.0
    return auc(sign * X[held_out, unit], labels[held_out]), unit


# ----------------------------------------------------------------------------------------------------------------
# what the model computes on an input, per example: SAE features, MLP neurons, residual stream, gradient importance


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


# ----------------------------------------------------------------------------------------------------------------
# 2. collateral constraint: does protecting task A also hold back the features task B needs?


def restriction(drift_free, drift_protected, features):
    """How much a protection holds back the drift of a set of features (weights w_j >= 0, (d,)):
    restriction = 1 - sum_j w_j d^prot_j / sum_j w_j d^free_j  (0: not at all, 1: frozen)."""
    return 1.0 - ((features * drift_protected).sum() / (features * drift_free).sum().clamp(min=1e-12)).item()


def collateral_ratio(drift_free, drift_protected, features_a, features_b):
    """restriction(B's features) / restriction(A's features): about 1 for a protection that holds back what the new
    task needs as much as what the old task needs (not selective); about 0 for one that leaves B's features free."""
    return restriction(drift_free, drift_protected, features_b) / restriction(drift_free, drift_protected,
                                                                              features_a)


class ProtectWeights(reg.Method):
    """Task A protected in weight space: the top-q share of its Fisher weights frozen (put back to their values
    after every step: EWC on those weights with lambda -> infinity), the other weights free."""

    def __init__(self, config, model, protected, theta):
        super().__init__(config, model)
        self.protected, self.theta = protected.bool(), theta

    @torch.no_grad()
    def after_step(self, model):
        theta = reg.flat_parameters(model)
        theta[self.protected] = self.theta[self.protected]
        vector_to_parameters(theta, [p for _, p in reg.trainable(model)])


class ProtectFeatures(reg.Method):
    """Task A protected in feature space: lambda sum_l relu(sum_j m_j d_j / sum_j m_j)^2 with m A's top-q features
    (d the drift of the batch's SAE codes from the task-start model's, as SAE-guided measures it)."""

    def __init__(self, config, model, saes, reference_codes, masks, lam):
        super().__init__(config, model)
        self.saes, self.reads, self.codes, self.masks, self.lam = saes, tuple(sorted(saes)), reference_codes, masks, lam

    def penalty(self, model, batch, outputs):
        ref_codes = reg.lookup_codes(self.codes, batch)
        total = 0.0
        for p, sae in self.saes.items():
            code = reg.content_codes(sae, outputs["residuals"][p], batch.content_mask)
            drift = reg.code_drift(code, ref_codes[p], sae.config.d_sae)
            total = total + self.lam * reg.hinge_penalty(drift, self.masks[p], 0.0)
        return total, {}


def top_share(values, q):
    """0/1 (d,): the top q share of the entries of values."""
    top = torch.zeros_like(values)
    top[values.topk(max(1, int(q * len(values)))).indices] = 1.0
    return top


def code_drifts(model, reference, saes, split):
    """{point: d (d_sae,)}: d_j = mean over the split's content tokens of |z_j(model) - z_j(reference)|."""
    codes = reg.sparse_codes(model, saes, split.x)
    ref = reg.sparse_codes(reference, saes, split.x)
    content = split.content_mask.bool()
    return {p: reg.code_drift(tuple(t[content] for t in codes[p]), tuple(t[content] for t in ref[p]),
                              sae.config.d_sae) for p, sae in saes.items()}


def collateral(config, model_a, saes, suite, task_a, task_b, *, q=0.1, feature_lambda=1e4, device="cpu", seed=0):
    """Protect task A (the model after training on it, model_a) while task B trains, in weight space and in feature
    space, and measure how each restricts the drift of A's features and of B's. A's features (B's) are the top-q
    share by relevance on A's inputs (B's) that are not also B's (A's); drift is measured on both tasks' eval inputs.
    The seed draws B's training batches and the Fisher's samples.
    Returns {restriction and collateral ratio of each protection, the drifts' sizes}."""
    split_a, split_b = suite[task_a]["train"], suite[task_b]["train"]
    with reg.evaluating(model_a):
        relevance_a = reg.feature_relevance(model_a, saes, split_a, config.sae_guided_mask_examples)
        relevance_b = reg.feature_relevance(model_a, saes, split_b, config.sae_guided_mask_examples)
    top_a = {p: top_share(r, q) for p, r in relevance_a.items()}
    top_b = {p: top_share(r, q) for p, r in relevance_b.items()}
    only_a = torch.cat([top_a[p] * (1 - top_b[p]) for p in sorted(saes)])
    only_b = torch.cat([top_b[p] * (1 - top_a[p]) for p in sorted(saes)])
    fisher = reg.fisher_diagonal(model_a, split_a, config.ewc_fisher_examples, config.ewc_fisher_labels, seed=seed)
    theta_a = reg.flat_parameters(model_a).detach().clone()
    with reg.evaluating(model_a):
        codes_b = reg.reference_codes(model_a, saes, split_b)
    protections = {"none": lambda m: reg.SeqFT(config, m),
                   "weights": lambda m: ProtectWeights(config, m, top_share(fisher, q), theta_a),
                   "features": lambda m: ProtectFeatures(config, m, saes, codes_b, top_a, feature_lambda)}
    drift = {}
    for name, make in protections.items():
        model = copy.deepcopy(model_a)
        generator = torch.Generator().manual_seed(seed)
        with progress(total=config.steps_per_task, desc=f"collateral {task_a}->{task_b} {name}", leave=False) as bar:
            train.train_steps(model, split_b, config.steps_per_task, make(model), config=config, device=device,
                              generator=generator, bar=bar)
        model.eval()
        by_point = {p: 0.0 for p in saes}
        for task in (task_a, task_b):
            inputs = suite[task]["test"].subset(torch.arange(min(config.diagnose_examples, len(suite[task]["test"]))))
            for p, d in code_drifts(model, model_a, saes, inputs).items():
                by_point[p] = by_point[p] + d / 2
        drift[name] = torch.cat([by_point[p] for p in sorted(saes)])
    result = {"task_a": task_a, "task_b": task_b, "seed": seed, "q": q, "features_a": int(only_a.sum()),
              "features_b": int(only_b.sum()), "drift_free": drift["none"].sum().item()}
    for name in ("weights", "features"):
        result[name] = {"restriction_a": restriction(drift["none"], drift[name], only_a),
                        "restriction_b": restriction(drift["none"], drift[name], only_b),
                        "ratio": collateral_ratio(drift["none"], drift[name], only_a, only_b)}
    return result


COLLATERAL_VALUES = ("restriction_a", "restriction_b", "ratio")


def collateral_over_seeds(results):
    """{(task_a, task_b) or 'all pairs': {protection: {value: (mean, std) over seeds}}} from collateral results of
    several seeds. For 'all pairs' each seed's restrictions are first averaged over the pairs and its ratio is the
    ratio of those means (a pair whose restriction of A is near 0 has a ratio of no meaning, and would swamp a mean
    of ratios); then mean and std over the seeds."""
    by_pair = {}
    for r in results:
        by_pair.setdefault((r["task_a"], r["task_b"]), []).append(r)
    seeds = sorted({r["seed"] for r in results})
    rows = {pair: {name: {v: mean_std([r[name][v] for r in rs]) for v in COLLATERAL_VALUES}
                   for name in ("weights", "features")} for pair, rs in by_pair.items()}
    rows["all pairs"] = {}
    for name in ("weights", "features"):
        a, b = ([sum(r[name][v] for r in results if r["seed"] == s) / len(by_pair) for s in seeds]
                for v in ("restriction_a", "restriction_b"))
        rows["all pairs"][name] = {"restriction_a": mean_std(a), "restriction_b": mean_std(b),
                                   "ratio": mean_std([rb / ra for ra, rb in zip(a, b)])}
    return rows


def plot_collateral(results, path):
    rows = collateral_over_seeds(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    labels = ["->".join(pair) if isinstance(pair, tuple) else pair for pair in rows]
    seeds = sorted({r["seed"] for r in results})
    for ax, name, title in zip(axes, ("weights", "features"), ("weight space: top-q Fisher weights frozen",
                                                                 "feature space: A's SAE features")):
        x = torch.arange(len(rows)).float()
        for offset, value, label in ((-0.2, "restriction_a", "A's features (the protected task)"),
                                     (0.2, "restriction_b", "B's features (the task learned)")):
            means, stds = zip(*(row[name][value] for row in rows.values()))
            ax.bar(x + offset, means, 0.4, yerr=stds, capsize=3, label=label)
        ax.set_xticks(x.tolist(), labels, rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"protect A in {title}", fontsize=10)
    axes[0].set_ylabel(f"restriction of drift (mean ± std, seeds {seeds})\n1 - drift protected / drift unprotected")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def collateral_table(results):
    rows = collateral_over_seeds(results)
    seeds = sorted({r["seed"] for r in results})
    lines = [f"Mean ± std over seeds {seeds}; 'all pairs': each seed's restrictions averaged over the pairs, its "
             "ratio the ratio of those means, then mean ± std over the seeds.", "",
             "| A -> B | weights: restriction A | B | ratio B/A | features: restriction A | B | ratio B/A |",
             "|---|---|---|---|---|---|---|"]
    for pair, row in rows.items():
        label = " -> ".join(pair) if isinstance(pair, tuple) else f"**{pair}**"
        cells = [fmt(*row[name][v], digits=2) for name in ("weights", "features") for v in COLLATERAL_VALUES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 3. ground truth: do single SAE features track the world's latent variables?

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


# ----------------------------------------------------------------------------------------------------------------
# 4. memory: what each method keeps between tasks, measured from its own state, as the model grows


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


# ----------------------------------------------------------------------------------------------------------------
# 5. ablations of SAE-guided regularization, each a set of config keys on top of the run's


def ablation_variants(config):
    """{variant: (method, {key: value})}: seqft as the floor, SAE-guided as configured, and one change each."""
    points = config.sae_points or tuple(range(1, config.n_layer + 1))
    variants = {"seqft (no penalty)": ("seqft", {}), "SAE-guided": ("sae_guided", {}),
                "no guide term": ("sae_guided", {"sae_guided_lambda_g": 0.0}),
                "binary mask": ("sae_guided", {"sae_guided_mask_binary": True}),
                "no kNN propagation": ("sae_guided", {"sae_guided_mask_alpha": 0.0}),
                "random mask, same mass": ("sae_guided", {"sae_guided_mask_random": True}),
                "earlier masks protected too": ("sae_guided", {"sae_guided_protect_past": True}),
                "dense pre-activations": ("sae_guided", {"sae_guided_codes": "dense"})}
    if len(points) > 1:
        variants.update({f"point {p} only": ("sae_guided", {"sae_guided_points": (p,)}) for p in points})
    other = "base" if config.sae_guided_reference == "task_start" else "task_start"
    variants[f"reference: {'frozen base' if other == 'base' else 'task start'}"] = (
        "sae_guided", {"sae_guided_reference": other})
    return variants


def slug(variant):
    return "".join(c if c.isalnum() else "_" for c in variant.lower()).strip("_")


def ablations(config, device, base, sae_checkpoint, variants):
    """{variant: {'OP', 'BWT': (mean, std) over the config's seeds, 'settings', 'seeds'}}: the continual-learning runs
    of every variant of ablation_variants (cached under out/<run>/evidence_<variant>/, without the forgetting
    diagnostic), config.jobs at a time."""
    configs = [dataclasses.replace(config, methods=(method,), cl_dir="evidence_" + slug(variant), diagnose=False,
                                   **settings) for variant, (method, settings) in variants.items()]
    for c in configs:
        cfg.validate(c)
    summaries = train.continual_learning_many(configs, device, base, sae_checkpoint, jobs=config.jobs)
    result = {}
    for (variant, (method, settings)), summary in zip(variants.items(), summaries):
        row = summary[method]
        result[variant] = {"OP": [row["op"], row["op_std"]], "BWT": [row["bwt"], row["bwt_std"]],
                           "settings": settings, "seeds": row["seeds"]}
    return result


def plot_ablations(result, path):
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(result) + 1.2))
    names = list(result)[::-1]
    means = [result[n]["OP"][0] for n in names]
    stds = [result[n]["OP"][1] or 0.0 for n in names]
    colours = ["gray" if n.startswith("seqft") else "tab:blue" if n == "SAE-guided" else "tab:orange" for n in names]
    ax.barh(range(len(names)), means, xerr=stds, color=colours, capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("overall performance OP (test, mean ± std over seeds)")
    ax.set_title("Ablations of SAE-guided regularization")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def ablations_table(result):
    lines = ["| variant | settings | OP | BWT |", "|---|---|---|---|"]
    for variant, r in result.items():
        settings = " ".join(f"--{k}={','.join(map(str, v)) if isinstance(v, tuple | list) else v}"
                            for k, v in r["settings"].items()) or "-"
        lines.append(f"| {variant} | {settings} | {fmt(*r['OP'])} | {fmt(*r['BWT'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


ABLATION_SEEDS = (0, 1, 2)  # the ablations' seeds unless --seeds is given
TABLES = {"separability": separability_table, "collateral": collateral_table, "ground_truth": ground_truth_table,
          "memory": memory_table, "ablations": ablations_table}
PLOTS = {"separability": plot_separability, "collateral": plot_collateral, "ground_truth": plot_ground_truth,
         "memory": plot_memory, "ablations": plot_ablations}


@dataclass
class Options:
    # evidence.py (any other key is the run's; --seeds, of the ablations and the collateral analysis, defaults to
    # 0,1,2 here)
    parts: tuple[str, ...] = PARTS  # the analyses to run
    CHOICES = {"parts": PARTS}


def parse_args(argv):
    """(parts, configurator.Config), or None for --help."""
    parsed = cfg.parse_script_args(argv, Options, "python evidence.py", __doc__)
    if parsed is None:
        return None
    options, rest = parsed
    if not options.parts:
        raise ValueError(f"--parts: give at least one of {', '.join(PARTS)}")
    seeds = [] if any(a.startswith("--seeds=") for a in rest) else ["--seeds=" + ",".join(map(str, ABLATION_SEEDS))]
    config = cfg.parse_args(seeds + rest)
    comparing = [p for p in options.parts if p in ("separability", "collateral")]
    if comparing and len(config.tasks) < 2:
        raise ValueError(f"--tasks={','.join(config.tasks)}: {' and '.join(comparing)} compare tasks; give at least "
                         "two")
    return options.parts, config


def timed(function, *args):
    """(function(*args), the seconds it took)."""
    t0 = time.time()
    return function(*args), time.time() - t0


def save(part, result, seconds, out_dir, command):
    """Write a part's JSON and plot, print its table; returns its section of evidence.md."""
    cache.save_json(result, os.path.join(out_dir, f"{part}.json"))
    PLOTS[part](result, os.path.join(out_dir, f"{part}.png"))
    table = TABLES[part](result)
    print(table)
    return f"## {part} ({seconds:.0f} s, `{command}`)\n\n{table}\n\n![{part}]({part}.png)\n"


def write_report(sections, path):
    """evidence.md: the new sections {part: text}, and those of the parts not run this time as an earlier run left
    them (their JSON and plots are still there), in the order of PARTS."""
    if os.path.exists(path):
        with open(path) as f:
            for text in f.read().split("\n## ")[1:]:
                part = text.split(" ", 1)[0]
                if part in PARTS and part not in sections:
                    sections[part] = "## " + text.rstrip("\n") + "\n"
    body = "\n".join(sections[part] for part in PARTS if part in sections)
    cache.save_text("# Evidence for the thesis (each section names the command that made it)\n\n" + body, path)


def main(argv):
    parsed = parse_args(argv)
    if parsed is None:
        return 0
    parts, config = parsed
    train.check_inputs(config)
    device = cfg.resolve_device(config)
    base = pretrain(config, device)
    sae_checkpoint = train.train_sae_stage(config, device, base)
    model = model_from_checkpoint(base, device)
    saes = train.load_saes(sae_checkpoint, model, device)
    out_dir = os.path.join(config.out_dir, config.run, "evidence")
    os.makedirs(out_dir, exist_ok=True)
    suite = build_task_suite(config.tasks, config.n_train, config.n_val, config.n_test, seed=0,
                             block_size=config.block_size, template_is_content=False)

    def analyse(part):
        """The result of one analysis other than the ablations."""
        if part == "separability":
            return separability(model, saes, suite, config.tasks)
        if part == "ground_truth":
            return ground_truth(model, saes, device=device)
        if part == "memory":
            # what a method keeps does not depend on how many examples its importance or mask is estimated on, nor
            # on SAE-guided's codes: dense ones hold the reference as a frozen copy during the task instead of
            # encoding every training example at task start (both are dropped when the task ends)
            memory_config = dataclasses.replace(config, ewc_fisher_examples=8, mas_examples=8,
                                                sae_guided_mask_examples=32, sae_guided_codes="dense")
            return memory_by_width(memory_config, widths=MEMORY_WIDTHS)
        results = []  # collateral: every pair of consecutive tasks, for each seed (A's and B's batches, Fisher)
        for seed in config.seeds:
            for task_a, task_b in zip(config.tasks, config.tasks[1:]):
                model_a = model_from_checkpoint(base, device)
                generator = torch.Generator().manual_seed(seed)
                with progress(total=config.steps_per_task, desc=f"collateral: learn {task_a}, seed {seed}",
                              leave=False) as bar:
                    train.train_steps(model_a, suite[task_a]["train"], config.steps_per_task,
                                      reg.SeqFT(config, model_a), config=config, device=device, generator=generator,
                                      bar=bar)
                results.append(collateral(config, model_a, saes, suite, task_a, task_b, device=device, seed=seed))
        return results

    # Every analysis runs on one thread, as every continual-learning run does (train.run_and_save), so that its
    # numbers do not depend on the machine's core count; meanwhile the ablations' runs go on in a process of their
    # own (with its config.jobs workers), so that the cores stay busy.
    t_start, threads, sections = time.time(), torch.get_num_threads(), {}
    command = f"python evidence.py {' '.join(argv)}".strip()
    torch.set_num_threads(1)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as background:
            if "ablations" in parts:
                ablation_run = background.submit(timed, ablations, config, device, base, sae_checkpoint,
                                                 ablation_variants(config))
            for part in parts:
                if part != "ablations":  # the ablations come last, when their runs are done
                    sections[part] = save(part, *timed(analyse, part), out_dir, command)
            if "ablations" in parts:
                sections["ablations"] = save("ablations", *ablation_run.result(), out_dir, command)
    finally:
        torch.set_num_threads(threads)
    write_report(sections, os.path.join(out_dir, "evidence.md"))
    print(f"evidence: {len(sections)} parts in {time.time() - t_start:.0f} s (the ablations beside the others); tables "
          f"in {os.path.join(out_dir, 'evidence.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
