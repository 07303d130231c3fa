"""
TopK sparse autoencoders on the residual stream (Gao et al., "Scaling and evaluating sparse autoencoders", 2024).

    x_n  = c * x                                    input scaled so that E ||x_n||^2 = d_in (c stored with the SAE)
    z    = TopK( ReLU( (x_n - b_dec) W_enc + b_enc ) )   keep the k largest pre-activations, zero the rest
    xhat = z W_dec + b_dec                          (in the scaled space; divide by c to get back to x)

    L = nmse(xhat, x_n) + (1/32) nmse(ehat, e),     nmse(a, b) = sum ||a - b||^2 / sum ||b - mean(b)||^2  (batch)
        e    = (x_n - xhat).detach()                the residual the live latents leave
        ehat = TopK_aux(ReLU(pre-activations of dead latents only)) W_dec     (no b_dec)

Each term is divided by the variance of its own target, as in OpenAI's reference code: the main term is the
batch's fraction of variance unexplained, and AuxK is weighed against the small residual it models (unnormalised,
it would be about FVU ~ 1/35 times weaker). A latent is dead when it has not fired for `dead_firings` expected
firings of an average latent, i.e. dead_firings * d_sae / k tokens; AuxK gives dead latents a gradient so they
come back. b_dec starts at the data mean, W_enc starts as W_dec^T, decoder rows are kept at unit norm after every
step, and the gradient component parallel to each row is removed before the step (it would only change the norm,
which the renormalisation undoes). Adam's learning rate follows 2e-4 / sqrt(d_sae / 2^14).

ReLU + L1 SAEs (kind 'relu', the "standard" SAE of Anthropic's "Towards Monosemanticity" and its April 2024 update,
the kind the original SAE-regularization study used):

    z    = ReLU( (x - b_dec) W_enc + b_enc )         every positive pre-activation is kept
    xhat = z W_dec + b_dec
    L    = mean_tokens ||x - xhat||^2 + l1 * mean_tokens sum_j z_j ||W_dec_j||

on raw activations (no input scaling), decoder rows free in norm: weighting each latent's L1 by its decoder row's
norm takes away the easy way of shrinking z and growing W_dec. L0 is set by l1, not fixed as with TopK.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from model import warmup_cosine


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    k: int  # TopK's k (unused by a ReLU SAE)
    kind: str = "topk"  # 'topk' or 'relu' (ReLU + L1)
    l1: float = 0.0  # ReLU SAE: weight of the sparsity term sum_j z_j ||W_dec_j||
    aux_k: int = 64  # how many dead latents AuxK may use per token
    dead_firings: float = 1000.0  # dead after this many expected firings without one (see dead_tokens)
    auxk_coef: float = 1 / 32  # 0 turns AuxK off

    @property
    def dead_tokens(self):
        """Tokens without firing after which a latent is dead: an average latent fires k / d_sae times a token.
        Only a TopK SAE has this count (AuxK's); a ReLU SAE's firing rate follows l1, not a k."""
        if self.kind != "topk":
            raise ValueError(f"dead_tokens counts expected TopK firings (k / d_sae a token); a {self.kind} SAE "
                             "has none")
        return math.ceil(self.dead_firings * self.d_sae / self.k)


class SparseAutoencoder(nn.Module):
    """What every kind shares: the parameters, the encoder's pre-activations, the decoder, the reconstruction, and
    the count of tokens since each latent last fired. A kind adds encode, loss and its decoder constraint."""

    def __init__(self, config, W_dec):
        super().__init__()
        self.config = config
        self.W_dec = nn.Parameter(W_dec)  # (d_sae, d_in): row j is feature j's direction
        self.W_enc = nn.Parameter(W_dec.t().clone())  # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))
        self.register_buffer("input_scale", torch.tensor(1.0))  # c
        self.register_buffer("tokens_since_fired", torch.zeros(config.d_sae, dtype=torch.long))

    def pre_activations(self, x):
        """ReLU((c x - b_dec) W_enc + b_enc), shape (..., d_sae): the dense codes before any selection."""
        return torch.relu((x * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, z):
        """xhat in the scaled space."""
        return z @ self.W_dec + self.b_dec

    def reconstruct(self, x):
        """(xhat / c, z): the reconstruction of x in x's own units, and the code it was decoded from."""
        z = self.encode(x)
        return self.decode(z) / self.input_scale, z

    def forward(self, x):
        """The reconstruction of x in x's own units; an SAE is a function x -> xhat, to splice into the model."""
        return self.reconstruct(x)[0]

    @torch.no_grad()
    def update_dead_counter(self, z):
        fired = (z > 0).reshape(-1, z.size(-1)).any(dim=0)
        self.tokens_since_fired += z.numel() // z.size(-1)
        self.tokens_since_fired[fired] = 0


class TopKSAE(SparseAutoencoder):
    second_term = "auxk"  # what loss() returns beside the FVU

    def __init__(self, config):
        if not 0 < config.k <= config.d_sae:
            raise ValueError(f"SAE k={config.k} must be in 1..d_sae={config.d_sae}")
        W_dec = torch.randn(config.d_sae, config.d_in)
        super().__init__(config, W_dec / W_dec.norm(dim=1, keepdim=True))

    # -- the forward pass, in pieces so that callers can use each one ------------------------------------------

    def encode(self, x):
        """The sparse code z (..., d_sae): the k largest pre-activations of each token, the rest zero."""
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def encode_sparse(self, x):
        """(values, indices), each (..., k): the code z without its zeros, z = zeros.scatter(-1, indices, values).

        The same code as `encode`, with a cheaper backward pass: which k latents win is not differentiable, so the
        choice is made on the dense pre-activations without autograd, and only the k chosen pre-activations are
        recomputed with it, from k columns of W_enc (a backward of k, not d_sae, columns per token)."""
        x_n = x * self.input_scale - self.b_dec
        with torch.no_grad():
            indices = (x_n @ self.W_enc + self.b_enc).topk(self.config.k, dim=-1).indices  # (..., k)
        columns = self.W_enc.t()[indices]  # (..., k, d_in)
        values = torch.relu((columns * x_n.unsqueeze(-2)).sum(-1) + self.b_enc[indices])
        return values, indices

    # -- training losses ----------------------------------------------------------------------------------------

    def loss(self, x):
        """(total loss, main nmse, auxk nmse, z) on a batch of raw activations x (N, d_in); see the docstring."""
        x_n = x * self.input_scale
        z = self.encode(x)
        xhat = self.decode(z)
        main = normalized_mse(xhat, x_n)
        auxk = self.auxk_loss(self.pre_activations(x), (x_n - xhat).detach())
        return main + self.config.auxk_coef * auxk, main, auxk, z

    def auxk_loss(self, pre, residual):
        """nmse(ehat, e) with ehat decoded (no bias) from the top aux_k pre-activations among dead latents."""
        dead = self.tokens_since_fired >= self.config.dead_tokens  # (d_sae,)
        if self.config.auxk_coef == 0 or not dead.any():
            return pre.new_zeros(())
        dead_pre = pre[:, dead]  # (N, n_dead): only dead latents may take part (few, so this is cheap)
        values, indices = dead_pre.topk(min(self.config.aux_k, dead_pre.size(1)), dim=-1)
        z_aux = torch.zeros_like(dead_pre).scatter(-1, indices, values)
        residual_hat = z_aux @ self.W_dec[dead]  # no b_dec: the residual has no offset to model
        return normalized_mse(residual_hat, residual)

    def sparsity(self, z):
        """l1 * mean over tokens of ||z||_1: 0 by default, since k fixes L0 (an SAE-regularized model may add it)."""
        return self.config.l1 * z.abs().sum(-1).mean()

    @torch.no_grad()
    def remove_parallel_decoder_grad(self):
        """grad_j <- grad_j - (grad_j . w_j) w_j for each unit-norm decoder row w_j."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def init_from_data(self, x):
        """c so that E ||c x||^2 = d_in, and b_dec = mean of the scaled data."""
        self.input_scale.fill_(math.sqrt(self.config.d_in / x.pow(2).sum(-1).mean().item()))
        self.b_dec.copy_((x * self.input_scale).mean(0))


class ReluSAE(SparseAutoencoder):
    """ReLU + L1 (see the module docstring): raw activations, decoder rows free in norm, L1 weighted by them."""

    second_term = "sparsity"

    def __init__(self, config):
        W_dec = torch.empty(config.d_sae, config.d_in)
        nn.init.kaiming_uniform_(W_dec)  # as the original; the rows' norms are then learned
        super().__init__(config, W_dec)

    def encode(self, x):
        """z = ReLU((x - b_dec) W_enc + b_enc): every positive pre-activation."""
        return self.pre_activations(x)

    def sparsity(self, z):
        """l1 * mean over tokens of sum_j z_j ||W_dec_j||."""
        return self.config.l1 * (z * self.W_dec.norm(dim=1)).sum(-1).mean()

    def loss(self, x):
        """(total loss, FVU (for the log), sparsity term, z): total = mean ||x - xhat||^2 + sparsity."""
        xhat, z = self.reconstruct(x)
        sparsity = self.sparsity(z)
        total = (x - xhat).pow(2).sum(-1).mean() + sparsity
        return total, normalized_mse(xhat.detach(), x), sparsity, z

    def remove_parallel_decoder_grad(self):
        """Nothing: the decoder's rows are free in norm (the L1 term is weighted by it)."""

    def normalize_decoder(self):
        """Nothing: see remove_parallel_decoder_grad."""

    def init_from_data(self, x):
        """Nothing: the original trains on raw activations from zero biases (input_scale stays 1)."""


SAE_KINDS = {"topk": TopKSAE, "relu": ReluSAE}


def make_sae(config):
    """An SAE of config.kind."""
    if config.kind not in SAE_KINDS:
        raise ValueError(f"SAE kind {config.kind!r}: choose one of {', '.join(SAE_KINDS)}")
    return SAE_KINDS[config.kind](config)


def normalized_mse(prediction, target):
    """sum ||prediction - target||^2 / sum ||target - mean(target)||^2 over the batch (0 for a constant target)."""
    variance = (target - target.mean(0)).pow(2).sum()
    return ((prediction - target).pow(2).sum() / variance).nan_to_num(0.0, posinf=0.0)


def sae_lr(d_sae, base_lr=2e-4):
    """The 1/sqrt(d_sae / 2^14) learning-rate rule, from 2e-4 at 2^14 latents."""
    return base_lr / math.sqrt(d_sae / 2**14)


def train_sae(activations, config, steps=3000, batch_size=1024, lr=None, seed=0, desc="sae", min_lr=None, warmup=0,
              progress=None):
    """Train one SAE of config.kind on activations (N, d_in), Adam at lr (default: the 1/sqrt(d_sae) rule), constant
    or, with min_lr, warmed up and cosine-decayed (model.warmup_cosine); returns (sae, history of losses). progress: a
    function that wraps the steps in a progress bar (configurator.progress), or None for none."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sae = make_sae(config).to(activations.device)
    sae.init_from_data(activations)
    peak_lr = lr or sae_lr(config.d_sae)
    optimizer = torch.optim.Adam(sae.parameters(), lr=peak_lr)
    history = []
    bar = progress(range(steps), desc=desc, leave=False) if progress else None
    for step in bar if bar is not None else range(steps):
        for group in optimizer.param_groups:
            group["lr"] = peak_lr if min_lr is None else warmup_cosine(step, steps, peak_lr, min_lr, warmup)
        idx = torch.randint(len(activations), (batch_size,), generator=generator).to(activations.device)
        loss, fvu, second, z = sae.loss(activations[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: SAE loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder()
        sae.update_dead_counter(z)
        if step % 100 == 0 or step == steps - 1:
            history.append({"step": step, "fvu": fvu.item(), sae.second_term: second.item()})
            if bar is not None:
                bar.set_postfix(fvu=f"{fvu.item():.3f}", refresh=False)
    return sae.eval(), history


@torch.no_grad()
def collect_activations(model, ids, points, n_tokens, block_size, seed=0, batch_size=64):
    """{point: (n_tokens, d_model)} residual activations of model on random windows of the token ids."""
    from data.corpus import get_batch  # local import: sae.py needs data only for this convenience

    device = next(model.parameters()).device
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    acts = {p: [] for p in points}
    n_windows = math.ceil(n_tokens / block_size)
    for start in range(0, n_windows, batch_size):
        x, _ = get_batch(ids, min(batch_size, n_windows - start), block_size, generator, device)
        _, _, residuals = model(x, read=points)
        for p in points:
            acts[p].append(residuals[p].reshape(-1, residuals[p].size(-1)))
    return {p: torch.cat(a)[:n_tokens] for p, a in acts.items()}


def train_saes(model, ids, points, sae_kwargs, *, n_tokens, steps, batch_size, block_size, seed=0, progress=None):
    """One SAE per residual point, trained on n_tokens of the frozen model's activations over ids;
    sae_kwargs are the SAEConfig fields other than d_in."""
    acts = collect_activations(model, ids, points, n_tokens, block_size, seed)
    saes, histories = {}, {}
    for p in points:
        config = SAEConfig(d_in=acts[p].size(1), **sae_kwargs)
        saes[p], histories[p] = train_sae(acts[p], config, steps, batch_size, seed=seed, desc=f"sae point {p}",
                                          progress=progress)
    return saes, histories


def sae_to_dict(sae):
    return {"config": asdict(sae.config), "state": sae.state_dict()}


def sae_from_dict(d, device="cpu"):
    sae = make_sae(SAEConfig(**d["config"]))
    sae.load_state_dict(d["state"])
    return sae.to(device).eval()


def check_sae_fits(sae, model, point):
    """Refuse an SAE whose input width or residual point does not fit the model."""
    n_embd, n_layer = model.config.n_embd, model.config.n_layer
    if sae.config.d_in != n_embd:
        raise ValueError(f"the SAE for point {point} reads vectors of width {sae.config.d_in}, but the model's "
                         f"residual stream has width n_embd={n_embd}; retrain the SAE for this model")
    if not 0 <= point <= n_layer:
        raise ValueError(f"the SAE is for residual point {point}, but the model has points 0..{n_layer}")
