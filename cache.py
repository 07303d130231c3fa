"""
The cache of the pipeline's stages: what each result depends on, and how results are written and read back.

    STAGE_KEYS, STAGE_CODE     the config fields and the project's files each stage's result depends on
    result_key(...)            a result's key: its config fields, the code it runs, the data, the device and torch,
                               and the checkpoint it was built from
    load_checkpoint / load_json_result
                               a cached result, only if its key matches (and, a checkpoint, its content hash)
    save_checkpoint / save_json / save_text
                               written atomically: a temporary file of this process, then a rename

A cached result is reused only if the code, data, device and config that made it are unchanged: the key of every
stage holds its config fields, a hash of the files whose code it runs (a stage's own and those of the stages it is
built from), a hash of the corpus file, the device and the torch version, and the content hash of the checkpoint it
was built from, so that a redone pretraining invalidates the SAEs and continual-learning results made from the old
one, while an edit of a method redoes only the continual-learning runs.
"""

import ast
import errno
import functools
import glob
import hashlib
import io
import json
import os
import tempfile

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------------
# what each stage's result depends on

STAGE_KEYS = {  # the config fields each stage's result depends on, beyond those of the stages it is built from
    "pretrain": ("seed", "corpus", "corpus_lines", "n_layer", "n_head", "n_embd", "block_size", "dropout",
                 "bias", "batch_size", "max_iters", "lr", "min_lr", "warmup_iters", "weight_decay", "beta1", "beta2",
                 "grad_clip", "eval_interval", "eval_iters", "instruct_tags", "instruct_iters", "instruct_lr",
                 "instruct_examples", "sae_reg_lambda", "sae_reg_kind", "sae_reg_k", "sae_reg_l1",
                 "sae_reg_expansion", "sae_reg_widths", "sae_reg_norm"),
    "sae": ("sae_kind", "sae_l1", "sae_points", "sae_expansion", "sae_k", "sae_steps", "sae_batch_size",
            "sae_tokens", "sae_auxk", "sae_aux_k", "sae_dead_firings"),
    "cl": ("tasks", "steps_per_task", "cl_batch_size", "cl_lr", "finetune", "lora_rank", "lora_alpha", "lora_targets",
           "content_tokens", "n_train", "n_val", "n_test", "eval_split", "diagnose", "diagnose_examples",
           "relearn_steps", "forced_choice_k"),
}  # and each method's own fields, '<method>_*' (regularizers.Method.config_keys)
NOT_RESULT_KEYS = ("run", "out_dir", "preset", "suite", "stage", "device", "methods", "seeds", "cl_dir", "jobs")
# device, preset, suite: in the keys as the resolved device, as the values the preset set and as the tasks

STAGE_CODE = {  # the project's code each stage runs, beside that of the stages it is built from: a file, or one
    # top-level function of a file ('file.py:name'), so that an edit elsewhere in the file leaves the result cached
    "pretrain": ("model.py", "pretrain.py", "data/__init__.py", "data/corpus.py", "data/tokenizer.py"),  # and
    # data/world.py for the generated corpus, the task and instruction files with an instruction phase (stage_code)
    "sae": ("sae.py", "sae_stage.py", "evaluate.py:sae_metrics", "evaluate.py:l0", "evaluate.py:fvu",
            "evaluate.py:second_moment_split"),
    "cl": ("regularizers.py", "evaluate.py", "train.py", "data/tasks.py", "data/world.py"),
}  # report.py, configurator.py and cli.py (settings and their checks only), cache.py, runs.py, jobs.py, evidence/,
# bench/, tests/ make no stage's result


def stage_config(config, *stages):
    """The config fields the given stages' results depend on; a corpus file by its absolute path, so that the same
    file named from another folder (../shared/x.txt, /work/shared/x.txt) is the same key (its content is keyed by its
    hash, result_key's corpus_hash)."""
    part = {key: getattr(config, key) for stage in stages for key in STAGE_KEYS[stage]}
    if part.get("corpus"):
        part["corpus"] = os.path.abspath(part["corpus"])
    return part


def stage_code(config, *stages):
    """The code the given stages run (STAGE_CODE, and what the config switches on), in a fixed order."""
    entries = [e for stage in stages for e in STAGE_CODE[stage]]
    if "pretrain" in stages:
        if not config.corpus:
            entries.append("data/world.py")  # the generated corpus
        if config.instruct_tags:  # the instruction phase: its tasks, and their held-out accuracy
            entries += ["data/tasks.py", "data/instructions.py", "evaluate.py"]
        if config.sae_reg_lambda > 0:
            entries.append("sae.py")  # the SAEs trained jointly with the model
    files = {path for e in entries if ":" not in e for path in glob.glob(e, root_dir=ROOT)}
    return sorted(files | {e for e in entries if ":" in e and e.split(":")[0] not in files})


