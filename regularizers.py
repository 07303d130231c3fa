"""
Continual-learning penalties and the state each one keeps between tasks.

All constraint-style penalties go through one squared hinge, `hinge_penalty`:

    aggregate form:       relu( s * (sum_j w_j d_j / sum_j w_j - bound) )^2         one weighted mean drift
    per-coordinate form:  sum_i w_i relu( s * (d_i - bound) )^2                       one hinge per coordinate

with s = +1 for an upper bound ("drift at most bound") and s = -1 for a lower bound ("drift at least bound").

- EWC (Kirkpatrick et al. 2017) is the per-coordinate form on weights: d = |theta - theta*|, w = Fisher diagonal,
  bound 0, times lambda/2, which is exactly (lambda/2) sum_i F_i (theta_i - theta*_i)^2.
- SAE-guided activation regularization (Ning et al. 2026) is the aggregate form on SAE features: per layer,
  protected features (weight 1 - m_j) must drift at most eps, task-relevant ones (weight m_j) at least delta.
- Replay keeps a small buffer of earlier tasks' examples; multitask (joint training) needs no state.
"""

import copy
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector

# ----------------------------------------------------------------------------------------------------------------
# the one squared hinge


def hinge_penalty(drift, weight, bound, upper=True, per_coordinate=False):
    """Squared-hinge penalty on drift (>= 0) with non-negative weights; see the module docstring.

    upper=True:  penalise drift above bound (protect).   upper=False: penalise drift below bound (guide)."""
    sign = 1.0 if upper else -1.0
    if per_coordinate:
        return (weight * F.relu(sign * (drift - bound)).pow(2)).sum()
    mean_drift = (weight * drift).sum() / weight.sum().clamp(min=1e-12)
    return F.relu(sign * (mean_drift - bound)).pow(2)


# ----------------------------------------------------------------------------------------------------------------
# EWC


def answer_log_likelihood(logits, targets, answer_mask):
    """sum over answer positions of log p(target_t | x_<=t); logits (..., T, V), targets and mask (..., T)."""
    log_probs = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (log_probs * answer_mask).sum(-1)


