"""
The pipeline, top to bottom: pretraining (pretrain.py), SAEs on the frozen base, then continual learning: each
method learns the tasks in order, and after the sequence what its final model keeps is measured.

    python train.py                       # every stage with the CPU defaults
    python train.py --help                # every key with its default and meaning, by stage
    python train.py --stage=pretrain      # stop after a stage: pretrain | sae | cl (= all)
    python train.py --methods=seqft,ewc,si,mas,lwf,o_lora,sae_fd,sae_guided,freeze,replay,multitask --seeds=0,1,2

Stages write to out/<run>/ and cache their result with what made it (cache.py): a later run reuses a stage
whose config, code, data, device and upstream checkpoint are unchanged and redoes it otherwise. Checkpoints are
written atomically, and an interrupted pretraining resumes from its last checkpoint.
"""

import copy
import json
import os
import sys
import time

import torch

import cache
import configurator as cfg
from cache import stage_code, stage_config
from configurator import Config, parse_args, resolve_device
from data.tasks import answer_format, build_task_suite, concat_splits, constant_guess, shuffle_answers, trim_padding
from evaluate import forced_choice, forgetting_diagnostic, forgetting_snapshot, sae_metrics, task_accuracy
from jobs import progress, run_all
from model import model_from_checkpoint
from pretrain import (aux_accuracy, aux_suite, check_finite, clip_gradients, corpus_hash, corpus_of,
                      estimate_lm_loss, pretrain)
from regularizers import METHODS, Method, tensor_bytes
from report import base_path, base_problem, plot_sae_metrics, result_problem, summarize_run
from sae import check_sae_fits, sae_from_dict, sae_to_dict, train_saes


def task_suite(config):
    return build_task_suite(config.tasks, config.n_train, config.n_val, config.n_test, seed=0,
                            block_size=config.block_size, template_is_content=config.content_tokens == "all")


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
                      batch_size=config.sae_batch_size, block_size=config.block_size, seed=config.seed,
                      progress=progress)


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
    key = cache.result_key(stage_config(config, "pretrain", "sae"), stage_code(config, "pretrain", "sae"), device,
                           corpus_hash(config), {"base": base["sha"]})
    checkpoint = cache.load_checkpoint(path, key, "saes")
    if checkpoint is not None and cache.summary_is_there("sae", path, metrics_path, key):
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
    checkpoint["sha"] = results["sha"] = cache.tensor_hash(checkpoint["saes"])
    cache.save_checkpoint(checkpoint, path)
    cache.save_json(results, metrics_path)
    plot_sae_metrics(results, run_dir)
    print(f"sae: trained in {results['seconds']:.1f}s; metrics in {metrics_path}, plots sae_*.png")
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------
# stage 3: continual learning


def evaluate_tasks(model, suite, config, device):
    """One row of the accuracy matrix: accuracy on every task's eval split, in task order."""
    return [task_accuracy(model, suite[name][config.eval_split], device) for name in config.tasks]


def cl_optimizer(model, config):
    """A fresh AdamW on the parameters being trained: constant cl_lr, no weight decay."""
    return model.configure_optimizer(config.cl_lr, 0.0, (config.beta1, config.beta2))


def train_steps(model, split, n_steps, method, *, config, device, generator, bar, optimizer=None):
    """n_steps of AdamW (a fresh optimizer, unless one is given) on the answer-token cross-entropy of split plus the
    method's penalty. Returns the seconds spent in the steps (for the step-time comparison)."""
    optimizer = optimizer or cl_optimizer(model, config)
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


def relearn(model, suite, config, device, seed, desc, shuffled=False):
    """{task: [accuracy after n steps, for n in relearn_steps]} for every task but the last: a copy of the model is
    fine-tuned on that task alone (its training split, a fresh AdamW at cl_lr, cl_batch_size, cross-entropy only,
    batches drawn by the seed) and scored on the task's evaluation split after n steps, for each n in turn (one
    run to the largest n). shuffled: the training split's answers permuted among its examples (shuffle_answers;
    scored on the true answers): the control, what re-teaching the format alone gives back. Measurement only: the
    model itself is not changed."""
    tasks = config.tasks[:-1]
    curves = {}
    with progress(total=len(tasks) * config.relearn_steps[-1], desc=desc) as bar:
        for task in tasks:
            student = relearnable(copy.deepcopy(model), config.finetune)
            optimizer, generator = cl_optimizer(student, config), torch.Generator().manual_seed(seed)
            split = shuffle_answers(suite[task]["train"], seed) if shuffled else suite[task]["train"]
            curves[task], done = [], 0
            for n in config.relearn_steps:
                train_steps(student, split, n - done, Method(config, student), config=config,
                            device=device, generator=generator, bar=bar, optimizer=optimizer)
                curves[task].append(task_accuracy(student, suite[task][config.eval_split], device))
                done = n
    return curves


