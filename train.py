"""
The entry point: configuration, the stages of the pipeline, the continual-learning loop, checkpoints.

    python train.py                       # every stage with the CPU defaults
    python train.py --stage=pretrain      # one stage (pretrain | sae | cl | all)
    python train.py --n_layer=4 --device=cpu --corpus=../shared/data/tinyshakespeare.txt

Stages write to out/<run>/ and cache their result with the config that made it: a later run reuses a stage whose
config is unchanged and redoes it otherwise. Checkpoints are written atomically (temp file, then rename), and an
interrupted pretraining resumes from its last checkpoint.
"""

import dataclasses
import difflib
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from data.corpus import get_batch, load_corpus
from data.tokenizer import NEWLINE, VOCAB_SIZE, decode, encode
from evaluate import plot_sae_metrics, sae_metrics
from model import GPT, GPTConfig
from sae import check_sae_fits, sae_from_dict, sae_to_dict, train_saes


@dataclass
class Config:
    # where and how
    run: str = "default"  # results go to out_dir/run/
    out_dir: str = "out"
    stage: str = "all"
    device: str = "auto"  # auto = cuda if available, else cpu
    seed: int = 0
    corpus: str = ""  # path of a text file; empty = the generated tiny-world corpus
    corpus_lines: int = 60_000  # size of the generated corpus
    # model
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64
    dropout: float = 0.0
    # pretraining (AdamW, cosine schedule with linear warmup)
    batch_size: int = 32
    max_iters: int = 2000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    # SAEs on the base model's residual stream
    sae_points: tuple[int, ...] = ()  # residual points; empty = every point after a block, 1..n_layer
    sae_expansion: int = 8  # d_sae = sae_expansion * n_embd
    sae_k: tuple[int, ...] = (8,)  # TopK; several values train a k sweep, the first is the one used later
    sae_steps: int = 2500
    sae_batch_size: int = 512  # tokens per SAE step
    sae_tokens: int = 200_000  # activations collected per point to train on
    sae_auxk: bool = True
    sae_aux_k: int = 64
    sae_dead_tokens: int = 20_000


CHOICES = {  # fields whose value must be one of a fixed set
    "stage": ("all", "pretrain", "sae"),
    "device": ("auto", "cpu", "cuda"),
}
STAGE_KEYS = {  # the config fields each stage's result depends on (a stage also depends on the ones before it)
    "pretrain": ("seed", "corpus", "corpus_lines", "n_layer", "n_head", "n_embd", "block_size", "dropout",
                 "batch_size", "max_iters", "lr", "min_lr", "warmup_iters", "weight_decay", "beta1", "beta2",
                 "grad_clip", "eval_interval", "eval_iters"),
    "sae": ("sae_points", "sae_expansion", "sae_k", "sae_steps", "sae_batch_size", "sae_tokens", "sae_auxk",
            "sae_aux_k", "sae_dead_tokens"),
}


# ----------------------------------------------------------------------------------------------------------------
# configuration from the command line

def parse_value(key, text, annotation):
    """Convert a command-line string to the field's type, or raise ValueError naming the key."""
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if annotation in (int, float, str):
            return annotation(text)  # float("3") works too: ints are accepted where floats are expected
        if typing.get_origin(annotation) is tuple:
            item_type = typing.get_args(annotation)[0]
            return tuple(item_type(item) for item in text.split(",") if item != "")
    except ValueError:
        pass
    type_name = getattr(annotation, "__name__", str(annotation))
    if typing.get_origin(annotation) is tuple:
        type_name = f"comma-separated list of {typing.get_args(annotation)[0].__name__}"
    raise ValueError(f"--{key}={text!r}: expected a {type_name}")


def validate(config):
    """Check choices and ranges; raise ValueError naming the key and what is allowed."""
    for key, allowed in CHOICES.items():
        values = getattr(config, key)
        for value in values if isinstance(values, tuple) else (values,):
            if value not in allowed:
                raise ValueError(f"--{key}={value!r} is not valid; choose from: {', '.join(map(str, allowed))}")
    if config.n_embd % config.n_head:
        raise ValueError(f"--n_embd={config.n_embd} must be divisible by --n_head={config.n_head}")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "eval_interval",
                "eval_iters", "corpus_lines", "sae_expansion", "sae_steps", "sae_batch_size", "sae_tokens",
                "sae_aux_k", "sae_dead_tokens"):
        if getattr(config, key) < 1:
            raise ValueError(f"--{key}={getattr(config, key)} must be at least 1")
    for point in config.sae_points:
        if not 0 <= point <= config.n_layer:
            raise ValueError(f"--sae_points: {point} is not a residual point; valid points are 0..{config.n_layer}")
    if not config.sae_k or not all(0 < k <= config.sae_expansion * config.n_embd for k in config.sae_k):
        raise ValueError(f"--sae_k={config.sae_k}: each k must be in 1..d_sae={config.sae_expansion * config.n_embd}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"--dropout={config.dropout} must be in [0, 1)")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda was asked for, but no CUDA device is available; use --device=cpu or auto")


