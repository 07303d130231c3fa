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
import functools
import json
import os
import sys
import time

import torch

import cache
from cache import stage_config
from cli import help_text
from configurator import Config, parse_args, resolve_device
from data.tasks import (TASKS, answer_format, build_task_suite, concat_splits, constant_guess, shuffle_answers,
                        trim_padding)
from evaluate import forced_choice, forgetting_diagnostic, forgetting_snapshot, task_accuracy
from jobs import progress, run_all
from model import model_from_checkpoint
from pretrain import aux_accuracy, aux_suite, check_finite, clip_gradients, corpus_of, estimate_lm_loss, pretrain
from regularizers import METHODS, Method, tensor_bytes
from report import summarize_run
from runs import MEASURED_AFTER, runs_to_do
from sae_stage import load_saes, train_sae_stage


def task_suite(config):
    """The tasks' splits, built once per process (every run a worker does reads the same suite, and none changes
    it): keyed by the settings and by each task's generator, so a task replaced under its name is rebuilt."""
    return built_suite(tuple((name, TASKS[name]) for name in config.tasks), config.n_train, config.n_val,
                       config.n_test, config.block_size, config.content_tokens == "all")


@functools.lru_cache(maxsize=4)
def built_suite(tasks, n_train, n_val, n_test, block_size, template_is_content):
    return build_task_suite([name for name, _ in tasks], n_train, n_val, n_test, seed=0, block_size=block_size,
                            template_is_content=template_is_content)


# ----------------------------------------------------------------------------------------------------------------
# stage 3: continual learning


SPLITS = ("val", "test")  # the splits R is measured on along a sequence: a sequence serves a run on either (runs.py)


def evaluate_tasks(model, suite, config, device, split=None):
    """One row of the accuracy matrix: accuracy on every task's split (the eval split unless given), in task order."""
    return [task_accuracy(model, suite[name][split or config.eval_split], device) for name in config.tasks]


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
        # the loss reads the logits at the answers only: unless the penalty reads more, the last block's MLP, ln_f
        # and the head run at those positions alone (model.GPT.forward, head_at)
        head_at = None if method.reads_logits or model.config.n_layer in method.reads else batch.answer_mask.bool()
        logits, ce, residuals = model(batch.x, batch.y, batch.answer_mask, read=method.reads, head_at=head_at)
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
    last = model.config.n_layer  # the stream the head reads, if an SAE reads it: where the answers' move is attributed
    readout = (last, saes[last], lambda x: model.lm_head(model.ln_f(x))) if last in saes else None
    return {task: forgetting_diagnostic(snapshots[task], snapshot(task), formats(task), formats(latest),
                                        latest_mask=snapshots[latest]["mask"], readout=readout)
            for task in config.tasks[:t]}


def relearnable(model, finetune):
    """Let relearning train what the regime trains: every parameter under full fine-tuning (a method's frozen blocks
    and adapters too), the current LoRA adapters only under LoRA. Returns the model."""
    adapters = {id(p) for layer in model.lora_layers() for p in (layer.A, layer.B)}
    for p in model.parameters():
        p.requires_grad_(finetune == "full" or id(p) in adapters)
    return model


def relearn(model, final_row, suite, config, device, seed, desc, shuffled=False):
    """{task: [accuracy after n steps, for n in relearn_steps]} for every task but the last: a copy of the model is
    fine-tuned on that task alone (its training split, a fresh AdamW at cl_lr, cl_batch_size, cross-entropy only,
    batches drawn by the seed) and scored on the task's evaluation split after n steps, for each n in turn (one
    run to the largest n; after 0 steps the copy is the model, whose scores are final_row, R's last row).
    shuffled: the training split's answers permuted among its examples (shuffle_answers; scored on the true
    answers): the control, what re-teaching the format alone gives back. Measurement only: the model itself is not
    changed."""
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
                curves[task].append(task_accuracy(student, suite[task][config.eval_split], device) if n else
                                    final_row[config.tasks.index(task)])
                done = n
    return curves


def knowledge(model, final_row, suite, config, device, seed, desc):
    """What a model holds of the tasks beyond its greedy answers, each with its control (evaluate.knowledge_metrics
    reads them): every task's constant guess; forced choice on every task with its question-blind control; and the
    relearning curves of the tasks before the last, on true and on shuffled answers (final_row: the model's
    accuracy on every task, R's last row)."""
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
        result["relearn"] = relearn(model, final_row, suite, config, device, seed, desc)
        result["relearn_shuffled"] = relearn(model, final_row, suite, config, device, seed,
                                             desc + " (shuffled answers)", shuffled=True)
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
    row = evaluate_tasks(model, suite, config, device)
    return {"method": "base", "seed": seed, "tasks": list(config.tasks), "eval_split": config.eval_split, "R": [row],
            **knowledge(model, row, suite, config, device, seed, desc=f"relearn base seed {seed}")}


