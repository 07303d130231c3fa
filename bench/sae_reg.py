r"""
SAE-regularized pretraining: does training a model jointly with SAEs make its activations easier to decompose?

For each seed, a normal model and an SAE-regularized one (`--sae_reg_lambda`; same steps, learning rate and data)
are pretrained; then each is frozen, a sweep of fresh SAEs is trained at every residual point 0..n_layer, and each
sweep point's SAEs are spliced in on held-out text (CE increase per point, and all at once: the compound CE
increase against the total L0). Both models of a seed, and their fresh SAEs, use that seed's corpus.

    python -m bench.sae_reg                                   # the tiny world, seeds 0 and 1, TopK k = 4, 8, 16
    python -m bench.sae_reg --seeds=0,1 --k=4,8,16 --sae_reg_lambda=1 --corpus=../shared/data/tinyshakespeare.txt
    python -m bench.sae_reg --preset=gpt_circuits --sweep=original --corpus=../shared/data/tinyshakespeare.txt \
        --run=gpt_circuits --seeds=0,1,2               # the original study's settings (meant for a GPU)
    python -m bench.sae_reg --preset=gpt_circuits --sweep=original --corpus=... --estimate=true   # its cost here

Sweeps: `--sweep=k` (default) trains fresh TopK SAEs with the run's SAE settings, one sweep point per --k;
`--sweep=original` trains the original's: ReLU + L1 SAEs of its per-point widths, 8 sets of L1 coefficients from
its start to its end values (its ranges differ for the normal and the regularized model), with its SAE training
schedule (ORIGINAL below, read from peterlai/gpt-circuits). This script's keys are Options' below (--help lists
them); any other --key=value is the pipeline's (the regularized model's lambda is --sae_reg_lambda). Each
model is a cached pretraining run that resumes from its last checkpoint, and each sweep point of each model is
cached on its own (out/<run>/sae_reg/<variant>_seed<s>/sweep_<i>.json, its fresh SAEs in sweep_<i>.pt for
bench/sae_adapt.py, and with --refit=true the same SAEs with least-squares decoders in sweep_<i>_refit.json), so an
interrupted study resumes per model and per sweep point. Writes out/<run>/sae_reg/sae_reg.json, sae_reg.md and
sae_reg_*.png.

`--sae_reg_norm=var` (or norm2) under the same --run is a third model beside the two: the regularized model under
that norm (regularized_var_seed<s>) against the normal models already there (the normal model divides nothing, so
the studies of every norm share it), written to sae_reg_var.json, sae_reg_var.md and sae_reg_var_*.png.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import torch

import cache
import configurator as cfg
import jobs
import sae_stage
import train
from jobs import progress
from evaluate import sae_metrics
from data.corpus import get_batch
from data.tokenizer import decode
from model import model_from_checkpoint
from pretrain import corpus_hash, corpus_of, pretrain
from report import fmt, mean_std, save_figure
from sae import SAEConfig, collect_activations, sae_to_dict, train_sae
from bench.sae_adapt import sweep_point_saes

# The original study (peterlai/gpt-circuits: experiments/regularization/setup.py, RegularizeAllLayersExperiment, and
# config/sae/training.py, shakespeare_64x4_defaults); its model settings are configurator.PRESETS["gpt_circuits"].
ORIGINAL = {
    "widths": (512, 512, 2048, 4096, 4096),  # SAE features per point 0..4 (64 x 8, 8, 32, 64, 64)
    "l1_start": {"normal": (0.0021, 0.0175, 0.056, 0.09, 0.275), "regularized": (0.0005, 0.002, 0.006, 0.010, 0.02)},
    "l1_end": {"normal": (0.009, 0.105, 0.33, 0.39, 0.87), "regularized": (0.0055, 0.014, 0.044, 0.048, 0.06)},
    "sweep_points": 8,  # linearly spaced from start to end, every point's coefficient at once
    "sae_steps": 7500, "sae_batch_size": 128 * 128, "sae_lr": 1e-3, "sae_warmup": 750, "sae_min_lr": 1e-4,
    # its published results, as the issue quotes them: val CE and (total L0, compound CE increase)
    "published": {"normal": {"val_ce": 1.572, "compound": (250, 1.01)},
                  "regularized": {"val_ce": 1.554, "compound": (250, 0.35)}},
}


@dataclass
class Options:
    # bench/sae_reg.py (the regularized model's lambda is the pipeline's --sae_reg_lambda, 1 if the run has none)
    seeds: tuple[int, ...] = (0, 1)  # seeds: one normal and one regularized model each
    k: tuple[int, ...] = (4, 8, 16)  # --sweep=k: TopK of the fresh SAEs
    sweep: str = "k"  # which fresh SAEs to train: 'k' (TopK, one point per k) or 'original' (the original's)
    sweep_points: int = ORIGINAL["sweep_points"]  # --sweep=original: points of the L1 sweep (the original: 8)
    sweep_steps: int = ORIGINAL["sae_steps"]  # --sweep=original: steps of each fresh SAE (the original: 7500)
    sweep_batch_size: int = ORIGINAL["sae_batch_size"]  # --sweep=original: tokens a step (the original: 16384)
    estimate: bool = False  # time a few steps of each stage and print the projected hours per seed; train nothing
    refit: bool = False  # also splice each sweep point's SAEs in with the least-squares decoders of their codes
    CHOICES = {"sweep": ("k", "original")}
    AT_LEAST_ZERO = ("seeds",)


def parse(argv):
    """(options of this script, configurator.Config), or None for --help; every value is checked before anything is
    trained."""
    args = cfg.parse_script_args(argv, Options, "python -m bench.sae_reg", __doc__)
    if args is None:
        return None
    options, config = args[0], cfg.parse_args(args[1])
    lam = config.sae_reg_lambda or 1.0
    d_sae = config.sae_expansion * config.n_embd
    if not options.seeds or not options.k:
        raise ValueError("--seeds and --k need at least one value each")
    if options.sweep == "k" and not all(0 < k <= d_sae for k in options.k):
        raise ValueError(f"--k={','.join(map(str, options.k))}: each k must be in 1..d_sae={d_sae}")
    if options.sweep == "original" and config.n_layer + 1 != len(ORIGINAL["widths"]):
        raise ValueError(f"--sweep=original has SAEs at 5 points (0..4): needs --n_layer=4, not {config.n_layer} "
                         "(--preset=gpt_circuits sets it)")
    if options.sweep_points < 2:
        raise ValueError(f"--sweep_points={options.sweep_points}: at least 2 (a start and an end)")
    return options, dataclasses.replace(config, sae_reg_lambda=lam)


def l1_sweep(variant, n_points):
    """The original's sweep: n_points sets of per-point L1 coefficients, linear from its start to its end values."""
    start, end = ORIGINAL["l1_start"][variant], ORIGINAL["l1_end"][variant]
    return [tuple(a + (b - a) * i / (n_points - 1) for a, b in zip(start, end)) for i in range(n_points)]


