import dataclasses
import json
import math
import os

import pytest
import torch

import cache
import pretrain
import runs
import sae_stage
import train
from conftest import TINY, TINY_PIPELINE
from evaluate import greedy_answers, knowledge_metrics
from model import GPT, GPTConfig
from train import main, parse_args


def tiny_config(tmp_path, *extra):
    return parse_args(TINY + [f"--out_dir={tmp_path}", *extra])


def test_lr_schedule():
    config = parse_args(["--lr=1e-3", "--min_lr=1e-4", "--warmup_iters=10", "--max_iters=110"])
    assert pretrain.get_lr(0, config) == pytest.approx(1e-4)  # warmup starts at lr / warmup_iters
    assert pretrain.get_lr(9, config) == pytest.approx(1e-3)
    assert pretrain.get_lr(60, config) == pytest.approx(5.5e-4)  # half way down the cosine
    assert pretrain.get_lr(110, config) == pytest.approx(1e-4)


def test_a_write_that_dies_or_finds_the_disk_full_leaves_the_previous_file_and_no_temporary_one(tmp_path,
                                                                                                 monkeypatch):
    import errno

    path = str(tmp_path / "ck.pt")
    cache.save_checkpoint({"value": 1}, path)
    cache.save_json({"value": 1}, str(tmp_path / "summary.json"))

    def dying_write(target, data):  # writes half of the file, then the process is interrupted
        with open(target, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "write_bytes", dying_write)
    with pytest.raises(KeyboardInterrupt):
        cache.save_checkpoint({"value": 2}, path)
    monkeypatch.setattr(cache, "write_bytes", lambda target, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(ValueError, match=r"cannot write .*summary.json: the disk is full \(\d+ bytes needed\)"):
        cache.save_json({"value": 2}, str(tmp_path / "summary.json"))
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["value"] == 1  # the old files are intact
    assert json.loads((tmp_path / "summary.json").read_text())["value"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] in ([], [f"ck.pt.{os.getpid()}.tmp"])
    with pytest.raises(ValueError):
        cache.save_json({"loss": float("nan")}, str(tmp_path / "nan.json"))  # never a bare NaN in a JSON file


def test_a_damaged_tensor_in_a_checkpoint_is_noticed_and_the_stage_redone(tmp_path, capsys):
    config = tiny_config(tmp_path, "--sae_steps=5", "--sae_tokens=2000", "--sae_batch_size=256")
    base = train.pretrain(config, "cpu")
    sae_stage.train_sae_stage(config, "cpu", base)
    for name, field in (("base.pt", "model"), ("sae.pt", "saes")):
        path = tmp_path / "default" / name
        checkpoint = torch.load(path, weights_only=False)
        tensors = checkpoint["model"] if field == "model" else next(iter(checkpoint["saes"].values()))[1]["state"]
        some = next(t for t in tensors.values() if t.is_floating_point())
        some.view(-1)[0] += 1.0  # a flipped value inside a tensor; key and stored hash unchanged
        torch.save(checkpoint, path)
        capsys.readouterr()
        base = train.pretrain(config, "cpu")
        sae_stage.train_sae_stage(config, "cpu", base)
        out = capsys.readouterr().out
        assert f"{name} is damaged (its {field} does not match its content hash); redoing it" in out


def test_unreadable_checkpoint_is_redone(tmp_path, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    assert cache.load_checkpoint(str(path), {"a": 1}, "model") is None
    assert "cannot read" in capsys.readouterr().out


def test_pretrain_loss_falls_then_is_reused_and_redone_on_change(tmp_path, capsys):
    config = tiny_config(tmp_path)
    checkpoint = train.pretrain(config, "cpu")
    history = checkpoint["history"]
    assert checkpoint["done"] and [h["iter"] for h in history] == [20, 40, 60]
    assert history[-1]["val_loss"] < history[0]["val_loss"] < math.log(96)
    assert history[-1]["train_loss"] < 0.75 * math.log(96)
    capsys.readouterr()

    again = train.pretrain(config, "cpu")  # same key: reused, not retrained
    assert "reusing" in capsys.readouterr().out
    assert all(torch.equal(again["model"][k], checkpoint["model"][k]) for k in checkpoint["model"])

    train.pretrain(tiny_config(tmp_path, "--max_iters=40"), "cpu")  # different config: redone
    assert "different config (max_iters)" in capsys.readouterr().out


def test_a_corpus_that_can_be_read_once_is_hashed_as_it_was_read(tmp_path, capsys):
    """`--corpus=<(cat a.txt)` is a pipe: its text goes to the first reader, and a second open of the same path
    finds it drained (end of file at once). The key must hash what was read, not a second read."""
    def pipe_holding(text, fd=None):
        read_end, write_end = os.pipe()
        os.write(write_end, text.encode())  # a few KB: fits in the pipe's buffer
        os.close(write_end)
        if fd is None:
            return read_end
        os.dup2(read_end, fd)  # the same path, /dev/fd/<fd>, now another pipe
        os.close(read_end)
        return fd

    fd = pipe_holding("to be or not to be, that is the question.\n" * 60)
    try:
        config = tiny_config(tmp_path, f"--corpus=/dev/fd/{fd}")
        train.pretrain(config, "cpu")
        pipe_holding("all the world's a stage, and all the men and women merely players.\n" * 40, fd)
        pretrain.corpus.cache_clear()  # a new process would read it anew
        capsys.readouterr()
        train.pretrain(config, "cpu")
        assert "different corpus file; redoing" in capsys.readouterr().out
    finally:
        os.close(fd)


def test_a_change_of_corpus_or_device_redoes_the_stage(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 60)
    config = tiny_config(tmp_path, f"--corpus={corpus}")
    train.pretrain(config, "cpu")
    capsys.readouterr()
    corpus.write_text("all the world's a stage, and all the men and women merely players.\n" * 40)
    pretrain.corpus.cache_clear()
    train.pretrain(config, "cpu")  # same path, other content
    assert "different corpus file; redoing" in capsys.readouterr().out
    key = cache.result_key(cache.stage_config(config, "pretrain"), cache.stage_code(config, "pretrain"), "cuda",
                           config.corpus)
    assert cache.load_checkpoint(str(tmp_path / "default" / "base.pt"), key, "model") is None  # made on cpu, not cuda
    assert "different device" in capsys.readouterr().out


def test_a_corpus_named_from_another_folder_is_the_same_key(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path / "data")
    relative = cache.stage_config(tiny_config(tmp_path, "--corpus=../text.txt"), "pretrain")
    absolute = cache.stage_config(tiny_config(tmp_path, f"--corpus={tmp_path / 'text.txt'}"), "pretrain")
    assert relative == absolute and relative["corpus"] == str(tmp_path / "text.txt")
    assert cache.stage_config(tiny_config(tmp_path), "pretrain")["corpus"] == ""  # the generated corpus: no path


def test_a_redone_pretraining_invalidates_the_saes_built_on_it(tmp_path, capsys):
    config = tiny_config(tmp_path, "--sae_steps=5", "--sae_tokens=1000", "--sae_batch_size=64")
    base = train.pretrain(config, "cpu")
    sae_stage.train_sae_stage(config, "cpu", base)
    capsys.readouterr()
    other = dict(base, sha="another-base")  # a pretraining redone with another result
    sae_stage.train_sae_stage(config, "cpu", other)
    assert "different the checkpoint it was built from; redoing" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["garble", "delete"])
@pytest.mark.parametrize("stage_file", ["pretrain.json", "sae.json"])
def test_a_damaged_or_deleted_stage_summary_is_redone_and_rewritten(tmp_path, capsys, damage, stage_file):
    config = tiny_config(tmp_path, "--sae_steps=5", "--sae_tokens=1000", "--sae_batch_size=64")
    sae_stage.train_sae_stage(config, "cpu", train.pretrain(config, "cpu"))
    path = tmp_path / "default" / stage_file
    if damage == "garble":
        path.write_text('{"val_loss": 0.5, "sam')
    else:
        path.unlink()
    capsys.readouterr()
    base = train.pretrain(config, "cpu")
    sae_stage.train_sae_stage(config, "cpu", base)
    out = capsys.readouterr().out
    assert f"{stage_file} is missing or stale; redoing" in out
    assert ("is damaged" in out) == (damage == "garble")
    assert json.loads(path.read_text())["key"]["config"]  # written again, whole


def test_pretrain_is_repeatable_under_a_seed(tmp_path):
    a = train.pretrain(tiny_config(tmp_path / "a"), "cpu")
    b = train.pretrain(tiny_config(tmp_path / "b"), "cpu")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["sha"] == b["sha"]


@pytest.mark.parametrize("dropout", ["0", "0.2"])  # with dropout, torch's global generator is in the checkpoint
def test_interrupted_pretraining_resumes(tmp_path, monkeypatch, capsys, dropout):
    config = tiny_config(tmp_path, f"--dropout={dropout}")
    calls = {"n": 0}
    real_get_batch = pretrain.get_batch

    def dying_get_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30 + 2 * config.eval_iters:  # in iteration 30, after the checkpoint at 20
            raise KeyboardInterrupt
        return real_get_batch(*args, **kwargs)

    monkeypatch.setattr(pretrain, "get_batch", dying_get_batch)
    with pytest.raises(KeyboardInterrupt):
        train.pretrain(config, "cpu")
    partial = torch.load(os.path.join(tmp_path, "default", "base.pt"), weights_only=False)
    assert partial["iter"] == 20 and not partial["done"]
    monkeypatch.setattr(pretrain, "get_batch", real_get_batch)
    capsys.readouterr()
    resumed = train.pretrain(config, "cpu")
    assert "resuming" in capsys.readouterr().out
    assert resumed["done"] and [h["iter"] for h in resumed["history"]] == [20, 40, 60]
    # resuming gives the same weights as an uninterrupted run, bit for bit
    straight = train.pretrain(tiny_config(tmp_path / "straight", f"--dropout={dropout}"), "cpu")
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])