def check_out_dir(path):
    """The output folder exists (or is made) and takes a file: checked before compute, not at the first checkpoint."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out_dir={path!r} is a file, not a folder; choose another --out_dir")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"--out_dir={path!r} cannot hold files ({error.strerror}); choose another --out_dir") from None


# ----------------------------------------------------------------------------------------------------------------
# the hashes in a key: the code, the tensors


def code_of(entry):
    """The bytes of one entry of stage_code: a project file, or ('file.py:name') the lines of one top-level function
    or class of it, its decorators and the comments inside it included."""
    path, _, name = entry.partition(":")
    with open(os.path.join(ROOT, path), "rb") as f:
        source = f.read()
    if not name:
        return source
    text = source.decode()
    if name not in top_level_spans(text):
        raise ValueError(f"{path} has no function {name} (cache.STAGE_CODE names it)")
    first, last = top_level_spans(text)[name]
    return "\n".join(text.splitlines()[first - 1 : last]).encode()


@functools.lru_cache(maxsize=32)
def top_level_spans(text):
    """{name: (first line, last line)} of a module's top-level functions and classes, decorators included; parsed
    once per text (a key names several functions of one file, and is made at every stage of every run)."""
    spans = {}
    for node in ast.parse(text).body:
        if hasattr(node, "name"):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            spans.setdefault(node.name, (first, node.end_lineno))  # the first of two of one name, as before
    return spans


def sha256_of_files(entries):
    """A hash of the project's code at these entries (files relative to the project's root, or 'file.py:function'),
    names and contents."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.encode())
        digest.update(code_of(entry))
    return digest.hexdigest()[:16]


def tensor_hash(obj):
    """A content hash of the tensors in a nested dict / list (keys in sorted order): a checkpoint's identity."""
    digest = hashlib.sha256()

    def visit(o):
        if torch.is_tensor(o):
            digest.update(o.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                digest.update(str(k).encode())
                visit(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    visit(obj)
    return digest.hexdigest()[:16]


def result_key(config_part, code_files, device, corpus_hash, built_from=None):
    """The full key of a cached result; JSON-normal so that it compares equal after a round trip. code_files: the
    project files whose code made it (stage_code); corpus_hash: pretrain.corpus_hash."""
    key = {"config": config_part, "code": sha256_of_files(code_files), "torch": torch.__version__, "device": device,
           "corpus": corpus_hash, "built_from": built_from or {}}
    return json.loads(json.dumps(key))


def key_difference(old, new):
    """What differs between two keys, in words: 'config (lr, max_iters)', 'code', 'device', ..."""
    if not isinstance(old, dict) or "code" not in old:
        return "an older format"
    parts = []
    for part in ("config", "code", "torch", "device", "corpus", "built_from"):
        if old.get(part) != new.get(part):
            if part == "config":
                a, b = old.get("config") or {}, new["config"]
                changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                parts.append(f"config ({', '.join(changed)})")
            else:
                parts.append({"code": "source code", "corpus": "corpus file", "built_from": "the checkpoint it "
                              "was built from"}.get(part, part))
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# cached results on disk, written atomically


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def write_atomically(path, data):
    """Write data (bytes) to a temporary file of this process beside path, then rename it to path: an interrupted or
    failed write leaves the previous file intact and no temporary file, and two processes writing one file never
    share a temporary file (the last to finish wins). A full disk or another OS error is a one-line ValueError."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write_bytes(tmp, data)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if error.errno == errno.ENOSPC:
            raise ValueError(f"cannot write {path}: the disk is full ({len(data):,} bytes needed); free some space "
                             "and rerun (the previous file is intact)") from None
        raise ValueError(f"cannot write {path} ({error.strerror}); the previous file is intact") from None


def save_checkpoint(obj, path):
    """torch.save, written atomically (write_atomically)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue())


def save_json(obj, path):
    """JSON, written atomically; NaN or infinity is an error, never a bare NaN in the file (not valid JSON)."""
    write_atomically(path, json.dumps(obj, indent=2, allow_nan=False).encode())


def save_text(text, path):
    write_atomically(path, text.encode())


def read_json(path):
    """The JSON object at path, or None if it is missing; a damaged file is named, and None returned."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            obj = json.load(f)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        return obj
    except (ValueError, UnicodeDecodeError) as error:
        print(f"{path} is damaged ({error}); redoing it")
        return None


def load_cached(path, key, loader):
    """loader(path) if the file there was made with this key, else None; says why a file is not reused."""
    if not os.path.exists(path):
        return None
    try:
        obj = loader(path)
    except Exception as error:  # a file we cannot read is redone, not trusted
        print(f"cannot read {path} ({type(error).__name__}: {error}); redoing it")
        return None
    if obj is None:
        return None
    if obj.get("key") != key:
        print(f"{path} was made with a different {key_difference(obj.get('key'), key)}; redoing it")
        return None
    return obj


def load_checkpoint(path, key, hashed):
    """The checkpoint at path if it was made with this key and its tensors `hashed` (a field: 'model', 'saes')
    still match the content hash stored beside them; else None (a damaged file is named and redone)."""
    checkpoint = load_cached(path, key, lambda p: torch.load(p, map_location="cpu", weights_only=False))
    if checkpoint is not None and tensor_hash(checkpoint[hashed]) != checkpoint["sha"]:
        print(f"{path} is damaged (its {hashed} does not match its content hash); redoing it")
        return None
    return checkpoint


def load_json_result(path, key):
    return load_cached(path, key, read_json)


def summary_is_there(stage, path, summary_path, key):
    """A finished stage is reused only with its summary JSON, made with the same key, beside it; else it is redone
    (and the summary written again)."""
    if load_json_result(summary_path, key) is not None:
        print(f"{stage}: reusing {path}")
        return True
    print(f"{stage}: {summary_path} is missing or stale; redoing the stage")
    return False
