"""
The --key=value machinery every set of settings shares: a dataclass's fields are its keys, the comment beside a
field is its --help text, and the generic checks hold for every field of a type. configurator.Config is the
pipeline's set; the scripts of bench/ and evidence/ declare their own (an `Options` dataclass).

    parse_fields(cls, argv)        an instance from ['--key=value', ...]; an unknown key names the closest ones
    help_text(cls)                 every key with its default and meaning, grouped as the class's comments group them
    check_fields(obj, choices)     choices, ranges and finiteness, by the type of each field
    parse_script_args(...)         a script's own keys and the rest, which are the pipeline's
"""

import dataclasses
import difflib
import inspect
import math
import re
import typing


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


def parse_fields(config_class, argv, presets=None, command="python train.py"):
    """A config_class instance from ['--key=value', ...]. presets = {name: {key: value}}: `--preset=name` sets
    those keys first, and any key given on the command line overrides them. Checking the values is `check_fields`'
    job (and, for Config, `validate`'s)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments look like --key=value (or --help), got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ValueError(f"unknown config key --{key}{hint}; `{command} --help` lists the keys")
        overrides[key] = parse_value(key, text, hints[key])
    if overrides.get("preset"):
        if overrides["preset"] not in (presets or {}):
            raise ValueError(f"--preset={overrides['preset']!r} is not valid; choose from: {', '.join(presets or {})}")
        overrides = {**presets[overrides["preset"]], **overrides}
    return config_class(**overrides)


def help_text(config_class, command="python train.py"):
    """The keys of config_class with their defaults and meanings, read from its source: a comment line opens a
    group, and the comment after a field is its meaning."""
    defaults = config_class()
    lines = [f"usage: {command} [--key=value ...]", ""]
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


def check_fields(config, choices, at_least_zero=()):
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
            if any(v >= 2**63 for v in values):  # torch's seeds and sizes are 64-bit integers
                raise ValueError(f"--{name}={shown}: must be below 2^63")


def parse_script_args(argv, options_class, command, doc, pipeline):
    """(options, rest) for a script: its own keys, the fields of options_class, and every other --key=value, which
    are the pipeline's (the fields of `pipeline`: the script parses or passes them on, and an unknown one is an
    error there). None after printing the script's docstring `doc` and both lists of keys for --help."""
    if "--help" in argv or "-h" in argv:
        pipeline_keys = help_text(pipeline).split("\n", 2)[2]  # without its usage line
        print((doc or "").strip() + "\n\n" + help_text(options_class, command) + "\n\nthe pipeline's keys:\n"
              + pipeline_keys)
        return None
    own = {f.name for f in dataclasses.fields(options_class)}
    mine = [a for a in argv if a.startswith("--") and a[2:].split("=", 1)[0] in own]
    options = parse_fields(options_class, mine, command=command)
    check_fields(options, getattr(options_class, "CHOICES", {}), getattr(options_class, "AT_LEAST_ZERO", ()))
    return options, [a for a in argv if a not in mine]
