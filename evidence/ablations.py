"""
5. Ablations of SAE-guided regularization: each a set of config keys on top of the run's, run as
continual-learning runs (cached under out/<run>/evidence_<variant>/).
"""

import dataclasses

import matplotlib.pyplot as plt

import configurator as cfg
import train
from evidence import save_figure
from report import fmt


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
