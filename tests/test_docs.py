"""Docs that run: every `python ...` command of README.md and docs/*.md names a script that exists, in the form that
runs (`python -m bench.<name>`, not `python bench/<name>.py`), with keys and values the script accepts. The keys are
parsed in this process (as the script parses them before any compute), so a stale command fails here in seconds."""

import glob
import importlib
import os
import re
import shlex

import configurator as cfg
from regularizers import METHODS
from solutions import restored

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP = {"|", ">", ">>", "&&", ";", "#", "2>&1", "&", "2>"}  # the shell's: the command ends there


def doc_commands():
    """(file, command) for every `python ...` in the docs: in inline code and in code blocks, one per line."""
    found = []
    for path in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        text = open(path).read().replace("\\\n", " ")  # a command continued on the next line is one line
        for match in re.finditer(r"python3? ((?:-m [\w.]+)|[\w/.-]+)([^`\n]*)", text):
            found.append((os.path.relpath(path, ROOT), match.group(0).strip()))
    return found


def problem(command, path=""):
    """What is wrong with one command, or None."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    args = []
    for w in words[1:]:
        if w in STOP or w.startswith("#"):
            break
        args.append(w.rstrip(";"))
        if w.endswith(";"):
            break
    if args[:1] == ["-m"]:
        module, args = args[1], args[2:]
        if module == "pytest" or "<" in module:  # the tests; 'python -m bench.<name>' in prose
            return None
    elif args[0].endswith(".py"):
        script = args.pop(0)
        if script.startswith("bench/"):
            return f"run it as `python -m bench.{script[6:-3]}` (a script of bench/ needs the project root on its path)"
        if script == "evidence.py":
            return "run it as `python -m evidence` (the analyses are a folder, evidence/)"
        if script == "report.py":
            return None if len(args) <= 1 else "report.py takes one argument, the folder of a run"
        module = script[:-3]
        if not os.path.exists(os.path.join(ROOT, script)) or module != "train":
            return f"{script} is not a script of the project (train.py, report.py, python -m evidence, python -m " \
                "bench.<name>)"
    else:
        return None  # prose ('python 3.11'), not a command
    args = [a for a in args if not re.search(r"[$<>…]|\.\.\.", a)]  # placeholders and shell variables
    args = ["--device=cpu" if a == "--device=cuda" else a for a in args]  # a GPU command, checked on a CPU
    if "--help" in args:
        return None
    methods = next((a.split("=", 1)[1].split(",") for a in args if a.startswith("--methods=")), [])
    if path in ("README.md", "docs/exercises.md") and set(methods) - set(METHODS):
        return None  # a method the reader is asked to write (adding a method, the exercises)
    try:
        if module == "train":
            cfg.parse_args(args)
            return None
        script = importlib.import_module("evidence.main" if module == "evidence" else module)
        with restored():
            if hasattr(script, "install"):  # a reference solution: its method or task in place, as its main does
                script.install()
            options_class = getattr(script, "Options", cfg.NoOptions)
            _, rest = cfg.parse_script_args(args, options_class, f"python -m {module}", script.__doc__)
            cfg.parse_args(rest)
    except (ValueError, ModuleNotFoundError) as error:
        return str(error)
    return None


def test_every_command_in_the_docs_parses():
    commands = doc_commands()
    assert len(commands) > 50  # the docs are full of them; a regex that finds none would pass anything
    failures = [f"{path}: `{command}`: {why}" for path, command in commands if (why := problem(command, path))]
    assert not failures, "\n".join(failures)


def test_a_stale_command_is_caught():
    assert "python -m bench.tune" in problem("python bench/tune.py --jobs=2")
    assert "unknown config key --n_layers" in problem("python train.py --n_layers=2")
    assert "not a script" in problem("python evaluate.py out/default")
    assert "python -m evidence" in problem("python evidence.py --parts=memory")
    assert problem("python -m bench.tune --methods=ewc --jobs=2") is None
