"""
The entry point: the Config, the stages of the pipeline, and the continual-learning loop.

    python train.py                       # every stage with the CPU defaults
    python train.py --help                # every key with its default and meaning, by stage
    python train.py --stage=pretrain      # stop after a stage: pretrain | sae | cl (= all)
    python train.py --methods=seqft,ewc,si,mas,lwf,o_lora,sae_fd,sae_guided,replay,multitask --seeds=0,1,2 --jobs=2
    python train.py --n_layer=4 --corpus=../shared/data/tinyshakespeare.txt --stage=pretrain

Stages write to out/<run>/ and cache their result with what made it (configurator.py): a later run reuses a stage
whose config, code, data, device and upstream checkpoint are unchanged and redoes it otherwise. Checkpoints are
written atomically, and an interrupted pretraining resumes from its last checkpoint.
"""

import copy
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

import configurator as cfg
from configurator import progress
from data.corpus import get_batch, load_corpus
from data.instructions import AUX_TASKS, aux_task_names
from data.tasks import DEFAULT_ORDER, TASKS, answer_format, build_task_suite, concat_splits, trim_padding
from data.tokenizer import NEWLINE, VOCAB_SIZE, decode, encode
from evaluate import (BASE_DIR, forced_choice, forgetting_diagnostic, forgetting_snapshot, mean_accuracy,
                      plot_sae_metrics, sae_metrics, summarize_run, task_accuracy)
from model import GPT, LORA_TARGETS, GPTConfig
from regularizers import METHODS, RENAMED_METHODS, Method, sae_training_penalty, tensor_bytes
from sae import SAE_KINDS, SAEConfig, check_sae_fits, make_sae, sae_from_dict, sae_to_dict, train_saes