START_MEASURES = {}  # {key: (suite, measures)} of the start model, per process (start_measures)


def start_measures(model, *, config, device, base, suite, lm_val_ids):
    """What a sequence measures before its first task: R's first row on both splits, the auxiliary accuracy (None
    without an instruction phase) and the LM loss. Every sequence starts from the base model's function, whatever
    its method and seed (LoRA's B starts at zero, so the adapters add exactly nothing), so these are measured once
    per process and setting and shared by the sequences after it. The setting: the base, the device, the suite (the
    object, kept with its measures so that its id is not reused), the LM validation tokens and the pretraining and
    continual-learning fields but those read only after a sequence (MEASURED_AFTER)."""
    fields = {k: v for k, v in stage_config(config, "pretrain", "cl").items() if k not in MEASURED_AFTER}
    key = json.dumps([base["sha"], device, id(suite), cache.tensor_hash(lm_val_ids), fields], sort_keys=True,
                     default=str)
    if key not in START_MEASURES:
        aux = aux_suite(config)
        START_MEASURES[key] = suite, {
            "R": {split: evaluate_tasks(model, suite, config, device, split) for split in SPLITS},
            "aux": aux_accuracy(model, aux, device) if aux else None,
            "lm_loss": estimate_lm_loss(model, lm_val_ids, config, device, config.eval_iters)}
    return START_MEASURES[key][1]


def learn_sequence(name, seed, *, config, device, base, saes, suite, lm_val_ids):
    """Learn the tasks in order with one method. Returns the final model and the sequence's record: R's rows on
    both splits (SPLITS; before the first task and after each), the auxiliary accuracy, the LM loss before and
    after, the bytes the method retains, its step and wall times, and the forgetting diagnostic (on the eval split)."""
    generator = torch.Generator().manual_seed(seed)
    model = start_model(base, config, device, seed)
    start = start_measures(model, config=config, device=device, base=base, suite=suite, lm_val_ids=lm_val_ids)
    lm_loss_before = start["lm_loss"]
    R = {split: [list(start["R"][split])] for split in SPLITS}
    aux = aux_suite(config)  # with an instruction-following base: is the tag still followed along the sequence?
    aux_R = [start["aux"]] if aux else []
    diagnostic, snapshots = [], {}
    method = METHODS[name](config, model, saes, seed)
    step_seconds, t_start = 0.0, time.time()
    total_steps = config.steps_per_task * len(config.tasks)

    def measure_rows():
        for split in SPLITS:
            R[split].append(evaluate_tasks(model, suite, config, device, split))
        aux_R.extend([aux_accuracy(model, aux, device)] if aux else [])

    with progress(total=total_steps, desc=f"cl {name} seed {seed}") as bar:
        if method.joint:  # every task at once, as many steps as the whole sequence
            mixed = concat_splits([suite[task]["train"] for task in config.tasks])
            step_seconds = train_steps(model, mixed, total_steps, method, config=config, device=device,
                                       generator=generator, bar=bar)
            measure_rows()
        else:
            for t, task in enumerate(config.tasks):
                split = suite[task]["train"]
                method.before_task(model, split, t)
                step_seconds += train_steps(model, split, config.steps_per_task, method, config=config, device=device,
                                            generator=generator, bar=bar)
                method.after_task(model, split, t)
                measure_rows()
                if config.diagnose:
                    diagnostic.append(diagnose_earlier_tasks(model, saes, suite, t, snapshots, config=config,
                                                             device=device))
                bar.write(f"{name} seed {seed} after {task}: " + " ".join(
                    f"{n}={a:.2f}" for n, a in zip(config.tasks, R[config.eval_split][-1])))
    wall_seconds = time.time() - t_start
    return model, {"R": R, "lm_loss_before": lm_loss_before,
                   "lm_loss_after": estimate_lm_loss(model, lm_val_ids, config, device, config.eval_iters),
                   "retained_bytes": tensor_bytes(method.retained()),
                   "step_seconds": step_seconds / max(1, total_steps), "wall_seconds": wall_seconds,
                   "aux_accuracy": aux_R, "diagnostic": diagnostic}


