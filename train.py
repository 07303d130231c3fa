"""
The entry point: configuration, the stages of the pipeline, the continual-learning loop, checkpoints.

    python train.py                       # every stage with the CPU defaults
    python train.py --stage=pretrain      # up to one stage: pretrain | sae | cl (= all)
    python train.py --stage=study         # idea 2: normal vs SAE-regularized pretraining, fresh SAEs on both
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
from dataclasses import dataclass

import torch
from tqdm import tqdm

import regularizers as reg
from data.corpus import get_batch, load_corpus
from data.tasks import DEFAULT_ORDER, TASKS, TaskSplit, build_task_suite, trim_padding
from data.tokenizer import NEWLINE, VOCAB_SIZE, decode, encode
from evaluate import plot_sae_metrics, sae_metrics, summarize_run, task_accuracy
from model import GPT, GPTConfig
from sae import SAEConfig, TopKSAE, check_sae_fits, sae_from_dict, sae_to_dict, train_saes


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
    n_embd: int = 96  # width, learning rate and steps per task chosen by bench/calibrate.py (README)
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers (nanoGPT's default is False)
    # pretraining (AdamW, cosine schedule with linear warmup)
    batch_size: int = 32
    max_iters: int = 1600
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_iters: int = 20
    # SAE regularization during pretraining (idea 2): TopK SAEs at every point 0..n_layer trained with the model
    sae_reg_lambda: float = 0.0  # 0 = off
    sae_reg_k: int = 8
    sae_reg_l1: float = 0.0  # optional L1 sparsity term; TopK already fixes L0
    sae_reg_expansion: int = 8  # d_sae of the jointly trained SAEs = sae_reg_expansion * n_embd
    # SAEs on the base model's residual stream
    sae_points: tuple[int, ...] = ()  # residual points; empty = every point after a block, 1..n_layer
    sae_expansion: int = 8  # d_sae = sae_expansion * n_embd
    sae_k: tuple[int, ...] = (8,)  # TopK; several values train a k sweep, the first is the one used later
    sae_steps: int = 2000
    sae_batch_size: int = 512  # tokens per SAE step
    sae_tokens: int = 200_000  # activations collected per point to train on
    sae_auxk: bool = True
    sae_aux_k: int = 64
    sae_dead_tokens: int = 20_000
    # continual learning
    tasks: tuple[str, ...] = DEFAULT_ORDER  # the order tasks are learned in
    methods: tuple[str, ...] = ("seqft", "ewc", "sae")
    seeds: tuple[int, ...] = (0,)
    steps_per_task: int = 200
    cl_batch_size: int = 32
    cl_lr: float = 3e-4  # AdamW, constant, a fresh optimizer per task, no weight decay
    n_train: int = 2000  # examples per task and split
    n_val: int = 100
    n_test: int = 200
    eval_split: str = "test"  # 'val' (carved from training data) is for tuning hyperparameters
    cl_dir: str = "cl"  # results go to out/<run>/<cl_dir>/<method>_seed<seed>.json
    # EWC
    ewc_lambda: float = 1e4  # chosen on val by bench/tune.py (README)
    ewc_mode: str = "separate"
    ewc_gamma: float = 1.0  # online mode: F <- gamma F_old + F_new
    ewc_fisher_examples: int = 256
    ewc_fisher_labels: str = "true"  # true: y sampled from the model; empirical: ground truth
    # SAE-guided activation regularization
    sae_lambda_p: float = 1e2  # these four chosen on val by bench/tune.py (README)
    sae_lambda_g: float = 1.0  # 0 turns the guide term off
    sae_eps: float = 0.02
    sae_delta: float = 0.2
    mask_examples: int = 256  # examples of the current task the mask is built from
    mask_knn: int = 4
    mask_alpha: float = 0.5
    mask_binary: bool = False  # ablation: threshold the mask at mask_threshold
    mask_threshold: float = 0.5
    sae_protect_past: bool = False  # ablation: also protect features earlier tasks' masks marked relevant
    sae_codes: str = "topk"  # drift on the TopK codes, or 'dense' ReLU pre-activations
    sae_reference: str = "task_start"  # theta_ref: the model at task start, or the 'base' model
    # replay (stores data; a reference point)
    replay_fraction: float = 0.05  # of each finished task's training examples kept
    replay_batch_size: int = 16  # replayed examples appended to each batch
    # the study of idea 2: normal vs SAE-regularized pretraining, then fresh SAEs at every point over a k sweep
    study_seeds: tuple[int, ...] = (0, 1)
    study_lambda: float = 1.0  # sae_reg_lambda of the regularized model
    study_k: tuple[int, ...] = (4, 8, 16)


CHOICES = {  # fields whose value must be one of a fixed set
    "stage": ("all", "pretrain", "sae", "cl", "study"),
    "device": ("auto", "cpu", "cuda"),
    "tasks": tuple(TASKS),
    "methods": ("seqft", "ewc", "sae", "replay", "multitask"),
    "eval_split": ("test", "val"),
    "ewc_mode": ("separate", "online"),
    "ewc_fisher_labels": ("true", "empirical"),
    "sae_codes": ("topk", "dense"),
    "sae_reference": ("task_start", "base"),
}
STAGE_KEYS = {  # the config fields each stage's result depends on (a stage also depends on the ones before it)
    "pretrain": ("seed", "corpus", "corpus_lines", "n_layer", "n_head", "n_embd", "block_size", "dropout",
                 "bias", "batch_size", "max_iters", "lr", "min_lr", "warmup_iters", "weight_decay", "beta1", "beta2",
                 "grad_clip", "eval_interval", "eval_iters", "sae_reg_lambda", "sae_reg_k", "sae_reg_l1",
                 "sae_reg_expansion"),
    "sae": ("sae_points", "sae_expansion", "sae_k", "sae_steps", "sae_batch_size", "sae_tokens", "sae_auxk",
            "sae_aux_k", "sae_dead_tokens"),
    "cl": ("tasks", "steps_per_task", "cl_batch_size", "cl_lr", "n_train", "n_val", "n_test", "eval_split",
           "ewc_lambda", "ewc_mode", "ewc_gamma", "ewc_fisher_examples", "ewc_fisher_labels", "sae_lambda_p",
           "sae_lambda_g", "sae_eps", "sae_delta", "mask_examples", "mask_knn", "mask_alpha", "mask_binary",
           "mask_threshold", "sae_protect_past", "sae_codes", "sae_reference", "replay_fraction",
           "replay_batch_size"),
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
                "sae_aux_k", "sae_dead_tokens", "sae_reg_expansion", "steps_per_task", "cl_batch_size", "n_train",
                "n_val", "n_test", "ewc_fisher_examples", "mask_examples", "mask_knn", "replay_batch_size"):
        if getattr(config, key) < 1:
            raise ValueError(f"--{key}={getattr(config, key)} must be at least 1")
    for point in config.sae_points:
        if not 0 <= point <= config.n_layer:
            raise ValueError(f"--sae_points: {point} is not a residual point; valid points are 0..{config.n_layer}")
    if not config.sae_k or not all(0 < k <= config.sae_expansion * config.n_embd for k in config.sae_k):
        raise ValueError(f"--sae_k={config.sae_k}: each k must be in 1..d_sae={config.sae_expansion * config.n_embd}")
    if not 0 < config.sae_reg_k <= config.sae_reg_expansion * config.n_embd:  # the jointly trained SAEs
        raise ValueError(f"--sae_reg_k={config.sae_reg_k} must be in 1..d_sae="
                         f"{config.sae_reg_expansion * config.n_embd}")
    if not config.study_seeds or not config.study_k:
        raise ValueError("--study_seeds and --study_k need at least one value each")
    for key in ("sae_reg_lambda", "sae_reg_l1", "study_lambda", "ewc_lambda", "ewc_gamma", "sae_lambda_p",
                "sae_lambda_g", "sae_eps", "sae_delta", "mask_alpha"):
        if getattr(config, key) < 0:
            raise ValueError(f"--{key}={getattr(config, key)} must be non-negative")
    if not config.tasks or len(set(config.tasks)) != len(config.tasks):
        raise ValueError(f"--tasks={','.join(config.tasks)}: name each task once; valid tasks: {', '.join(TASKS)}")
    if not config.methods or not config.seeds:
        raise ValueError("--methods and --seeds need at least one value each")
    if not 0.0 < config.replay_fraction <= 1.0:
        raise ValueError(f"--replay_fraction={config.replay_fraction} must be in (0, 1]")
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


def greedy_samples(model, prompts, device, max_new_tokens=40, one_line=True):
    """Greedy continuations of each prompt: to the end of its line, or max_new_tokens characters."""
    model.eval()
    samples = []
    for prompt in prompts:
        idx = torch.tensor([encode(prompt)], device=device)
        stop = NEWLINE if one_line else None
        text = decode(model.generate(idx, max_new_tokens, stop_token=stop)[0, len(prompt) :].tolist())
        samples.append(prompt + (text.split("\n")[0] if one_line else text))
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
                      n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, bias=config.bias)
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = model.configure_optimizer(config.lr, config.weight_decay, (config.beta1, config.beta2), device)
    joint_saes = {}  # idea 2: an SAE at every residual point, trained with the model, without weight decay
    if config.sae_reg_lambda > 0:
        sae_config = SAEConfig(d_in=config.n_embd, d_sae=config.sae_reg_expansion * config.n_embd,
                               k=config.sae_reg_k, auxk_coef=0.0)
        joint_saes = {p: TopKSAE(sae_config).to(device) for p in range(config.n_layer + 1)}
        optimizer.add_param_group({"params": [q for s in joint_saes.values() for q in s.parameters()],
                                   "weight_decay": 0.0})
    generator = torch.Generator().manual_seed(config.seed)
    start_iter, history = 0, []
    if checkpoint is not None:  # an interrupted run with the same config: resume where it stopped
        model.load_state_dict(checkpoint["model"])
        for p, state in checkpoint["joint_saes"].items():
            joint_saes[p].load_state_dict(state)
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["generator"])
        start_iter, history = checkpoint["iter"], checkpoint["history"]
        print(f"pretrain: resuming {path} at iteration {start_iter}")
    print(f"pretrain: {model.num_params():,} parameters, {len(train_ids):,} train tokens, device {device}")

    def snapshot(it, done, val_loss=None):
        return {"config": expected, "model_args": model_args, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "iter": it,
                "history": history, "done": done, "val_loss": val_loss,
                "joint_saes": {p: s.state_dict() for p, s in joint_saes.items()}}

    model.train()
    t0 = time.time()
    step_seconds = 0.0  # time in training steps only, without evaluation and checkpoints
    bar = tqdm(range(start_iter, config.max_iters), desc="pretrain", initial=start_iter, total=config.max_iters)
    for it in bar:
        t_step = time.time()
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it, config)
        x, y = get_batch(train_ids, config.batch_size, config.block_size, generator, device)
        _, loss, residuals = model(x, y, read=tuple(joint_saes))
        if joint_saes:
            loss = loss + reg.sae_training_penalty(residuals, joint_saes, config.sae_reg_lambda, config.sae_reg_l1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: loss is {loss.item()} at iteration {it}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        for sae in joint_saes.values():
            sae.remove_parallel_decoder_grad()
        optimizer.step()
        for sae in joint_saes.values():
            sae.normalize_decoder()
        step_seconds += time.time() - t_step
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
    if config.corpus:  # a user corpus: one long continuation of a newline
        samples = greedy_samples(model, ("\n",), device, max_new_tokens=200, one_line=False)
    else:
        samples = greedy_samples(model, SAMPLE_PROMPTS, device)
    checkpoint = snapshot(config.max_iters, done=True, val_loss=val_loss)
    save_checkpoint(checkpoint, path)
    summary = {"val_loss": val_loss, "train_loss": history[-1]["train_loss"], "seconds": seconds,
               "ms_per_iter": 1000 * step_seconds / max(1, config.max_iters - start_iter), "history": history,
               "samples": samples, "params": model.num_params(), "config": expected}
    save_json(summary, os.path.join(config.out_dir, config.run, "pretrain.json"))
    print(f"pretrain: val loss {val_loss:.4f} in {seconds:.1f}s; greedy samples:")
    for sample in samples:
        print("   ", sample.strip("\n").replace("\n", "\n    "))
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------
# stage 2: TopK SAEs on the frozen base model's residual stream

def sae_points(config):
    return config.sae_points or tuple(range(1, config.n_layer + 1))


def sae_kwargs(config, k):
    """The SAEConfig fields (all but d_in) that the config sets, for one k."""
    return dict(d_sae=config.sae_expansion * config.n_embd, k=k, aux_k=config.sae_aux_k,
                dead_tokens=config.sae_dead_tokens, auxk_coef=1 / 32 if config.sae_auxk else 0.0)


def load_saes(checkpoint, model, device, k=None):
    """{point: sae} for one k (default: the first of the sweep), checked against the model."""
    k = checkpoint["ks"][0] if k is None else k
    saes = {p: sae_from_dict(d, device) for p, d in checkpoint["saes"][k].items()}
    for p, sae in saes.items():
        check_sae_fits(sae, model, p)
        sae.requires_grad_(False)  # frozen: gradients flow through the SAE to the model, never into it
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
        saes, histories = train_saes(model, train_ids, points, sae_kwargs(config, k), config.sae_tokens,
                                     config.sae_steps, config.sae_batch_size, config.block_size, device,
                                     seed=config.seed)
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
# stage 3: continual learning


def evaluate_tasks(model, suite, config, device):
    """One row of the accuracy matrix: accuracy on every task's eval split, in task order."""
    return [task_accuracy(model, suite[name][config.eval_split], device) for name in config.tasks]