@dataclass
class Config:
    # where and how
    run: str = "default"  # results go to out_dir/run/
    preset: str = ""  # a named set of the keys below (PRESETS); 'paper' = the paper's regime; given keys override it
    out_dir: str = "out"  # the folder all runs go to
    stage: str = "all"  # stop after this stage: pretrain | sae | cl (= all)
    device: str = "auto"  # auto = cuda if available, else cpu
    seed: int = 0  # seed of pretraining, the generated corpus and the SAEs
    corpus: str = ""  # path of a text file; empty = the generated tiny-world corpus
    corpus_lines: int = 60_000  # lines of the generated corpus
    # model
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 96  # width of the residual stream (chosen by bench/calibrate.py, docs/calibration.md)
    block_size: int = 64  # longest sequence, in characters
    dropout: float = 0.0  # dropout probability in pretraining
    bias: bool = True  # biases in Linear and LayerNorm layers (nanoGPT's default is False)
    # pretraining (AdamW, cosine schedule with linear warmup)
    batch_size: int = 32  # windows per pretraining step
    max_iters: int = 1600  # pretraining steps
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine
    warmup_iters: int = 100  # steps of linear warmup
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    beta1: float = 0.9  # AdamW beta1 (pretraining and continual learning)
    beta2: float = 0.99  # AdamW beta2 (pretraining and continual learning)
    grad_clip: float = 1.0  # clip the gradient norm to this in every stage; 0 = no clipping
    eval_interval: int = 200  # steps between evaluations and checkpoints
    eval_iters: int = 20  # batches per loss estimate
    # instruction phase, the end of the base stage: tag-routed auxiliary tasks (data/instructions.py)
    instruct_tags: int = 0  # auxiliary tasks learned (the first n of AUX_TASKS); 0 = no instruction phase
    instruct_iters: int = 1000  # steps of the phase: each an auxiliary batch (answer tokens) plus a corpus batch
    instruct_lr: float = 1e-3  # its peak learning rate, cosine-decayed to min_lr
    instruct_examples: int = 500  # training prompts per auxiliary task (32 more per task are held out)
    # SAE-regularized pretraining: an SAE at every point 0..n_layer trained jointly with the model
    sae_reg_lambda: float = 0.0  # weight of the reconstruction term; 0 = off
    sae_reg_kind: str = "topk"  # the joint SAEs: 'topk', or 'relu' (ReLU + L1, the original study's kind)
    sae_reg_k: int = 8  # TopK of joint TopK SAEs
    sae_reg_l1: tuple[float, ...] = (0.0,)  # sparsity weight per point 0..n_layer, or one for all (TopK: optional)
    sae_reg_expansion: int = 8  # d_sae of the joint SAEs = sae_reg_expansion * n_embd, unless sae_reg_widths
    sae_reg_widths: tuple[int, ...] = ()  # d_sae per point 0..n_layer; empty = sae_reg_expansion * n_embd
    sae_reg_norm: str = "norm"  # reconstruction / ||x|| ('norm', the original's) or / ||x||^2 ('norm2', scale-free)
    # SAEs on the base model's residual stream
    sae_kind: str = "topk"  # 'topk', or 'relu' (ReLU + L1: L0 follows sae_l1; sae_k then takes one, unused, value)
    sae_l1: float = 0.01  # a ReLU SAE's sparsity weight
    sae_points: tuple[int, ...] = ()  # residual points; empty = every point after a block, 1..n_layer
    sae_expansion: int = 8  # d_sae = sae_expansion * n_embd
    sae_k: tuple[int, ...] = (8,)  # TopK; several values train a k sweep, the first is the one used later
    sae_steps: int = 2000  # training steps per SAE
    sae_batch_size: int = 512  # tokens per SAE step
    sae_tokens: int = 200_000  # activations collected per point to train on
    sae_auxk: bool = True  # the auxiliary loss that revives dead latents
    sae_aux_k: int = 64  # dead latents AuxK may use per token
    sae_dead_firings: float = 1000.0  # dead after this many expected firings without one (d_sae / k tokens each)
    # continual learning
    tasks: tuple[str, ...] = DEFAULT_ORDER  # the order tasks are learned in
    methods: tuple[str, ...] = ("seqft", "ewc", "sae_guided")  # methods to run (regularizers.METHODS)
    seeds: tuple[int, ...] = (0,)  # fine-tuning seeds: batch order, importance samples, replay buffer
    steps_per_task: int = 200  # AdamW steps per task
    cl_batch_size: int = 32  # examples per step
    cl_lr: float = 3e-4  # AdamW, constant, a fresh optimizer per task, no weight decay
    finetune: str = "full"  # 'full': every weight learns; 'lora': adapters on frozen weights (model.add_lora)
    lora_rank: int = 8  # rank r of each adapter
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = LORA_TARGETS  # projections of every block that get an adapter
    content_tokens: str = "all"  # where SAE-guided and LwF look: 'all' real tokens, or 'no_template' (no tag, no ' > ')
    n_train: int = 2000  # training examples per task
    n_val: int = 100  # validation examples per task (at most; carved from training questions)
    n_test: int = 200  # test examples per task (at most)
    eval_split: str = "test"  # the split R is measured on; 'val' is for tuning hyperparameters
    cl_dir: str = "cl"  # results go to out/<run>/<cl_dir>/<method>_seed<seed>.json
    jobs: int = 2  # (method, seed) runs at once, in processes; each run uses one thread, whatever this is
    # what a method keeps of the earlier tasks, measured after the sequence (never fed to training)
    relearn_steps: tuple[int, ...] = (0, 5, 20)  # relearn@n: n steps of fine-tuning on one earlier task; empty = off
    forced_choice_k: int = 9  # distractors per example in forced choice (fewer if a task has fewer answers); 0 = off
    # EWC: w = diagonal Fisher
    ewc_lambda: float = 1e5  # penalty weight (chosen on val by bench/tune.py, docs/tuning.md)
    ewc_mode: str = "separate"  # one (F, theta*) per task, or 'online': F <- gamma F_old + F_new
    ewc_gamma: float = 1.0  # online mode's decay of the old Fisher
    ewc_fisher_examples: int = 256  # examples the Fisher is estimated on
    ewc_fisher_labels: str = "true"  # true: y sampled from the model; empirical: ground truth
    # SI: w = path integral of -g * delta_theta over the task
    si_lambda: float = 1e3  # penalty weight (chosen on val by bench/tune.py)
    si_xi: float = 1e-3  # damping of the division by the squared total change
    # MAS: w = mean |gradient of the squared output norm|
    mas_lambda: float = 1.0  # penalty weight (chosen on val by bench/tune.py)
    mas_examples: int = 256  # examples the importance is estimated on
    # LwF: distillation of the task-start model's outputs
    lwf_lambda: float = 1.0  # weight of the KL term (chosen on val by bench/tune.py)
    lwf_temperature: float = 2.0  # softmax temperature T of both distributions
    # O-LoRA: an adapter set per task (lora_rank, lora_alpha, lora_targets; its own under finetune=full), all summed
    o_lora_lambda: float = 0.1  # weight of the orthogonality loss sum_{s<t} ||A_t A_s^T||_F^2 (chosen on val)
    # freeze (Zheng et al. 2025): the bottom of the model is not trained during the sequence
    freeze_layers: int = 1  # blocks frozen from the bottom, with the embeddings (and so the tied head; chosen on val)
    # SAE-FD: distillation of SAE codes on stored anchors of finished tasks (stores data)
    sae_fd_lambda: float = 1.0  # weight of the squared code distance on the anchors (chosen on val)
    sae_fd_anchors: int = 64  # training inputs of each finished task kept, with their SAE codes
    sae_fd_batch_size: int = 16  # anchors in each step's distillation batch
    # SAE-guided activation regularization
    sae_guided_lambda_p: float = 100.0  # weight of the protect hinge (these four chosen on val by bench/tune.py)
    sae_guided_lambda_g: float = 1.0  # weight of the guide hinge; 0 turns it off
    sae_guided_eps: float = 0.005  # protected features may drift this much for free
    sae_guided_delta: float = 0.05  # relevant features should drift at least this much
    sae_guided_mask_examples: int = 256  # examples of the current task the mask is built from
    sae_guided_mask_knn: int = 4  # decoder neighbours a feature's relevance spreads to
    sae_guided_mask_alpha: float = 0.5  # how much relevance spreads to a neighbour
    sae_guided_mask_binary: bool = False  # ablation: threshold the mask at sae_guided_mask_threshold
    sae_guided_mask_threshold: float = 0.5  # the threshold of a binary mask
    sae_guided_mask_random: bool = False  # ablation: the mask's values on randomly permuted features (same mass)
    sae_guided_protect_past: bool = False  # ablation: also protect features earlier tasks' masks marked
    sae_guided_points: tuple[int, ...] = ()  # ablation: the SAE points the penalty uses; empty = every SAE point
    sae_guided_codes: str = "topk"  # drift on the TopK codes, or 'dense' ReLU pre-activations
    sae_guided_reference: str = "task_start"  # theta_ref: the model at task start, or the 'base' model
    # replay (stores data; a reference point)
    replay_fraction: float = 0.05  # share of each finished task's training examples kept
    replay_batch_size: int = 16  # replayed examples appended to each batch
    # the forgetting diagnostic (evaluate.forgetting_diagnostic): measurement only, never fed to training
    diagnose: bool = True  # after every task, on each earlier task: drift in its SAE features and the rest, ...
    diagnose_examples: int = 64  # evaluation examples per task it looks at


