"""
The command line of train.py and the cached results of its stages (nanoGPT names its version of this file so).

    parse_args(Config, argv)   Config from ['--key=value', ...]; unknown keys and bad values are one-line errors
    help_text(Config)          every key with its default and the comment beside it, grouped by stage
    validate(config)           choices, ranges, finiteness; raises ValueError naming the key and what is allowed
    result_key(...)            what a stage's result depends on: its config keys, the source code, the data, the
                               device, and the checkpoint it was built from
    load_cached / save_*       read a cached result only if its key matches; write atomically (temp file, rename)

A cached result is reused only if the code, data, device and config that made it are unchanged: the key of every
stage holds a hash of the project's source files, a hash of the corpus file, the device and the torch version,
and the content hash of the checkpoint it was built from, so that a redone pretraining invalidates the SAEs and
continual-learning results made from the old one.
"""

import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import re
import sys
import typing

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------------
# --key=value


def parse_value(key, text, annotation):
    """Convert a command-line string to the field's type, or raise ValueError naming the key."""
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if annotation in (int, float, str):
            return annotation(text)  # float("3") works too: ints are accepted where floats are expected
        if typing.get_origin(annotation) is tuple:
            item_type = typing.get_args(annotation)[0]
            return tuple(item_type(item) for item in text.split(",") if item != "")
    except ValueError:
        pass
    type_name = getattr(annotation, "__name__", str(annotation))
    if typing.get_origin(annotation) is tuple:
        type_name = f"comma-separated list of {typing.get_args(annotation)[0].__name__}"
    raise ValueError(f"--{key}={text!r}: expected a {type_name}")


def parse_args(config_class, argv, renamed=None, presets=None):
    """A config_class instance from ['--key=value', ...]. renamed = {old key: new key} for deprecated keys (a
    warning names the new key). presets = {name: {key: value}}: `--preset=name` sets those keys first, and any
    key given on the command line overrides them. Checking the values is `validate`'s job."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments look like --key=value (or --help), got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if renamed and key in renamed:
            print(f"warning: --{key} is deprecated; it is now --{renamed[key]}", file=sys.stderr)
            key = renamed[key]
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ValueError(f"unknown config key --{key}{hint}; `python train.py --help` lists the keys")
        overrides[key] = parse_value(key, text, hints[key])
    if overrides.get("preset"):
        if overrides["preset"] not in (presets or {}):
            raise ValueError(f"--preset={overrides['preset']!r} is not valid; choose from: {', '.join(presets or {})}")
        overrides = {**presets[overrides["preset"]], **overrides}
    return config_class(**overrides)


def help_text(config_class):
    """The keys of config_class with their defaults and meanings, read from its source: a comment line opens a
    group, and the comment after a field is its meaning."""
    defaults = config_class()
    lines = ["usage: python train.py [--key=value ...]", ""]
    for line in inspect.getsource(config_class).splitlines()[1:]:
        group = re.fullmatch(r"\s+# (.+)", line)
        field = re.fullmatch(r"\s+(\w+): [^=]+= .*?(?:#\s*(.*))?", line)
        if group:
            lines += ["", group.group(1) + ":"]
        elif field:
            name, meaning = field.group(1), field.group(2) or ""
            value = getattr(defaults, name)
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            lines.append(f"  --{name}={shown}".ljust(34) + f" {meaning}")
    return "\n".join(lines).replace("\n\n\n", "\n\n")


# ----------------------------------------------------------------------------------------------------------------
# validation: every check that can be made before compute is spent


def validate(config, choices, at_least_zero=()):
    """Choices, ranges and finiteness, by rules that hold for every field of the given kind:

    - a field listed in `choices` takes one of its values (each item, for a tuple field);
    - every float is finite and non-negative;
    - every int (and each item of an int tuple) is at least 1, except those in `at_least_zero`."""
    for key, allowed in choices.items():
        values = getattr(config, key)
        for value in values if isinstance(values, tuple) else (values,):
            if value not in allowed:
                raise ValueError(f"--{key}={value!r} is not valid; choose from: {', '.join(map(str, allowed))}")
    hints = typing.get_type_hints(type(config))
    for name, annotation in hints.items():
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        item_type = typing.get_args(annotation)[0] if typing.get_origin(annotation) is tuple else annotation
        shown = ",".join(map(str, values))
        if item_type is float and any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"--{name}={shown}: must be a finite number, at least 0")
        if item_type is int:
            low = 0 if name in at_least_zero else 1
            if any(v < low for v in values):
                raise ValueError(f"--{name}={shown}: must be at least {low}")


def check_out_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out_dir={path!r} is a file, not a folder; choose another --out_dir")


# ----------------------------------------------------------------------------------------------------------------
# what a result depends on


MAKES_NO_STAGE = ("evidence.py",)  # top-level modules that only read results (its runs are train.py's, keyed there)


def source_files():
    """The project's source: the top-level modules and data/ (not tests/, bench/ or MAKES_NO_STAGE: no stage's
    result depends on them)."""
    names = [n for n in os.listdir(ROOT) if n.endswith(".py") and n not in MAKES_NO_STAGE]
    names += [os.path.join("data", n) for n in os.listdir(os.path.join(ROOT, "data")) if n.endswith(".py")]
    return sorted(names)


def sha256_of_files(paths, root=ROOT):
    digest = hashlib.sha256()
    for name in paths:
        digest.update(name.encode())
        with open(os.path.join(root, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def source_hash():
    return sha256_of_files(source_files())


def file_hash(path):
    """A hash of the file's content (its path is in the config already)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


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


def result_key(config_part, device, corpus, built_from=None):
    """The full key of a cached result; JSON-normal so that it compares equal after a round trip."""
    key = {"config": config_part, "code": source_hash(), "torch": torch.__version__, "device": device,
           "corpus": file_hash(corpus) if corpus else "generated", "built_from": built_from or {}}
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


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename: an interrupted write never leaves a corrupt checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows


def save_json(obj, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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


def load_checkpoint(path, key):
    return load_cached(path, key, lambda p: torch.load(p, map_location="cpu", weights_only=False))


def load_json_result(path, key):
    return load_cached(path, key, read_json)


# ----------------------------------------------------------------------------------------------------------------
# progress bars that read well in a terminal and in a log file


class LogLines:
    """A file for tqdm in a log: each redraw becomes a line of its own (no carriage returns, no blank lines)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = text.replace("\r", "").strip("\n").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, **kwargs):
    """tqdm that redraws in place in a terminal, and writes a line at most every 30 s into a log file (when
    stderr is not a terminal), plus one when the bar closes."""
    if not sys.stderr.isatty():
        if hasattr(sys.stdout, "reconfigure"):  # printed lines and bar lines reach the log in order
            sys.stdout.reconfigure(line_buffering=True)
        kwargs.update(mininterval=30.0, leave=True, ascii=True, file=LogLines(sys.stderr))
    return tqdm(iterable, **kwargs)