def concat_splits(splits, name="mixed"):
    """One TaskSplit holding the examples of several (same padded length)."""
    return TaskSplit(name, [e for s in splits for e in s.examples], *(
        torch.cat([getattr(s, key) for s in splits]) for key in ("x", "y", "answer_mask", "content_mask")))


def subset(split, idx):
    return TaskSplit(split.name, [split.examples[i] for i in idx.tolist()], split.x[idx], split.y[idx],
                     split.answer_mask[idx], split.content_mask[idx])


def train_steps(model, split, n_steps, config, device, generator, bar, penalty_fn=None, replay=None):
    """n_steps of AdamW on the answer-token cross-entropy of split, plus penalty_fn(batch, residuals) if given.

    Returns the seconds spent in the steps (for the step-time comparison)."""
    optimizer = model.configure_optimizer(config.cl_lr, 0.0, (config.beta1, config.beta2), device)
    model.train()
    read = penalty_fn.points if penalty_fn is not None else ()
    seconds = 0.0
    for step in range(n_steps):
        t0 = time.time()
        x, y, answer_mask, content_mask = split.batch(config.cl_batch_size, generator, device)
        if replay is not None:  # append a batch from the replay buffer
            old = replay.batch(config.replay_batch_size, generator, device)
            new = (x, y, answer_mask, content_mask)
            x, y, answer_mask, content_mask = (torch.cat([a, b]) for a, b in zip(new, old))
        x, y, answer_mask, content_mask = trim_padding(x, y, answer_mask, content_mask)
        _, ce, residuals = model(x, y, answer_mask, read=read)
        loss = ce
        logs = {}
        if penalty_fn is not None:
            penalty, logs = penalty_fn(x, content_mask, residuals)
            loss = ce + penalty
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} on task {split.name} step {step}; lower --cl_lr or the "
                                     "penalty weights")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if device == "cuda":  # CUDA runs asynchronously: wait for the step before reading the clock
            torch.cuda.synchronize()
        seconds += time.time() - t0
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(task=split.name, ce=f"{ce.item():.3f}", **{k: f"{v:.3f}" for k, v in logs.items()})
    return seconds