PRESETS = {  # name -> the keys it sets
    # the paper's regime as calibrated on the 2-core CPU (README, "The paper's regime"): an instruction-following
    # base (32 auxiliary tags), one set of LoRA adapters on every projection of the frozen base, the frozen base with
    # the adapters off as SAE-guided's reference, drift measured on content tokens without the template; the
    # penalty weights chosen for it on val (docs/tuning.md; where the choice is the default, it is not repeated here)
    "paper": {"instruct_tags": 32, "finetune": "lora", "lora_rank": 8, "cl_lr": 1e-3, "sae_guided_reference": "base",
              "content_tokens": "no_template", "ewc_lambda": 100.0, "lwf_lambda": 0.1, "o_lora_lambda": 100.0,
              "sae_fd_lambda": 10.0, "sae_guided_lambda_p": 1e4, "sae_guided_lambda_g": 0.0, "sae_guided_eps": 0.0,
              "sae_guided_delta": 0.0},
    # the original SAE-regularization study (peterlai/gpt-circuits, experiments/regularization/setup.py,
    # RegularizeAllLayersExperiment, with its config/gpt and config/sae settings for shakespeare_64x4): 4 layers,
    # 64 wide, character level, block 128, batch 128, 15,000 steps, lr 1e-3 (750 warmup) decaying to 1e-5; ReLU + L1
    # SAEs at all 5 points, of its widths and L1 coefficients, lambda 3, reconstruction / ||x||. The normal model is
    # the same with --sae_reg_lambda=0; the corpus is tinyshakespeare (--corpus); bench/sae_reg.py --sweep=original
    # trains its sweep of fresh SAEs. Weight decay, betas and gradient clipping stay ours (README).
    "gpt_circuits": {"n_layer": 4, "n_head": 4, "n_embd": 64, "block_size": 128, "dropout": 0.0, "batch_size": 128,
                     "max_iters": 15_000, "lr": 1e-3, "min_lr": 1e-5, "warmup_iters": 750, "eval_interval": 250,
                     "eval_iters": 100, "sae_reg_lambda": 3.0, "sae_reg_kind": "relu",
                     "sae_reg_widths": (512, 512, 2048, 4096, 4096), "sae_reg_l1": (0.020, 0.035, 0.085, 0.07, 0.075),
                     "sae_reg_norm": "norm", "sae_points": (0, 1, 2, 3, 4), "sae_tokens": 1_000_000},
}
CHOICES = {  # fields whose value must be one of a fixed set
    "preset": ("",) + tuple(PRESETS),
    "stage": ("all", "pretrain", "sae", "cl"),
    "device": ("auto", "cpu", "cuda"),
    "tasks": tuple(TASKS),
    "methods": tuple(METHODS),
    "eval_split": ("test", "val"),
    "ewc_mode": ("separate", "online"),
    "ewc_fisher_labels": ("true", "empirical"),
    "sae_guided_codes": ("topk", "dense"),
    "sae_guided_reference": ("task_start", "base"),
    "finetune": ("full", "lora"),
    "content_tokens": ("all", "no_template"),
    "lora_targets": LORA_TARGETS,
    "sae_kind": tuple(SAE_KINDS),
    "sae_reg_kind": tuple(SAE_KINDS),
    "sae_reg_norm": ("norm", "norm2"),
}
STAGE_KEYS = {  # the config fields each stage's result depends on, beyond those of the stages it is built from
    "pretrain": ("seed", "corpus", "corpus_lines", "n_layer", "n_head", "n_embd", "block_size", "dropout",
                 "bias", "batch_size", "max_iters", "lr", "min_lr", "warmup_iters", "weight_decay", "beta1", "beta2",
                 "grad_clip", "eval_interval", "eval_iters", "instruct_tags", "instruct_iters", "instruct_lr",
                 "instruct_examples", "sae_reg_lambda", "sae_reg_kind", "sae_reg_k", "sae_reg_l1",
                 "sae_reg_expansion", "sae_reg_widths", "sae_reg_norm"),
    "sae": ("sae_kind", "sae_l1", "sae_points", "sae_expansion", "sae_k", "sae_steps", "sae_batch_size",
            "sae_tokens", "sae_auxk", "sae_aux_k", "sae_dead_firings"),
    "cl": ("tasks", "steps_per_task", "cl_batch_size", "cl_lr", "finetune", "lora_rank", "lora_alpha", "lora_targets",
           "content_tokens", "n_train", "n_val", "n_test", "eval_split", "diagnose", "diagnose_examples",
           "relearn_steps", "forced_choice_k"),
}  # and each method's own fields, '<method>_*' (regularizers.Method.config_keys)
NOT_RESULT_KEYS = ("run", "out_dir", "preset", "stage", "device", "methods", "seeds", "cl_dir", "jobs")  # device,
# preset: in the keys as the resolved device and as the values the preset set
RENAMED_KEYS = {old: "sae_guided_" + new for old, new in (
    ("sae_lambda_p", "lambda_p"), ("sae_lambda_g", "lambda_g"), ("sae_eps", "eps"), ("sae_delta", "delta"),
    ("mask_examples", "mask_examples"), ("mask_knn", "mask_knn"), ("mask_alpha", "mask_alpha"),
    ("mask_binary", "mask_binary"), ("mask_threshold", "mask_threshold"), ("sae_protect_past", "protect_past"),
    ("sae_codes", "codes"), ("sae_reference", "reference"))}


# ----------------------------------------------------------------------------------------------------------------
# configuration


