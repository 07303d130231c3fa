"""
Continual-learning methods: each is one small class with a few hooks, and METHODS maps their names to them.

The loop in train.py calls the hooks and never names a method:

    for each task t:  before_task(model, split, t)
                      each step:  batch = extend_batch(batch)          (replay appends old examples)
                                  logits, CE, residuals = model(batch, read=reads)
                                  loss = CE + penalty(model, batch, {logits, residuals})
                                  backward, clip, optimizer step, after_step(model)
                      after_task(model, split, t)
    retained()   the tensors the method keeps between tasks (the "retained bytes" of the report)

The loss reads the logits at the answer positions only, so the forward pass computes them there alone, unless the
method says it reads them everywhere (reads_logits) or reads the last residual point.

A method's results depend on the Config fields whose names start with its name and '_' (`ewc_lambda`, ...), on
the shared continual-learning fields, and, if it uses the SAEs, on the SAE stage.

All constraint-style penalties go through one squared hinge, `hinge_penalty`:

    aggregate form:       relu( s * (sum_j w_j d_j / sum_j w_j - bound) )^2         one weighted mean drift
    per-coordinate form:  sum_i w_i relu( s * (d_i - bound) )^2                       one hinge per coordinate

with s = +1 for an upper bound ("drift at most bound") and s = -1 for a lower bound ("drift at least bound").

- The weight-space family, EWC (Kirkpatrick et al. 2017), SI (Zenke et al. 2017) and MAS (Aljundi et al. 2018),
  is the per-coordinate form on weights with d = |theta - theta*|, bound 0, times lambda/2:
  (lambda/2) sum_i w_i (theta_i - theta*_i)^2. They differ only in the importance w.
- SAE-guided activation regularization (Ning et al. 2026) is the aggregate form on SAE features: per layer,
  protected features (weight 1 - m_j) must drift at most eps, task-relevant ones (weight m_j) at least delta.
- LwF (Li and Hoiem 2016) distils the task-start model's outputs on the current task's inputs: the same data the
  SAE-guided penalty sees, constrained in output space instead of feature space.
- O-LoRA (Wang et al. 2023) learns each task in a new LoRA adapter set whose input directions are pushed to be
  orthogonal to the earlier, frozen sets'.
- SAE-FD (SAE feature distillation, Zhang et al. 2026) keeps a few inputs of each finished task (anchors) with
  their SAE codes and pulls the codes back to them: the feature-space analogue of replay, storing task data.
- Freeze (after Zheng et al. 2025) trains nothing below a chosen block: no penalty, no data.
- Replay keeps a small buffer of earlier tasks' examples; multitask trains on all tasks at once.
"""

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector

from data.tasks import Batch, concat_splits, example_keys, trim_padding
from model import AdaptersOff, answer_log_likelihood, evaluating, frozen_copy, model_device

# ----------------------------------------------------------------------------------------------------------------
# the hooks every method has, and the baseline that adds nothing


class Method:
    """The hooks of a continual-learning method, each a no-op here; see the module docstring for when each runs."""

    name = ""
    strength = None  # (config key, its values from seqft-like to learning almost nothing): bench/frontier.py
    joint = False  # True: the loop trains on every task at once, for as many steps as the whole sequence
    uses_saes = False  # True: the method gets the SAEs, and its results depend on the SAE stage
    reads = ()  # residual points the penalty needs in outputs["residuals"], at every position
    reads_logits = False  # True: outputs["logits"] is (B, T, vocab), every position; False: (N, vocab), the N
    #                       positions where batch.answer_mask is 1, in row-major order (all the loss reads)
    positive = ()  # config keys that must be above 0 (not only at least 0, which holds for every float)

    def __init__(self, config, model, saes=None, seed=0):
        self.config, self.seed = config, seed

    def before_task(self, model, split, t):
        pass

    def extend_batch(self, batch, generator, device):
        return batch

    def penalty(self, model, batch, outputs):
        """(penalty or None, {name: float to show in the progress bar}). outputs: {"logits": at the answer positions
        only, (N, vocab), unless reads_logits; "residuals": {point: (B, T, C)} for the points in reads}."""
        return None, {}

    def after_step(self, model):
        pass

    def after_task(self, model, split, t):
        pass

    def retained(self):
        """The tensors kept between tasks (nested lists / dicts)."""
        return []

    @classmethod
    def check(cls, config):
        """Raise ValueError for config values this method cannot use (called before any compute)."""
        for key in cls.positive:
            if not getattr(config, key) > 0:
                raise ValueError(f"--{key}={getattr(config, key)}: must be above 0")

    @classmethod
    def config_keys(cls, config):
        """The Config fields this method's results depend on, beyond the shared ones: those named '<name>_*'."""
        return tuple(f.name for f in dataclasses.fields(config) if f.name.startswith(cls.name + "_"))


class SeqFT(Method):
    """Sequential fine-tuning: cross-entropy only. The lower bound."""

    name = "seqft"


