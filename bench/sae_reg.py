"""
SAE-regularized pretraining: does training a model jointly with SAEs make its activations easier to decompose?

For each seed, a normal model and an SAE-regularized one (`--sae_reg_lambda`; same steps, learning rate and data)
are pretrained; then each is frozen, fresh TopK SAEs are trained at every residual point 0..n_layer for each k of
the sweep, and spliced in on held-out text. Both models of a seed, and their fresh SAEs, use that seed's corpus.

    python bench/sae_reg.py                                   # the tiny world, seeds 0 and 1, k = 4, 8, 16
    python bench/sae_reg.py --seeds=0,1 --k=4,8,16 --lambda=1 --corpus=../shared/data/tinyshakespeare.txt ...

Options of this script: --seeds, --k, --lambda (the regularized model's sae_reg_lambda); any other --key=value is
a train.py override. Each model and its sweep is cached (out/<run>/sae_reg/<variant>_seed<s>/), so an interrupted
run resumes per model. Writes out/<run>/sae_reg/sae_reg.json, sae_reg.md and the plots sae_reg_*.png.
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import torch  # noqa: E402

import configurator as cfg  # noqa: E402
import train  # noqa: E402
from data.corpus import get_batch  # noqa: E402
from evaluate import fmt, mean_std, sae_metrics  # noqa: E402


def ints(text):
    values = [int(v) for v in text.split(",") if v]
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value")
    return values


def parse(argv):
    """(options of this script, train.Config); every value is checked before anything is trained."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=ints, default=[0, 1], help="seeds: one normal and one regularized model each")
    parser.add_argument("--k", type=ints, default=[4, 8, 16], help="TopK of the fresh SAEs, a sweep")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="sae_reg_lambda of the regularized")
    options, rest = parser.parse_known_args(argv)
    config = train.parse_args(rest)
    if not options.lam > 0:
        parser.error(f"--lambda={options.lam}: must be above 0 (0 is the normal model)")
    d_sae = config.sae_expansion * config.n_embd
    if not all(0 < k <= d_sae for k in options.k):
        parser.error(f"--k={options.k}: each k must be in 1..d_sae={d_sae}")
    if any(s < 0 for s in options.seeds):
        parser.error(f"--seeds={options.seeds}: seeds are at least 0")
    return options, config


def fresh_sae_sweep(config, ks, device):
    """Pretrain (or reuse) the model of config, then fresh SAEs at every point for each k; cached per model."""
    path = os.path.join(config.out_dir, config.run, "fresh_saes.json")
    base = train.pretrain(config, device)
    key = cfg.result_key({**train.stage_config(config, "pretrain", "sae"), "sweep_k": ks}, device, config.corpus,
                         {"base": base["sha"]})
    cached = cfg.load_json_result(path, key)
    if cached is not None:
        print(f"sae_reg: reusing {path}")
        return cached
    model = train.model_from_checkpoint(base, device)
    train_ids, val_ids = train.corpus_of(config)  # the corpus this model was trained on
    points = tuple(range(config.n_layer + 1))
    by_k = {}
    for k in ks:
        saes, _ = train.fresh_saes(model, train_ids, points, config, k)
        by_k[k] = sae_metrics(model, saes, val_ids, config.block_size, device)
        print(f"sae_reg {config.run} k={k}: total L0 {by_k[k]['total_l0']:.1f}, compound CE increase "
              f"{by_k[k]['compound_ce_increase']:.4f}")
    pretrain_summary = cfg.read_json(os.path.join(config.out_dir, config.run, "pretrain.json"))
    result = {"key": key, "val_ce": base["val_loss"], "ms_per_iter": pretrain_summary["ms_per_iter"], "by_k": by_k}
    cfg.save_json(result, path)
    return cfg.read_json(path)  # one form for every caller: JSON's string keys


@torch.no_grad()
def activation_norms(config, device, n_batches=10, seed=1234):
    """{point: mean ||x||} of the (cached) model of config on fixed held-out windows: does the regularizer,
    whose reconstruction term ||x - xhat||^2 / ||x|| grows with the scale of x, shrink the activations?"""
    model = train.model_from_checkpoint(train.pretrain(config, device), device).eval()
    val_ids = train.corpus_of(config)[1]
    generator = torch.Generator().manual_seed(seed)
    points = tuple(range(config.n_layer + 1))
    totals = {p: 0.0 for p in points}
    for _ in range(n_batches):
        x, _ = get_batch(val_ids, config.batch_size, config.block_size, generator, device)
        residuals = model(x, read=points)[2]
        for p in points:
            totals[p] += residuals[p].norm(dim=-1).mean().item() / n_batches
    return {str(p): v for p, v in totals.items()}