def validate(config):
    """Everything that can be checked before compute is spent; ValueError names the key and what is allowed."""
    cfg.validate(config, CHOICES, at_least_zero=("seed", "seeds", "sae_points", "sae_guided_points",
                                                "corpus_lines", "instruct_tags", "relearn_steps", "forced_choice_k",
                                                "freeze_layers"))
    if list(config.relearn_steps) != sorted(set(config.relearn_steps)):
        raise ValueError(f"--relearn_steps={','.join(map(str, config.relearn_steps))}: give increasing step counts, "
                         "each once (e.g. 0,5,20)")
    aux_task_names(config.instruct_tags)
    if config.n_embd % config.n_head:
        raise ValueError(f"--n_embd={config.n_embd} must be divisible by --n_head={config.n_head}")
    if config.lr <= 0 or config.cl_lr <= 0:
        raise ValueError(f"--lr={config.lr} and --cl_lr={config.cl_lr} must be above 0")
    if config.min_lr > config.lr:
        raise ValueError(f"--min_lr={config.min_lr} must be at most --lr={config.lr}")
    for key in ("beta1", "beta2", "dropout"):
        if not getattr(config, key) < 1.0:
            raise ValueError(f"--{key}={getattr(config, key)} must be below 1")
    for point in config.sae_points:
        if not 0 <= point <= config.n_layer:
            raise ValueError(f"--sae_points: {point} is not a residual point; valid points are 0..{config.n_layer}")
    d_sae = config.sae_expansion * config.n_embd
    if not all(0 < k <= d_sae for k in config.sae_k):
        raise ValueError(f"--sae_k={','.join(map(str, config.sae_k))}: each k must be in 1..d_sae={d_sae}")
    n_points = config.n_layer + 1  # the jointly trained SAEs, one per point 0..n_layer
    for key, allowed in (("sae_reg_l1", (1, n_points)), ("sae_reg_widths", (0, n_points))):
        if len(getattr(config, key)) not in allowed:
            raise ValueError(f"--{key}: give {' or '.join(map(str, allowed))} values (points 0..{config.n_layer}), "
                             f"not {len(getattr(config, key))}")
    widths = [s.d_sae for s in joint_sae_configs(config).values()]
    if config.sae_reg_kind == "topk" and not config.sae_reg_k <= min(widths):
        raise ValueError(f"--sae_reg_k={config.sae_reg_k} must be in 1..d_sae={min(widths)}")
    if config.sae_kind == "relu" and len(config.sae_k) > 1:
        raise ValueError(f"--sae_k={','.join(map(str, config.sae_k))}: a sweep of k needs --sae_kind=topk "
                         "(a ReLU SAE's L0 follows --sae_l1)")
    if not config.tasks or len(set(config.tasks)) != len(config.tasks):
        raise ValueError(f"--tasks={','.join(config.tasks)}: name each task once; valid tasks: {', '.join(TASKS)}")
    if not config.methods or not config.seeds or not config.sae_k:
        raise ValueError("--methods, --seeds and --sae_k need at least one value each")
    for method in METHODS.values():
        method.check(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda was asked for, but no CUDA device is available; use --device=cpu or auto")


def parse_args(argv):
    """Config from ['--key=value', ...]; deprecated names are accepted with a warning."""
    config = cfg.parse_args(Config, argv, renamed=RENAMED_KEYS, presets=PRESETS)
    if any(m in RENAMED_METHODS for m in config.methods):
        for old, new in RENAMED_METHODS.items():
            if old in config.methods:
                print(f"warning: the method '{old}' is now called '{new}'; running {new}", file=sys.stderr)
        config = dataclasses.replace(config, methods=tuple(RENAMED_METHODS.get(m, m) for m in config.methods))
    validate(config)
    return config


def resolve_device(config):
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def joint_sae_configs(config):
    """{point: SAEConfig} of the SAEs trained jointly with the model, points 0..n_layer: the width and sparsity
    weight of each point (one value given = every point), no AuxK."""
    points = range(config.n_layer + 1)
    widths = config.sae_reg_widths or [config.sae_reg_expansion * config.n_embd] * len(points)
    l1s = config.sae_reg_l1 if len(config.sae_reg_l1) > 1 else config.sae_reg_l1 * len(points)
    return {p: SAEConfig(d_in=config.n_embd, d_sae=widths[p], k=config.sae_reg_k, kind=config.sae_reg_kind, l1=l1s[p],
                         auxk_coef=0.0) for p in points}


def stage_config(config, *stages):
    """The config fields the given stages' results depend on."""
    return {key: getattr(config, key) for stage in stages for key in STAGE_KEYS[stage]}


@functools.lru_cache(maxsize=4)
def corpus(path, n_lines, seed, block_size):
    """(train_ids, val_ids) of the corpus, made once per process (the generated corpus takes a few seconds)."""
    return load_corpus(path or None, n_lines=n_lines, seed=seed, block_size=block_size)


def corpus_of(config):
    return corpus(config.corpus, config.corpus_lines, config.seed, config.block_size)


def task_suite(config):
    return build_task_suite(config.tasks, config.n_train, config.n_val, config.n_test, seed=0,
                            block_size=config.block_size, template_is_content=config.content_tokens == "all")


AUX_HELD_OUT = 32  # held-out prompts per auxiliary task: the instruction-following accuracy is measured on them


def aux_suite(config):
    """{aux task: {'train', 'val' (empty), 'test' (held out)}} of the instruction phase; {} without one."""
    if not config.instruct_tags:
        return {}
    return build_task_suite(aux_task_names(config.instruct_tags), config.instruct_examples, 0, AUX_HELD_OUT, seed=0,
                            block_size=config.block_size, tasks=AUX_TASKS)


def aux_accuracy(model, suite, device):
    """Instruction following: the mean accuracy over the auxiliary tasks' held-out prompts."""
    return mean_accuracy(model, [s["test"] for s in suite.values()], device)


def model_from_checkpoint(checkpoint, device):
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device)