# ----------------------------------------------------------------------------------------------------------------
# the one squared hinge every constraint-style penalty goes through


def hinge_penalty(drift, weight, bound, upper=True, per_coordinate=False):
    """Squared-hinge penalty on drift (>= 0) with non-negative weights; see the module docstring.

    upper=True:  penalise drift above bound (protect).   upper=False: penalise drift below bound (guide)."""
    sign = 1.0 if upper else -1.0
    if per_coordinate:
        return (weight * F.relu(sign * (drift - bound)).pow(2)).sum()
    mean_drift = (weight * drift).sum() / weight.sum().clamp(min=1e-12)
    return F.relu(sign * (mean_drift - bound)).pow(2)


# ----------------------------------------------------------------------------------------------------------------
# the weight-space family (EWC, SI, MAS): one penalty, (lambda/2) sum_i w_i (theta_i - theta*_i)^2, three importances


class WeightSpaceMethod(Method):
    """(lambda/2) sum_anchors sum_i w_i (theta_i - theta*_i)^2, lambda = config.<name>_lambda; a subclass says what
    w is (`importance`) and may change how anchors combine (`mode`, `gamma`: see consolidate)."""

    mode, gamma = "online", 1.0

    def __init__(self, config, model, saes=None, seed=0):
        super().__init__(config, model, saes, seed)
        self.lam = getattr(config, f"{self.name}_lambda")
        self.anchors = []

    def importance(self, model, split, t):
        raise NotImplementedError

    def penalty(self, model, batch, outputs):
        return (weight_penalty(model, self.anchors, self.lam) if self.anchors else None), {}

    def after_task(self, model, split, t):
        importance = self.importance(model, split, t)
        consolidate(self.anchors, importance, flat_parameters(model).detach().clone(), self.mode, self.gamma)

    def retained(self):
        return self.anchors


class EWC(WeightSpaceMethod):
    """w = the diagonal Fisher at the end of each task (per-example gradients, model-sampled labels by default)."""

    name = "ewc"
    strength = ("ewc_lambda", (1.0, 10.0, 1e2, 1e3, 1e4))

    def __init__(self, config, model, saes=None, seed=0):
        super().__init__(config, model, saes, seed)
        self.mode, self.gamma = config.ewc_mode, config.ewc_gamma

    def importance(self, model, split, t):
        return fisher_diagonal(model, split, self.config.ewc_fisher_examples, self.config.ewc_fisher_labels,
                               seed=self.seed + t)


class SI(WeightSpaceMethod):
    """Synaptic intelligence: w_i = max(0, sum over the task's steps of -g_i delta_theta_i) / (Delta_i^2 + xi),
    g the gradient the step used, delta_theta the step's change, Delta the whole task's change; summed over tasks
    with one anchor at the end of the last task. (The clamp at 0 is ours: a negative w would push a weight away.)"""

    name = "si"
    strength = ("si_lambda", (1.0, 10.0, 1e2, 1e3, 1e4))
    positive = ("si_xi",)  # it keeps the division finite
    start = previous = path = None  # held during a task only

    def before_task(self, model, split, t):
        self.start = flat_parameters(model).detach().clone()
        self.previous = self.start.clone()
        self.path = torch.zeros_like(self.start)

    def after_step(self, model):
        theta = flat_parameters(model).detach()
        g = parameters_to_vector([p.grad if p.grad is not None else torch.zeros_like(p) for _, p in trainable(model)])
        self.path -= g * (theta - self.previous)  # -g_i delta_theta_i
        self.previous = theta.clone()

    def importance(self, model, split, t):
        change = flat_parameters(model).detach() - self.start
        w = (self.path / (change.pow(2) + self.config.si_xi)).clamp(min=0.0)
        self.start = self.previous = self.path = None
        return w


class MAS(WeightSpaceMethod):
    """Memory-aware synapses: w_i = E_x |d ||f(x)||^2 / d theta_i| on the task's inputs, no labels."""

    name = "mas"
    strength = ("mas_lambda", (1e-3, 1e-2, 1e-1, 1.0, 10.0))

    def importance(self, model, split, t):
        return mas_importance(model, split, self.config.mas_examples, seed=self.seed + t)