def make_sae_penalty(reference, saes, masks, config):
    """The SAE-guided penalty for one task, as a function of (batch, content mask, residuals), given the frozen
    reference model theta_ref."""

    def penalty_fn(x, content_mask, residuals):
        with torch.no_grad():
            _, _, ref_residuals = reference(x, read=tuple(saes))
        return reg.sae_guided_penalty(residuals, ref_residuals, saes, masks, content_mask, config.sae_lambda_p,
                                      config.sae_lambda_g, config.sae_eps, config.sae_delta, config.sae_codes)

    penalty_fn.points = tuple(saes)
    return penalty_fn


def make_ewc_penalty(model, state, config):
    def penalty_fn(x, content_mask, residuals):
        return reg.ewc_penalty(model, state, config.ewc_lambda), {}

    penalty_fn.points = ()
    return penalty_fn


def run_method(method, seed, config, device, base, sae_checkpoint, suite, lm_val_ids):
    """Learn the tasks in order with one method; returns the results dict (accuracy matrix R and timings)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = model_from_checkpoint(base, device)
    names = config.tasks
    lm_loss_before = estimate_lm_loss(model, lm_val_ids, config, device, config.eval_iters)
    R = [evaluate_tasks(model, suite, config, device)]
    state = {"anchors": []}  # EWC
    masks, replay_idx = [], {}  # SAE-guided: one {point: mask} per task; replay: kept example indices per task
    saes = load_saes(sae_checkpoint, model, device) if method == "sae" else None
    base_model = reg.frozen_copy(model) if method == "sae" and config.sae_reference == "base" else None
    step_seconds, n_steps, t_start = 0.0, 0, time.time()
    total_steps = config.steps_per_task * len(names)
    bar = tqdm(total=total_steps, desc=f"cl {method} seed {seed}")
    if method == "multitask":  # the upper bound: every task at once, as many steps as the whole sequence
        mixed = concat_splits([suite[name]["train"] for name in names])
        step_seconds = train_steps(model, mixed, total_steps, config, device, generator, bar)
        n_steps = total_steps
        R.append(evaluate_tasks(model, suite, config, device))
    else:
        for t, name in enumerate(names):
            train_split = suite[name]["train"]
            penalty_fn, replay = None, None
            if method == "ewc" and state["anchors"]:
                penalty_fn = make_ewc_penalty(model, state, config)
            elif method == "sae":
                reference = base_model if base_model is not None else reg.frozen_copy(model)
                mask = reg.build_feature_masks(reference, saes, train_split, config.mask_examples, config.mask_knn,
                                               config.mask_alpha, config.sae_codes,
                                               config.mask_threshold if config.mask_binary else None)
                masks.append(mask)
                if config.sae_protect_past:
                    mask = {p: reg.merge_past_masks(m, [old[p] for old in masks[:-1]]) for p, m in mask.items()}
                penalty_fn = make_sae_penalty(reference, saes, mask, config)
            elif method == "replay" and replay_idx:
                replay = concat_splits([subset(suite[old]["train"], idx) for old, idx in replay_idx.items()])
            step_seconds += train_steps(model, train_split, config.steps_per_task, config, device, generator, bar,
                                        penalty_fn, replay)
            n_steps += config.steps_per_task
            if method == "ewc":
                fisher = reg.fisher_diagonal(model, train_split, config.ewc_fisher_examples,
                                             config.ewc_fisher_labels, seed=seed + t)
                reg.ewc_consolidate(state, model, fisher, config.ewc_mode, config.ewc_gamma)
            elif method == "replay":
                replay_idx[name] = reg.replay_sample(train_split, config.replay_fraction, seed=seed + t)
            R.append(evaluate_tasks(model, suite, config, device))
            bar.write(f"{method} seed {seed} after {name}: " + " ".join(f"{n}={a:.2f}" for n, a in zip(names, R[-1])))
    bar.close()
    retained = {  # what the method keeps between tasks, in bytes
        "seqft": 0, "multitask": 0,
        "ewc": reg.tensor_bytes(state["anchors"]),
        "sae": reg.tensor_bytes(masks),
        "replay": sum(reg.tensor_bytes([suite[n]["train"].x[i], suite[n]["train"].y[i]])
                      for n, i in replay_idx.items()),
    }[method]
    return {"method": method, "seed": seed, "tasks": list(names), "eval_split": config.eval_split, "R": R,
            "lm_loss_before": lm_loss_before,
            "lm_loss_after": estimate_lm_loss(model, lm_val_ids, config, device, config.eval_iters),
            "retained_bytes": retained, "step_seconds": step_seconds / n_steps,
            "wall_seconds": time.time() - t_start}


def continual_learning(config, device, base, sae_checkpoint):
    """Run every method and seed (each cached as out/<run>/cl/<method>_seed<seed>.json) and write the report."""
    run_dir = os.path.join(config.out_dir, config.run)
    expected = stage_config(config, "cl")
    suite = build_task_suite(config.tasks, config.n_train, config.n_val, config.n_test, seed=0)
    _, lm_val_ids = load_corpus(config.corpus or None, n_lines=config.corpus_lines, seed=config.seed)
    for method in config.methods:
        for seed in config.seeds:
            path = os.path.join(run_dir, config.cl_dir, f"{method}_seed{seed}.json")
            if os.path.exists(path):
                with open(path) as f:
                    cached = json.load(f)
                if cached.get("config") == json.loads(json.dumps(expected)):
                    print(f"cl: reusing {path}")
                    continue
            result = run_method(method, seed, config, device, base, sae_checkpoint, suite, lm_val_ids)
            result["config"] = expected
            save_json(result, path)
    return summarize_run(run_dir, config.methods, config.seeds, config.cl_dir)


# ----------------------------------------------------------------------------------------------------------------
# the study of idea 2: does SAE-regularized pretraining make the activations easier to decompose?


def fresh_saes_on_frozen_model(model, train_ids, val_ids, config, k, device):
    """Train new TopK SAEs at every residual point of a frozen model and measure them on held-out text."""
    for p in model.parameters():
        p.requires_grad_(False)
    points = tuple(range(config.n_layer + 1))
    saes, _ = train_saes(model, train_ids, points, sae_kwargs(config, k), config.sae_tokens, config.sae_steps,
                         config.sae_batch_size, config.block_size, device, seed=config.seed)
    return sae_metrics(model, saes, val_ids, config.block_size, device)


def study(config, device):
    """For each seed: a normal and an SAE-regularized model (same steps and learning rate), then fresh SAEs at
    every point over the k sweep. Writes out/<run>/study/study.json and the plots study_*.png."""
    from evaluate import plot_study, study_table

    study_dir = os.path.join(config.out_dir, config.run, "study")
    train_ids, val_ids = load_corpus(config.corpus or None, n_lines=config.corpus_lines, seed=config.seed)
    results = {"normal": {}, "regularized": {}, "study_k": list(config.study_k), "lambda": config.study_lambda}
    for seed in config.study_seeds:
        for variant, lam in (("normal", 0.0), ("regularized", config.study_lambda)):
            variant_config = dataclasses.replace(config, seed=seed, sae_reg_lambda=lam,
                                                 run=os.path.join(config.run, "study", f"{variant}_seed{seed}"))
            path = os.path.join(config.out_dir, variant_config.run, "fresh_saes.json")
            expected = {**stage_config(variant_config, "sae"), "study_k": list(config.study_k)}
            if os.path.exists(path):
                with open(path) as f:
                    cached = json.load(f)
                if cached.get("config") == json.loads(json.dumps(expected)):
                    print(f"study: reusing {path}")
                    results[variant][seed] = cached
                    continue
            checkpoint = pretrain(variant_config, device)
            with open(os.path.join(config.out_dir, variant_config.run, "pretrain.json")) as f:
                pretrain_summary = json.load(f)
            model = model_from_checkpoint(checkpoint, device)
            by_k = {}
            for k in config.study_k:
                by_k[k] = fresh_saes_on_frozen_model(model, train_ids, val_ids, variant_config, k, device)
                print(f"study {variant} seed {seed} k={k}: total L0 {by_k[k]['total_l0']:.1f}, compound CE "
                      f"increase {by_k[k]['compound_ce_increase']:.4f}")
            result = {"config": expected, "val_ce": checkpoint["val_loss"],
                      "ms_per_iter": pretrain_summary["ms_per_iter"], "by_k": by_k}
            save_json(result, path)
            results[variant][seed] = json.loads(json.dumps(result))
    save_json(results, os.path.join(study_dir, "study.json"))
    results = json.loads(json.dumps(results))  # one form for the plots: JSON's string keys
    plot_study(results, study_dir)
    table = study_table(results)
    with open(os.path.join(study_dir, "study.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return results


# ----------------------------------------------------------------------------------------------------------------

def main(argv):
    try:
        config = parse_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = resolve_device(config)
    if config.stage == "study":
        study(config, device)
        return 0
    base = pretrain(config, device)
    if config.stage == "pretrain":
        return 0
    sae_checkpoint = train_sae_stage(config, device, base)
    if config.stage == "sae":
        return 0
    continual_learning(config, device, base, sae_checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