def summary_is_there(stage, path, summary_path, key):
    """A finished stage is reused only with its summary JSON, made with the same key, beside it; else it is redone
    (and the summary written again)."""
    if cfg.load_json_result(summary_path, key) is not None:
        print(f"{stage}: reusing {path}")
        return True
    print(f"{stage}: {summary_path} is missing or stale; redoing the stage")
    return False


def clip_gradients(parameters, grad_clip):
    """Clip the global gradient norm to grad_clip; 0 means no clipping (in every stage)."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)


def check_finite(loss, where, advice):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()} {where}; {advice}")


# ----------------------------------------------------------------------------------------------------------------
# stage 1: pretraining on the base corpus


def get_lr(it, config):
    """Linear warmup to lr over warmup_iters, then cosine decay to min_lr at max_iters; in the instruction phase
    that follows, a second cosine from instruct_lr to min_lr over instruct_iters."""
    if config.instruct_tags and it >= config.max_iters:
        progress_ = (it - config.max_iters) / max(1, config.instruct_iters)
        return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress_)) * (config.instruct_lr - config.min_lr)
    if it < config.warmup_iters:
        return config.lr * (it + 1) / config.warmup_iters
    progress_ = min(1.0, (it - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters))
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress_)) * (config.lr - config.min_lr)


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


@torch.no_grad()
def activation_norms(model, ids, config, device, n_batches=2, seed=1234):
    """{point: mean ||x||} over the residual points 0..n_layer on fixed windows of ids: the scale the SAE
    regularizer's reconstruction term / ||x|| depends on, logged at every evaluation of pretraining."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    points = tuple(range(model.config.n_layer + 1))
    totals = dict.fromkeys(points, 0.0)
    for _ in range(n_batches):
        x, _ = get_batch(ids, config.batch_size, config.block_size, generator, device)
        residuals = model(x, read=points)[2]
        for p in points:
            totals[p] += residuals[p].norm(dim=-1).mean().item() / n_batches
    model.train(was_training)
    return {str(p): v for p, v in totals.items()}


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
    """Train the GPT on the base corpus, then (with --instruct_tags) on the auxiliary tasks mixed with corpus text;
    returns the checkpoint dict (cached at out/<run>/base.pt, with its summary in pretrain.json: the stage is
    reused only when both are there and made by this key)."""
    run_dir = os.path.join(config.out_dir, config.run)
    path, summary_path = os.path.join(run_dir, "base.pt"), os.path.join(run_dir, "pretrain.json")
    key = cfg.result_key(stage_config(config, "pretrain"), device, config.corpus)
    checkpoint = cfg.load_checkpoint(path, key)
    if checkpoint is not None and checkpoint["done"]:
        if summary_is_there("pretrain", path, summary_path, key):
            return checkpoint
        checkpoint = None

    torch.manual_seed(config.seed)
    train_ids, val_ids = corpus_of(config)
    model_args = dict(vocab_size=VOCAB_SIZE, block_size=config.block_size, n_layer=config.n_layer,
                      n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, bias=config.bias)
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = model.configure_optimizer(config.lr, config.weight_decay, (config.beta1, config.beta2), device)
    joint_saes = {}  # SAE-regularized pretraining: an SAE at every point, trained with the model, no weight decay
    if config.sae_reg_lambda > 0:
        joint_saes = {p: make_sae(c).to(device) for p, c in joint_sae_configs(config).items()}
        optimizer.add_param_group({"params": [q for s in joint_saes.values() for q in s.parameters()],
                                   "weight_decay": 0.0})
    aux = aux_suite(config)  # the instruction phase runs from max_iters to total_iters
    aux_train = concat_splits([s["train"] for s in aux.values()]) if aux else None
    total_iters = config.max_iters + (config.instruct_iters if aux else 0)
    generator = torch.Generator().manual_seed(config.seed)
    start_iter, history = 0, []
    if checkpoint is not None:  # an interrupted run with the same key: resume where it stopped
        model.load_state_dict(checkpoint["model"])
        for p, state in checkpoint["joint_saes"].items():
            joint_saes[p].load_state_dict(state)
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["generator"])
        start_iter, history = checkpoint["iter"], checkpoint["history"]
        print(f"pretrain: resuming {path} at iteration {start_iter}")
    print(f"pretrain: {model.num_params():,} parameters, {len(train_ids):,} train tokens, device {device}")

    def snapshot(it, done, val_loss=None):
        return {"key": key, "model_args": model_args, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "iter": it,
                "history": history, "done": done, "val_loss": val_loss, "sha": cfg.tensor_hash(model.state_dict()),
                "joint_saes": {p: s.state_dict() for p, s in joint_saes.items()}}

    model.train()
    t0 = time.time()
    step_seconds = 0.0  # time in training steps only, without evaluation and checkpoints
    with progress(range(start_iter, total_iters), desc="pretrain", initial=start_iter, total=total_iters) as bar:
        for it in bar:
            t_step = time.time()
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it, config)
            x, y = get_batch(train_ids, config.batch_size, config.block_size, generator, device)
            _, loss, residuals = model(x, y, read=tuple(joint_saes))
            if joint_saes:
                loss = loss + sae_training_penalty(residuals, joint_saes, config.sae_reg_lambda,
                                                   norm_power=1 if config.sae_reg_norm == "norm" else 2)
            if it >= config.max_iters:  # the instruction phase: plus the CE of an auxiliary batch's answers
                batch = trim_padding(aux_train.batch(config.batch_size, generator, device))
                loss = loss + model(batch.x, batch.y, batch.answer_mask)[1]
            check_finite(loss, f"in pretraining at iteration {it}", "lower --lr (or --sae_reg_lambda)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), config.grad_clip)
            for sae in joint_saes.values():
                sae.remove_parallel_decoder_grad()
            optimizer.step()
            for sae in joint_saes.values():
                sae.normalize_decoder()
            step_seconds += time.time() - t_step
            if it % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if (it + 1) % config.eval_interval == 0 or it + 1 in (config.max_iters, total_iters):
                train_loss = estimate_lm_loss(model, train_ids, config, device, config.eval_iters)
                val_loss = estimate_lm_loss(model, val_ids, config, device, config.eval_iters)
                history.append({"iter": it + 1, "train_loss": train_loss, "val_loss": val_loss,
                                "norms": activation_norms(model, val_ids, config, device)})
                if it >= config.max_iters:
                    history[-1]["aux_accuracy"] = aux_accuracy(model, aux, device)
                bar.write(f"iter {it + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}" + (
                    f", held-out auxiliary accuracy {history[-1]['aux_accuracy']:.3f}" if it >= config.max_iters
                    else ""))
                cfg.save_checkpoint(snapshot(it + 1, done=False), path)
    seconds = time.time() - t0
    val_loss = history[-1]["val_loss"]
    if config.corpus:  # a user corpus: one long continuation of a newline
        samples = greedy_samples(model, ("\n",), device, max_new_tokens=200, one_line=False)
    else:
        samples = greedy_samples(model, SAMPLE_PROMPTS, device)
    checkpoint = snapshot(total_iters, done=True, val_loss=val_loss)
    cfg.save_checkpoint(checkpoint, path)
    summary = {"key": key, "val_loss": val_loss, "train_loss": history[-1]["train_loss"], "seconds": seconds,
               "ms_per_iter": 1000 * step_seconds / max(1, total_iters - start_iter), "history": history,
               "samples": samples, "params": model.num_params(), "sha": checkpoint["sha"]}
    if aux:  # instruction following: held-out prompts of the auxiliary tasks, and prompts it was trained on
        summary["aux_accuracy"] = aux_accuracy(model, aux, device)
        summary["aux_train_accuracy"] = mean_accuracy(
            model, [s["train"].subset(torch.arange(AUX_HELD_OUT)) for s in aux.values()], device)
        summary["aux_samples"] = greedy_samples(model, [q + " > " for q, _ in (s["test"].examples[0]
                                                                                for s in aux.values())], device)
        print(f"pretrain: instruction phase, held-out auxiliary accuracy {summary['aux_accuracy']:.3f} "
              f"(trained prompts {summary['aux_train_accuracy']:.3f})")
    cfg.save_json(summary, summary_path)
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
    return dict(d_sae=config.sae_expansion * config.n_embd, k=k, kind=config.sae_kind, l1=config.sae_l1,
                aux_k=config.sae_aux_k, dead_firings=config.sae_dead_firings,
                auxk_coef=1 / 32 if config.sae_auxk else 0.0)


def fresh_saes(model, ids, points, config, k):
    """Train an SAE at each point of the frozen model on the config's SAE settings (one k)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return train_saes(model, ids, points, sae_kwargs(config, k), n_tokens=config.sae_tokens, steps=config.sae_steps,
                      batch_size=config.sae_batch_size, block_size=config.block_size, seed=config.seed)


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
    key = cfg.result_key(stage_config(config, "pretrain", "sae"), device, config.corpus, {"base": base["sha"]})
    checkpoint = cfg.load_checkpoint(path, key)
    if checkpoint is not None and summary_is_there("sae", path, metrics_path, key):
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
    checkpoint["sha"] = results["sha"] = cfg.tensor_hash(checkpoint["saes"])
    cfg.save_checkpoint(checkpoint, path)
    cfg.save_json(results, metrics_path)
    plot_sae_metrics(results, run_dir)
    print(f"sae: trained in {results['seconds']:.1f}s; metrics in {metrics_path}, plots sae_*.png")
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------
# stage 3: continual learning


def evaluate_tasks(model, suite, config, device):
    """One row of the accuracy matrix: accuracy on every task's eval split, in task order."""
    return [task_accuracy(model, suite[name][config.eval_split], device) for name in config.tasks]


def cl_optimizer(model, config, device):
    """A fresh AdamW on the parameters being trained: constant cl_lr, no weight decay."""
    return model.configure_optimizer(config.cl_lr, 0.0, (config.beta1, config.beta2), device)


def train_steps(model, split, n_steps, method, *, config, device, generator, bar, optimizer=None):
    """n_steps of AdamW (a fresh optimizer, unless one is given) on the answer-token cross-entropy of split plus the
    method's penalty. Returns the seconds spent in the steps (for the step-time comparison)."""
    optimizer = optimizer or cl_optimizer(model, config, device)
    model.train()
    seconds = 0.0
    for step in range(n_steps):
        t0 = time.time()
        batch = trim_padding(method.extend_batch(split.batch(config.cl_batch_size, generator, device), generator,
                                                 device))
        logits, ce, residuals = model(batch.x, batch.y, batch.answer_mask, read=method.reads)
        penalty, logs = method.penalty(model, batch, {"logits": logits, "residuals": residuals})
        loss = ce if penalty is None else ce + penalty
        check_finite(loss, f"on task {split.name}, step {step}, method {method.name}",
                     "lower --cl_lr or the method's penalty weight")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model.parameters(), config.grad_clip)
        optimizer.step()
        method.after_step(model)
        if device == "cuda":  # CUDA runs asynchronously: wait for the step before reading the clock
            torch.cuda.synchronize()
        seconds += time.time() - t0
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(task=split.name, ce=f"{ce.item():.3f}", **{k: f"{v:.3f}" for k, v in logs.items()},
                            refresh=False)
    return seconds