def main(argv):
    try:
        options, config = parse(argv)
        train.check_inputs(dataclasses.replace(config, seed=options.seeds[0]), tasks=False)
    except ValueError as error:
        sys.exit(f"error: {error}")
    device = train.resolve_device(config)
    out = os.path.join(config.out_dir, config.run, "sae_reg")
    results = {"normal": {}, "regularized": {}, "k": options.k, "lambda": options.lam}
    for seed in options.seeds:
        for variant, lam in (("normal", 0.0), ("regularized", options.lam)):
            variant_config = dataclasses.replace(config, seed=seed, sae_reg_lambda=lam,
                                                 run=os.path.join(config.run, "sae_reg", f"{variant}_seed{seed}"))
            results[variant][str(seed)] = fresh_sae_sweep(variant_config, options.k, device)
            results[variant][str(seed)]["norms"] = activation_norms(variant_config, device)
    cfg.save_json(results, os.path.join(out, "sae_reg.json"))
    plot(results, out)
    text = table(results)
    with open(os.path.join(out, "sae_reg.md"), "w") as f:
        f.write(f"Command: `python bench/sae_reg.py {' '.join(argv)}`\n\n{text}\n")
    print(text)


# ----------------------------------------------------------------------------------------------------------------
# the comparison: CE increase against L0, normal vs regularized, mean over seeds


def curves(results, variant):
    """{'points': {p: (L0 (mean, std) per k, CE increase (mean, std) per k)}, 'compound': (total L0, compound)}."""
    runs = [r["by_k"] for r in results[variant].values()]
    ks = [str(k) for k in results["k"]]
    points = list(runs[0][ks[0]]["points"])
    per_point = {p: ([mean_std([r[k]["points"][p]["l0"] for r in runs]) for k in ks],
                     [mean_std([r[k]["points"][p]["ce_increase"] for r in runs]) for k in ks]) for p in points}
    compound = ([mean_std([r[k]["total_l0"] for r in runs]) for k in ks],
                [mean_std([r[k]["compound_ce_increase"] for r in runs]) for k in ks])
    return {"points": per_point, "compound": compound}


def plot(results, out):
    """sae_reg_per_point.png: CE increase vs L0 per point (log-log); sae_reg_compound.png: compound CE increase vs
    total L0; normal vs regularized, mean over seeds with the std as error bars."""
    both = {v: curves(results, v) for v in ("normal", "regularized")}
    colors = {"normal": "tab:blue", "regularized": "tab:orange"}
    points = list(both["normal"]["points"])
    fig, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.4), squeeze=False)
    for ax, p in zip(axes[0], points):
        for variant, color in colors.items():
            l0s, ces = both[variant]["points"][p]
            ax.errorbar([m for m, _ in l0s], [max(m, 1e-5) for m, _ in ces], yerr=[s for _, s in ces],
                        marker="o", color=color, label=variant, capsize=3)
        ax.set(xscale="log", yscale="log", xlabel="L0", title=f"point {p}")
    axes[0][0].set_ylabel("CE increase (nats)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sae_reg_per_point.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    for variant, color in colors.items():
        l0s, ces = both[variant]["compound"]
        ax.errorbar([m for m, _ in l0s], [m for m, _ in ces], yerr=[s for _, s in ces], marker="o", color=color,
                    label=variant, capsize=3)
    ax.set(xlabel="total L0 (sum over points)", ylabel="compound CE increase (nats)",
           title="all points spliced at once")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sae_reg_compound.png"), dpi=120)
    plt.close(fig)


def table(results):
    """Markdown: val CE and, per k, total L0 and compound CE increase, normal vs regularized (mean ± std); then
    the mean activation norm at each point."""
    lines = ["| model | val CE | ms/iter | k | total L0 | compound CE increase |", "|---|---|---|---|---|---|"]
    for variant in ("normal", "regularized"):
        runs = list(results[variant].values())
        val = mean_std([r["val_ce"] for r in runs])
        ms = mean_std([r["ms_per_iter"] for r in runs])
        for k in results["k"]:
            l0 = mean_std([r["by_k"][str(k)]["total_l0"] for r in runs])
            ce = mean_std([r["by_k"][str(k)]["compound_ce_increase"] for r in runs])
            lines.append(f"| {variant} | {fmt(*val)} | {ms[0]:.1f} | {k} | {l0[0]:.1f} | {fmt(*ce)} |")
    points = list(next(iter(results["normal"].values()))["norms"])
    lines += ["", "| model | " + " | ".join(f"mean norm at point {p}" for p in points) + " |",
              "|---|" + "---|" * len(points)]
    for variant in ("normal", "regularized"):
        runs = list(results[variant].values())
        lines.append(f"| {variant} | " + " | ".join(fmt(*mean_std([r["norms"][p] for r in runs]), digits=2)
                                                    for p in points) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
