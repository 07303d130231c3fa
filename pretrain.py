"""
Stage 1, pretraining: the GPT learns the base corpus (the generated tiny world, or a text file); with
--instruct_tags it then learns tag-routed auxiliary tasks (the instruction phase), and with --sae_reg_lambda it
learns jointly with an SAE at every residual point (SAE-regularized pretraining). The result is cached at
out/<run>/base.pt with its summary in pretrain.json; an interrupted run resumes from its last checkpoint.

    pretrain(config, device)   the base checkpoint: reused when cached, else trained (or resumed) and saved
"""

import functools
import os
import time

import torch

import cache
import jobs
from cache import stage_code, stage_config
from data.corpus import get_batch, load_corpus
from data.instructions import AUX_TASKS, aux_task_names
from data.tasks import Batch, build_task_suite, concat_splits, trim_padding
from data.tokenizer import NEWLINE, VOCAB_SIZE, decode, encode
from evaluate import mean_accuracy
from jobs import progress
from model import GPT, GPTConfig, warmup_cosine
from sae import SAEConfig, make_sae

# ----------------------------------------------------------------------------------------------------------------
# data of the stage: the corpus and the auxiliary tasks of the instruction phase


@functools.lru_cache(maxsize=4)
def corpus(path, n_lines, seed, block_size):
    """(train_ids, val_ids) of the corpus, made once per process (the generated corpus takes a few seconds)."""
    return load_corpus(path or None, n_lines=n_lines, seed=seed, block_size=block_size)


def corpus_of(config):
    return corpus(config.corpus, config.corpus_lines, config.seed, config.block_size)


def corpus_hash(config):
    """The corpus's part of every key: a hash of what was read (once: a pipe cannot be read again), or 'generated'
    for the tiny world's corpus, which its config fields make."""
    return cache.tensor_hash(list(corpus_of(config))) if config.corpus else "generated"


AUX_HELD_OUT = 32  # held-out prompts per auxiliary task: the instruction-following accuracy is measured on them


def aux_suite(config):
    """{aux task: {'train', 'val' (empty), 'test' (held out)}} of the instruction phase; {} without one. Built once
    per process (every continual-learning run a worker does measures the same held-out prompts; none changes them)."""
    if not config.instruct_tags:
        return {}
    return built_aux_suite(config.instruct_tags, config.instruct_examples, config.block_size)


@functools.lru_cache(maxsize=2)
def built_aux_suite(instruct_tags, instruct_examples, block_size):
    return build_task_suite(aux_task_names(instruct_tags), instruct_examples, 0, AUX_HELD_OUT, seed=0,
                            block_size=block_size, tasks=AUX_TASKS)


def aux_accuracy(model, suite, device):
    """Instruction following: the mean accuracy over the auxiliary tasks' held-out prompts."""
    return mean_accuracy(model, [s["test"] for s in suite.values()], device)


def joint_sae_configs(config):
    """{point: SAEConfig} of the SAEs trained jointly with the model, points 0..n_layer: the width and sparsity
    weight of each point (one value given = every point), no AuxK."""
    points = range(config.n_layer + 1)
    widths = config.sae_reg_widths or [config.sae_reg_expansion * config.n_embd] * len(points)
    l1s = config.sae_reg_l1 if len(config.sae_reg_l1) > 1 else config.sae_reg_l1 * len(points)
    return {p: SAEConfig(d_in=config.n_embd, d_sae=widths[p], k=config.sae_reg_k, kind=config.sae_reg_kind, l1=l1s[p],
                         auxk_coef=0.0) for p in points}


def check_joint_saes(config):
    """The joint SAEs' settings, checked before any compute (configurator.validate): an L1 weight for one point or
    every point, a width for every point or none, and TopK's k within each width."""
    n_points = config.n_layer + 1
    for key, allowed in (("sae_reg_l1", (1, n_points)), ("sae_reg_widths", (0, n_points))):
        if len(getattr(config, key)) not in allowed:
            raise ValueError(f"--{key}: give {' or '.join(map(str, allowed))} values (points 0..{config.n_layer}), "
                             f"not {len(getattr(config, key))}")
    narrowest = min(c.d_sae for c in joint_sae_configs(config).values())
    if config.sae_reg_kind == "topk" and not config.sae_reg_k <= narrowest:
        raise ValueError(f"--sae_reg_k={config.sae_reg_k} must be in 1..d_sae={narrowest}")


