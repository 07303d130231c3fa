r"""
Adapting a model to its SAEs (after Chen, Engels and Tegmark 2025, "Low-Rank Adapting Models for Sparse
Autoencoders", arXiv 2501.19406). The model and its trained SAEs are frozen; every SAE is spliced into the forward
pass at once (or some, --adapt_points); LoRA adapters on the model learn to make the spliced model predict
what the original predicts, on ordinary text:

    L = mean over tokens t of KL( p_orig(. | x_<=t) || p_spliced(. | x_<=t) )
      = mean_t sum_v p_orig(v | x_<=t) (log p_orig(v | x_<=t) - log p_spliced(v | x_<=t))

p_orig is the model with its adapters switched off (the teacher: the original, frozen, no copy made), p_spliced the
model with its adapters on and each SAE's reconstruction patched into the residual stream, every SAE reading the
already-patched stream. The adapters start as the identity (B = 0), so at step 0 the student is the spliced
original. Measured before and after, with the same SAEs: the compound and per-point CE increase and the total L0
(a TopK SAE's L0 is fixed; a ReLU SAE's moves where an adapted block changes what it reads), and the model's own CE
on held-out text without SAEs; and the cost, in steps, wall seconds and CPU-seconds.

    python train.py --stage=sae --sae_points=0,1,2 --run=x      # a model and SAEs at every point (the pipeline's)
    python -m bench.sae_adapt --run=x --sae_points=0,1,2         # adapt the model to all of them at once
    python -m bench.sae_adapt --run=x --sae_points=0,1,2 --adapt_points=1 --adapt_layers=after
    python -m bench.sae_adapt --preset=gpt_circuits_cpu --corpus=../shared/data/tinyshakespeare.txt --sae_reg_lambda=0 \
        --run=gpt_circuits_cpu/sae_reg/normal_seed0 --saes=out/gpt_circuits_cpu/sae_reg/normal_seed0/sweep_0.pt
                                                # a model of bench/sae_reg.py's study and one sweep point's SAEs

The adapters are the project's LoRA (--lora_rank, --lora_alpha, --lora_targets). Writes
out/<run>/sae_adapt/<points>_<layers>[_<sweep point>].json (reused while the model, the SAEs, the keys and this code
are unchanged) and prints the comparison. bench/sae_routes.py adapts each model of bench/sae_reg.py's study to
each of its sweep points and sets the routes side by side.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cache
import configurator as cfg
import jobs
import sae_stage
from evaluate import sae_metrics
from data.corpus import get_batch
from model import model_from_checkpoint
from pretrain import clip_gradients, corpus_hash, corpus_of, pretrain
from sae import check_sae_fits, sae_from_dict


@dataclass
class Options:
    # bench/sae_adapt.py (any other key is the pipeline's: the model, its SAEs, the LoRA settings)
    adapt_points: tuple[int, ...] = ()  # the residual points whose SAEs are spliced in; empty = every SAE at once
    adapt_layers: str = "all"  # the blocks whose adapters learn: 'all', or those 'after' the first spliced point
    adapt_steps: int = 300  # AdamW steps
    adapt_lr: float = 1e-3  # constant learning rate of the adapters
    adapt_batch_size: int = 32  # windows a step, of --block_size characters
    saes: str = ""  # a sweep point's SAEs (bench/sae_reg.py's sweep_<i>.pt, trained on --run's model); empty: --run's
    CHOICES = {"adapt_layers": ("all", "after")}
    AT_LEAST_ZERO = ("adapt_steps", "adapt_points")


def spliced(saes, points):
    """{point: sae} of the SAEs spliced in: every one (no points given) or those at the points."""
    for p in points:
        if p not in saes:
            raise ValueError(f"--adapt_points: no SAE at point {p}; the SAEs are at points "
                             f"{', '.join(map(str, saes))}")
    return {p: saes[p] for p in points or saes}


def sweep_point_saes(path, base, model, device):
    """({point: sae}, their hash) of one sweep point of bench/sae_reg.py (its sweep_<i>.pt), frozen; an error unless
    they were trained on this model."""
    if not os.path.exists(path):
        raise ValueError(f"--saes={path}: no such file (bench/sae_reg.py writes "
                         "out/<run>/sae_reg/<model>/sweep_<i>.pt)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if cache.tensor_hash(checkpoint["saes"]) != checkpoint.get("sha"):
        raise ValueError(f"--saes={path}: the file's SAEs do not match their hash (damaged); rerun bench/sae_reg.py")
    if checkpoint.get("base") != base["sha"]:
        raise ValueError(f"--saes={path}: these SAEs were trained on another model than the one of --run and its "
                         "settings (give the run, seed and settings of the model they were trained on)")
    saes = {int(p): sae_from_dict(d, device) for p, d in checkpoint["saes"].items()}
    for p, sae in saes.items():
        check_sae_fits(sae, model, p)
        sae.requires_grad_(False)
    return saes, checkpoint["sha"]


def add_adapters(model, config, first_point=0, layers="all"):
    """LoRA on the model (every weight frozen; model.add_lora); with layers='after', the adapters of the blocks before
    the first spliced point stay frozen at the identity (block i reads point i: only blocks i >= the point can make
    up for its SAE)."""
    model.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
    for i, block in enumerate(model.blocks):
        learns = layers == "all" or i >= first_point
        for p in block.parameters():
            p.requires_grad_(learns and p.requires_grad)
    return model


def adaptation_loss(model, patch, x):
    """mean_t KL(p_orig || p_spliced) over the tokens of x (B, T): the teacher is the model with adapters off, under
    no_grad; the student the model with adapters on and `patch` spliced in."""
    with torch.no_grad(), model.adapters_off():
        teacher = F.log_softmax(model(x)[0].float(), dim=-1)
    student = F.log_softmax(model(x, patch=patch)[0].float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def adapt(model, patch, ids, options, config, device, seed=0):
    """options.adapt_steps of AdamW on the adapters; returns the loss at every step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.adapt_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in jobs.progress(range(options.adapt_steps), desc="adapt"):
        x, _ = get_batch(ids, options.adapt_batch_size, config.block_size, generator, device)
        loss = adaptation_loss(model, patch, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(trainable, config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    return losses


def measure(model, saes, patch, ids, config, device):
    """The SAE metrics that matter here: CE without SAEs, compound CE increase of the spliced set, per point."""
    m = sae_metrics(model, {p: saes[p] for p in patch}, ids, config.block_size, device)
    return {"clean_ce": m["clean_ce"], "compound_ce_increase": m["compound_ce_increase"],
            "ce_increase": {p: point["ce_increase"] for p, point in m["points"].items()}, "total_l0": m["total_l0"]}


def adapt_to_saes(config, options, device):
    """The model of config adapted to its SAEs (options.saes: a sweep point's; else the pipeline's SAE stage), measured
    before and after; cached in out/<run>/sae_adapt/<points>_<layers>[_<sweep point>].json under a key of the model,
    the SAEs, the options and this code, so a rerun with all unchanged reads the file. Returns the result."""
    base = pretrain(config, device)
    model = model_from_checkpoint(base, device)
    if options.saes:
        saes, saes_sha = sweep_point_saes(options.saes, base, model, device)
    else:
        checkpoint = sae_stage.train_sae_stage(config, device, base)
        saes, saes_sha = sae_stage.load_saes(checkpoint, model, device), checkpoint["sha"]
    patch = spliced(saes, options.adapt_points)
    source = f"_{os.path.splitext(os.path.basename(options.saes))[0]}" if options.saes else ""
    name = f"{'-'.join(map(str, options.adapt_points)) or 'all'}_{options.adapt_layers}{source}.json"
    path = os.path.join(config.out_dir, config.run, "sae_adapt", name)
    adapt_options = {k: v for k, v in dataclasses.asdict(options).items() if k != "saes"}
    code = [f"bench/sae_adapt.py:{f.__name__}" for f in (sweep_point_saes, spliced, add_adapters, adaptation_loss,
                                                         adapt, measure, adapt_to_saes)]  # not main's printing
    key = cache.result_key({**cache.stage_config(config, "pretrain"), **adapt_options,
                            **{k: getattr(config, k) for k in ("lora_rank", "lora_alpha", "lora_targets")}},
                           cache.stage_code(config, "pretrain", "sae") + code, device,
                           corpus_hash(config), {"base": base["sha"], "saes": saes_sha})
    cached = cache.load_json_result(path, key)
    if cached is not None:
        return cached
    train_ids, val_ids = corpus_of(config)
    before = measure(model, saes, patch, val_ids, config, device)
    add_adapters(model, config, min(patch), options.adapt_layers)
    t0, cpu0 = time.time(), time.process_time()
    losses = adapt(model, patch, train_ids, options, config, device, seed=config.seed)
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    after = measure(model, saes, patch, val_ids, config, device)
    result = {"key": key, "points": sorted(patch), "layers": options.adapt_layers, "steps": options.adapt_steps,
              "seconds": seconds, "cpu_seconds": cpu_seconds, "loss_first": losses[0] if losses else None,
              "loss_last": losses[-1] if losses else None, "before": before, "after": after,
              "kl_by_tenth": [c.mean().item() for c in torch.tensor(losses).chunk(10)] if losses else []}
    cache.save_json(result, path)
    return cache.read_json(path)  # one form for every caller: JSON's string keys


def main(argv):
    parsed = cfg.parse_script_args(argv, Options, "python -m bench.sae_adapt", __doc__)
    if parsed is None:
        return 0
    options, config = parsed[0], cfg.parse_args(parsed[1])
    result = adapt_to_saes(config, options, cfg.resolve_device(config))
    print("| | CE without SAEs | compound CE increase | per point |\n|---|---|---|---|")
    for label in ("before", "after"):
        m = result[label]
        per_point = ", ".join(f"{p}: {v:.3f}" for p, v in m["ce_increase"].items())
        print(f"| {label} | {m['clean_ce']:.4f} | {m['compound_ce_increase']:.4f} | {per_point} |")
    if result["steps"]:
        print(f"KL {result['loss_first']:.4f} -> {result['loss_last']:.4f} in {result['steps']} steps, "
              f"{result['seconds'] / 60:.1f} min ({result['cpu_seconds'] / 60:.1f} CPU-min); total L0 "
              f"{result['before']['total_l0']:.1f} before, {result['after']['total_l0']:.1f} after")


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
