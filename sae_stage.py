"""
Stage 2 of the pipeline (train.py): an SAE at every residual point of the frozen base model, trained on base-corpus
text, measured (evaluate.sae_metrics) and cached at out/<run>/sae.pt with sae.json; a sweep of k trains one set per
k. The SAE itself, its losses and its training loop are sae.py's.
"""

import os
import time

import cache
from cache import stage_code, stage_config
from evaluate import sae_metrics
from jobs import progress
from model import model_from_checkpoint
from pretrain import corpus_hash, corpus_of
import report
from sae import check_sae_fits, sae_from_dict, sae_to_dict, train_saes


def check_saes(config):
    """The SAE stage's settings, checked before any compute (configurator.validate)."""
    for point in config.sae_points:
        if not 0 <= point <= config.n_layer:
            raise ValueError(f"--sae_points: {point} is not a residual point; valid points are 0..{config.n_layer}")
    d_sae = config.sae_expansion * config.n_embd
    if not all(0 < k <= d_sae for k in config.sae_k):
        raise ValueError(f"--sae_k={','.join(map(str, config.sae_k))}: each k must be in 1..d_sae={d_sae}")
    if config.sae_kind == "relu" and len(config.sae_k) > 1:
        raise ValueError(f"--sae_k={','.join(map(str, config.sae_k))}: a sweep of k needs --sae_kind=topk "
                         "(a ReLU SAE's L0 follows --sae_l1)")
    if config.sae_tokens < config.sae_batch_size:
        raise ValueError(f"--sae_tokens={config.sae_tokens}: must be at least --sae_batch_size="
                         f"{config.sae_batch_size} (the activations an SAE is trained on; a step draws that many)")


def sae_points(config):
    return config.sae_points or tuple(range(1, config.n_layer + 1))


def sae_kwargs(config, k):
    """The SAEConfig fields (all but d_in) that the config sets, for one k."""
    return dict(d_sae=config.sae_expansion * config.n_embd, k=k, kind=config.sae_kind, l1=config.sae_l1,
                aux_k=config.sae_aux_k, dead_firings=config.sae_dead_firings,
                auxk_coef=1 / 32 if config.sae_auxk else 0.0)


def fresh_saes(model, ids, points, config, k):
    """Train an SAE at each point of the frozen model on the config's SAE settings (one k)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return train_saes(model, ids, points, sae_kwargs(config, k), n_tokens=config.sae_tokens, steps=config.sae_steps,
                      batch_size=config.sae_batch_size, block_size=config.block_size, seed=config.seed,
                      progress=progress)


def load_saes(checkpoint, model, device, k=None):
    """{point: sae} for one k (default: the first of the sweep), checked against the model."""
    k = checkpoint["ks"][0] if k is None else k
    saes = {p: sae_from_dict(d, device) for p, d in checkpoint["saes"][k].items()}
    for p, sae in saes.items():
        check_sae_fits(sae, model, p)
        sae.requires_grad_(False)  # frozen: gradients flow through the SAE to the model, never into it
    return saes


def train_sae_stage(config, device, base):
    """Train an SAE per point and per k on base-corpus text; cached at out/<run>/sae.pt with sae.json."""
    run_dir = os.path.join(config.out_dir, config.run)
    path, metrics_path = os.path.join(run_dir, "sae.pt"), os.path.join(run_dir, "sae.json")
    key = cache.result_key(stage_config(config, "pretrain", "sae"), stage_code(config, "pretrain", "sae"), device,
                           corpus_hash(config), {"base": base["sha"]})
    checkpoint = cache.load_checkpoint(path, key, "saes")
    if checkpoint is not None and cache.summary_is_there("sae", path, metrics_path, key):
        return checkpoint
    model = model_from_checkpoint(base, device)
    train_ids, val_ids = corpus_of(config)
    points = sae_points(config)
    t0 = time.time()
    checkpoint = {"key": key, "ks": list(config.sae_k), "saes": {}}
    results = {"key": key, "points": list(points), "by_k": {}}
    for k in config.sae_k:
        saes, histories = fresh_saes(model, train_ids, points, config, k)
        checkpoint["saes"][k] = {p: sae_to_dict(sae) for p, sae in saes.items()}
        metrics = sae_metrics(model, saes, val_ids, config.block_size, device)
        metrics["train_dead_fraction"] = {p: (sae.tokens_since_fired >= sae.config.dead_tokens).float().mean().item()
                                          for p, sae in saes.items() if sae.config.kind == "topk"}  # AuxK's count
        metrics["history"] = histories
        results["by_k"][k] = metrics
        for p, m in metrics["points"].items():
            print(f"sae k={k} point {p}: L0 {m['l0']:.1f}, FVU {m['fvu']:.3f}, dead {m['dead_fraction']:.1%}, "
                  f"CE increase {m['ce_increase']:.4f} nats")
        print(f"sae k={k}: compound CE increase {metrics['compound_ce_increase']:.4f} nats "
              f"(clean CE {metrics['clean_ce']:.4f})")
    results["seconds"] = time.time() - t0
    checkpoint["sha"] = results["sha"] = cache.tensor_hash(checkpoint["saes"])
    cache.save_checkpoint(checkpoint, path)
    cache.save_json(results, metrics_path)
    if report.DRAW_PLOTS:
        report.plot_sae_metrics(results, run_dir)
    print(f"sae: trained in {results['seconds']:.1f}s; metrics in {metrics_path}, plots sae_*.png")
    return checkpoint