# ----------------------------------------------------------------------------------------------------------------
# the pieces of a training step, shared with the continual-learning loop (train.py)


def clip_gradients(parameters, grad_clip):
    """Clip the global gradient norm to grad_clip; 0 means no clipping (in every stage)."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)


def check_finite(loss, where, advice):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()} {where}; {advice}")


def get_lr(it, config):
    """Linear warmup to lr over warmup_iters, then cosine decay to min_lr at max_iters; in the instruction phase
    that follows, a second cosine from instruct_lr to min_lr over instruct_iters."""
    if config.instruct_tags and it >= config.max_iters:
        return warmup_cosine(it - config.max_iters, config.instruct_iters, config.instruct_lr, config.min_lr)
    return warmup_cosine(it, config.max_iters, config.lr, config.min_lr, config.warmup_iters)


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


def reconstruction_scale(x, norm):
    """The denominator D(x) of the joint reconstruction term, x (B, T, C), means over the B * T tokens:
        'norm'   E||x||                the original's; grows with the scale of x
        'norm2'  E||x||^2              scale-free: D(s x) = s^2 D(x), as the squared error
        'var'    E||x - mu||^2         mu = E[x]: scale-free and blind to a constant vector added to every token
    A constant costs an SAE nothing (its decoder bias reconstructs it), so under 'norm' and 'norm2' a model can lower
    the term by moving its activations into one constant vector (docs/sae_reg.md measures it); under 'var', the FVU,
    it cannot (the SAE's sparsity term, not divided, still rewards a smaller varying part)."""
    if norm == "norm":
        return x.norm(dim=-1).mean()
    if norm == "norm2":
        return x.pow(2).sum(-1).mean()
    if norm == "var":
        flat = x.reshape(-1, x.size(-1))
        return (flat - flat.mean(0)).pow(2).sum(-1).mean()
    raise ValueError(f"--sae_reg_norm={norm}: choose from norm, norm2, var")


def sae_training_penalty(residuals, saes, lam, norm="norm"):
    """(1/P) sum_i [ lam * ||x_i - xhat_i||^2 / D(x_i)  +  S_i(z_i) ]

    over the P residual points i that have an SAE (all L+1 of them in pretraining). The squared error is a mean over
    tokens, D the denominator reconstruction_scale names by `norm`, and S_i the SAE's own sparsity term (a ReLU SAE:
    l1_i sum_j z_j ||W_dec_j||; a TopK SAE: l1_i ||z||_1, 0 by default since k fixes L0), not scaled by lam, as the
    original study's code has it (its published equation puts lambda on both terms). The inputs are *not* detached,
    so the gradient shapes the model towards activations the SAEs reconstruct well."""
    total = 0.0
    for p, sae in saes.items():
        x = residuals[p]  # (B, T, C)
        xhat, z = sae.reconstruct(x)
        squared_error = (x - xhat).pow(2).sum(-1).mean()
        total = total + lam * squared_error / reconstruction_scale(x, norm) + sae.sparsity(z)
    return total / len(saes)


# ----------------------------------------------------------------------------------------------------------------
# the stage


def pretrain(config, device):
    """Train the GPT on the base corpus, then (with --instruct_tags) on the auxiliary tasks mixed with corpus text;
    returns the checkpoint dict (cached at out/<run>/base.pt, with its summary in pretrain.json: the stage is
    reused only when both are there and made by this key)."""
    run_dir = os.path.join(config.out_dir, config.run)
    path, summary_path = os.path.join(run_dir, "base.pt"), os.path.join(run_dir, "pretrain.json")
    key = cache.result_key(stage_config(config, "pretrain"), stage_code(config, "pretrain"), device,
                           corpus_hash(config))
    rank, world = jobs.data_parallel()  # (0, 1) alone; under torchrun each rank trains on its share of every batch
    if config.batch_size % world:
        raise ValueError(f"--batch_size={config.batch_size} must be divisible by the {world} processes of torchrun")
    checkpoint = cache.load_checkpoint(path, key, "model")
    if checkpoint is not None and checkpoint["done"]:
        if cache.summary_is_there("pretrain", path, summary_path, key):
            jobs.end_data_parallel()
            return checkpoint
        checkpoint = None
    run = new_run(config, device, key, rank, world)
    if checkpoint is not None:  # an interrupted run with the same key: resume where it stopped
        resume(run, checkpoint)
        print(f"pretrain: resuming {path} at iteration {run['iter']}")
    train_ids, _ = corpus_of(config)
    print(f"pretrain: {run['model'].num_params():,} parameters, {len(train_ids):,} train tokens, device {device}")
    timing = train_run(run, config, device, path)
    checkpoint = finish(run, config, device, path, summary_path, timing)
    jobs.end_data_parallel()
    return checkpoint


def new_run(config, device, key, rank=0, world=1):
    """Everything a pretraining run holds, at iteration 0: the model, its AdamW, with SAE-regularized pretraining
    the jointly trained SAEs (in the optimizer, without weight decay), the generator of the batches, the history;
    and its place under torchrun (rank, world: every rank draws the same global batches and trains on its rows)."""
    torch.manual_seed(config.seed)
    model_args = dict(vocab_size=VOCAB_SIZE, block_size=config.block_size, n_layer=config.n_layer,
                      n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, bias=config.bias)
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = model.configure_optimizer(config.lr, config.weight_decay, (config.beta1, config.beta2))
    joint_saes = {}
    if config.sae_reg_lambda > 0:
        joint_saes = {p: make_sae(c).to(device) for p, c in joint_sae_configs(config).items()}
        optimizer.add_param_group({"params": [q for s in joint_saes.values() for q in s.parameters()],
                                   "weight_decay": 0.0})
    return {"key": key, "model_args": model_args, "model": model, "optimizer": optimizer, "joint_saes": joint_saes,
            "generator": torch.Generator().manual_seed(config.seed), "iter": 0, "history": [], "rank": rank,
            "world": world}


def snapshot(run, done, val_loss=None):
    """The checkpoint of a run: all it holds, and every random number generator it draws from (batches, and torch's
    global one for dropout), so that a resumed run goes on as the uninterrupted one would."""
    model = run["model"]
    return {"key": run["key"], "model_args": run["model_args"], "model": model.state_dict(),
            "optimizer": run["optimizer"].state_dict(), "generator": run["generator"].get_state(),
            "torch_rng": torch.get_rng_state(), "iter": run["iter"], "history": run["history"], "done": done,
            "val_loss": val_loss, "sha": cache.tensor_hash(model.state_dict()),
            "joint_saes": {p: s.state_dict() for p, s in run["joint_saes"].items()}}


def resume(run, checkpoint):
    """Put a run back in the state of its checkpoint."""
    run["model"].load_state_dict(checkpoint["model"])
    for p, state in checkpoint["joint_saes"].items():
        run["joint_saes"][p].load_state_dict(state)
    run["optimizer"].load_state_dict(checkpoint["optimizer"])
    run["generator"].set_state(checkpoint["generator"])
    if "torch_rng" in checkpoint:
        torch.set_rng_state(checkpoint["torch_rng"])
    run["iter"], run["history"] = checkpoint["iter"], checkpoint["history"]


def pretraining_loss(run, it, config, device, train_ids, aux_train):
    """The loss of iteration it: the base phase's corpus cross-entropy (plus, with joint SAEs, the SAE regularizer);
    in the instruction phase (it >= max_iters) plus the cross-entropy of an auxiliary batch's answers. Under
    torchrun each rank draws the global batch and takes its rows rank, rank + W, ... The corpus loss is then one
    process's exactly (every row has block_size tokens); the joint SAEs' denominator D(x) and the instruction
    phase's mean over answer tokens are each rank's own, so those two are close to one process's, not equal."""
    model, joint_saes, generator = run["model"], run["joint_saes"], run["generator"]
    mine = slice(run["rank"], None, run["world"])
    x, y = (t[mine] for t in get_batch(train_ids, config.batch_size, config.block_size, generator, device))
    _, loss, residuals = model(x, y, read=tuple(joint_saes))
    if joint_saes:
        loss = loss + sae_training_penalty(residuals, joint_saes, config.sae_reg_lambda, config.sae_reg_norm)
    if it >= config.max_iters:
        batch = trim_padding(Batch(*(t[mine] for t in aux_train.batch(config.batch_size, generator, device))))
        loss = loss + model(batch.x, batch.y, batch.answer_mask)[1]
    return loss


def train_run(run, config, device, path):
    """Train from the run's iteration to the end, evaluating and checkpointing every eval_interval steps and at the
    end of each phase. Returns the seconds in all and the milliseconds per training step (without evaluations and
    checkpoints)."""
    model, optimizer, joint_saes, history = run["model"], run["optimizer"], run["joint_saes"], run["history"]
    train_ids, val_ids = corpus_of(config)
    aux = aux_suite(config)  # the instruction phase runs from max_iters to total_iters
    aux_train = concat_splits([s["train"] for s in aux.values()]) if aux else None
    total_iters = config.max_iters + (config.instruct_iters if aux else 0)
    model.train()
    t0, step_seconds, start_iter = time.time(), 0.0, run["iter"]
    with progress(range(run["iter"], total_iters), desc="pretrain", initial=run["iter"], total=total_iters,
                  disable=run["rank"] > 0) as bar:
        for it in bar:
            t_step = time.time()
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it, config)
            loss = pretraining_loss(run, it, config, device, train_ids, aux_train)
            check_finite(loss, f"in pretraining at iteration {it}", "lower --lr, --weight_decay or --sae_reg_lambda")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            jobs.average_gradients(list(model.parameters()) + [q for s in joint_saes.values() for q in s.parameters()],
                                   run["world"])
            clip_gradients(model.parameters(), config.grad_clip)
            for sae in joint_saes.values():
                sae.remove_parallel_decoder_grad()
            optimizer.step()
            for sae in joint_saes.values():
                sae.normalize_decoder()
            step_seconds += time.time() - t_step
            run["iter"] = it + 1
            if it % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if (it + 1) % config.eval_interval == 0 or it + 1 in (config.max_iters, total_iters):
                train_loss = estimate_lm_loss(model, train_ids, config, device, config.eval_iters)
                val_loss = estimate_lm_loss(model, val_ids, config, device, config.eval_iters)
                history.append({"iter": it + 1, "train_loss": train_loss, "val_loss": val_loss,
                                "norms": activation_norms(model, val_ids, config, device)})
                if it >= config.max_iters:
                    history[-1]["aux_accuracy"] = aux_accuracy(model, aux, device)
                if run["rank"] == 0:  # under torchrun one rank writes (every rank holds the same model)
                    bar.write(f"iter {it + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}" + (
                        f", held-out auxiliary accuracy {history[-1]['aux_accuracy']:.3f}" if it >= config.max_iters
                        else ""))
                    cache.save_checkpoint(snapshot(run, done=False), path)
    return {"seconds": time.time() - t0, "ms_per_iter": 1000 * step_seconds / max(1, total_iters - start_iter)}


