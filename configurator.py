"""
The configuration of the pipeline (nanoGPT names its version of this file so).

    Config                     every setting, one dataclass grouped by stage; PRESETS name sets of them
    CHOICES                    the fields whose value is one of a fixed set
    parse_args(argv)           Config from ['--key=value', ...], validated; unknown keys and bad values are one-line
                               errors (`python train.py --help`: every key with its default and meaning, by stage)
    validate(config)           choices, ranges, finiteness; raises ValueError naming the key and what is allowed
    parse_script_args(...)     the same --key=value style for the scripts of bench/ and evidence/

How any dataclass of settings is parsed, checked by type and listed for --help is cli.py's; what a stage's result
depends on, and how it is cached, cache.py's; the worker pool and progress bars, jobs.py's.
"""

from dataclasses import dataclass

import torch

import cli
from cli import check_fields, parse_fields
from data.instructions import aux_task_names
from data.tasks import DEFAULT_ORDER, SUITES, TASKS
from model import LORA_TARGETS
from pretrain import check_joint_saes
from regularizers import METHODS
from sae import SAE_KINDS
from sae_stage import check_saes

# ----------------------------------------------------------------------------------------------------------------
# the configuration: every setting, grouped by stage


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
    sae_reg_norm: str = "norm"  # joint error / ||x|| ('norm', the original's), / ||x||^2 ('norm2'), / variance ('var')
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
    suite: str = ""  # a named task list (data/tasks.py SUITES: 'eight', 'things'); sets --tasks unless it is given
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
    ewc_lambda: float = 1e3  # penalty weight (chosen on val by bench/tune.py, docs/tuning.md)
    ewc_mode: str = "separate"  # one (F, theta*) per task, or 'online': F <- gamma F_old + F_new
    ewc_gamma: float = 1.0  # online mode's decay of the old Fisher
    ewc_fisher_examples: int = 256  # examples the Fisher is estimated on
    ewc_fisher_labels: str = "true"  # true: y sampled from the model; empirical: ground truth
    # SI: w = path integral of -g * delta_theta over the task
    si_lambda: float = 1e4  # penalty weight (chosen on val by bench/tune.py)
    si_xi: float = 1e-3  # damping of the division by the squared total change
    # MAS: w = mean |gradient of the squared output norm|
    mas_lambda: float = 1.0  # penalty weight (chosen on val by bench/tune.py)
    mas_examples: int = 256  # examples the importance is estimated on
    # LwF: distillation of the task-start model's outputs
    lwf_lambda: float = 0.01  # weight of the KL term (chosen on val by bench/tune.py)
    lwf_temperature: float = 2.0  # softmax temperature T of both distributions
    # O-LoRA: an adapter set per task (lora_rank, lora_alpha, lora_targets; its own under finetune=full), all summed
    o_lora_lambda: float = 0.1  # weight of the orthogonality loss sum_{s<t} ||A_t A_s^T||_F^2 (chosen on val)
    # freeze (Zheng et al. 2025): the bottom of the model is not trained during the sequence
    freeze_layers: int = 0  # blocks frozen from the bottom, with the embeddings (and so the tied head; chosen on val)
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
    sae_guided_freeze_head: bool = False  # ablation: the final LayerNorm and the tied head (and token embedding) frozen
    sae_guided_error_lambda: float = 0.0  # ablation: lambda_e sum_l D_err_l^2, the drift of the SAE's error held too
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


GPT_CIRCUITS_SHRUNK = {"batch_size": 64, "max_iters": 6000, "warmup_iters": 300, "eval_iters": 20,
                       "sae_reg_widths": (512, 512, 512, 512, 512), "sae_tokens": 200_000}