def knowledge(model, suite, config, device, seed, desc):
    """What a model holds of the tasks beyond its greedy answers, each with its control (evaluate.knowledge_metrics
    reads them): every task's constant guess; forced choice on every task with its question-blind control; and the
    relearning curves of the tasks before the last, on true and on shuffled answers."""
    result = {"constant_guess": {}}
    for task in config.tasks:
        answer, accuracy = constant_guess([a for _, a in suite[task]["train"].examples],
                                          [a for _, a in suite[task][config.eval_split].examples])
        result["constant_guess"][task] = {"answer": answer, "accuracy": accuracy,
                                          "n": len(suite[task][config.eval_split])}
    if config.forced_choice_k:
        result["forced_choice"] = forced_choice(model, suite, config.tasks, config.eval_split, device,
                                                config.forced_choice_k)
    if config.relearn_steps and len(config.tasks) > 1:
        result["relearn_steps"] = list(config.relearn_steps)
        result["relearn"] = relearn(model, suite, config, device, seed, desc)
        result["relearn_shuffled"] = relearn(model, suite, config, device, seed, desc + " (shuffled answers)",
                                             shuffled=True)
    return result


def start_model(base, config, device, seed):
    """The model a sequence starts from: the base model, with one fresh set of LoRA adapters under --finetune=lora
    (the base weights frozen; the adapters' random A drawn after torch.manual_seed(seed))."""
    torch.manual_seed(seed)
    model = model_from_checkpoint(base, device)
    if config.finetune == "lora":
        model.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
    return model


NOT_READ_BY_BASE = ("diagnose", "diagnose_examples")  # continual-learning fields base_reference never reads


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
    comparison must have in common (report.check_comparable)."""
    method = METHODS[name]
    uses_saes = method.uses_saes or config.diagnose  # the diagnostic measures in the SAEs' features
    stages = ("pretrain", "cl") + (("sae",) if uses_saes else ())
    settings = {k: getattr(config, k) for k in method.config_keys(config)}
    built_from = {"base": base["sha"], **({"sae": sae_checkpoint["sha"]} if uses_saes else {})}
    key = cache.result_key({**stage_config(config, *stages), **settings, "method": name, "seed": seed},
                           stage_code(config, *stages), device, corpus_hash(config), built_from)
    shared = cache.result_key(stage_config(config, "pretrain", "cl"), stage_code(config, "pretrain", "cl"), device,
                              corpus_hash(config), {"base": base["sha"]})
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
                                suite=task_suite(config), lm_val_ids=job["lm_val_ids"])
    finally:
        torch.set_num_threads(threads)
    cache.save_json({**result, "key": job["key"], "shared": job["shared"], "method_settings": job["settings"]},
                    job["path"])


def reusable(path, key, problem):
    """The result at path if it was made with this key and problem(result) finds nothing wrong with it, else None;
    says which (a damaged result is named and redone)."""
    cached = cache.load_json_result(path, key)
    if cached is not None and problem(cached):
        print(f"{path} is damaged ({problem(cached)}); redoing it")
        return None
    if cached is not None:
        print(f"cl: reusing {path}")
    return cached


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
                if reusable(path, key, result_problem) is None:
                    todo.append({"name": name, "seed": seed, "config": config, "path": path, "key": key,
                                 "shared": shared, "settings": settings,  # the corpus as read here, once
                                 "lm_val_ids": corpus_of(config)[1]})
        for seed in config.seeds if config.relearn_steps or config.forced_choice_k else ():
            shared = cache.result_key(stage_config(config, "pretrain", "cl"), stage_code(config, "pretrain", "cl"),
                                      device, corpus_hash(config), {"base": base["sha"]})
            used = {k: v for k, v in stage_config(config, "pretrain", "cl").items() if k not in NOT_READ_BY_BASE}
            key = {**cache.result_key(used, stage_code(config, "pretrain", "cl"), device, corpus_hash(config),
                                      {"base": base["sha"]}), "seed": seed}
            path = base_path(os.path.join(config.out_dir, config.run), key)  # once a seed and setting, per run
            if reusable(path, key, base_problem) is None and all(job["path"] != path for job in todo):
                todo.append({"name": None, "seed": seed, "config": config, "path": path, "key": key,
                             "shared": shared, "settings": {}})
    # the longer runs first, so that no long one is left alone at the end; the base references last
    todo.sort(key=lambda job: 2 if job["name"] is None else int(not METHODS[job["name"]].uses_saes))
    run_all(run_and_save, todo, jobs, device=device, base=base, sae_checkpoint=sae_checkpoint)
    return [summarize_run(os.path.join(c.out_dir, c.run), c.methods, c.seeds, c.cl_dir) for c in configs]


def continual_learning(config, device, base, sae_checkpoint):
    """The continual-learning stage of one config: its methods x seeds, then the report."""
    return continual_learning_many([config], device, base, sae_checkpoint, jobs=config.jobs)[0]


# ----------------------------------------------------------------------------------------------------------------


def check_inputs(config, tasks=True):
    """The checks that need files or data, made before any compute: the output folder, the corpus and, if the
    run goes as far as continual learning, the tasks."""
    cache.check_out_dir(config.out_dir)
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
        if config.stage == "pretrain" or int(os.environ.get("RANK", 0)) > 0:  # torchrun: the later stages, rank 0
            return 0
        sae_checkpoint = train_sae_stage(config, device, base)
        if config.stage == "sae":
            return 0
        continual_learning(config, device, base, sae_checkpoint)
    except (ValueError, FloatingPointError) as error:  # bad input, or a loss that is not finite: one line
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: finished stages and runs are saved, the rest resumes on the next run
        print("interrupted; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

