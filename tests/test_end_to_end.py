"""The whole pipeline on a tiny config: pretrain, SAEs, continual learning with every method, the report."""

import json
import os

import pytest

import train
from evaluate import summarize_run
from test_train import TINY

TINY_PIPELINE = TINY + ["--sae_steps=40", "--sae_tokens=4000", "--sae_batch_size=256", "--sae_expansion=4",
                        "--tasks=add,reverse", "--steps_per_task=8", "--n_train=64", "--n_val=8", "--n_test=16",
                        "--ewc_fisher_examples=8", "--mask_examples=16", "--replay_batch_size=4",
                        "--methods=seqft,ewc,sae,replay,multitask"]


def test_pipeline_runs_every_method_and_reuses_its_stages(tmp_path, capsys):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}"]
    assert train.main(argv) == 0
    run_dir = tmp_path / "default"
    for name in ("base.pt", "sae.pt", "pretrain.json", "sae.json", "summary.json", "report.md", "cl_matrix.png",
                 "cl_curves.png", "cl_bars.png", "sae_metrics.png"):
        assert (run_dir / name).exists(), name
    for method in ("seqft", "ewc", "sae", "replay", "multitask"):
        result = json.loads((run_dir / "cl" / f"{method}_seed0.json").read_text())
        rows = 2 if method == "multitask" else 3
        assert len(result["R"]) == rows and all(len(r) == 2 for r in result["R"])
        assert all(0.0 <= a <= 1.0 for r in result["R"] for a in r)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seqft"]["retained_bytes"] == 0
    assert summary["ewc"]["retained_bytes"] > 0 and summary["sae"]["retained_bytes"] > 0
    assert summary["sae"]["retained_bytes"] == 2 * 4 * 32 * 4  # 2 tasks x 1 point x d_sae floats
    assert summary["replay"]["retained_bytes"] > 0
    assert "| seqft |" in capsys.readouterr().out

    assert train.main(argv) == 0  # everything cached: nothing is retrained
    out = capsys.readouterr().out
    assert "pretrain: reusing" in out and "sae: reusing" in out and out.count("cl: reusing") == 5

    os.remove(run_dir / "report.md")  # `python evaluate.py out/<run>` rebuilds the report from JSON
    summarize_run(str(run_dir))
    assert (run_dir / "report.md").exists()


def test_sae_checkpoint_for_another_model_is_refused(tmp_path):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--sae_steps=5", "--methods=sae"]
    config = train.parse_args(argv)
    base = train.pretrain(config, "cpu")
    sae_checkpoint = train.train_sae_stage(config, "cpu", base)
    wider = train.parse_args(argv + ["--n_embd=64", "--out_dir=" + str(tmp_path / "wide")])
    wide_model = train.model_from_checkpoint(train.pretrain(wider, "cpu"), "cpu")
    with pytest.raises(ValueError, match="width 32.*n_embd=64"):
        train.load_saes(sae_checkpoint, wide_model, "cpu")


@pytest.mark.parametrize("option", ["--sae_protect_past=true", "--mask_binary=true", "--sae_codes=dense",
                                    "--sae_reference=base"])
def test_sae_guided_ablation_options_run_end_to_end(tmp_path, option):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=sae", "--sae_lambda_p=100", option]
    assert train.main(argv) == 0
    result = json.loads((tmp_path / "default" / "cl" / "sae_seed0.json").read_text())
    key, value = option[2:].split("=")
    assert str(result["config"][key]).lower() == value  # the option reached the run and is recorded with it
    assert len(result["R"]) == 3 and all(0.0 <= a <= 1.0 for r in result["R"] for a in r)
    assert result["retained_bytes"] == 2 * 4 * 32 * 4  # whatever the option, only the masks are kept