def sweep(config, options, variant):
    """[(label, {point: SAEConfig}, train_sae keyword arguments)] of the fresh SAEs for one model."""
    points = range(config.n_layer + 1)
    if options.sweep == "k":
        return [(f"k={k}", {p: SAEConfig(d_in=config.n_embd, **sae_stage.sae_kwargs(config, k)) for p in points},
                 dict(steps=config.sae_steps, batch_size=config.sae_batch_size)) for k in options.k]
    schedule = dict(steps=options.sweep_steps, batch_size=options.sweep_batch_size, lr=ORIGINAL["sae_lr"],
                    min_lr=ORIGINAL["sae_min_lr"], warmup=options.sweep_steps // 10)  # the original: 750 of 7500
    widths = config.sae_reg_widths or ORIGINAL["widths"]  # as wide as the joint SAEs given, else the original's
    return [("l1=" + ",".join(f"{c:.5g}" for c in l1s),
             {p: SAEConfig(d_in=config.n_embd, d_sae=widths[p], k=0, kind="relu", l1=l1s[p],
                           auxk_coef=0.0) for p in points}, schedule)
            for l1s in l1_sweep(variant, options.sweep_points)]


ESTIMATE_STEPS = 10  # steps timed per stage by --estimate (the SAEs' after 2 untimed ones: the first are slow)


def estimate(config, options, device):
    """{stage: seconds per step} and the projected hours of one seed, from ESTIMATE_STEPS timed steps of each:
    pretraining of the normal and the regularized model (pretrain itself, its schedule cut short, in a scratch
    run), and the fresh SAEs of one sweep point (train_sae on random activations of the right width)."""
    per_step, hours = {}, 0.0
    for variant, lam in (("normal", 0.0), ("regularized", config.sae_reg_lambda)):
        short = dataclasses.replace(config, sae_reg_lambda=lam, max_iters=ESTIMATE_STEPS, warmup_iters=1,
                                    eval_interval=ESTIMATE_STEPS, eval_iters=1,
                                    run=os.path.join(config.run, "sae_reg", f"estimate_{variant}"))
        pretrain(short, device)
        summary = cache.read_json(os.path.join(short.out_dir, short.run, "pretrain.json"))
        per_step[f"pretrain {variant}"] = summary["ms_per_iter"] / 1000
        hours += per_step[f"pretrain {variant}"] * config.max_iters / 3600
    label, sae_configs, schedule = sweep(config, options, "normal")[0]
    seconds = 0.0
    for p, sae_config in sae_configs.items():
        activations = torch.randn(schedule["batch_size"], sae_config.d_in, device=device)
        train_sae(activations, sae_config, **{**schedule, "steps": 2}, desc=f"estimate point {p}")
        t0 = time.time()
        train_sae(activations, sae_config, **{**schedule, "steps": ESTIMATE_STEPS}, desc=f"estimate point {p}")
        seconds += (time.time() - t0) / ESTIMATE_STEPS
    per_step["fresh SAEs of one sweep point"] = seconds  # every residual point
    n_points = len(sweep(config, options, "normal"))
    hours += 2 * n_points * schedule["steps"] * seconds / 3600  # both models' sweeps
    return per_step, hours


def sweep_point_key(config, settings, device, base):
    """A sweep point's cache key: the model's, its SAEs' settings, and the code that trains and measures them (the SAE
    stage's and fresh_sae_sweep's: an edit of this script's tables or plots redoes none)."""
    return cache.result_key({**cache.stage_config(config, "pretrain"), "sweep_point": settings},
                            cache.stage_code(config, "pretrain", "sae") + ["bench/sae_reg.py:fresh_sae_sweep"], device,
                            corpus_hash(config), {"base": base["sha"]})


def fresh_sae_sweep(config, points_of_sweep, device):
    """Pretrain (or reuse, or resume) the model of config, then each sweep point's fresh SAEs at every residual
    point, spliced in on held-out text. Each sweep point is cached on its own: a rerun redoes only the missing."""
    base = pretrain(config, device)
    model = model_from_checkpoint(base, device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_ids, val_ids = corpus_of(config)  # the corpus this model was trained on
    points = tuple(range(config.n_layer + 1))
    activations = None  # collected once per model, when a sweep point needs them
    results = []
    for i, (label, sae_configs, schedule) in enumerate(points_of_sweep):
        path, saes_path = (os.path.join(config.out_dir, config.run, f"sweep_{i}.{ext}") for ext in ("json", "pt"))
        settings = {"saes": {p: dataclasses.asdict(c) for p, c in sae_configs.items()}, "schedule": schedule,
                    "sae_tokens": config.sae_tokens, "seed": config.seed}
        key = sweep_point_key(config, settings, device, base)
        cached = cache.load_json_result(path, key)
        if cached is None or cache.load_checkpoint(saes_path, key, "saes") is None:
            if activations is None:
                activations = collect_activations(model, train_ids, points, config.sae_tokens, config.block_size,
                                                  config.seed)
            saes = {p: train_sae(activations[p], c, seed=config.seed, desc=f"{label} point {p}", progress=progress,
                                 **schedule)[0]
                    for p, c in sae_configs.items()}
            metrics = sae_metrics(model, saes, val_ids, config.block_size, device)
            checkpoint = {"key": key, "base": base["sha"], "saes": {p: sae_to_dict(sae) for p, sae in saes.items()}}
            cache.save_checkpoint({**checkpoint, "sha": cache.tensor_hash(checkpoint["saes"])}, saes_path)
            cache.save_json({"key": key, "label": label, **metrics}, path)
            cached = cache.read_json(path)  # one form for every caller: JSON's string keys
        print(f"sae_reg {config.run} {label}: total L0 {cached['total_l0']:.1f}, compound CE increase "
              f"{cached['compound_ce_increase']:.4f}")
        results.append(cached)
    summary = cache.read_json(os.path.join(config.out_dir, config.run, "pretrain.json"))
    return {"val_ce": base["val_loss"], "ms_per_iter": summary["ms_per_iter"], "sweep": results,
            # the model's activations at each point (evaluate.second_moment_split), the same at every sweep point
            "activations": {p: {k: m[k] for k in ("rms", "mean_share", "centered_rms")}
                            for p, m in results[0]["points"].items()},
            "unigram_ce": unigram_ce(train_ids, val_ids, model.config.vocab_size),
            "norms_during_training": [{"iter": h["iter"], **h["norms"]} for h in summary["history"] if "norms" in h],
            "norms": summary["history"][-1].get("norms", {})}


def variance_by_token(x, tokens):
    """x: (N, d) activations, tokens: (N,) the token at each. The share of the token-to-token variance held by the
    tokens of each vocabulary entry v, and v's share of the tokens:

        variance_share(v) = sum_{t: tokens_t = v} ||x_t - mu||^2 / sum_t ||x_t - mu||^2,   mu = mean_t x_t

    Returns {'token', 'variance_share', 'token_share'} of the entry holding the largest share. A variance share far
    above the token share means one vector on one token carries what varies, which one SAE latent could reconstruct."""
    x = x.double()
    centered = ((x - x.mean(0)) ** 2).sum(-1)
    by_token = torch.zeros(int(tokens.max()) + 1, dtype=torch.float64).index_add_(0, tokens, centered)
    top = int(by_token.argmax())
    return {"token": top, "variance_share": (by_token[top] / centered.sum()).item(),
            "token_share": (tokens == top).double().mean().item()}


@torch.no_grad()
def variance_by_character(config, device, n_batches=20, batch_size=32, seed=1234):
    """{point: variance_by_token} of the model of config at every residual point, on the held-out windows that
    evaluate.sae_metrics reads (the same seed), the token named as its character."""
    model = model_from_checkpoint(pretrain(config, device), device).eval()
    val_ids, generator = corpus_of(config)[1], torch.Generator().manual_seed(seed)
    windows = torch.cat([get_batch(val_ids, batch_size, config.block_size, generator, device)[0]
                         for _ in range(n_batches)])
    points = range(config.n_layer + 1)
    residuals = model(windows, read=points)[2]
    result = {}
    for p in points:
        top = variance_by_token(residuals[p].flatten(0, 1), windows.flatten())
        result[str(p)] = {**top, "token": decode([top["token"]])}
    return result


def least_squares_decoder(pairs, ridge=1e-8):
    r"""(W, c): the linear decoder that reads codes best, fit by least squares on (z, x) chunks ((N, m) codes, (N, d)
    activations):

        (W, c) = argmin_{W, c} sum_n ||x_n - z_n W - c||^2 + ridge * s * ||W||^2,   s = max(mean_j (z^T z)_jj, 1e-12)

    solved by the normal equations in float64, accumulated chunk by chunk (no (N, m) matrix of every token is kept);
    the tiny ridge only gives a latent that never fires the weight 0 (and keeps the system solvable if none fires)."""
    gram = rhs = None
    for z, x in pairs:
        design = torch.ones(len(z), z.size(1) + 1, dtype=torch.float64, device=z.device)  # [z, 1]
        design[:, :-1] = z
        gram = design.T @ design if gram is None else gram + design.T @ design
        rhs = design.T @ x.double() if rhs is None else rhs + design.T @ x.double()
    if gram is None:
        raise ValueError("least_squares_decoder: no (codes, activations) to fit")
    scale = max(gram.diagonal()[:-1].mean().item(), 1e-12)
    penalty = torch.full((gram.size(0),), ridge * scale, dtype=torch.float64, device=gram.device)
    penalty[-1] = 0.0  # the bias c is not penalised
    solution = torch.linalg.solve(gram + torch.diag(penalty), rhs)
    return solution[:-1].float(), solution[-1].float()


class RefitDecoder(torch.nn.Module):
    """An SAE's encoder with the least-squares decoder of its codes (least_squares_decoder): xhat = encode(x) W + c.
    Spliced in like the SAE (evaluate.sae_metrics reads its reconstruct, config and call), it measures how much of
    the SAE's error is its decoder and how much is in the codes themselves (the same encoder: the same L0)."""

    def __init__(self, sae, W, c):
        super().__init__()
        self.sae, self.config = sae, sae.config
        self.register_buffer("W", W)  # (d_sae, d_in)
        self.register_buffer("c", c)  # (d_in,)

    def reconstruct(self, x):
        """(xhat, z): x's reconstruction by the refit decoder, and the SAE's code it was decoded from."""
        z = self.sae.encode(x)
        return z @ self.W + self.c, z

    def forward(self, x):
        """The reconstruction of x, to splice into the model as the SAE would be."""
        return self.reconstruct(x)[0]


@torch.no_grad()
def decoder_refit(config, points_of_sweep, device, chunk=20_000):
    """[{label, compound_refit, points: {p: {fvu_refit, ce_increase_refit}}}], one per sweep point of the model of
    config: its SAEs spliced in on held-out text with the least-squares decoders of their codes, fit on the
    activations they were trained on (the same config.sae_tokens tokens, the same seed), measured as the sweep
    measures them with their own decoders (evaluate.sae_metrics, the same windows: table() sets the two side by
    side). Cached per sweep point beside its SAEs (sweep_<i>_refit.json), under a key of the SAEs and this code."""
    base = pretrain(config, device)
    model = model_from_checkpoint(base, device).eval()
    train_ids, val_ids = corpus_of(config)
    points = tuple(range(config.n_layer + 1))
    activations, results = None, []
    for i, (label, _, _) in enumerate(points_of_sweep):
        folder = os.path.join(config.out_dir, config.run)
        saes, sha = sweep_point_saes(os.path.join(folder, f"sweep_{i}.pt"), base, model, device)
        key = cache.result_key({**cache.stage_config(config, "pretrain"), "refit_of": sha,
                                "sae_tokens": config.sae_tokens, "seed": config.seed},
                               cache.stage_code(config, "pretrain", "sae") + [
                                   f"bench/sae_reg.py:{name}" for name in
                                   ("least_squares_decoder", "RefitDecoder", "decoder_refit")],
                               device, corpus_hash(config), {"base": base["sha"]})
        path = os.path.join(folder, f"sweep_{i}_refit.json")
        cached = cache.load_json_result(path, key)
        if cached is None:
            if activations is None:  # the tokens the sweep's SAEs were trained on (fresh_sae_sweep)
                activations = collect_activations(model, train_ids, points, config.sae_tokens, config.block_size,
                                                  config.seed)
            refit = {}
            for p, sae in saes.items():
                x = activations[p]
                W, c = least_squares_decoder((sae.encode(x[s:s + chunk]), x[s:s + chunk])
                                             for s in range(0, len(x), chunk))
                refit[p] = RefitDecoder(sae, W, c)
            metrics = sae_metrics(model, refit, val_ids, config.block_size, device)
            cache.save_json({"key": key, "label": label, "compound_refit": metrics["compound_ce_increase"],
                             "points": {str(p): {"fvu_refit": m["fvu"], "ce_increase_refit": m["ce_increase"]}
                                        for p, m in metrics["points"].items()}}, path)
            cached = cache.read_json(path)
        results.append(cached)
    return results


def unigram_ce(train_ids, val_ids, vocab_size):
    """The held-out CE of a model that ignores context: -mean_t log p(y_t), p(v) = (count of v in train + 1) /
    (train tokens + vocab_size). A spliced model whose CE passes it does worse than one that ignores context."""
    counts = torch.bincount(torch.as_tensor(train_ids).long(), minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return -log_p[torch.as_tensor(val_ids).long()].mean().item()


def main(argv):
    parsed = parse(argv)
    if parsed is None:
        return 0
    options, config = parsed
    train.check_inputs(dataclasses.replace(config, seed=options.seeds[0]), tasks=False)
    device = cfg.resolve_device(config)
    if options.estimate:
        per_step, hours = estimate(config, options, device)
        for stage, seconds in per_step.items():
            print(f"{stage}: {seconds:.2f} s per step")
        print(f"one seed (two models, {config.max_iters} steps each, and their sweeps): about {hours:.1f} h on "
              f"{device} ({torch.get_num_threads()} threads)")
        return 0
    out = os.path.join(config.out_dir, config.run, "sae_reg")
    results = {"normal": {}, "regularized": {}, "sweep": options.sweep, "lambda": config.sae_reg_lambda,
               "norm": config.sae_reg_norm}
    for seed in options.seeds:
        for variant in ("normal", "regularized"):
            variant_config = variant_of(config, variant, seed)
            results[variant][str(seed)] = fresh_sae_sweep(variant_config, sweep(variant_config, options, variant),
                                                          device)
            results[variant][str(seed)]["by_character"] = variance_by_character(variant_config, device)
            if options.refit:
                results[variant][str(seed)]["refit"] = decoder_refit(
                    variant_config, sweep(variant_config, options, variant), device)
    stem = "sae_reg" + ("" if config.sae_reg_norm == ORIGINAL_NORM else f"_{config.sae_reg_norm}")
    cache.save_json(results, os.path.join(out, f"{stem}.json"))
    plot(results, out, stem)
    text = table(results)
    cache.save_text(f"Command: `python -m bench.sae_reg {' '.join(argv)}`\n\n{text}\n", os.path.join(out, f"{stem}.md"))
    print(text)


ORIGINAL_NORM = "norm"  # the original's division of the joint SAEs' error, ||x - xhat||^2 / ||x||


def variant_of(config, variant, seed):
    """The config of one model of the study, in out/<run>/sae_reg/<variant>_seed<seed>: the normal model (lambda 0)
    has no joint term to divide, so it is the same model whatever --sae_reg_norm says and is shared by the studies
    of every norm; a regularized model under another norm than the original's has its own folder
    (regularized_var_seed0)."""
    if variant == "normal":
        config = dataclasses.replace(config, sae_reg_lambda=0.0, sae_reg_norm=ORIGINAL_NORM)
    elif config.sae_reg_norm != ORIGINAL_NORM:
        variant = f"{variant}_{config.sae_reg_norm}"
    return dataclasses.replace(config, seed=seed, run=os.path.join(config.run, "sae_reg", f"{variant}_seed{seed}"))


# ----------------------------------------------------------------------------------------------------------------
# the comparison: CE increase against L0, normal vs regularized, mean over seeds at each sweep point


def curves(results, variant):
    """{'labels', 'points': {p: (L0 (mean, std), CE increase (mean, std)) per sweep point}, 'compound': (total L0,
    compound CE increase) per sweep point}: the mean over seeds of the i-th sweep point."""
    runs = [r["sweep"] for r in results[variant].values()]
    n = len(runs[0])
    points = list(runs[0][0]["points"])
    per_point = {p: ([mean_std([r[i]["points"][p]["l0"] for r in runs]) for i in range(n)],
                     [mean_std([r[i]["points"][p]["ce_increase"] for r in runs]) for i in range(n)]) for p in points}
    compound = ([mean_std([r[i]["total_l0"] for r in runs]) for i in range(n)],
                [mean_std([r[i]["compound_ce_increase"] for r in runs]) for i in range(n)])
    return {"labels": [runs[0][i]["label"] for i in range(n)], "points": per_point, "compound": compound}


COLORS = {"normal": "tab:blue", "regularized": "tab:orange"}


def headroom(results, variant):
    """The held-out unigram CE minus the model's clean CE, mean over seeds: a compound CE increase above it leaves
    the spliced model worse than a model that ignores context."""
    return mean_std([r["unigram_ce"] - r["sweep"][0]["clean_ce"] for r in results[variant].values()])[0]


def interpolate(curve, l0):
    """curve: [(total L0, compound CE increase)] sorted by L0; the CE increase at l0, linear between points."""
    for (a, ya), (b, yb) in zip(curve, curve[1:]):
        if a <= l0 <= b:
            return ya if b == a else ya + (yb - ya) * (l0 - a) / (b - a)
    if len(curve) == 1 and curve[0][0] == l0:
        return curve[0][1]
    raise ValueError(f"total L0 {l0} is outside the sweep's {curve[0][0]}..{curve[-1][0]}")


def at_matched_l0(results, n=3):
    """Both models' compound CE increase at matched total L0, as the original compares them: at n L0s spread evenly
    over the range that every seed's curve of both models covers, each curve read there by linear interpolation
    between its sweep points. [{'l0', 'normal': (mean, std) over seeds, 'regularized': ...}], largest L0 first;
    [] if the curves do not overlap."""
    runs = {v: [sorted((s["total_l0"], s["compound_ce_increase"]) for s in r["sweep"]) for r in results[v].values()]
            for v in COLORS}
    l0s = common_l0s([curve for v in runs for curve in runs[v]], n)
    return [{"l0": l0, **{v: mean_std([interpolate(curve, l0) for curve in runs[v]]) for v in runs}} for l0 in l0s]


def common_l0s(curves, n=3):
    """n L0s spread evenly over the range every curve ([(L0, y)] sorted by L0) covers, largest first; [] if none."""
    low, high = max(curve[0][0] for curve in curves), min(curve[-1][0] for curve in curves)
    if low > high:
        return []
    # the ends exactly, not as high - (high - low), which rounding can put just outside a curve
    return [high, *(high - (high - low) * i / (n - 1) for i in range(1, n - 1)), low] if high > low else [high]


def plot(results, out, stem="sae_reg"):
    """<stem>_per_point.png: CE increase vs L0 per point (log-log); <stem>_compound.png: compound CE increase vs
    total L0 (with the original's published points for --sweep=original, and for each model the line past which
    its spliced model is worse than a unigram model); <stem>_activations.png: the constant and the varying part of
    each point's activations at the end of pretraining; <stem>_norms.png: the mean activation norm at each point
    along pretraining, one line per seed. Normal vs regularized, mean over seeds, std as error bars where drawn."""
    both = {v: curves(results, v) for v in COLORS}
    points = list(both["normal"]["points"])
    fig, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.4), squeeze=False)
    for ax, p in zip(axes[0], points):
        for variant, color in COLORS.items():
            l0s, ces = both[variant]["points"][p]
            ax.errorbar([m for m, _ in l0s], [max(m, 1e-5) for m, _ in ces], yerr=[s for _, s in ces],
                        marker="o", color=color, label=variant, capsize=3)
        ax.set(xscale="log", yscale="log", xlabel="L0", title=f"point {p}")
    axes[0][0].set_ylabel("CE increase (nats)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, f"{stem}_per_point.png"))

    fig, ax = plt.subplots(figsize=(5, 3.8))
    for variant, color in COLORS.items():
        l0s, ces = both[variant]["compound"]
        ax.errorbar([m for m, _ in l0s], [m for m, _ in ces], yerr=[s for _, s in ces], marker="o", color=color,
                    label=f"{variant} (ours)", capsize=3)
        if results["sweep"] == "original":
            l0, ce = ORIGINAL["published"][variant]["compound"]
            ax.scatter([l0], [ce], marker="*", s=160, color=color, edgecolor="black", zorder=3,
                       label=f"{variant} (original, published)")
    for variant, color in COLORS.items():
        ax.axhline(headroom(results, variant), color=color, linestyle="--", linewidth=1,
                   label=f"{variant}: above, worse than a unigram model")
    ax.set(xlabel="total L0 (sum over points)", ylabel="compound CE increase (nats)",
           title="all points spliced at once")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, f"{stem}_compound.png"))

    fig, ax = plt.subplots(figsize=(1.3 * len(points) + 1.5, 3.6))
    for j, (variant, color) in enumerate(COLORS.items()):
        runs = list(results[variant].values())
        split = {p: [r["activations"][p] for r in runs] for p in points}
        constant = [mean_std([a["mean_share"] * a["rms"] ** 2 for a in split[p]])[0] for p in points]
        varying = [mean_std([a["centered_rms"] ** 2 for a in split[p]])[0] for p in points]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(points))]
        ax.bar(xs, varying, width=0.36, color=color, label=f"{variant}: varies by token, E||x - mu||^2")
        ax.bar(xs, constant, width=0.36, bottom=varying, color=color, alpha=0.35, hatch="//",
               label=f"{variant}: constant, ||mu||^2")
    ax.set(xticks=range(len(points)), xticklabels=[f"point {p}" for p in points],
           ylabel="E||x||^2 on held-out text", title="constant and varying parts of the residual stream")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, os.path.join(out, f"{stem}_activations.png"))

    fig, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.2), squeeze=False, sharex=True)
    for ax, p in zip(axes[0], points):
        for variant, color in COLORS.items():
            for i, run in enumerate(results[variant].values()):
                history = run["norms_during_training"]
                ax.plot([h["iter"] for h in history], [h[p] for h in history], color=color, alpha=0.8,
                        label=variant if i == 0 else None)
        ax.set(xlabel="pretraining step", title=f"point {p}")
    axes[0][0].set_ylabel("mean ||x|| on held-out text")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, f"{stem}_norms.png"))