def sequence_state(model):
    """What a sequence's final model is rebuilt from (final_model): its weights, and how many adapter sets it has
    (0: none; 1: LoRA; one per task: O-LoRA)."""
    layers = model.lora_layers()
    return {"model": model.state_dict(), "adapter_sets": len(layers[0].pairs()) if layers else 0}


def final_model(state, base, config, device):
    """The final model of a sequence from its sequence_state: the base model, its adapter sets, its weights."""
    model = model_from_checkpoint(base, device)
    if state["adapter_sets"]:
        model.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
        for _ in range(state["adapter_sets"] - 1):
            model.stack_adapters()
    model.load_state_dict(state["model"])
    return model


def measure(name, seed, model, record, *, config, device, suite):
    """A run's result: its sequence's record with R on the eval split, and what the final model keeps beyond its
    greedy answers (knowledge), measured on the eval split."""
    R = record["R"][config.eval_split]
    return {"method": name, "seed": seed, "tasks": list(config.tasks), "eval_split": config.eval_split, **record,
            "R": R, **knowledge(model, R[-1], suite, config, device, seed, desc=f"relearn {name} seed {seed}")}


def run_method(name, seed, *, config, device, base, saes, suite, lm_val_ids):
    """Learn the tasks in order with one method, then measure its final model: the results dict (accuracy matrix R,
    timings, and what the final model keeps beyond its greedy answers)."""
    model, record = learn_sequence(name, seed, config=config, device=device, base=base, saes=saes, suite=suite,
                                   lm_val_ids=lm_val_ids)
    model = final_model(sequence_state(model), base, config, device)  # as a saved sequence is measured
    return measure(name, seed, model, record, config=config, device=device, suite=suite)


def sequence_of(job, *, device, base, sae_checkpoint):
    """The final model and record of a job's sequence: the saved one if it was made with the job's sequence key (by a
    run of the same training measured on the other split, or with other measures after it), else learned now and
    saved (out/<run>/sequences/)."""
    saved = cache.load_checkpoint(job["sequence_path"], job["sequence_key"], "model")
    config = job["runs"][0]["config"]  # the job's runs differ only in what is measured after the sequence
    if saved is not None:
        print(f"cl: reusing {job['sequence_path']}")
    else:
        model = model_from_checkpoint(base, device)
        uses_saes = METHODS[job["name"]].uses_saes or config.diagnose
        saes = load_saes(sae_checkpoint, model, device) if uses_saes else None
        model, record = learn_sequence(job["name"], job["seed"], config=config, device=device, base=base, saes=saes,
                                       suite=task_suite(config), lm_val_ids=job["lm_val_ids"])
        saved = {"key": job["sequence_key"], "record": record, **sequence_state(model)}
        saved["sha"] = cache.tensor_hash(saved["model"])
        cache.save_checkpoint(saved, job["sequence_path"])
    return final_model(saved, base, config, device), saved["record"]


def run_and_save(job, *, device, base, sae_checkpoint):
    """One job (runs.runs_to_do: a method's sequence at a seed, and the runs measured after it; or the base model's
    reference), on one CPU thread: a run's numbers then depend on its seed, not on how many cores the machine has or
    how many runs share them (--jobs), since the thread count changes the order of floating-point sums and training
    amplifies the difference. Each run's result is saved with its key, shared key and method settings."""
    def save(run, result):
        cache.save_json({**result, "key": run["key"], "shared": run["shared"], "method_settings": run["settings"]},
                        run["path"])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if job["name"] is None:  # the base model's reference for kept@n
            (run,) = job["runs"]
            save(run, base_reference(job["seed"], config=run["config"], device=device, base=base,
                                     suite=task_suite(run["config"])))
        else:
            model, record = sequence_of(job, device=device, base=base, sae_checkpoint=sae_checkpoint)
            for run in job["runs"]:
                save(run, measure(job["name"], job["seed"], model, record, config=run["config"], device=device,
                                  suite=task_suite(run["config"])))
    finally:
        torch.set_num_threads(threads)


def continual_learning_many(configs, device, base, sae_checkpoint, jobs=1, plots=True):
    """For each config, run its methods and seeds (each cached as out/<run>/<cl_dir>/<method>_seed<seed>.json) and
    write its report (plots=False: without its plots); returns the summaries. The runs not cached go to one list,
    `jobs` at a time."""
    todo = runs_to_do(configs, device, base, sae_checkpoint)
    run_all(run_and_save, todo, jobs, device=device, base=base, sae_checkpoint=sae_checkpoint)
    return [summarize_run(os.path.join(c.out_dir, c.run), c.methods, c.seeds, c.cl_dir, plots) for c in configs]


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
        print(help_text(Config))
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

