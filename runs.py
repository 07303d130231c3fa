"""
The continual-learning runs a set of configs asks for, and which of them are done: each run's cache key (a method
at a seed, and the base model's reference), where its result is saved, and whether the saved one can be reused.
train.continual_learning_many runs the rest in the job pool (jobs.py).

    out/<run>/<cl_dir>/<method>_seed<seed>.json    a method's result
    out/<run>/sequences/<method>_seed<seed>_<key hash>.pt   its sequence: the training, R on both splits, the final
                                                   model (train.sequence_of), shared by the runs measured after it
    out/<run>/base/seed<seed>_<key hash>.json      the base model's reference, shared by every folder of the run
"""

import dataclasses
import hashlib
import json
import os

import cache
from cache import stage_code, stage_config
from pretrain import corpus_hash, corpus_of
from regularizers import METHODS
from report import base_path, base_problem, result_problem

NOT_READ_BY_BASE = ("diagnose", "diagnose_examples")  # continual-learning fields base_reference never reads
# continual-learning fields read only after the sequence (train.measure), here at fixed values in a sequence's key;
# the eval split too, unless the forgetting diagnostic, measured along the sequence on it, is on
MEASURED_AFTER = {"relearn_steps": (), "forced_choice_k": 0, "eval_split": "test"}


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
    return key, shared_key(config, device, base), json.loads(json.dumps(settings))


def sequence_key_and_path(config, name, seed, device, base, sae_checkpoint):
    """(key, path) of a method's sequence at a seed (train.sequence_of): the key of its runs with the fields
    MEASURED_AFTER set aside, so that a run on val and one on test, or with other measures, share one training."""
    fixed = {k: v for k, v in MEASURED_AFTER.items() if not (k == "eval_split" and config.diagnose)}
    key = method_key(dataclasses.replace(config, **fixed), name, seed, device, base, sae_checkpoint)[0]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return key, os.path.join(config.out_dir, config.run, "sequences", f"{name}_seed{seed}_{digest}.pt")


def shared_key(config, device, base, leave_out=()):
    """The key of what every method of a comparison shares: the pretraining and continual-learning settings and
    code, and the base model (without the fields in leave_out)."""
    used = {k: v for k, v in stage_config(config, "pretrain", "cl").items() if k not in leave_out}
    return cache.result_key(used, stage_code(config, "pretrain", "cl"), device, corpus_hash(config),
                            {"base": base["sha"]})


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


def runs_to_do(configs, device, base, sae_checkpoint):
    """The runs of every config (its methods x seeds, and the base model's reference of each seed) whose result is
    not saved with its key, as jobs: dicts of name (None: the base reference), seed and runs, each run a dict of
    config, and the path, key, shared key and method settings its result is saved with. A method's job is one
    sequence (its key and path) and every run measured after it, so that runs sharing a sequence train it once. The
    longer jobs first, so that no long one is left alone at the end; the base references last."""
    todo, sequences = [], {}
    for config in configs:
        folder = os.path.join(config.out_dir, config.run, config.cl_dir)
        for name in config.methods:
            for seed in config.seeds:
                path = os.path.join(folder, f"{name}_seed{seed}.json")
                key, shared, settings = method_key(config, name, seed, device, base, sae_checkpoint)
                if reusable(path, key, result_problem) is None:
                    sequence_key, sequence_path = sequence_key_and_path(config, name, seed, device, base,
                                                                        sae_checkpoint)
                    if sequence_path not in sequences:
                        sequences[sequence_path] = {"name": name, "seed": seed, "sequence_key": sequence_key,
                                                    "sequence_path": sequence_path, "runs": [],
                                                    "lm_val_ids": corpus_of(config)[1]}  # the corpus as read here
                        todo.append(sequences[sequence_path])
                    sequences[sequence_path]["runs"].append({"config": config, "path": path, "key": key,
                                                             "shared": shared, "settings": settings})
        for seed in config.seeds if config.relearn_steps or config.forced_choice_k else ():
            key = {**shared_key(config, device, base, leave_out=NOT_READ_BY_BASE), "seed": seed}
            path = base_path(os.path.join(config.out_dir, config.run), key)  # once a seed and setting, per run
            if reusable(path, key, base_problem) is None and all(job["runs"][0]["path"] != path for job in todo):
                todo.append({"name": None, "seed": seed, "runs": [{"config": config, "path": path, "key": key,
                                                                   "shared": shared_key(config, device, base),
                                                                   "settings": {}}]})
    return sorted(todo, key=lambda job: 2 if job["name"] is None else int(not METHODS[job["name"]].uses_saes))