def diagnose_earlier_tasks(model, saes, suite, t, snapshots, *, config, device):
    """The forgetting diagnostic after task t: a snapshot of task t as it ends (kept in `snapshots`, measurement
    only), and for each earlier task its forgetting since its own snapshot, {task: evaluate.forgetting_diagnostic}."""
    def snapshot(task):
        return forgetting_snapshot(model, saes, suite[task][config.eval_split], device, config.diagnose_examples)

    def formats(task):
        return {answer_format(a) for _, a in suite[task]["train"].examples}

    latest = config.tasks[t]
    snapshots[latest] = snapshot(latest)
    return {task: forgetting_diagnostic(snapshots[task], snapshot(task), formats(task), formats(latest))
            for task in config.tasks[:t]}


def relearnable(model, finetune):
    """Let relearning train what the regime trains: every parameter under full fine-tuning (a method's frozen blocks
    and adapters too), the current LoRA adapters only under LoRA. Returns the model."""
    adapters = {id(p) for layer in model.lora_layers() for p in (layer.A, layer.B)}
    for p in model.parameters():
        p.requires_grad_(finetune == "full" or id(p) in adapters)
    return model


def relearn(model, suite, config, device, seed, desc):
    """{task: [accuracy after n steps, for n in relearn_steps]} for every task but the last: a copy of the model is
    fine-tuned on that task alone (its training split, a fresh AdamW at cl_lr, cl_batch_size, cross-entropy only,
    batches drawn by the seed) and scored on the task's evaluation split after n steps, for each n in turn (one
    run to the largest n). Measurement only: the model itself is not changed."""
    tasks = config.tasks[:-1]
    curves = {}
    with progress(total=len(tasks) * config.relearn_steps[-1], desc=desc) as bar:
        for task in tasks:
            student = relearnable(copy.deepcopy(model), config.finetune)
            optimizer, generator = cl_optimizer(student, config, device), torch.Generator().manual_seed(seed)
            curves[task], done = [], 0
            for n in config.relearn_steps:
                train_steps(student, suite[task]["train"], n - done, Method(config, student), config=config,
                            device=device, generator=generator, bar=bar, optimizer=optimizer)
                curves[task].append(task_accuracy(student, suite[task][config.eval_split], device))
                done = n
    return curves