def trainable(model):
    """(name, parameter) of the parameters being trained, in a fixed order: the coordinates theta_i."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def flat_parameters(model):
    return parameters_to_vector([p for _, p in trainable(model)])


def weight_penalty(model, anchors, lam):
    """(lambda/2) sum_anchors sum_i w_i (theta_i - theta*_i)^2: the per-coordinate hinge with bound 0."""
    theta = flat_parameters(model)  # differentiable: gradients flow back to each parameter
    total = 0.0
    for anchor in anchors:
        drift = (theta - anchor["theta"]).abs()
        total = total + 0.5 * lam * hinge_penalty(drift, anchor["importance"], 0.0, per_coordinate=True)
    return total


def consolidate(anchors, importance, theta, mode="separate", gamma=1.0):
    """After a task, add (w, theta*) to anchors, each a flat vector over the trained parameters.

    separate: one (w, theta*) pair per past task.   online: w <- gamma w_old + w_new, one anchor at theta* = now."""
    if mode == "separate" or not anchors:
        anchors.append({"importance": importance, "theta": theta})
    elif mode == "online":
        anchors[0] = {"importance": gamma * anchors[0]["importance"] + importance, "theta": theta}
    else:
        raise ValueError(f"consolidation mode {mode!r}: choose 'separate' or 'online'")


def fisher_diagonal(model, split, n_examples, labels="true", seed=0):
    """EWC's importance, the diagonal Fisher F_i = E_x E_y [ (d log p(y|x) / d theta_i)^2 ], in eval mode.

    labels="true" samples each answer token y_t from the model's own distribution given the ground-truth prefix
    (the true Fisher); labels="empirical" uses the ground-truth tokens."""
    if labels not in ("true", "empirical"):
        raise ValueError(f"fisher labels {labels!r}: choose 'true' or 'empirical'")

    def log_likelihood(params, x1, y1, m1):
        logits = functional_call(model, params, (x1.unsqueeze(0),))[0][0]  # (T, V)
        return answer_log_likelihood(logits, y1, m1)

    with evaluating(model):
        batch = trim_padding(split.sample(n_examples, seed, model_device(model)))
        y = batch.y
        if labels == "true":
            with torch.no_grad():
                probs = F.softmax(model(batch.x)[0], dim=-1)  # (N, T, V)
                sample_gen = torch.Generator(device=probs.device).manual_seed(seed)
                y = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=sample_gen).view_as(y)
        return per_example_mean(model, log_likelihood, (batch.x, y, batch.answer_mask), torch.square)


def mas_importance(model, split, n_examples, seed=0):
    """MAS's importance: w_i = E_x | d ||f(x)||^2 / d theta_i |, with ||f(x)||^2 the squared L2 norm of the
    logits, averaged over the answer positions (where the model writes its output). No labels are used."""

    def output_norm(params, x1, m1):
        logits = functional_call(model, params, (x1.unsqueeze(0),))[0][0]  # (T, V)
        return (logits.pow(2).sum(-1) * m1).sum() / m1.sum().clamp(min=1.0)

    with evaluating(model):
        batch = trim_padding(split.sample(n_examples, seed, model_device(model)))
        return per_example_mean(model, output_norm, (batch.x, batch.answer_mask), torch.abs)


def per_example_mean(model, example_fn, tensors, reduce, chunk_size=64):
    """(1/N) sum_n reduce( d example_fn(theta; example n) / d theta ), as a flat vector over the trained parameters.

    Per-example gradients come from torch.func's vmap of grad, never from a batch-mean gradient. example_fn(params,
    *one example's tensors) is a scalar; tensors are (N, ...) each."""
    params = {name: p.detach() for name, p in trainable(model)}
    per_example_grad = vmap(grad(example_fn), in_dims=(None,) + (0,) * len(tensors))
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    n = len(tensors[0])
    for start in range(0, n, chunk_size):
        with warnings.catch_warnings():  # SDPA has no vmap batching rule on CPU yet; the fallback is correct
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            grads = per_example_grad(params, *(t[start : start + chunk_size] for t in tensors))
        for name, g in grads.items():
            total[name] += reduce(g).sum(0)
    return parameters_to_vector([total[name] / n for name in params])


# ----------------------------------------------------------------------------------------------------------------
# a frozen reference's outputs on a task's training examples, computed once and looked up per batch (LwF, SAE-guided)


def example_rows(split):
    """{example key: its row in the split} (data.tasks.example_keys): where a batch's examples are found again."""
    return {key: row for row, key in enumerate(example_keys(split.rows(slice(None))))}


def batch_rows(rows, batch, device):
    """The rows of the batch's examples in their split (a tensor on device), from example_rows."""
    return torch.tensor([rows[key] for key in example_keys(batch)], device=device)


# ----------------------------------------------------------------------------------------------------------------
# LwF: the task-start model's outputs, distilled


class LwF(Method):
    """Learning without forgetting: lambda T^2 KL(p_ref || p_theta) at temperature T on the current batch's content
    tokens, p_ref the model at task start. That model is frozen for the whole task, so its logits on every training
    example of the task are computed once, when the task starts, held during the task only, and looked up per batch
    (as SAE-guided's reference codes are), not recomputed at every step."""

    name = "lwf"
    strength = ("lwf_lambda", (1e-2, 1e-1, 1.0, 10.0, 1e2))
    reads_logits = True  # the KL is taken at every content token
    positive = ("lwf_temperature",)

    def before_task(self, model, split, t):
        reference, x = frozen_copy(model), trim_padding(split.rows(slice(None))).x.to(model_device(model))
        self.rows = example_rows(split)
        with torch.no_grad():
            self.ref_logits = torch.cat([reference(x[i : i + 128])[0] for i in range(0, len(x), 128)])

    def penalty(self, model, batch, outputs):
        rows = batch_rows(self.rows, batch, self.ref_logits.device)
        ref_logits = self.ref_logits[rows, : batch.x.size(1)]  # the batch may be trimmed: its first columns
        kl = distillation_loss(outputs["logits"], ref_logits, batch.content_mask, self.config.lwf_temperature)
        return self.config.lwf_lambda * kl, {"kl": kl.item()}

    def after_task(self, model, split, t):
        self.rows = self.ref_logits = None


