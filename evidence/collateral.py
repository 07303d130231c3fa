"""
2. Collateral constraint: does protecting task A (in weight space, or in its SAE features) also hold back
the features task B needs?
"""

import copy

import matplotlib.pyplot as plt
import torch
from torch.nn.utils import vector_to_parameters

import regularizers as reg
import train
from evidence import save_figure
from jobs import progress
from model import evaluating
from report import fmt, mean_std


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
    with evaluating(model_a):
        relevance_a = reg.feature_relevance(model_a, saes, split_a, config.sae_guided_mask_examples)
        relevance_b = reg.feature_relevance(model_a, saes, split_b, config.sae_guided_mask_examples)
    top_a = {p: top_share(r, q) for p, r in relevance_a.items()}
    top_b = {p: top_share(r, q) for p, r in relevance_b.items()}
    only_a = torch.cat([top_a[p] * (1 - top_b[p]) for p in sorted(saes)])
    only_b = torch.cat([top_b[p] * (1 - top_a[p]) for p in sorted(saes)])
    fisher = reg.fisher_diagonal(model_a, split_a, config.ewc_fisher_examples, config.ewc_fisher_labels, seed=seed)
    theta_a = reg.flat_parameters(model_a).detach().clone()
    with evaluating(model_a):
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