def knowledge(model, suite, config, device, seed, desc):
    """What a model holds of the tasks beyond its greedy answers (evaluate.knowledge_metrics reads it): forced
    choice on every task, and the relearning curves of the tasks before the last."""
    result = {}
    if config.forced_choice_k:
        result["forced_choice"] = forced_choice(model, suite, config.tasks, config.eval_split, device,
                                                config.forced_choice_k)
    if config.relearn_steps and len(config.tasks) > 1:
        result["relearn_steps"] = list(config.relearn_steps)
        result["relearn"] = relearn(model, suite, config, device, seed, desc)
    return result


def start_model(base, config, device, seed):
    """The model a sequence starts from: the base model, with one fresh set of LoRA adapters under --finetune=lora
    (the base weights frozen; the adapters' random A drawn after torch.manual_seed(seed))."""
    torch.manual_seed(seed)
    model = model_from_checkpoint(base, device)
    if config.finetune == "lora":
        model.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
    return model


def base_reference(seed, *, config, device, base, suite):
    """The base model, never trained on the tasks, measured as a final model is (knowledge): the reference of
    kept@n, computed once per base, seed and setting and shared by every method."""
    model = start_model(base, config, device, seed)
    return {"method": "base", "seed": seed, "tasks": list(config.tasks), "eval_split": config.eval_split,
            "R": [evaluate_tasks(model, suite, config, device)],
            **knowledge(model, suite, config, device, seed, desc=f"relearn base seed {seed}")}


def run_method(name, seed, *, config, device, base, saes, suite, lm_val_ids):
    """Learn the tasks in order with one method; returns the results dict (accuracy matrix R, timings, and what the
    final model keeps beyond its greedy answers)."""
    generator = torch.Generator().manual_seed(seed)
    model = start_model(base, config, device, seed)
    lm_loss_before = estimate_lm_loss(model, lm_val_ids, config, device, config.eval_iters)
    R = [evaluate_tasks(model, suite, config, device)]
    aux = aux_suite(config)  # with an instruction-following base: is the tag still followed along the sequence?
    aux_R = [aux_accuracy(model, aux, device)] if aux else []
    diagnostic, snapshots = [], {}
    method = METHODS[name](config, model, saes, seed)
    step_seconds, t_start = 0.0, time.time()
    total_steps = config.steps_per_task * len(config.tasks)
    with progress(total=total_steps, desc=f"cl {name} seed {seed}") as bar:
        if method.joint:  # every task at once, as many steps as the whole sequence
            mixed = concat_splits([suite[task]["train"] for task in config.tasks])
            step_seconds = train_steps(model, mixed, total_steps, method, config=config, device=device,
                                       generator=generator, bar=bar)
            R.append(evaluate_tasks(model, suite, config, device))
            aux_R += [aux_accuracy(model, aux, device)] if aux else []
        else:
            for t, task in enumerate(config.tasks):
                split = suite[task]["train"]
                method.before_task(model, split, t)
                step_seconds += train_steps(model, split, config.steps_per_task, method, config=config, device=device,
                                            generator=generator, bar=bar)
                method.after_task(model, split, t)
                R.append(evaluate_tasks(model, suite, config, device))
                aux_R += [aux_accuracy(model, aux, device)] if aux else []
                if config.diagnose:
                    diagnostic.append(diagnose_earlier_tasks(model, saes, suite, t, snapshots, config=config,
                                                             device=device))
                bar.write(f"{name} seed {seed} after {task}: " + " ".join(
                    f"{n}={a:.2f}" for n, a in zip(config.tasks, R[-1])))
    wall_seconds = time.time() - t_start
    return {"method": name, "seed": seed, "tasks": list(config.tasks), "eval_split": config.eval_split, "R": R,
            "lm_loss_before": lm_loss_before,
            "lm_loss_after": estimate_lm_loss(model, lm_val_ids, config, device, config.eval_iters),
            "retained_bytes": tensor_bytes(method.retained()), "step_seconds": step_seconds / max(1, total_steps),
            "wall_seconds": wall_seconds, "aux_accuracy": aux_R, "diagnostic": diagnostic,
            **knowledge(model, suite, config, device, seed, desc=f"relearn {name} seed {seed}")}