def distillation_loss(logits, ref_logits, mask, temperature):
    """T^2 * mean over positions where mask is 1 of KL( softmax(ref_logits / T) || softmax(logits / T) )."""
    ref_log_probs = F.log_softmax(ref_logits / temperature, dim=-1)
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)  # (B, T)
    return temperature**2 * (kl * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------
# SAE-guided activation regularization (the paper's method): the penalty on the drift, the mask, the class


def sae_guided_penalty(drifts, masks, *, lambda_p, lambda_g, eps, delta):
    """lambda_p sum_l relu(D_prot_l - eps)^2 + lambda_g sum_l relu(delta - D_guide_l)^2, with
    D_prot_l = sum_j (1 - m_j) d_j / sum_j (1 - m_j) and D_guide_l = sum_j m_j d_j / sum_j m_j, for the drift d
    ({point: (d_sae,)}) of each SAE point l.
    Returns (penalty, {'protect': sum_l D_prot_l, 'guide': sum_l D_guide_l}) for logging."""
    penalty = 0.0
    logs = {"protect": 0.0, "guide": 0.0}
    for p, drift in drifts.items():
        m = masks[p]
        penalty = penalty + lambda_p * hinge_penalty(drift, 1.0 - m, eps, upper=True)
        penalty = penalty + lambda_g * hinge_penalty(drift, m, delta, upper=False)
        with torch.no_grad():
            logs["protect"] += ((1 - m) * drift).sum().item() / (1 - m).sum().clamp(min=1e-12).item()
            logs["guide"] += (m * drift).sum().item() / m.sum().clamp(min=1e-12).item()
    return penalty, logs


def feature_drift(z, z_ref):
    """d_j = mean over tokens of |z_j - z_ref_j|; z, z_ref (n_tokens, d_sae), the codes of the content tokens."""
    return (z - z_ref).abs().mean(0)


def sae_codes(sae, x, codes="topk"):
    """The SAE code the drift is measured on: the TopK code z (default) or the dense ReLU pre-activations."""
    return sae.encode(x) if codes == "topk" else sae.pre_activations(x)


def content_codes(sae, residual, content_mask, codes="topk"):
    """The SAE codes of the content tokens only: residual (B, T, C), content_mask (B, T). TopK codes come sparse,
    (values, indices) each (n_tokens, k), with sae.encode_sparse's cheap backward; dense codes as (n_tokens, d_sae).
    Only the tokens the drift is measured on are encoded."""
    x = residual[content_mask.bool()]  # (n_tokens, C)
    return sae.encode_sparse(x) if codes == "topk" else sae.pre_activations(x)


def relative_move(a, a_ref, x_ref):
    """mean_n ||a_n - a_ref_n|| / mean_n ||x_ref_n||: how far a moved on the same tokens, relative to the stream's
    size (a: the stream itself, or a part of it). Rows are tokens."""
    return (a - a_ref).norm(dim=-1).mean() / x_ref.norm(dim=-1).mean().clamp(min=1e-12)


def error_drift(sae, residual, ref_residual, content_mask):
    """How far the SAE's error e = x - xhat(x) moved from the reference's on the same content tokens, relative to
    the stream's size: D_err = mean_n ||e_n - e_ref_n|| / mean_n ||x_ref_n|| (evaluate.stream_change's 'error').
    The ablation --sae_guided_error_lambda adds lambda_e sum_l D_err_l^2 to SAE-guided's penalty."""
    content = content_mask.bool()
    x, x_ref = residual[content], ref_residual[content]
    return relative_move(x - sae.reconstruct(x)[0], x_ref - sae.reconstruct(x_ref)[0], x_ref)


@torch.no_grad()
def feature_relevance(reference, saes, split, n_examples, codes="topk", batch_size=128):
    """{point: r (d_sae,)}: r_j = mean over content tokens of |z_j| under the reference model, divided by max_j r_j
    so that r lies in [0, 1]."""
    device = next(reference.parameters()).device
    points = sorted(saes)
    total = {p: 0.0 for p in points}
    n_tokens = 0.0
    for start in range(0, min(n_examples, len(split)), batch_size):
        end = min(start + batch_size, n_examples, len(split))
        batch = trim_padding(split.rows(slice(start, end)))
        x, content = batch.x.to(device), batch.content_mask.to(device)
        _, _, residuals = reference(x, read=points)
        for p in points:
            z = sae_codes(saes[p], residuals[p], codes)  # (B, T, d_sae)
            total[p] = total[p] + (z.abs() * content.unsqueeze(-1)).sum((0, 1))
        n_tokens += content.sum().item()
    relevance = {}
    for p in points:
        r = total[p] / n_tokens
        relevance[p] = r / r.max().clamp(min=1e-12)
    return relevance


def propagate_mask(relevance, decoder, knn=4, alpha=0.5):
    """m_j = max(r_j, alpha * max_{k in N(j)} S_jk r_k), S_jk the cosine similarity of decoder rows j and k and
    N(j) the knn most similar other features: a feature close to a relevant one counts as partly relevant."""
    rows = F.normalize(decoder, dim=1)
    similarity = rows @ rows.t()  # (d_sae, d_sae)
    similarity.fill_diagonal_(float("-inf"))  # a feature is not its own neighbour
    neighbour_sim, neighbours = similarity.topk(knn, dim=1)  # (d_sae, knn)
    spread = (neighbour_sim * relevance[neighbours]).max(dim=1).values
    return torch.maximum(relevance, alpha * spread)


def build_feature_masks(reference, saes, split, *, n_examples, knn, alpha, codes="topk", binary_threshold=None):
    """{point: m (d_sae,)}: the continuous feature mask of a task from its data. Only these vectors are kept."""
    relevance = feature_relevance(reference, saes, split, n_examples, codes)
    masks = {}
    for p, r in relevance.items():
        m = propagate_mask(r, saes[p].W_dec.detach(), knn, alpha)
        if binary_threshold is not None:
            m = (m >= binary_threshold).float()
        masks[p] = m.detach().clone()
    return masks


def merge_past_masks(mask, past_masks):
    """Option: features earlier tasks relied on are protected too: m_j <- m_j * (1 - max_{s<t} m^s_j)."""
    if not past_masks:
        return mask
    past = torch.stack(past_masks).max(dim=0).values
    return mask * (1.0 - past)


def shuffled_masks(masks, seed):
    """{point: m[pi]} with pi a seeded random permutation of the features: the same mass and the same values,
    on features chosen without looking at the task (the random-mask control of the ablations)."""
    generator = torch.Generator().manual_seed(seed)
    return {p: m[torch.randperm(len(m), generator=generator).to(m.device)] for p, m in masks.items()}


class SAEGuided(Method):
    """SAE-guided activation regularization: before each task a feature mask from the task's data; each step the
    protect / guide hinges on the drift of the batch's SAE codes from the reference's; only the masks are kept.

    The reference is frozen during a task, so its TopK codes on the task's training examples are computed once at
    task start and looked up per batch (one forward pass per step, not two); they are dropped when the task ends.
    Dense codes ('--sae_guided_codes=dense') are too large to keep per token: the reference runs each step, as it
    does under the ablation --sae_guided_error_lambda (the SAE error's drift held too: error_drift)."""

    name = "sae_guided"
    strength = ("sae_guided_lambda_p", (1e3, 1e4, 1e5, 1e6, 1e7))
    uses_saes = True

    def __init__(self, config, model, saes=None, seed=0):
        super().__init__(config, model, saes, seed)
        points = config.sae_guided_points or tuple(saes or ())  # the SAE points the penalty looks at
        self.saes = {p: saes[p] for p in points} if saes else saes
        self.reads, self.masks = tuple(sorted(self.saes or ())), []
        self.base = None  # the 'base' reference: with LoRA the model with adapters off, else a frozen copy
        if config.sae_guided_reference == "base":
            self.base = AdaptersOff(model) if model.has_adapters() else frozen_copy(model)
        self.cached_codes = self.reference = self.mask = None  # held during a task only
        if config.sae_guided_freeze_head:  # ablation: is what forgets after the last protected point? The final
            for module in (model.ln_f, model.wte):  # LayerNorm and the head, tied to the token embedding, not trained
                module.requires_grad_(False)

    def before_task(self, model, split, t):
        c = self.config
        reference = self.base if self.base is not None else model  # at task start the model is its own reference
        with evaluating(model):
            mask = build_feature_masks(reference, self.saes, split, n_examples=c.sae_guided_mask_examples,
                                       knn=c.sae_guided_mask_knn, alpha=c.sae_guided_mask_alpha,
                                       codes=c.sae_guided_codes,
                                       binary_threshold=c.sae_guided_mask_threshold if c.sae_guided_mask_binary
                                       else None)
            if c.sae_guided_mask_random:  # the control: the same mask values on features drawn at random
                mask = shuffled_masks(mask, seed=1000 * self.seed + t)
            if c.sae_guided_codes == "topk":
                self.cached_codes = reference_codes(reference, self.saes, split)
            if c.sae_guided_codes != "topk" or c.sae_guided_error_lambda > 0:  # the reference runs on every batch
                self.reference = self.base if self.base is not None else frozen_copy(model)
        self.masks.append(mask)
        if c.sae_guided_protect_past:
            mask = {p: merge_past_masks(m, [old[p] for old in self.masks[:-1]]) for p, m in mask.items()}
        self.mask = mask

    def penalty(self, model, batch, outputs):
        c = self.config
        residuals = outputs["residuals"]
        codes = {p: content_codes(sae, residuals[p], batch.content_mask, c.sae_guided_codes)
                 for p, sae in self.saes.items()}
        if self.reference is not None:
            with torch.no_grad():
                _, _, ref_residuals = self.reference(batch.x, read=self.reads)
        if self.cached_codes is not None:
            ref_codes = lookup_codes(self.cached_codes, batch)
        else:
            with torch.no_grad():
                ref_codes = {p: content_codes(sae, ref_residuals[p], batch.content_mask, c.sae_guided_codes)
                             for p, sae in self.saes.items()}
        drifts = {p: code_drift(codes[p], ref_codes[p], sae.config.d_sae) for p, sae in self.saes.items()}
        penalty, logs = sae_guided_penalty(drifts, self.mask, lambda_p=c.sae_guided_lambda_p,
                                           lambda_g=c.sae_guided_lambda_g, eps=c.sae_guided_eps,
                                           delta=c.sae_guided_delta)
        if c.sae_guided_error_lambda > 0:  # ablation: the part of the stream the codes do not see, held too
            errors = [error_drift(sae, residuals[p], ref_residuals[p], batch.content_mask)
                      for p, sae in self.saes.items()]
            penalty = penalty + c.sae_guided_error_lambda * sum(e.pow(2) for e in errors)
            logs["error"] = sum(e.item() for e in errors)
        return penalty, logs

    def after_task(self, model, split, t):
        self.cached_codes = self.reference = self.mask = None  # of the task's examples, only its mask outlives it

    def retained(self):  # the masks, and the frozen base if it is the reference and a copy of the model
        copied = self.base is not None and not isinstance(self.base, AdaptersOff)
        return [self.masks, list(self.base.parameters()) if copied else []]

    @classmethod
    def check(cls, config):
        d_sae = config.sae_expansion * config.n_embd
        if config.sae_guided_mask_knn >= d_sae:
            raise ValueError(f"--sae_guided_mask_knn={config.sae_guided_mask_knn}: must be below the SAE "
                             f"width d_sae={d_sae} (the number of other features a feature can have)")
        if not 0 <= config.sae_guided_mask_threshold <= 1:
            raise ValueError(f"--sae_guided_mask_threshold={config.sae_guided_mask_threshold}: must be in "
                             "[0, 1]")
        if cls.name in config.methods and config.sae_kind != "topk" and config.sae_guided_codes == "topk":
            raise ValueError(f"--sae_kind={config.sae_kind}: SAE-guided's cached sparse codes need TopK SAEs; add "
                             "--sae_guided_codes=dense (a ReLU SAE's code is its dense pre-activations)")
        sae_points = config.sae_points or tuple(range(1, config.n_layer + 1))
        for point in config.sae_guided_points:
            if point not in sae_points:
                raise ValueError(f"--sae_guided_points: {point} has no SAE; valid points are "
                                 f"{', '.join(map(str, sae_points))} (--sae_points)")


# ----------------------------------------------------------------------------------------------------------------
# SAE-guided's speed-up: the reference's TopK codes cached once per task and the drift computed on sparse codes
# (the same d_j as feature_drift, tested; code_drift picks the path)


def code_drift(code, ref_code, d_sae):
    """d (d_sae,) between two codes of the same tokens, sparse (TopK) or dense."""
    if isinstance(code, tuple):
        return sparse_feature_drift(code, ref_code, d_sae)
    return feature_drift(code, ref_code)


def sparse_feature_drift(code, ref_code, d_sae):
    """The same d_j from TopK codes kept sparse, (values, indices) each (n_tokens, k), without a dense
    (n_tokens, d_sae) tensor: a latent active in both codes of a token adds |z_j - z_ref_j|, a latent active in one
    only adds its value (the other is 0), and the other latents add nothing."""
    values, indices = code
    ref_values, ref_indices = ref_code
    same = indices.unsqueeze(-1) == ref_indices.unsqueeze(-2)  # (n, k, k): z's a-th latent is z_ref's b-th
    ref_at_z = (same * ref_values.unsqueeze(-2)).sum(-1)  # (n, k): z_ref at z's latents, 0 where inactive
    ref_only = ref_values * ~same.any(-2)  # (n, k): z_ref's latents that z does not have
    total = values.new_zeros(d_sae).index_add(0, indices.reshape(-1), (values - ref_at_z).abs().reshape(-1))
    total = total.index_add(0, ref_indices.reshape(-1), ref_only.reshape(-1))
    return total / max(len(values), 1)


def sparse_to_dense(values, indices, d_sae):
    """z (..., d_sae) from a TopK code's (values, indices) (..., k); differentiable in the values."""
    return values.new_zeros(*values.shape[:-1], d_sae).scatter(-1, indices, values)


@torch.no_grad()
def sparse_codes(model, saes, x, content_mask=None, batch_size=128):
    """{point: (values, indices), each (N, T, k)}: the model's TopK SAE codes on the inputs x (N, T), kept sparse;
    with a content_mask (N, T), only those tokens are encoded (content_codes), the others left zero."""
    points = sorted(saes)
    values, indices = {p: [] for p in points}, {p: [] for p in points}
    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        _, _, residuals = model(x[rows], read=points)
        content = torch.ones_like(x[rows], dtype=torch.bool) if content_mask is None else content_mask[rows].bool()
        for p in points:
            v, i = content_codes(saes[p], residuals[p], content)  # (n_tokens, k) each
            values[p].append(v.new_zeros(*content.shape, v.size(-1)).index_put_((content,), v))
            indices[p].append(i.new_zeros(*content.shape, i.size(-1)).index_put_((content,), i))
    return {p: (torch.cat(values[p]), torch.cat(indices[p])) for p in points}


def reference_codes(reference, saes, split):
    """{'rows': {example key: row}, 'codes': sparse_codes of every example of the split at its content tokens}.
    The reference is frozen while a task trains, so its codes on the task's training examples are computed once,
    when the task starts, and looked up per batch (lookup_codes)."""
    device = next(reference.parameters()).device
    every = trim_padding(split.rows(slice(None)))  # up to the longest example: a batch is never longer
    codes = sparse_codes(reference, saes, every.x.to(device), every.content_mask.to(device))
    return {"rows": example_rows(split), "codes": codes}


def lookup_codes(cache, batch):
    """{point: (values, indices), each (n_tokens, k)}: the cached codes of the batch's examples at its content
    tokens, the same tokens in the same order as content_codes."""
    codes = cache["codes"]
    some_values = next(iter(codes.values()))[0]
    rows = batch_rows(cache["rows"], batch, some_values.device)
    length, content = batch.x.size(1), batch.content_mask.bool()  # the batch may be trimmed: its first columns
    return {p: (values[rows, :length][content], indices[rows, :length][content])
            for p, (values, indices) in codes.items()}


# ----------------------------------------------------------------------------------------------------------------
# SAE-FD, O-LoRA, freeze, replay, multitask


class SAEFD(Method):
    """SAE feature distillation (after Zhang et al. 2026; the details are ours, README): when a task ends, keep
    sae_fd_anchors of its training inputs (the anchors) with the model's TopK SAE codes on them, sparse; on every
    later step, pull the codes of sae_fd_batch_size stored anchors back towards the stored ones:

        lambda_fd sum_l mean over the anchors' content tokens ||z_l(x) - z*_l(x)||^2

    The anchors are task data: they and their codes count as retained bytes."""

    name = "sae_fd"
    strength = ("sae_fd_lambda", (1e-3, 1e-2, 1e-1, 1.0, 10.0))
    uses_saes = True
    positive = ("sae_fd_anchors", "sae_fd_batch_size")

    @classmethod
    def check(cls, config):
        super().check(config)
        if cls.name in config.methods and config.sae_kind != "topk":
            raise ValueError(f"--sae_kind={config.sae_kind}: SAE-FD stores sparse TopK codes; use --sae_kind=topk")

    def __init__(self, config, model, saes=None, seed=0):
        super().__init__(config, model, saes, seed)
        self.saes, self.points, self.anchors = saes, tuple(sorted(saes or ())), None  # read on the anchors only
        self.generator = torch.Generator().manual_seed(seed)  # which anchors each step sees

    def after_task(self, model, split, t):
        with evaluating(model):
            kept = split.sample(self.config.sae_fd_anchors, self.seed + t, model_device(model))
            anchors = {"x": kept.x, "content_mask": kept.content_mask,
                       "codes": sparse_codes(model, self.saes, kept.x)}
        if self.anchors:  # one pool of every finished task's anchors
            anchors = {"x": torch.cat([self.anchors["x"], anchors["x"]]),
                       "content_mask": torch.cat([self.anchors["content_mask"], anchors["content_mask"]]),
                       "codes": {p: tuple(torch.cat(pair) for pair in zip(self.anchors["codes"][p], codes))
                                 for p, codes in anchors["codes"].items()}}
        self.anchors = anchors

    def penalty(self, model, batch, outputs):
        if not self.anchors:
            return None, {}
        x, content = self.anchors["x"], self.anchors["content_mask"]
        idx = torch.randint(len(x), (self.config.sae_fd_batch_size,), generator=self.generator).to(x.device)
        length = int(content[idx].nonzero()[:, 1].max()) + 1  # cut the padding columns
        x, content = x[idx, :length], content[idx, :length]
        _, _, residuals = model(x, read=self.points)
        distance = 0.0
        for p, sae in self.saes.items():
            values, indices = (c[idx, :length][content.bool()] for c in self.anchors["codes"][p])
            stored = sparse_to_dense(values, indices, sae.config.d_sae)  # z*
            z = sparse_to_dense(*content_codes(sae, residuals[p], content), sae.config.d_sae)
            distance = distance + (z - stored).pow(2).sum(-1).mean()
        return self.config.sae_fd_lambda * distance, {"fd": distance.item()}

    def retained(self):
        return self.anchors


class OLoRA(Method):
    """O-LoRA (Wang et al. 2023): a new LoRA adapter set per task (lora_rank, lora_alpha, lora_targets), the
    earlier sets frozen and every set summed at inference (no task identity is given); the loss adds
    lambda_o sum_{s<t} ||A_t A_s^T||_F^2. Under --finetune=full it brings its own adapters, so the base weights are
    frozen for O-LoRA in both regimes: adapters are what the method is."""

    name = "o_lora"
    strength = ("o_lora_lambda", (0.0, 10.0, 1e2, 1e3, 1e4))

    def __init__(self, config, model, saes=None, seed=0):
        super().__init__(config, model, saes, seed)
        if not model.has_adapters():
            model.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
        self.layers = model.lora_layers()

    def before_task(self, model, split, t):
        if t > 0:
            model.stack_adapters()  # the last task's adapters are frozen; a fresh set learns this task

    def penalty(self, model, batch, outputs):
        if not self.layers[0].past:
            return None, {}
        overlap = orthogonality_loss(model)
        return self.config.o_lora_lambda * overlap, {"orth": overlap.item()}

    def retained(self):  # the frozen adapters of the earlier tasks (the current set is the model being trained)
        return [list(layer.past) for layer in self.layers]


def orthogonality_loss(model):
    """sum over adapted layers sum_{s<t} ||A_t A_s^T||_F^2: the current adapter's rows (the input directions it
    reads) against every earlier adapter's; 0 when they span orthogonal subspaces."""
    total = 0.0
    for layer in model.lora_layers():
        *earlier, (A, _) = layer.pairs()
        for A_s, _ in earlier:
            total = total + (A @ A_s.t()).pow(2).sum()
    return total


class Freeze(Method):
    """Freeze the bottom (after Zheng et al. 2025, "spurious forgetting"): the token and position embeddings and the
    first freeze_layers blocks are not trained during the sequence (under LoRA: those blocks' adapters); no penalty.
    The output head is tied to the token embedding, so it stays fixed too."""

    name = "freeze"
    strength = ("freeze_layers", (0, 1, 2, 3))  # the values the model and regime allow

    def __init__(self, config, model, saes=None, seed=0):
        super().__init__(config, model, saes, seed)
        for module in [model.wte, model.wpe, *model.blocks[: config.freeze_layers]]:
            for p in module.parameters():
                p.requires_grad_(False)

    @classmethod
    def check(cls, config):
        most = config.n_layer if config.finetune == "full" else config.n_layer - 1  # under LoRA, freezing every
        if cls.name in config.methods and not config.freeze_layers <= most:  # block's adapters: nothing would train
            raise ValueError(f"--freeze_layers={config.freeze_layers}: must be in 0..{most} (n_layer={config.n_layer}"
                             + (", and under LoRA one block keeps its adapters)" if config.finetune == "lora" else ")"))


class Replay(Method):
    """Keeps a random replay_fraction of each finished task's training examples and appends replay_batch_size of
    them to every batch of the later tasks. It stores data: a reference point, not a data-free method."""

    name = "replay"

    def __init__(self, config, model, saes=None, seed=0):
        super().__init__(config, model, saes, seed)
        self.buffer, self.memory = [], None

    def extend_batch(self, batch, generator, device):
        if self.memory is None:
            return batch
        old = self.memory.batch(self.config.replay_batch_size, generator, device)
        return Batch(*(torch.cat([new, replayed]) for new, replayed in zip(batch, old)))

    def after_task(self, model, split, t):
        self.buffer.append(split.subset(replay_sample(split, self.config.replay_fraction, seed=self.seed + t)))
        self.memory = concat_splits(self.buffer)

    def retained(self):
        return [[kept.x, kept.y] for kept in self.buffer]

    @classmethod
    def check(cls, config):
        if not 0.0 < config.replay_fraction <= 1.0:
            raise ValueError(f"--replay_fraction={config.replay_fraction}: must be in (0, 1]")


def replay_sample(split, fraction, seed=0):
    """Indices of a random `fraction` of a task's training examples, to keep in the replay buffer."""
    n = max(1, int(round(fraction * len(split))))
    return torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]


class Multitask(Method):
    """Every task at once, as many steps as the whole sequence: the upper bound."""

    name = "multitask"
    joint = True


# ----------------------------------------------------------------------------------------------------------------
# every method by its name, and what a method keeps


METHODS = {cls.name: cls for cls in (SeqFT, EWC, SI, MAS, LwF, OLoRA, SAEFD, SAEGuided, Freeze, Replay,
                                     Multitask)}


def tensor_bytes(obj):
    """Bytes held by all tensors in a nested dict / list structure."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