def finish(run, config, device, path, summary_path, timing):
    """Save the finished checkpoint and its summary (losses, samples, instruction following); returns it."""
    model, history = run["model"], run["history"]
    val_loss = history[-1]["val_loss"]
    if config.corpus:  # a user corpus: one long continuation of a newline
        samples = greedy_samples(model, ("\n",), device, max_new_tokens=200, one_line=False)
    else:
        samples = greedy_samples(model, SAMPLE_PROMPTS, device)
    checkpoint = snapshot(run, done=True, val_loss=val_loss)
    if run["rank"] > 0:  # under torchrun, rank 0 writes the checkpoint and the summary
        return checkpoint
    cache.save_checkpoint(checkpoint, path)
    summary = {"key": run["key"], "val_loss": val_loss, "train_loss": history[-1]["train_loss"], **timing,
               "history": history, "samples": samples, "params": model.num_params(), "sha": checkpoint["sha"]}
    aux = aux_suite(config)
    if aux:  # instruction following: held-out prompts of the auxiliary tasks, and prompts it was trained on
        summary["aux_accuracy"] = aux_accuracy(model, aux, device)
        summary["aux_train_accuracy"] = mean_accuracy(
            model, [s["train"].subset(torch.arange(min(AUX_HELD_OUT, len(s["train"])))) for s in aux.values()], device)
        summary["aux_samples"] = greedy_samples(model, [q + " > " for q, _ in (s["test"].examples[0]
                                                                                for s in aux.values())], device)
        print(f"pretrain: instruction phase, held-out auxiliary accuracy {summary['aux_accuracy']:.3f} "
              f"(trained prompts {summary['aux_train_accuracy']:.3f})")
    cache.save_json(summary, summary_path)
    print(f"pretrain: val loss {val_loss:.4f} in {timing['seconds']:.1f}s; greedy samples:")
    for sample in samples:
        print("   ", sample.strip("\n").replace("\n", "\n    "))
    return checkpoint