def parse_args(argv):
    """Config from ['--key=value', ...]: unknown keys and bad values stop with a message that names them."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments look like --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ValueError(f"unknown config key --{key}{hint}; valid keys: {', '.join(fields)}")
        overrides[key] = parse_value(key, text, hints[key])
    config = dataclasses.replace(Config(), **overrides)
    validate(config)
    return config


def resolve_device(config):
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def stage_config(config, stage):
    """The part of the config a stage's result depends on: its own keys and those of the stages before it."""
    keys = []
    for name, stage_keys in STAGE_KEYS.items():
        keys += stage_keys
        if name == stage:
            break
    return {key: getattr(config, key) for key in keys}


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: written atomically, reused when the config that made them is unchanged

def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename: an interrupted write never leaves a corrupt checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path, expected_config=None):
    """The checkpoint at path, or None if absent or made by a different config (the differing keys are printed)."""
    if not os.path.exists(path):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a file we cannot read is redone, not trusted
        print(f"cannot read checkpoint {path} ({error}); redoing it")
        return None
    if expected_config is not None and checkpoint.get("config") != expected_config:
        old = checkpoint.get("config") or {}
        changed = sorted(k for k in set(old) | set(expected_config) if old.get(k) != expected_config.get(k))
        print(f"{path} was made with a different config ({', '.join(changed)}); redoing it")
        return None
    return checkpoint