def fisher_diagonal(model, split, n_examples, labels="true", seed=0, chunk_size=64):
    """Diagonal Fisher F_i = E_x E_y [ (d log p(y|x) / d theta_i)^2 ] at the model's current weights, in eval mode.

    The expectation over x runs over n_examples training examples, with per-example gradients (torch.func's
    vmap of grad), never the square of a batch-mean gradient. labels="true" samples each answer token y_t from
    the model's own distribution given the ground-truth prefix (the true Fisher); labels="empirical" uses the
    ground-truth tokens. Returns {parameter name: tensor shaped like the parameter}."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=generator)[:n_examples]
    x, y, answer_mask = split.x[idx].to(device), split.y[idx].to(device), split.answer_mask[idx].to(device)
    if labels == "true":
        with torch.no_grad():
            probs = F.softmax(model(x)[0], dim=-1)  # (N, T, V)
            sample_gen = torch.Generator(device=device).manual_seed(seed)
            y = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=sample_gen).view_as(y)
    elif labels != "empirical":
        raise ValueError(f"fisher labels {labels!r}: choose 'true' or 'empirical'")

    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_log_likelihood(params, x1, y1, m1):
        logits = functional_call(model, params, (x1.unsqueeze(0),))[0]  # (1, T, V)
        return answer_log_likelihood(logits[0], y1, m1)

    per_example_grad = vmap(grad(example_log_likelihood), in_dims=(None, 0, 0, 0))
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, len(idx), chunk_size):
        with warnings.catch_warnings():  # SDPA has no vmap batching rule on CPU yet; the fallback is correct
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            grads = per_example_grad(params, x[start : start + chunk_size], y[start : start + chunk_size],
                                     answer_mask[start : start + chunk_size])
        for name, g in grads.items():
            fisher[name] += g.pow(2).sum(0)
    model.train(was_training)
    return {name: f / len(idx) for name, f in fisher.items()}


def ewc_consolidate(state, model, fisher, mode="separate", gamma=1.0):
    """After a task: add (F, theta*) to the EWC state, each one flat vector over all of the model's parameters
    (in model.parameters() order), so that the penalty is a few operations on long vectors.

    separate: one (F, theta*) pair per past task.  online: F <- gamma F_old + F_new with one anchor, theta* = now."""
    fisher = parameters_to_vector([fisher[name] for name, _ in model.named_parameters()])
    theta_star = parameters_to_vector(model.parameters()).detach().clone()
    if mode == "separate" or not state["anchors"]:
        state["anchors"].append({"fisher": fisher, "theta": theta_star})
    elif mode == "online":
        old = state["anchors"][0]["fisher"]
        state["anchors"][0] = {"fisher": gamma * old + fisher, "theta": theta_star}
    else:
        raise ValueError(f"ewc mode {mode!r}: choose 'separate' or 'online'")
    return state


def ewc_penalty(model, state, lam):
    """(lambda/2) sum_anchors sum_i F_i (theta_i - theta*_i)^2, written as the per-coordinate hinge with bound 0."""
    theta = parameters_to_vector(model.parameters())  # differentiable: gradients flow back to each parameter
    total = 0.0
    for anchor in state["anchors"]:
        drift = (theta - anchor["theta"]).abs()
        total = total + 0.5 * lam * hinge_penalty(drift, anchor["fisher"], 0.0, per_coordinate=True)
    return total


# ----------------------------------------------------------------------------------------------------------------
# SAE-guided activation regularization


def sae_codes(sae, x, codes="topk"):
    """The SAE code the drift is measured on: the TopK code z (default) or the dense ReLU pre-activations."""
    return sae.encode(x) if codes == "topk" else sae.pre_activations(x)


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
        x, content = split.x[start:end].to(device), split.content_mask[start:end].to(device)
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


def build_feature_masks(reference, saes, split, n_examples, knn, alpha, codes="topk", binary_threshold=None):
    """{point: m (d_sae,)}: the continuous feature mask of a task from its data. Only these vectors are kept."""
    relevance = feature_relevance(reference, saes, split, n_examples, codes)
    masks = {}
    for p, r in relevance.items():
        m = propagate_mask(r, saes[p].W_dec.detach(), knn, alpha)
        if binary_threshold is not None:
            m = (m >= binary_threshold).float()
        masks[p] = m.detach().clone()
    return masks


def feature_drift(z, z_ref, content_mask):
    """d_j = mean over content tokens of |z_j - z_ref_j|; z, z_ref (B, T, d_sae), content_mask (B, T)."""
    weights = content_mask.unsqueeze(-1)
    return ((z - z_ref).abs() * weights).sum((0, 1)) / content_mask.sum().clamp(min=1.0)


def sae_guided_penalty(residuals, ref_residuals, saes, masks, content_mask, lambda_p, lambda_g, eps, delta,
                       codes="topk"):
    """lambda_p sum_l relu(D_prot_l - eps)^2 + lambda_g sum_l relu(delta - D_guide_l)^2, with
    D_prot_l = sum_j (1 - m_j) d_j / sum_j (1 - m_j) and D_guide_l = sum_j m_j d_j / sum_j m_j.
    Returns (penalty, {'protect': sum_l D_prot_l, 'guide': sum_l D_guide_l}) for logging."""
    penalty = 0.0
    logs = {"protect": 0.0, "guide": 0.0}
    for p, sae in saes.items():
        z = sae_codes(sae, residuals[p], codes)
        with torch.no_grad():
            z_ref = sae_codes(sae, ref_residuals[p], codes)
        drift = feature_drift(z, z_ref, content_mask)
        m = masks[p]
        penalty = penalty + lambda_p * hinge_penalty(drift, 1.0 - m, eps, upper=True)
        penalty = penalty + lambda_g * hinge_penalty(drift, m, delta, upper=False)
        with torch.no_grad():
            logs["protect"] += ((1 - m) * drift).sum().item() / (1 - m).sum().clamp(min=1e-12).item()
            logs["guide"] += (m * drift).sum().item() / m.sum().clamp(min=1e-12).item()
    return penalty, logs


def merge_past_masks(mask, past_masks):
    """Option: features earlier tasks relied on are protected too: m_j <- m_j * (1 - max_{s<t} m^s_j)."""
    if not past_masks:
        return mask
    past = torch.stack(past_masks).max(dim=0).values
    return mask * (1.0 - past)


def frozen_copy(model):
    """A copy of the model that takes no gradient: the reference theta_ref."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


# ----------------------------------------------------------------------------------------------------------------
# replay and memory accounting


def replay_sample(split, fraction, seed=0):
    """Indices of a random `fraction` of a task's training examples, to keep in the replay buffer."""
    n = max(1, int(round(fraction * len(split))))
    return torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]


def tensor_bytes(obj):
    """Bytes held by all tensors in a nested dict / list structure."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# SAE regularization during training (idea 2): the model is trained jointly with an SAE at every residual point


def sae_training_penalty(residuals, saes, lam, l1_coef=0.0):
    """(1/(L+1)) sum_i [ lam * ||x_i - xhat_i||^2 / ||x_i||  +  l1_coef * ||z_i||_1 ]

    over the residual points i that have an SAE (all L+1 of them in the study). Squared error and L1 are means over
    tokens; ||x_i|| is the mean L2 norm of the activations at point i. The inputs are *not* detached, so the
    gradient shapes the model towards activations the SAEs reconstruct well; dividing by ||x_i|| (also not
    detached) takes away the easy way out of shrinking the activations. With TopK SAEs, k fixes L0 and the
    L1 term is optional (l1_coef = 0 by default)."""
    total = 0.0
    for p, sae in saes.items():
        x = residuals[p]  # (B, T, C)
        z = sae.encode(x)
        xhat = sae.decode(z) / sae.input_scale
        squared_error = (x - xhat).pow(2).sum(-1).mean()
        mean_norm = x.norm(dim=-1).mean()
        total = total + lam * squared_error / mean_norm + l1_coef * z.abs().sum(-1).mean()
    return total / len(saes)