def table(results):
    """Markdown: val CE and, per sweep point, total L0 and compound CE increase, normal vs regularized (mean ± std
    over seeds); both at matched total L0; per point at the first sweep point; what of each point's activations is
    constant (evaluate.second_moment_split), and the character whose tokens hold the most of what varies
    (variance_by_token); with --refit=true, each sweep point's SAEs with their own and with refit decoders; then the
    mean activation norm at each point along pretraining (first, middle, last evaluation)."""
    lines = ["| model | val CE | ms/iter | sweep point | total L0 | compound CE increase |",
             "|---|---|---|---|---|---|"]
    for variant in COLORS:
        runs = list(results[variant].values())
        val = mean_std([r["val_ce"] for r in runs])
        ms = mean_std([r["ms_per_iter"] for r in runs])
        c = curves(results, variant)
        for label, (l0, _), ce in zip(c["labels"], c["compound"][0], c["compound"][1]):
            lines.append(f"| {variant} | {fmt(*val)} | {ms[0]:.1f} | {label} | {l0:.1f} | {fmt(*ce)} |")
    unigram = mean_std([r["unigram_ce"] for v in COLORS for r in results[v].values()])[0]
    lines += ["", f"For scale: the held-out text's unigram CE (no context) is {unigram:.3f} nats; a compound CE "
              f"increase above {headroom(results, 'normal'):.3f} (normal) or {headroom(results, 'regularized'):.3f} "
              "(regularized), the unigram CE minus the model's clean CE, leaves the spliced model worse than a "
              "model that ignores context."]
    matched = at_matched_l0(results)
    if matched:
        lines += ["", "At matched total L0 (linear between sweep points, over the range every curve covers):", "",
                  "| total L0 | compound CE increase, normal | regularized | ratio regularized / normal |",
                  "|---|---|---|---|"]
        for m in matched:
            ratio = m["regularized"][0] / m["normal"][0]
            lines.append(f"| {m['l0']:.1f} | {fmt(*m['normal'])} | {fmt(*m['regularized'])} | {ratio:.2f} |")
    points = list(next(iter(results["normal"].values()))["sweep"][0]["points"])
    lines += ["", "Per point, at each model's first sweep point (--sweep=original: its smallest L1s):",
              "", "| model | point | L0 | FVU | cosine(x, xhat) | dead fraction | CE increase |",
              "|---|---|---|---|---|---|---|"]
    for variant in COLORS:
        runs = [r["sweep"][0]["points"] for r in results[variant].values()]
        for p in points:
            lines.append(f"| {variant} | {p} | " + " | ".join(
                fmt(*mean_std([r[p][m] for r in runs]), digits=digits)
                for m, digits in (("l0", 1), ("fvu", 3), ("cos", 3), ("dead_fraction", 3), ("ce_increase", 3))) + " |")
    lines += ["", "Each point's activations on the held-out windows: the share of E\\|\\|x\\|\\|^2 in their mean "
              "over tokens (the constant), and the rms of what varies, sqrt(E\\|\\|x - mu\\|\\|^2):", "",
              "| model | " + " | ".join(f"point {p}" for p in points) + " |", "|---|" + "---|" * len(points)]
    for variant in COLORS:
        runs = list(results[variant].values())
        lines.append(f"| {variant} | " + " | ".join(
            fmt(*mean_std([r["activations"][p]["mean_share"] for r in runs]), digits=2) + ", " +
            fmt(*mean_std([r["activations"][p]["centered_rms"] for r in runs]), digits=2) for p in points) + " |")
    if all("by_character" in r for v in COLORS for r in results[v].values()):
        lines += ["", "The character whose tokens hold the largest share of each point's token-to-token variance "
                  "E\\|\\|x - mu\\|\\|^2 (each seed: the character, its share of the variance / its share of the "
                  "tokens):", "", "| model | " + " | ".join(f"point {p}" for p in points) + " |",
                  "|---|" + "---|" * len(points)]
        for variant in COLORS:
            lines.append(f"| {variant} | " + " | ".join("; ".join(
                f"{c['token']!r} {c['variance_share']:.2f} / {c['token_share']:.2f}"
                for c in (r["by_character"][p] for r in results[variant].values())) for p in points) + " |")
    if all("refit" in r for v in COLORS for r in results[v].values()):  # --refit=true
        lines += ["", "Each sweep point's SAEs with their own decoders and with the least-squares decoders of their "
                  "codes (RefitDecoder: the same encoders and L0, the decoder fit on the SAEs' training tokens; "
                  "mean over seeds): compound CE increase, and FVU at each point, own / refit:", "",
                  "| model | sweep point | total L0 | compound, own | compound, refit | " +
                  " | ".join(f"FVU point {p}" for p in points) + " |", "|---|---|---|---|---|" + "---|" * len(points)]
        for variant in COLORS:
            for i, label in enumerate(curves(results, variant)["labels"]):
                own = [r["sweep"][i] for r in results[variant].values()]  # sweep point i of every seed
                refit = [r["refit"][i] for r in results[variant].values()]
                mean = lambda values: mean_std(list(values))[0]  # noqa: E731
                lines.append(
                    f"| {variant} | {label} | {mean(o['total_l0'] for o in own):.1f} | "
                    f"{mean(o['compound_ce_increase'] for o in own):.3f} | "
                    f"{mean(r['compound_refit'] for r in refit):.3f} | " + " | ".join(
                        f"{mean(o['points'][p]['fvu'] for o in own):.4f} / "
                        f"{mean(r['points'][p]['fvu_refit'] for r in refit):.4f}" for p in points) + " |")
    history = next(iter(results["normal"].values()))["norms_during_training"]
    shown = sorted({0, len(history) // 2, len(history) - 1})  # the first, a middle and the last evaluation
    steps = [history[i]["iter"] for i in shown]
    lines += ["", "| model | " + " | ".join(f"mean norm at point {p}, steps {' / '.join(map(str, steps))}"
                                            for p in points) + " |", "|---|" + "---|" * len(points)]
    for variant in COLORS:
        runs = list(results[variant].values())
        lines.append(f"| {variant} | " + " | ".join(" / ".join(
            fmt(*mean_std([r["norms_during_training"][i][p] for r in runs]), digits=2) for i in shown)
            for p in points) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
