"""
A small GPT language model, written from scratch in the style of nanoGPT.

token + position embeddings -> n_layer pre-LN blocks (causal self-attention, GELU MLP) -> LayerNorm -> tied head.

Besides next-token prediction it exposes the *residual stream*, which the SAEs read and the continual-learning
regularizers constrain. Residual points are numbered 0..n_layer:

    point 0      = token embedding + position embedding   (the input of block 1)
    point l >= 1 = the output of block l

`forward(idx, read=(...))` returns the activations at the requested points, and `forward(idx, patch={point: f})`
replaces the activation at a point by `f(x)` (or by a given tensor) before the rest of the network sees it; this is
how SAE reconstructions are spliced in. `forward(idx, head_at=mask)` runs the last block's MLP, ln_f and the head at
the masked positions only (a fine-tuning loss reads the answers' logits alone). Shapes are commented as (B, T, C) =
(batch, time, channels).

For fine-tuning, `add_lora` freezes every weight and wraps chosen projections with LoRA adapters (Hu et al. 2021);
`adapters_off()` runs the frozen base without a copy of the model; `stack_adapters()` freezes the current adapters
and starts new ones (O-LoRA keeps one set per task, all of them summed).
"""

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:  # no defaults: configurator.Config is the one place they are set
    vocab_size: int
    block_size: int  # longest sequence the position embedding covers
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True  # gets the scaled init, see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attention=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # softmax(q k^T / sqrt(head_size) + mask) v; the mask is causal unless `attention` (B, T, T) says which
        # positions each one reads (True: read)
        mask = None if attention is None else attention.unsqueeze(1)  # the same for every head
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=attention is None
        )  # (B, n_head, T, head_size)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attention=None, keep=None):
        x = x + self.attn(self.ln_1(x), attention)
        if keep is not None:  # (B, T) bool: only these positions are read after this block, and the MLP reads each
            x = x[keep]  # position alone, so it runs at these only: (N, C)
        x = x + self.mlp(self.ln_2(x))
        return x


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (LoRA):

        y = base(x) + (alpha / r) (x A^T) B^T,     A (r, in) random, B (out, r) zero at the start

    so that the wrapped layer starts as the base layer exactly, and only A and B learn. `stack()` freezes the
    current (A, B) into `past` and starts a fresh pair (O-LoRA: one adapter per task); every pair is added:

        y = base(x) + (alpha / r) sum_s (x A_s^T) B_s^T

    The same map is computed as one product with every update folded into the weight, x (W + (alpha / r) sum_s
    B_s A_s)^T, in training too. Autograd then forms the merged weight's gradient G = (dL/dy)^T x and hands the
    current pair its share, dB = (alpha / r) G A^T and dA = (alpha / r) B^T G. That is more arithmetic than the thin
    products once the width is well above the rank (G is a full out x in product), but fewer, larger products: at this
    project's sizes on one CPU thread it is the faster (bench/step_cost.py and bench/eval_cost.py time both). With
    `fold` off, the thin products above are computed as written; on a GPU or at larger widths they may win."""

    fold = True

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        self.B = nn.Parameter(torch.empty(base.out_features, rank))
        self.reset_adapter()
        self.past = nn.ParameterList()  # frozen earlier pairs, A_1, B_1, A_2, B_2, ... (requires_grad False)
        self.scale = alpha / rank
        self.enabled = True

    def reset_adapter(self):
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's own initialisation
            self.B.zero_()

    def stack(self):
        """Keep the current pair, frozen, and start a new one (which adds nothing until it learns)."""
        for p in (self.A, self.B):
            self.past.append(nn.Parameter(p.detach().clone(), requires_grad=False))
        self.reset_adapter()

    def pairs(self):
        """[(A_s, B_s)] of every adapter, the earlier (frozen) ones first and the current one last."""
        return [(self.past[i], self.past[i + 1]) for i in range(0, len(self.past), 2)] + [(self.A, self.B)]

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        if self.fold:
            return F.linear(x, self.merged_weight(), self.base.bias)
        return self.base(x) + self.scale * sum((x @ A.t()) @ B.t() for A, B in self.pairs())

    def merged_weight(self):
        """W + (alpha / r) sum_s B_s A_s."""
        weight = self.base.weight
        for A, B in self.pairs():
            weight = weight + self.scale * B @ A
        return weight

    def merged(self):
        """A plain nn.Linear with every update folded in: W + (alpha / r) sum_s B_s A_s."""
        linear = copy.deepcopy(self.base)
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
        return linear


LORA_TARGETS = ("attn_qkv", "attn_out", "mlp_in", "mlp_out")  # the projections of a block LoRA can wrap


def projection(block, target):
    """(module, attribute) of a block's projection: attn_qkv, attn_out, mlp_in or mlp_out."""
    return {"attn_qkv": (block.attn, "c_attn"), "attn_out": (block.attn, "c_proj"),
            "mlp_in": (block.mlp, "c_fc"), "mlp_out": (block.mlp, "c_proj")}[target]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: the head reads tokens in the embedding's coordinates
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # N(0, 0.02) everywhere, and N(0, 0.02 / sqrt(2 n_layer)) for the projections that write into the residual
        # stream, so its variance does not grow with depth (GPT-2).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied head is counted once

    # -- LoRA ---------------------------------------------------------------------------------------------------

    def add_lora(self, rank, alpha, targets=LORA_TARGETS):
        """Freeze every weight and wrap the target projections of every block with LoRA adapters (one set, trained
        across the whole task sequence). Returns the model."""
        for p in self.parameters():
            p.requires_grad_(False)
        for block in self.blocks:
            for target in targets:
                module, name = projection(block, target)
                setattr(module, name, LoRALinear(getattr(module, name), rank, alpha))
        return self

    @contextlib.contextmanager
    def adapters_off(self):
        """Within the block, the model is its frozen base: every LoRA update is switched off (no copy is made)."""
        adapters = self.lora_layers()
        for m in adapters:
            m.enabled = False
        try:
            yield self
        finally:
            for m in adapters:
                m.enabled = True

    def lora_layers(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def has_adapters(self):
        return bool(self.lora_layers())

    def stack_adapters(self):
        """Freeze every current adapter and start a new set (O-LoRA's adapter per task); returns the model."""
        for layer in self.lora_layers():
            layer.stack()
        return self

    def merged(self):
        """A copy of the model with every adapter folded into its weights: the same function, plain Linears."""
        model = copy.deepcopy(self)
        for block in model.blocks:
            for target in LORA_TARGETS:
                module, name = projection(block, target)
                if isinstance(getattr(module, name), LoRALinear):
                    setattr(module, name, getattr(module, name).merged())
        return model

    def forward(self, idx, targets=None, loss_mask=None, read=(), patch=None, positions=None, attention=None,
                head_at=None):
        """
        idx:       (B, T) token ids
        targets:   (B, T) next-token ids; if given, the mean cross-entropy is returned as `loss`
        loss_mask: (B, T) 0/1; if given, the loss is averaged over positions where it is 1 only
        read:      residual points whose activations to return, e.g. (1, 2)
        patch:     {point: tensor (B, T, C) or function x -> x'}; the activation at that point is replaced before
                   the next block sees it. `read` returns the activation *before* its own patch is applied, and
                   later points see the already-patched stream.
        positions: (B, T) each token's position (default 0..T-1)
        attention: (B, T, T) bool, which tokens each token attends to (default causal: itself and every earlier
                   one). With both, one row can hold several sequences that share a prefix (evaluate.py, forced
                   choice: one prompt, read once, and every candidate answer after it).
        head_at:   (B, T) bool, the positions whose logits are wanted (a fine-tuning loss reads the answers' only).
                   The last block's MLP, ln_f and the head then run at those N positions alone: nothing after the
                   last attention mixes positions, so the logits there are the same, for less work (as nanoGPT's
                   generate runs the head at the last position only). Logits come back as (N, vocab), in the order
                   of head_at.nonzero(), and the loss is taken there; the last point cannot be read or patched.
        returns (logits (B, T, vocab) or (N, vocab) with head_at, loss or None, {point: (B, T, C)})
        """
        B, T = idx.size()
        if positions is None:
            assert T <= self.config.block_size, f"sequence of length {T} > block_size {self.config.block_size}"
            positions = torch.arange(T, device=idx.device)
        for point in list(read) + list(patch or {}):
            if not 0 <= point <= self.config.n_layer:
                raise ValueError(f"residual point {point} is not in 0..{self.config.n_layer}")
            if head_at is not None and point == self.config.n_layer:
                raise ValueError(f"head_at: the last point ({point}) is computed at head_at's positions only, so it "
                                 "cannot be read or patched; leave head_at out")
        residuals = {}

        def visit(point, x):
            if point in read:
                residuals[point] = x
            if patch and point in patch:
                replacement = patch[point]
                x = replacement(x) if callable(replacement) else replacement
            return x

        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        x = visit(0, x)
        for layer, block in enumerate(self.blocks, start=1):
            x = visit(layer, block(x, attention, keep=head_at if layer == self.config.n_layer else None))
        if head_at is not None and not self.blocks:  # no block: the head reads the embedding
            x = x[head_at]
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab), or (N, vocab) at head_at

        loss = None
        if targets is not None:
            if head_at is not None:
                targets, loss_mask = targets[head_at], None if loss_mask is None else loss_mask[head_at]
            loss = cross_entropy(logits, targets, loss_mask)
        return logits, loss, residuals

    def configure_optimizer(self, lr, weight_decay, betas):
        """AdamW with weight decay on matrices (Linear and embedding weights) only, not on biases or LayerNorms."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel for every tensor's update, on the CPU too (the default model on one thread: 0.30 ms a
        # step against the per-tensor loop's 0.93 ms)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, stop_token=None):
        """Greedy decoding: append argmax tokens to idx (B, T) until max_new_tokens, or until every row has produced
        stop_token (rows that stopped keep being extended; callers cut at the first stop_token)."""
        prompt_len = idx.size(1)
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _, _ = self(idx_cond)
            next_token = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
            if stop_token is not None and (idx[:, prompt_len:] == stop_token).any(dim=1).all():
                break
        return idx


def warmup_cosine(step, steps, lr, min_lr, warmup=0):
    """The learning rate at a step: linear warmup to lr over `warmup` steps, then cosine decay to min_lr at `steps`
    (and min_lr after). Pretraining and SAE training both use it."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def cross_entropy(logits, targets, loss_mask=None):
    """Mean next-token cross-entropy, -1/N sum_t log p(targets_t), over the positions where loss_mask is 1."""
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    if loss_mask is None:
        return per_token.mean()
    loss_mask = loss_mask.reshape(-1).to(per_token.dtype)
    return (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def answer_log_likelihood(logits, targets, answer_mask):
    """sum over answer positions of log p(target_t | x_<=t); logits (..., T, V), targets and mask (..., T)."""
    log_probs = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (log_probs * answer_mask).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# models made from a model: a checkpoint's, a frozen reference, the base under the adapters


def model_from_checkpoint(checkpoint, device):
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device)


def model_device(model):
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluating(model):
    """Eval mode (no dropout) for the duration, then the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def frozen_copy(model):
    """A copy of the model that takes no gradient: a reference theta_ref."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


class AdaptersOff(nn.Module):
    """The frozen base of a model with LoRA adapters, as a module of its own: the same model, run with its adapters
    switched off. A reference that costs no copy."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with self.model.adapters_off():
            return self.model(*args, **kwargs)