def test_pretraining_with_the_sae_regularizer(tmp_path):
    config = tiny_config(tmp_path, "--sae_reg_lambda=1.0", "--sae_reg_k=4", "--sae_reg_expansion=2")
    checkpoint = train.pretrain(config, "cpu")
    assert sorted(checkpoint["joint_saes"]) == [0, 1]  # every residual point 0..n_layer
    for state in checkpoint["joint_saes"].values():
        assert torch.allclose(state["W_dec"].norm(dim=1), torch.ones(64), atol=1e-5)
    plain = train.pretrain(tiny_config(tmp_path / "plain"), "cpu")
    assert not plain["joint_saes"]
    assert not torch.allclose(plain["model"]["wte.weight"], checkpoint["model"]["wte.weight"])  # it shaped the model


def test_grad_clip_zero_means_no_clipping_in_every_stage(tmp_path, monkeypatch):
    """0 turns clipping off in pretraining and in continual learning alike (it used to clip every fine-tuning
    gradient to norm 0 there, so that nothing was learned)."""
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, c: clipped.append(c) or real_clip(p, c))
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft", "--grad_clip=0", "--stage=cl",
                            "--steps_per_task=30", "--cl_lr=3e-3"]
    assert main(argv) == 0
    assert clipped == []
    result = json.loads((tmp_path / "default" / "cl" / "seqft_seed0.json").read_text())
    assert result["R"][1][0] > result["R"][0][0] or result["R"][2][1] > result["R"][0][1]  # something was learned
    assert main(argv[:-4] + ["--grad_clip=-1"]) == 2  # negative: refused


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_a_nan_loss_is_one_line_naming_where(tmp_path, capsys):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft", "--cl_lr=1e30", "--steps_per_task=3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0])  # the last line
    assert "the loss is" in errors[0] and "task add, step" in errors[0] and "lower --cl_lr" in errors[0]
    assert main(TINY + [f"--out_dir={tmp_path / 'wd'}", "--weight_decay=1e10", "--stage=pretrain"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # a weight decay that blows up is named, not only --lr
    assert "in pretraining at iteration" in error and "--weight_decay" in error


@pytest.mark.parametrize("extra, message", [
    (["--tasks=add,stance", "--block_size=24"], "task stance: the example .* more than --block_size=24"),
    (["--corpus=/no/such/file.txt"], "corpus file '/no/such/file.txt' does not exist"),
    (["--sae_guided_mask_knn=128"], "--sae_guided_mask_knn=128: must be below the SAE width d_sae=128"),
])
def test_bad_input_stops_before_any_compute(tmp_path, capsys, extra, message):
    assert main(TINY_PIPELINE + [f"--out_dir={tmp_path}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "default" / "base.pt").exists()  # nothing was trained


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "results"
    file.write_text("")
    assert main(TINY + [f"--out_dir={file}"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_bias_flag_builds_a_model_without_biases(tmp_path):
    checkpoint = train.pretrain(tiny_config(tmp_path, "--bias=false", "--max_iters=5", "--eval_interval=5"), "cpu")
    model = train.model_from_checkpoint(checkpoint, "cpu")
    assert all(m.bias is None for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    with_bias = train.model_from_checkpoint(train.pretrain(tiny_config(tmp_path / "b", "--max_iters=5",
                                                                       "--eval_interval=5"), "cpu"), "cpu")
    assert with_bias.num_params() > model.num_params()


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


def test_a_log_file_gets_lines_not_redraws(tmp_path):
    """With stderr going to a file, the progress bars write a few lines, not a redraw per iteration, and what a
    stage prints at its end starts on a line of its own."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = TINY + [f"--out_dir={tmp_path}", "--max_iters=200", "--stage=sae", "--sae_steps=300",
                   "--sae_tokens=2000", "--sae_batch_size=64"]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, os.path.join(root, "train.py"), *argv], stdout=f, stderr=f)
    assert done.returncode == 0
    text = log.read_text()
    assert len(text) < 5000, f"{len(text)} bytes for 200 iterations"  # a redraw per iteration was ~95 bytes each
    lines = text.split("\n")
    assert any(line.startswith("pretrain: val loss") for line in lines)
    assert any(line.startswith("sae k=8 point 1: L0") for line in lines)
    assert "\r" not in text


def test_lr_schedule_of_the_instruction_phase():
    config = parse_args(["--lr=1e-3", "--min_lr=1e-4", "--max_iters=110", "--instruct_tags=4", "--instruct_lr=5e-4",
                         "--instruct_iters=100"])
    assert pretrain.get_lr(110, config) == pytest.approx(5e-4)  # the phase starts at its own peak
    assert pretrain.get_lr(160, config) == pytest.approx(3e-4)  # half way down its cosine
    assert pretrain.get_lr(209, config) == pytest.approx(1e-4, rel=1e-3)


def test_the_instruction_phase_makes_the_base_answer_held_out_auxiliary_prompts_in_the_tags_style(tmp_path):
    """On held-out prompts the phase's model answers in the auxiliary style (upper case or '#', which no corpus text
    has) and the plain base never does. A model this tiny learns the tag's style, not the content: its exact match
    on the held-out prompts is near a constant guess's (once 0.25, from parity's two held-out prompts both 'EVEN';
    the splits now hold answers in turn), so the test reads the style."""
    extra = ["--n_embd=48", "--instruct_tags=4", "--instruct_iters=200", "--instruct_lr=3e-3",
             "--instruct_examples=200"]
    config = tiny_config(tmp_path, *extra)
    with_phase = train.model_from_checkpoint(train.pretrain(config, "cpu"), "cpu")
    summary = json.loads((tmp_path / "default" / "pretrain.json").read_text())
    without = train.model_from_checkpoint(train.pretrain(tiny_config(tmp_path / "plain", "--n_embd=48"), "cpu"), "cpu")
    suite = train.aux_suite(config)

    def styled(model):  # the share of held-out answers written in the auxiliary style
        answers = [a for s in suite.values() for a in greedy_answers(model, s["test"], "cpu")]
        return sum(any(c.isupper() or c == "#" for c in a) for a in answers) / len(answers)

    assert styled(without) == 0.0 and styled(with_phase) >= 0.8
    assert summary["aux_accuracy"] == pytest.approx(train.aux_accuracy(with_phase, suite, "cpu"))
    assert "aux_accuracy" in summary["history"][-1] and "aux_accuracy" not in summary["history"][0]


@pytest.mark.parametrize("norm", ["norm2", "var"])
def test_pretraining_with_relu_saes_of_per_point_widths_and_the_scale_free_forms(tmp_path, norm):
    config = tiny_config(tmp_path, "--sae_reg_lambda=3", "--sae_reg_kind=relu", "--sae_reg_widths=16,48",
                         "--sae_reg_l1=0.02,0.05", f"--sae_reg_norm={norm}")
    checkpoint = train.pretrain(config, "cpu")
    assert [checkpoint["joint_saes"][p]["W_dec"].shape[0] for p in (0, 1)] == [16, 48]
    norms = [checkpoint["joint_saes"][p]["W_dec"].norm(dim=1) for p in (0, 1)]
    assert not all(torch.allclose(n, torch.ones_like(n), atol=1e-3) for n in norms)  # ReLU SAEs: rows free in norm
    history = json.loads((tmp_path / "default" / "pretrain.json").read_text())["history"]
    assert all(set(h["norms"]) == {"0", "1"} and min(h["norms"].values()) > 0 for h in history)
    with pytest.raises(ValueError, match="--sae_reg_widths: give 0 or 2 values"):
        train.parse_args(["--n_layer=1", "--sae_reg_widths=16,16,16"])


# ----------------------------------------------------------------------------------------------------------------
# what a method keeps: relearning and forced choice, measured after the sequence


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_relearning_starts_at_the_final_accuracy_and_the_base_reference_is_made_once(tmp_path, monkeypatch, capsys):
    calls, original = [], train.base_reference
    monkeypatch.setattr(train, "base_reference", lambda seed, **kw: calls.append(seed) or original(seed, **kw))
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft,freeze", "--seeds=0,1", "--diagnose=false"]
    assert main(argv) == 0
    assert calls == [0, 1]  # once per seed, for both methods
    folder = tmp_path / "default" / "cl"
    for name in ("seqft", "freeze"):
        result = json.loads((folder / f"{name}_seed0.json").read_text())
        assert result["relearn_steps"] == [0, 2] and list(result["relearn"]) == ["add"]  # the tasks before the last
        assert result["relearn"]["add"][0] == result["R"][-1][0]  # relearn@0 is the final accuracy
        assert set(result["forced_choice"]) == {"add", "reverse"}
        suite = train.task_suite(parse_args(argv))  # the constant guess: the training majority, scored on test
        for task in ("add", "reverse"):
            answers = [a for _, a in suite[task]["train"].examples]
            majority = max(answers, key=answers.count)
            test = [a for _, a in suite[task]["test"].examples]
            assert result["constant_guess"][task] == {"answer": majority, "accuracy": test.count(majority) / 16,
                                                      "n": 16}
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert "kept@2" in summary["seqft"] and "forced_choice" in summary["freeze"]
    capsys.readouterr()
    assert main(argv[:-3] + ["--methods=seqft,ewc", "--seeds=0,1", "--diagnose=false"]) == 0  # a new method
    reused = capsys.readouterr().out
    assert calls == [0, 1] and "reusing " + str(tmp_path / "default" / "base" / "seed0_") in reused
    assert main(argv[:-3] + ["--methods=seqft", "--seeds=1", "--cl_dir=other", "--diagnose=false"]) == 0
    assert calls == [0, 1]  # another results folder of the run: the same base reference
    assert "kept@2" in json.loads((tmp_path / "default" / "other" / "summary.json").read_text())["seqft"]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_kept_is_exactly_zero_for_the_base_model_run_through_the_methods_path(tmp_path, monkeypatch, finetune):
    def answer_likelihood(model, split, device):  # a score that moves with every weight, unlike a tiny model's 0.0
        with torch.no_grad():
            return -model(split.x, split.y, split.answer_mask)[1].item()

    monkeypatch.setattr(train, "task_accuracy", answer_likelihood)
    config = tiny_config(tmp_path, "--tasks=add,reverse,sort", "--n_train=64", "--n_test=16", "--n_val=8",
                         "--relearn_steps=0,1,3", "--sae_steps=5", "--sae_tokens=2000", f"--finetune={finetune}")
    base = train.pretrain(config, "cpu")
    suite = train.task_suite(config)
    # a sequence of zero steps leaves the final model equal to the start model: kept@n must come out 0, exactly
    still = dataclasses.replace(config, steps_per_task=0, diagnose=False)
    result = train.run_method("seqft", 3, config=still, device="cpu", base=base, saes=None, suite=suite,
                              lm_val_ids=train.corpus_of(config)[1])
    reference = train.base_reference(3, config=still, device="cpu", base=base, suite=suite)
    assert result["relearn"] == reference["relearn"] and result["forced_choice"] == reference["forced_choice"]
    assert all(knowledge_metrics(result, reference)[f"kept@{n}"] == 0.0 for n in (0, 1, 3))
    assert all(curve[0] < curve[1] < curve[2] for curve in reference["relearn"].values())  # relearning trains
    # the control: the same steps from the same model, on other answers (a tiny model this short learns the format
    # either way, so no order between the two is asserted here; the question-blind test below reads the difference)
    for task, curve in reference["relearn"].items():
        shuffled = reference["relearn_shuffled"][task]
        assert shuffled[0] == curve[0] and shuffled[1] != curve[1] and shuffled[2] != curve[2]


def test_a_question_blind_model_relearns_the_format_and_keeps_no_content(tmp_path):
    """A model with no block reads only the current token and its position: it can learn count's format (a digit,
    then the newline) but not which digit a question asks for. Its relearn@n is a constant's 0.25 on the balanced
    test split; content kept@n, relearning on true minus on shuffled answers, is 0."""
    config = tiny_config(tmp_path, "--tasks=count,sort", "--n_train=200", "--n_test=40", "--n_val=8",
                         "--relearn_steps=0,30", "--cl_lr=3e-2")
    suite = train.task_suite(config)
    torch.manual_seed(0)
    blind = GPT(GPTConfig(vocab_size=96, block_size=config.block_size, n_layer=0, n_head=2, n_embd=32))
    row = train.evaluate_tasks(blind, suite, config, "cpu")
    true = train.relearn(blind, row, suite, config, "cpu", 0, "relearn")["count"]
    shuffled = train.relearn(blind, row, suite, config, "cpu", 0, "relearn", shuffled=True)["count"]
    assert true == [0.0, 0.25] and shuffled == [0.0, 0.25]  # the format learned both ways: content kept 0


def test_relearning_trains_a_copy_as_the_regime_trains(tmp_path):
    config = tiny_config(tmp_path, "--tasks=add,reverse", "--n_train=32", "--n_test=8", "--n_val=4",
                         "--relearn_steps=0,2", "--finetune=lora", "--lora_targets=mlp_in")
    base = train.pretrain(config, "cpu")
    model = train.start_model(base, config, "cpu", seed=0)
    model.stack_adapters()  # as O-LoRA leaves it: an earlier, frozen adapter set and a current one
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train.relearn(model, [0.0, 0.0], train.task_suite(config), config, "cpu", 0, desc="relearn")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # measurement only
    trained = {n for n, p in train.relearnable(model, "lora").named_parameters() if p.requires_grad}
    assert trained == {"blocks.0.mlp.c_fc.A", "blocks.0.mlp.c_fc.B"}  # the current adapters, not the past ones
    assert all(p.requires_grad for p in train.relearnable(model, "full").parameters())


def test_an_edit_redoes_only_the_stages_that_run_the_edited_file(tmp_path, monkeypatch, capsys):
    """In a copy of the project's files (the hashes read the copy): an edit of the methods' file keeps the base and
    the SAEs, of the SAE file keeps the base, of the model file redoes everything; a new file redoes nothing; an
    edit of a file part of whose functions a stage runs (evaluate.py, train.py for the SAEs) redoes it only when it
    is inside one of those functions."""
    import shutil

    copy = tmp_path / "project"
    shutil.copytree(cache.ROOT, copy, ignore=shutil.ignore_patterns("out", ".git", "__pycache__", "tests", "*.tmp"))
    monkeypatch.setattr(cache, "ROOT", str(copy))
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path / 'out'}", "--methods=seqft", "--relearn_steps=0,1"]

    def run_after(edit=None):
        if edit:
            edit()
        capsys.readouterr()
        assert main(argv) == 0
        out = capsys.readouterr().out
        return ["pretrain: reusing" in out, "sae: reusing" in out, out.count("cl: reusing")]  # of 2: run and base

    def append_comment(name):
        return lambda: open(copy / name, "a").write("# a student's comment\n")

    def edit_inside(name, line_start):  # a comment as the first line of a function's body
        def edit():
            text = (copy / name).read_text()
            head, rest = text.split(line_start, 1)
            signature, body = rest.split("\n", 1)
            (copy / name).write_text(head + line_start + signature + "\n    # a student's comment\n" + body)
        return edit

    assert run_after() == [False, False, 0]
    # nothing changed, or the report and a file of one's own: everything reused (the report makes no stage)
    assert run_after(lambda: (append_comment("report.py")(), (copy / "scratch.py").write_text("print(1)\n"))) == [
        True, True, 2]
    assert run_after(append_comment("regularizers.py")) == [True, True, 0]
    assert run_after(edit_inside("evaluate.py", "def sae_metrics(")) == [True, False, 0]  # the SAEs, every run
    assert run_after(edit_inside("train.py", "def relearn(")) == [True, True, 0]  # relearning: not the SAEs
    assert run_after(append_comment("sae.py")) == [True, False, 1]  # the diagnostic reads the SAEs; the base does not
    assert run_after(append_comment("model.py")) == [False, False, 0]


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    other = tmp_path / "summary.json.99999999.tmp"  # another process's write, under way
    other.write_text("half of another process's file")
    cache.save_json({"value": 1}, str(path))
    assert json.loads(path.read_text()) == {"value": 1} and other.read_text() == "half of another process's file"


# ----------------------------------------------------------------------------------------------------------------
# tests that bite: relearning's steps, starting weights and optimizer, the keys of what it depends on


def test_relearning_segments_add_up_to_one_run_from_the_final_model_per_task(tmp_path, monkeypatch):
    """With a continuous score: every task's curve starts at the final model's own score (R's last row, given) and
    each task relearns from the final model, not from the previous task's student (reverse relearned first gives
    the same curve); the segments 0, 2, 5 train 5 steps in all with one optimizer, so the score at 5 equals that
    of one run of 5 steps."""
    def answer_likelihood(model, split, device):
        with torch.no_grad():
            return -model(split.x, split.y, split.answer_mask)[1].item()

    monkeypatch.setattr(train, "task_accuracy", answer_likelihood)
    steps = []
    original = train.train_steps
    monkeypatch.setattr(train, "train_steps", lambda *a, **kw: steps.append(a[2]) or original(*a, **kw))
    config = tiny_config(tmp_path, "--tasks=add,reverse,sort", "--n_train=64", "--n_test=16", "--n_val=8")
    model = train.start_model(train.pretrain(config, "cpu"), config, "cpu", seed=0)
    suite = train.task_suite(config)
    row = [answer_likelihood(model, suite[task]["test"], "cpu") for task in config.tasks]
    segmented = train.relearn(model, row, suite, dataclasses.replace(config, relearn_steps=(0, 2, 5)), "cpu", 0, "r")
    assert steps == [0, 2, 3, 0, 2, 3]  # per task: n minus the steps done
    one_run = train.relearn(model, row, suite, dataclasses.replace(config, relearn_steps=(0, 5)), "cpu", 0, "r")
    for task, score in zip(("add", "reverse"), row):
        assert segmented[task][0] == score
        assert segmented[task][2] == one_run[task][1]  # one optimizer carried across the segments
    reverse_first = dataclasses.replace(config, tasks=("reverse", "sort"), relearn_steps=(0, 5))
    assert train.relearn(model, row[1:], suite, reverse_first, "cpu", 0, "r")["reverse"] == one_run["reverse"]


def test_the_measures_settings_are_in_the_keys_of_the_runs_and_of_the_base_reference():
    config = parse_args(["--diagnose=false"])
    base = {"sha": "b"}

    def keys(*extra):
        c = parse_args(["--diagnose=false", *extra])
        key, shared, _ = runs.method_key(c, "seqft", 0, "cpu", base, None)
        return key, shared

    assert keys() == keys()
    for extra in ("--relearn_steps=0,5", "--forced_choice_k=3"):
        assert keys(extra)[0] != keys()[0] and keys(extra)[1] != keys()[1]  # a run, and the base reference (shared)
    assert "evaluate.py" in cache.stage_code(config, "pretrain", "cl")  # forced choice and relearning's scores
    with pytest.raises(ValueError, match="increasing"):
        parse_args(["--relearn_steps=20,5"])


def test_a_checkpoint_whose_content_does_not_match_its_hash_is_not_returned(tmp_path, capsys):
    path = str(tmp_path / "ck.pt")
    model = {"w": torch.ones(3)}
    cache.save_checkpoint({"key": {"k": 1}, "model": model, "sha": cache.tensor_hash(model)}, path)
    assert cache.load_checkpoint(path, {"k": 1}, "model") is not None
    cache.save_checkpoint({"key": {"k": 1}, "model": {"w": torch.zeros(3)}, "sha": cache.tensor_hash(model)}, path)
    assert cache.load_checkpoint(path, {"k": 1}, "model") is None
    assert "does not match its content hash" in capsys.readouterr().out


def test_an_os_error_half_way_through_a_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "summary.json"
    cache.save_json({"value": 1}, str(path))

    def half_then_full(target, data):
        with open(target, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "write_bytes", half_then_full)
    with pytest.raises(ValueError, match="the disk is full"):
        cache.save_json({"value": 2}, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert json.loads(path.read_text())["value"] == 1


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_the_base_reference_is_keyed_on_what_it_reads_and_still_found_by_the_report(tmp_path, monkeypatch):
    """The diagnostic's settings change the methods' runs, not the base model's reference: it is reused, and the
    report still sets it beside the runs (kept@n)."""
    calls, original = [], train.base_reference
    monkeypatch.setattr(train, "base_reference", lambda seed, **kw: calls.append(seed) or original(seed, **kw))
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft"]
    assert main(argv + ["--diagnose=false"]) == 0 and main(argv + ["--diagnose_examples=8"]) == 0
    assert calls == [0]
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert "kept@2" in summary["seqft"] and "content_kept@2" in summary["seqft"]


@pytest.mark.skipif(__import__("shutil").which("torchrun") is None, reason="torchrun is not installed")
def test_pretraining_under_torchrun_resumes_and_matches_one_process(tmp_path, monkeypatch):
    """A run interrupted in one process after its checkpoint at 20 is finished by two processes under torchrun (gloo,
    on the CPU) at the same global batch: the losses at 40 and 60 are those of one process uninterrupted, within
    float tolerance, and rank 0 alone writes the checkpoint and the summary."""
    import subprocess

    one = train.pretrain(tiny_config(tmp_path / "one"), "cpu")
    config = tiny_config(tmp_path / "two")
    calls, real_get_batch = {"n": 0}, pretrain.get_batch

    def dying_get_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30 + 2 * config.eval_iters:  # in iteration 30
            raise KeyboardInterrupt
        return real_get_batch(*args, **kwargs)

    monkeypatch.setattr(pretrain, "get_batch", dying_get_batch)
    with pytest.raises(KeyboardInterrupt):
        train.pretrain(config, "cpu")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "train.py", *TINY, "--stage=pretrain",
                           f"--out_dir={tmp_path / 'two'}"], cwd=cache.ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout
    two = torch.load(tmp_path / "two" / "default" / "base.pt", weights_only=False)
    assert two["done"] and [h["iter"] for h in two["history"]] == [20, 40, 60]
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "default").iterdir()) == ["base.pt", "pretrain.json"]


def test_the_task_suite_is_built_once_per_process_and_again_for_a_replaced_task(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "--tasks=add,reverse", "--n_train=16", "--n_test=8", "--n_val=4")
    suite = train.task_suite(config)
    assert train.task_suite(dataclasses.replace(config, seeds=(1,), methods=("ewc",))) is suite  # no task setting
    monkeypatch.setitem(train.TASKS, "add", train.TASKS["reverse"])  # another generator under the name add
    replaced = train.task_suite(config)
    assert replaced is not suite and all(q.startswith("rev:") for q, _ in replaced["add"]["test"].examples)
    assert train.task_suite(dataclasses.replace(config, n_test=6)) is not replaced


def test_every_sequence_starts_from_the_base_model_s_measures_taken_once_per_setting(tmp_path, monkeypatch):
    """A sequence's first row of R (both splits), auxiliary accuracy and LM loss are the base model's, measured by
    hand, whatever the method and the seed's LoRA A (B starts at zero: the same logits bit for bit); a process
    measures them once per setting, and another task list or LM-loss length is another setting."""
    config = tiny_config(tmp_path, "--tasks=add,reverse", "--n_train=32", "--n_test=8", "--n_val=4",
                         "--finetune=lora", "--steps_per_task=2", "--diagnose=false", "--instruct_tags=2",
                         "--instruct_iters=4", "--instruct_examples=16")
    base = train.pretrain(config, "cpu")
    plain = train.model_from_checkpoint(base, "cpu")
    x = train.task_suite(config)["add"]["val"].x
    assert torch.equal(train.start_model(base, config, "cpu", seed=1)(x)[0], plain(x)[0])
    calls, evaluate = [], train.evaluate_tasks
    monkeypatch.setattr(train, "evaluate_tasks", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    lm_val_ids = train.corpus_of(config)[1]
    for other in (config, dataclasses.replace(config, tasks=("reverse", "add")),
                  dataclasses.replace(config, eval_iters=config.eval_iters + 1)):
        suite = train.task_suite(other)
        records = [train.learn_sequence(name, seed, config=other, device="cpu", base=base, saes=None, suite=suite,
                                        lm_val_ids=lm_val_ids)[1] for name, seed in (("seqft", 0), ("ewc", 1))]
        aux = pretrain.aux_suite(other)
        for record in records:
            for split in train.SPLITS:
                assert record["R"][split][0] == evaluate(plain, suite, other, "cpu", split)
            assert record["aux_accuracy"][0] == pretrain.aux_accuracy(plain, aux, "cpu")
            assert record["lm_loss_before"] == pretrain.estimate_lm_loss(plain, lm_val_ids, other, "cpu",
                                                                          other.eval_iters)
    rows_along = 2 * len(config.tasks) * len(train.SPLITS)  # two sequences' rows after each task, both splits
    assert len(calls) == 3 * (len(train.SPLITS) + rows_along)  # and the start rows once for each setting
