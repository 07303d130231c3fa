"""Every script speaks one command-line style: --key=value, --help that lists its keys and the pipeline's, and a
one-line error (exit status 2) for a key nobody knows, before any compute."""

import importlib

import pytest

import jobs

SCRIPTS = ["train", "evidence.main"] + [f"bench.{name}" for name in (
    "calibrate", "cl_benchmark", "eval_cost", "frontier", "importance_scale", "nanogpt_parity", "profile_step",
    "sae_adapt", "sae_budget", "sae_reg", "sae_routes", "step_cost", "task_overlap", "tune")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_help_and_refuses_an_unknown_key_in_one_line(name, capsys):
    script = importlib.import_module(name)
    assert jobs.run_script(script.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n  --") >= 3  # its keys (or the pipeline's), one a line, with their defaults
    if name != "train":  # its own docstring first, not another module's (train.py prints its keys only)
        assert out.startswith(script.__doc__.strip().splitlines()[0])
    assert jobs.run_script(script.main, ["--no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key --no_such_key") and err.count("\n") == 1