PRESETS = {  # name -> the keys it sets
    # the paper's regime as calibrated on the 2-core CPU (README, "The paper's regime"): an instruction-following
    # base (32 auxiliary tags), one set of LoRA adapters on every projection of the frozen base, the frozen base with
    # the adapters off as SAE-guided's reference, drift measured on content tokens without the template; the
    # penalty weights chosen for it on val (docs/tuning.md; where the choice is the default, it is not repeated here)
    "paper": {"instruct_tags": 32, "finetune": "lora", "lora_rank": 8, "cl_lr": 1e-3, "sae_guided_reference": "base",
              "content_tokens": "no_template", "ewc_lambda": 100.0, "si_lambda": 100.0, "mas_lambda": 10.0,
              "lwf_lambda": 0.1, "o_lora_lambda": 1e4, "sae_guided_lambda_p": 1e4, "sae_guided_lambda_g": 0.0,
              "sae_guided_eps": 0.0, "sae_guided_delta": 0.0},
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
# the original study shrunk in compute only, to a seed in about 75 min on a 2-core CPU (bench/sae_reg.py --estimate):
# the same model, SAE kind, lambda, L1 coefficients and their sweep ranges; fewer steps, a smaller batch, every SAE
# 512 wide, fewer activations (its sweep: fewer points, steps and tokens a step, given to bench/sae_reg.py)
PRESETS["gpt_circuits_cpu"] = {**PRESETS["gpt_circuits"], **GPT_CIRCUITS_SHRUNK}
# the whole pipeline in seconds, to try a change end to end (what the tests run: tests/conftest.py); its numbers
# mean nothing (the model learns no task in 8 steps)
PRESETS["tiny"] = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8, "max_iters": 60,
                   "eval_interval": 20, "eval_iters": 2, "warmup_iters": 5, "corpus_lines": 3000, "lr": 3e-3,
                   "sae_steps": 40, "sae_tokens": 4000, "sae_batch_size": 256, "sae_expansion": 4,
                   "tasks": ("add", "reverse"), "steps_per_task": 8, "n_train": 64, "n_val": 8, "n_test": 16,
                   "ewc_fisher_examples": 8, "mas_examples": 8, "sae_guided_mask_examples": 16, "replay_batch_size": 4,
                   "sae_fd_anchors": 8, "sae_fd_batch_size": 4, "relearn_steps": (0, 2), "jobs": 1}
CHOICES = {  # fields whose value must be one of a fixed set
    "preset": ("",) + tuple(PRESETS), "suite": ("",) + tuple(SUITES), "stage": ("all", "pretrain", "sae", "cl"),
    "device": ("auto", "cpu", "cuda"), "tasks": tuple(TASKS), "methods": tuple(METHODS), "eval_split": ("test", "val"),
    "finetune": ("full", "lora"), "lora_targets": LORA_TARGETS, "content_tokens": ("all", "no_template"),
    "ewc_mode": ("separate", "online"), "ewc_fisher_labels": ("true", "empirical"),
    "sae_guided_codes": ("topk", "dense"), "sae_guided_reference": ("task_start", "base"),
    "sae_kind": tuple(SAE_KINDS), "sae_reg_kind": tuple(SAE_KINDS), "sae_reg_norm": ("norm", "norm2", "var"),
}


def validate(config):
    """Everything that can be checked before compute is spent; ValueError names the key and what is allowed."""
    check_fields(config, CHOICES, at_least_zero=("seed", "seeds", "sae_points", "sae_guided_points",
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
    check_joint_saes(config)
    check_saes(config)
    if not config.tasks or len(set(config.tasks)) != len(config.tasks):
        raise ValueError(f"--tasks={','.join(config.tasks)}: name each task once; valid tasks: {', '.join(TASKS)}")
    for key in ("methods", "seeds", "sae_k", "sae_points", "sae_guided_points", "lora_targets"):
        values = getattr(config, key)
        if len(set(values)) != len(values):  # the same run twice into one file, or one adapter wrapped twice
            raise ValueError(f"--{key}={','.join(map(str, values))}: name each value once")
    if not config.methods or not config.seeds or not config.sae_k:
        raise ValueError("--methods, --seeds and --sae_k need at least one value each")
    if not config.lora_alpha > 0:
        raise ValueError(f"--lora_alpha={config.lora_alpha}: must be above 0 (the adapters' update is scaled by "
                         "lora_alpha / lora_rank; 0 would train nothing)")
    for method in METHODS.values():
        method.check(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda was asked for, but no CUDA device is available; use --device=cpu or auto")


def parse_args(argv):
    """Config from ['--key=value', ...], validated. --suite=<name> stands for --tasks=<its tasks>, unless --tasks is
    given too."""
    suite = next((a.split("=", 1)[1] for a in argv if a.startswith("--suite=")), "")
    if suite and suite in SUITES and not any(a.startswith("--tasks=") for a in argv):
        argv = [f"--tasks={','.join(SUITES[suite])}"] + list(argv)
    config = parse_fields(Config, argv, presets=PRESETS)
    validate(config)
    return config


def resolve_device(config):
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


@dataclass
class NoOptions:
    pass  # the keys of a script that has none of its own: every key is the pipeline's


def parse_script_args(argv, options_class, command, doc):
    """cli.parse_script_args for a script of bench/ or evidence/: its own keys, and every other one the pipeline's
    (Config), both listed by --help."""
    return cli.parse_script_args(argv, options_class, command, doc, pipeline=Config)
