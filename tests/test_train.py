import math
import os

import pytest
import torch

import train
from train import main, parse_args

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=60",
        "--eval_interval=20", "--eval_iters=2", "--warmup_iters=5", "--corpus_lines=3000", "--lr=3e-3"]


def tiny_config(tmp_path, *extra):
    return parse_args(TINY + [f"--out_dir={tmp_path}", *extra])


def test_defaults_parse_and_overrides_apply():
    config = parse_args(["--n_layer=3", "--lr=1", "--tasks=add,sort", "--sae_auxk=false", "--seeds=0,1"])
    assert config.n_layer == 3 and config.lr == 1.0 and isinstance(config.lr, float)  # int accepted for float
    assert config.tasks == ("add", "sort") and config.sae_auxk is False and config.seeds == (0, 1)


@pytest.mark.parametrize("argv, message", [
    (["--n_layers=3"], "unknown config key --n_layers.*did you mean --n_layer"),
    (["--n_layer=three"], "--n_layer='three': expected a int"),
    (["--lr=fast"], "--lr='fast': expected a float"),
    (["--sae_auxk=maybe"], "--sae_auxk='maybe': expected a bool"),
    (["--device=tpu"], "--device='tpu' is not valid; choose from: auto, cpu, cuda"),
    (["--methods=seqft,magic"], "--methods='magic' is not valid; choose from: seqft, ewc, sae, replay, multitask"),
    (["--tasks=add,juggle"], "--tasks='juggle' is not valid; choose from: stance, facts"),
    (["--tasks=add,add"], "name each task once"),
    (["--n_embd=30", "--n_head=4"], "must be divisible"),
    (["--sae_points=7"], "--sae_points: 7 is not a residual point"),
    (["--sae_k=0"], "each k must be in 1..d_sae"),
    (["--steps_per_task=0"], "--steps_per_task=0 must be at least 1"),
    (["--ewc_lambda=-1"], "must be non-negative"),
    (["lr=3"], "arguments look like --key=value"),
])
def test_bad_config_is_an_error_that_names_the_key(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_main_reports_config_errors_without_a_traceback(capsys):
    assert main(["--bogus=1"]) == 2
    assert "error: unknown config key --bogus" in capsys.readouterr().err


def test_lr_schedule():
    config = parse_args(["--lr=1e-3", "--min_lr=1e-4", "--warmup_iters=10", "--max_iters=110"])
    assert train.get_lr(0, config) == pytest.approx(1e-4)  # warmup starts at lr / warmup_iters
    assert train.get_lr(9, config) == pytest.approx(1e-3)
    assert train.get_lr(60, config) == pytest.approx(5.5e-4)  # half way down the cosine
    assert train.get_lr(110, config) == pytest.approx(1e-4)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    train.save_checkpoint({"value": 1}, path)

    def broken_save(obj, f):  # writes half a file, then dies
        with open(f, "wb") as handle:
            handle.write(b"garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({"value": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["value"] == 1  # the old checkpoint is intact


def test_unreadable_checkpoint_is_redone(tmp_path, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    assert train.load_checkpoint(str(path), {"a": 1}) is None
    assert "cannot read checkpoint" in capsys.readouterr().out


def test_pretrain_loss_falls_then_is_reused_and_redone_on_change(tmp_path, capsys):
    config = tiny_config(tmp_path)
    checkpoint = train.pretrain(config, "cpu")
    history = checkpoint["history"]
    assert checkpoint["done"] and [h["iter"] for h in history] == [20, 40, 60]
    assert history[-1]["val_loss"] < history[0]["val_loss"] < math.log(96)
    assert history[-1]["train_loss"] < 0.75 * math.log(96)
    capsys.readouterr()

    again = train.pretrain(config, "cpu")  # same config: reused, not retrained
    assert "reusing" in capsys.readouterr().out
    assert all(torch.equal(again["model"][k], checkpoint["model"][k]) for k in checkpoint["model"])

    train.pretrain(tiny_config(tmp_path, "--max_iters=40"), "cpu")  # different config: redone
    assert "made with a different config (max_iters)" in capsys.readouterr().out


def test_pretrain_is_repeatable_under_a_seed(tmp_path):
    a = train.pretrain(tiny_config(tmp_path / "a"), "cpu")
    b = train.pretrain(tiny_config(tmp_path / "b"), "cpu")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_interrupted_pretraining_resumes(tmp_path, monkeypatch, capsys):
    config = tiny_config(tmp_path)
    calls = {"n": 0}
    real_get_batch = train.get_batch

    def dying_get_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30 + 2 * config.eval_iters:  # in iteration 30, after the checkpoint at 20
            raise KeyboardInterrupt
        return real_get_batch(*args, **kwargs)

    monkeypatch.setattr(train, "get_batch", dying_get_batch)
    with pytest.raises(KeyboardInterrupt):
        train.pretrain(config, "cpu")
    partial = torch.load(os.path.join(tmp_path, "default", "base.pt"), weights_only=False)
    assert partial["iter"] == 20 and not partial["done"]
    monkeypatch.setattr(train, "get_batch", real_get_batch)
    capsys.readouterr()
    resumed = train.pretrain(config, "cpu")
    assert "resuming" in capsys.readouterr().out
    assert resumed["done"] and [h["iter"] for h in resumed["history"]] == [20, 40, 60]
    # resuming gives the same weights as an uninterrupted run
    straight = train.pretrain(tiny_config(tmp_path / "straight"), "cpu")
    assert all(torch.allclose(resumed["model"][k], straight["model"][k], atol=1e-6) for k in straight["model"])


def test_pretraining_with_the_sae_regularizer(tmp_path):
    config = tiny_config(tmp_path, "--sae_reg_lambda=1.0", "--sae_reg_k=4", "--sae_reg_expansion=2")
    checkpoint = train.pretrain(config, "cpu")
    assert sorted(checkpoint["joint_saes"]) == [0, 1]  # every residual point 0..n_layer
    for state in checkpoint["joint_saes"].values():
        assert torch.allclose(state["W_dec"].norm(dim=1), torch.ones(64), atol=1e-5)
    plain = train.pretrain(tiny_config(tmp_path / "plain"), "cpu")
    assert not plain["joint_saes"]
    assert not torch.allclose(plain["model"]["wte.weight"], checkpoint["model"]["wte.weight"])  # it shaped the model


def test_fresh_saes_leave_the_frozen_model_unchanged(tmp_path):
    from data.corpus import load_corpus

    config = tiny_config(tmp_path, "--sae_steps=20", "--sae_tokens=2000", "--sae_batch_size=128")
    model = train.model_from_checkpoint(train.pretrain(config, "cpu"), "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_ids, val_ids = load_corpus(None, n_lines=config.corpus_lines)
    metrics = train.fresh_saes_on_frozen_model(model, train_ids, val_ids, config, k=4, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())
    assert sorted(metrics["points"]) == [0, 1] and metrics["total_l0"] <= 8.0


def test_compound_splicing_feeds_each_sae_the_patched_stream(tiny_model):
    seen = {}

    def recording(point):
        def f(h):
            seen[point] = h.detach().clone()
            return 2.0 * h  # a "reconstruction" that differs from its input

        return f

    x = torch.randint(0, 96, (2, 10))
    _, _, clean = tiny_model(x, read=(1, 2))
    tiny_model(x, patch={1: recording(1), 2: recording(2)})  # all points at once, as in sae_metrics
    assert torch.allclose(seen[1], clean[1])
    assert torch.allclose(seen[2], tiny_model.blocks[1](2.0 * clean[1]), atol=1e-6)  # block 2 of the patched stream
    assert not torch.allclose(seen[2], clean[2])


def test_study_stage(tmp_path):
    argv = TINY + [f"--out_dir={tmp_path}", "--stage=study", "--study_seeds=0", "--study_k=2,4", "--sae_steps=20",
                   "--sae_tokens=2000", "--sae_batch_size=128", "--sae_expansion=2", "--sae_reg_expansion=2",
                   "--sae_reg_k=4"]
    assert main(argv) == 0
    study_dir = tmp_path / "default" / "study"
    import json

    results = json.loads((study_dir / "study.json").read_text())
    for variant in ("normal", "regularized"):
        run = results[variant]["0"]
        assert run["val_ce"] > 0 and sorted(run["by_k"]) == ["2", "4"]
        assert run["by_k"]["4"]["total_l0"] > run["by_k"]["2"]["total_l0"]
    for name in ("study_per_point.png", "study_compound.png", "study.md"):
        assert (study_dir / name).exists()


def test_bias_flag_builds_a_model_without_biases(tmp_path):
    checkpoint = train.pretrain(tiny_config(tmp_path, "--bias=false", "--max_iters=5", "--eval_interval=5"), "cpu")
    model = train.model_from_checkpoint(checkpoint, "cpu")
    assert all(m.bias is None for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    with_bias = train.model_from_checkpoint(train.pretrain(tiny_config(tmp_path / "b", "--max_iters=5",
                                                                       "--eval_interval=5"), "cpu"), "cpu")
    assert with_bias.num_params() > model.num_params()
