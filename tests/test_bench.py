"""The benchmark scripts that make the README's numbers, on tiny settings."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import calibrate  # noqa: E402
import sae_reg  # noqa: E402
import train  # noqa: E402
from conftest import TINY  # noqa: E402

SAE_REG = TINY + ["--sae_steps=20", "--sae_tokens=2000", "--sae_batch_size=128", "--sae_expansion=2",
                  "--sae_reg_expansion=2", "--sae_reg_k=4"]


def test_sae_reg_uses_each_seeds_corpus_throughout(tmp_path, monkeypatch):
    seen = []
    real_corpus = train.corpus

    def recording_corpus(path, n_lines, seed, block_size):
        seen.append(seed)
        return real_corpus(path, n_lines, seed, block_size)

    monkeypatch.setattr(train, "corpus", recording_corpus)
    sae_reg.main(SAE_REG + [f"--out_dir={tmp_path}", "--seeds=1", "--k=2,4"])
    assert seen and set(seen) == {1}  # pretraining, the fresh SAEs and their metrics: all on seed 1's corpus
    results = json.loads((tmp_path / "default" / "sae_reg" / "sae_reg.json").read_text())
    for variant in ("normal", "regularized"):
        run = results[variant]["1"]
        assert run["val_ce"] > 0 and sorted(run["by_k"]) == ["2", "4"]
        assert run["by_k"]["4"]["total_l0"] > run["by_k"]["2"]["total_l0"]
    for name in ("sae_reg_per_point.png", "sae_reg_compound.png", "sae_reg.md"):
        assert (tmp_path / "default" / "sae_reg" / name).exists()


@pytest.mark.parametrize("argv, message", [(["--k=0"], "each k must be in 1..d_sae"),
                                           (["--lambda=0"], "--lambda=0.0: must be above 0"),
                                           (["--seeds="], "needs at least one value")])
def test_sae_reg_options_are_checked_before_anything_is_trained(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        sae_reg.main(SAE_REG + [f"--out_dir={tmp_path}", *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "default").exists()


@pytest.mark.parametrize("final_first, fits", [(0.5, True), (0.0, False)])
def test_a_calibration_point_fits_only_with_partial_forgetting(tmp_path, final_first, fits):
    # two tasks, both learned (R[t][t] = 1); BWT = R[2][0] - R[1][0] = final_first - 1
    seqft = {"tasks": ["add", "sort"], "R": [[0, 0], [1, 0], [final_first, 1]], "aux_accuracy": [0.5, 0.2, 0.0]}
    multitask = {"tasks": ["add", "sort"], "R": [[0, 0], [0.9, 1.0]], "aux_accuracy": []}
    (tmp_path / "seqft_seed0.json").write_text(json.dumps(seqft))
    (tmp_path / "multitask_seed0.json").write_text(json.dumps(multitask))
    row = calibrate.read_point(str(tmp_path), [0])
    assert row["multitask_avg"] == pytest.approx(0.95) and min(row["seqft_diagonal"]) == 1
    assert row["seqft_bwt"] == pytest.approx(final_first - 1)
    assert row["seqft_aux"] == [0.5, 0.2, 0.0] and row["fits"] is fits