def method_key(config, name, seed, device, base, sae_checkpoint):
    """(key, shared, method settings) of one continual-learning result: the shared part is what every method of a
    comparison must have in common (evaluate.check_comparable)."""
    method = METHODS[name]
    uses_saes = method.uses_saes or config.diagnose  # the diagnostic measures in the SAEs' features
    stages = ("pretrain", "cl") + (("sae",) if uses_saes else ())
    settings = {k: getattr(config, k) for k in method.config_keys(config)}
    built_from = {"base": base["sha"], **({"sae": sae_checkpoint["sha"]} if uses_saes else {})}
    key = cfg.result_key({**stage_config(config, *stages), **settings, "method": name, "seed": seed}, device,
                         config.corpus, built_from)
    shared = cfg.result_key(stage_config(config, "pretrain", "cl"), device, config.corpus, {"base": base["sha"]})
    return key, shared, json.loads(json.dumps(settings))


def run_and_save(job, *, device, base, sae_checkpoint):
    """run_method for one job (a dict: name, seed, config, and the path, key, shared key and method settings its
    result is saved with), on one CPU thread: a run's numbers then depend on its seed, not on how many cores the
    machine has or how many runs share them (--jobs), since the thread count changes the order of floating-point
    sums and training amplifies the difference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = job["config"]
        if job["name"] is None:  # the base model's reference for kept@n
            result = base_reference(job["seed"], config=config, device=device, base=base, suite=task_suite(config))
        else:
            model = model_from_checkpoint(base, device)
            uses_saes = METHODS[job["name"]].uses_saes or config.diagnose
            saes = load_saes(sae_checkpoint, model, device) if uses_saes else None
            result = run_method(job["name"], job["seed"], config=config, device=device, base=base, saes=saes,
                                suite=task_suite(config), lm_val_ids=corpus_of(config)[1])
    finally:
        torch.set_num_threads(threads)
    cfg.save_json({**result, "key": job["key"], "shared": job["shared"], "method_settings": job["settings"]},
                  job["path"])


def continual_learning_many(configs, device, base, sae_checkpoint, jobs=1):
    """For each config, run its methods and seeds (each cached as out/<run>/<cl_dir>/<method>_seed<seed>.json) and
    write its report; returns the summaries. The runs not cached go to one list, `jobs` at a time."""
    todo = []
    for config in configs:
        folder = os.path.join(config.out_dir, config.run, config.cl_dir)
        for name in config.methods:
            for seed in config.seeds:
                path = os.path.join(folder, f"{name}_seed{seed}.json")
                key, shared, settings = method_key(config, name, seed, device, base, sae_checkpoint)
                if cfg.load_json_result(path, key) is not None:
                    print(f"cl: reusing {path}")
                else:
                    todo.append({"name": name, "seed": seed, "config": config, "path": path, "key": key,
                                 "shared": shared, "settings": settings})
        for seed in config.seeds if config.relearn_steps or config.forced_choice_k else ():
            path = os.path.join(folder, BASE_DIR, f"seed{seed}.json")  # the base model's reference, once a seed
            shared = cfg.result_key(stage_config(config, "pretrain", "cl"), device, config.corpus,
                                    {"base": base["sha"]})
            key = {**shared, "seed": seed}
            if cfg.load_json_result(path, key) is not None:
                print(f"cl: reusing {path}")
            elif all(job["path"] != path for job in todo):
                todo.append({"name": None, "seed": seed, "config": config, "path": path, "key": key,
                             "shared": shared, "settings": {}})
    stages = dict(device=device, base=base, sae_checkpoint=sae_checkpoint)
    # the longer runs first, so that no long one is left alone at the end; the base references last
    todo.sort(key=lambda job: 2 if job["name"] is None else int(not METHODS[job["name"]].uses_saes))
    if jobs > 1 and len(todo) > 1:  # processes, spawned (a fork is unsafe once torch has run)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=context) as pool:
            for future in [pool.submit(run_and_save, job, **stages) for job in todo]:
                future.result()
    else:
        for job in todo:
            run_and_save(job, **stages)
    return [summarize_run(os.path.join(c.out_dir, c.run), c.methods, c.seeds, c.cl_dir) for c in configs]


def continual_learning(config, device, base, sae_checkpoint):
    """The continual-learning stage of one config: its methods x seeds, then the report."""
    return continual_learning_many([config], device, base, sae_checkpoint, jobs=config.jobs)[0]


# ----------------------------------------------------------------------------------------------------------------


def check_inputs(config, tasks=True):
    """The checks that need files or data, made before any compute: the output folder, the corpus and, if the
    run goes as far as continual learning, the tasks."""
    cfg.check_out_dir(config.out_dir)
    corpus_of(config)
    if tasks and config.stage in ("all", "cl"):
        task_suite(config)


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(cfg.help_text(Config))
        return 0
    try:
        config = parse_args(argv)
        check_inputs(config)
        device = resolve_device(config)
        base = pretrain(config, device)
        if config.stage == "pretrain":
            return 0
        sae_checkpoint = train_sae_stage(config, device, base)
        if config.stage == "sae":
            return 0
        continual_learning(config, device, base, sae_checkpoint)
    except (ValueError, FloatingPointError) as error:  # bad input, or a loss that is not finite: one line
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