def save_json(obj, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def model_from_checkpoint(checkpoint, device):
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# stage 1: pretraining on the base corpus

def get_lr(it, config):
    """Linear warmup to lr over warmup_iters, then cosine decay to min_lr at max_iters."""
    if it < config.warmup_iters:
        return config.lr * (it + 1) / config.warmup_iters
    progress = min(1.0, (it - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters))
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


@torch.no_grad()
def estimate_lm_loss(model, ids, config, device, n_batches, seed=1234):
    """Mean cross-entropy over n_batches fixed random windows of ids (the same windows every call)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n_batches):
        x, y = get_batch(ids, config.batch_size, config.block_size, generator, device)
        losses.append(model(x, y)[1].item())
    model.train(was_training)
    return sum(losses) / len(losses)


def greedy_samples(model, prompts, device, max_new_tokens=40):
    """Greedy continuations of each prompt up to the end of its line."""
    model.eval()
    samples = []
    for prompt in prompts:
        idx = torch.tensor([encode(prompt)], device=device)
        out = model.generate(idx, max_new_tokens, stop_token=NEWLINE)[0, len(prompt) :].tolist()
        text = decode(out)
        samples.append(prompt + text.split("\n")[0])
    return samples


SAMPLE_PROMPTS = ("mia has", "what colour is tom's", "3 + 4 =", "lemon backwards", "the red cat is el", "x = f(")


def pretrain(config, device):
    """Train the GPT on the base corpus; returns the checkpoint dict (cached at out/<run>/base.pt)."""
    path = os.path.join(config.out_dir, config.run, "base.pt")
    expected = stage_config(config, "pretrain")
    checkpoint = load_checkpoint(path, expected)
    if checkpoint is not None and checkpoint["done"]:
        print(f"pretrain: reusing {path} (val loss {checkpoint['val_loss']:.4f})")
        return checkpoint

    torch.manual_seed(config.seed)
    train_ids, val_ids = load_corpus(config.corpus or None, n_lines=config.corpus_lines, seed=config.seed)
    model_args = dict(vocab_size=VOCAB_SIZE, block_size=config.block_size, n_layer=config.n_layer,
                      n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout)
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = model.configure_optimizer(config.lr, config.weight_decay, (config.beta1, config.beta2), device)
    generator = torch.Generator().manual_seed(config.seed)
    start_iter, history = 0, []
    if checkpoint is not None:  # an interrupted run with the same config: resume where it stopped
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["generator"])
        start_iter, history = checkpoint["iter"], checkpoint["history"]
        print(f"pretrain: resuming {path} at iteration {start_iter}")
    print(f"pretrain: {model.num_params():,} parameters, {len(train_ids):,} train tokens, device {device}")

    def snapshot(it, done, val_loss=None):
        return {"config": expected, "model_args": model_args, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "iter": it,
                "history": history, "done": done, "val_loss": val_loss}

    model.train()
    t0 = time.time()
    bar = tqdm(range(start_iter, config.max_iters), desc="pretrain", initial=start_iter, total=config.max_iters)
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it, config)
        x, y = get_batch(train_ids, config.batch_size, config.block_size, generator, device)
        _, loss, _ = model(x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: loss is {loss.item()} at iteration {it}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (it + 1) % config.eval_interval == 0 or it + 1 == config.max_iters:
            train_loss = estimate_lm_loss(model, train_ids, config, device, config.eval_iters)
            val_loss = estimate_lm_loss(model, val_ids, config, device, config.eval_iters)
            history.append({"iter": it + 1, "train_loss": train_loss, "val_loss": val_loss})
            bar.write(f"iter {it + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
            save_checkpoint(snapshot(it + 1, done=False), path)
    bar.close()
    seconds = time.time() - t0
    val_loss = history[-1]["val_loss"]
    samples = greedy_samples(model, SAMPLE_PROMPTS if not config.corpus else ("\n",), device)
    checkpoint = snapshot(config.max_iters, done=True, val_loss=val_loss)
    save_checkpoint(checkpoint, path)
    summary = {"val_loss": val_loss, "train_loss": history[-1]["train_loss"], "seconds": seconds,
               "ms_per_iter": 1000 * seconds / max(1, config.max_iters - start_iter), "history": history,
               "samples": samples, "params": model.num_params(), "config": expected}
    save_json(summary, os.path.join(config.out_dir, config.run, "pretrain.json"))
    print(f"pretrain: val loss {val_loss:.4f} in {seconds:.1f}s; greedy samples:")
    for sample in samples:
        print("   ", sample.replace("\n", "\\n"))
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------
# stage 2: TopK SAEs on the frozen base model's residual stream

def sae_points(config):
    return config.sae_points or tuple(range(1, config.n_layer + 1))


def load_saes(checkpoint, model, device, k=None):
    """{point: sae} for one k (default: the first of the sweep), checked against the model."""
    k = checkpoint["ks"][0] if k is None else k
    saes = {p: sae_from_dict(d, device) for p, d in checkpoint["saes"][k].items()}
    for p, sae in saes.items():
        check_sae_fits(sae, model, p)
    return saes


def train_sae_stage(config, device, base):
    """Train an SAE per point and per k on base-corpus text; cached at out/<run>/sae.pt."""
    run_dir = os.path.join(config.out_dir, config.run)
    path = os.path.join(run_dir, "sae.pt")
    expected = stage_config(config, "sae")
    checkpoint = load_checkpoint(path, expected)
    if checkpoint is not None:
        print(f"sae: reusing {path}")
        return checkpoint
    model = model_from_checkpoint(base, device)
    for p in model.parameters():
        p.requires_grad_(False)
    train_ids, val_ids = load_corpus(config.corpus or None, n_lines=config.corpus_lines, seed=config.seed)
    points = sae_points(config)
    t0 = time.time()
    checkpoint = {"config": expected, "ks": list(config.sae_k), "saes": {}}
    results = {"points": list(points), "by_k": {}}
    for k in config.sae_k:
        sae_kwargs = dict(d_sae=config.sae_expansion * config.n_embd, k=k, aux_k=config.sae_aux_k,
                          dead_tokens=config.sae_dead_tokens, auxk_coef=1 / 32 if config.sae_auxk else 0.0)
        saes, histories = train_saes(model, train_ids, points, sae_kwargs, config.sae_tokens, config.sae_steps,
                                     config.sae_batch_size, config.block_size, device, seed=config.seed)
        checkpoint["saes"][k] = {p: sae_to_dict(sae) for p, sae in saes.items()}
        metrics = sae_metrics(model, saes, val_ids, config.block_size, device)
        metrics["train_dead_fraction"] = {p: (sae.tokens_since_fired >= sae.config.dead_tokens).float().mean().item()
                                          for p, sae in saes.items()}
        metrics["history"] = histories
        results["by_k"][k] = metrics
        for p, m in metrics["points"].items():
            print(f"sae k={k} point {p}: L0 {m['l0']:.1f}, FVU {m['fvu']:.3f}, dead {m['dead_fraction']:.1%}, "
                  f"CE increase {m['ce_increase']:.4f} nats")
        print(f"sae k={k}: compound CE increase {metrics['compound_ce_increase']:.4f} nats "
              f"(clean CE {metrics['clean_ce']:.4f})")
    results["seconds"] = time.time() - t0
    save_checkpoint(checkpoint, path)
    save_json(results, os.path.join(run_dir, "sae.json"))
    plot_sae_metrics(results, run_dir)
    print(f"sae: trained in {results['seconds']:.1f}s; metrics in {run_dir}/sae.json, plots sae_*.png")
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------

def main(argv):
    try:
        config = parse_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = resolve_device(config)
    base = pretrain(config, device)
    if config.stage == "pretrain":
        return 0
    train_sae_stage(config, device, base)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
