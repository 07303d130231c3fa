"""The whole pipeline on a tiny config: pretrain, SAEs, continual learning with every method, the report."""

import json
import math
import os
import shutil

import pytest
import torch

import report
import sae_stage
import train
from conftest import TINY_PIPELINE
from report import summarize_run

METHODS = ("seqft", "ewc", "si", "mas", "lwf", "o_lora", "sae_fd", "sae_guided", "freeze", "replay",
           "multitask")


@pytest.mark.plots
def test_pipeline_runs_every_method_and_reuses_its_stages(tmp_path, capsys, monkeypatch):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}"]
    assert train.main(argv) == 0
    run_dir = tmp_path / "default"
    for name in ("base.pt", "sae.pt", "pretrain.json", "sae.json", "summary.json", "report.md", "cl_matrix.png",
                 "cl_curves.png", "cl_bars.png", "forgetting.png", "knowledge.png", "sae_metrics.png"):
        assert (run_dir / name).exists(), name
    for method in METHODS:
        result = json.loads((run_dir / "cl" / f"{method}_seed0.json").read_text())
        rows = 2 if method == "multitask" else 3
        assert len(result["R"]) == rows and all(len(r) == 2 for r in result["R"])
        assert all(0.0 <= a <= 1.0 for r in result["R"] for a in r)
        assert result["aux_accuracy"] == []  # no instruction phase in TINY
        if method != "multitask":  # the forgetting diagnostic: after each task, one entry per earlier task
            first, second = result["diagnostic"]
            assert first == {} and list(second) == ["add"]
            for point in second["add"]["points"]["1"].values():  # every content token, and the answer positions
                assert point["drift_mask"] + point["drift_rest"] == pytest.approx(point["drift"], rel=1e-5)
            assert 0 <= second["add"]["format_confusion"] <= 1 and second["add"]["answer_kl"] >= 0
            # the one SAE point is the last, the stream the head reads: the answers' move attributed to its parts
            assert set(second["add"]["answer_attribution"]) == {"all", "error", "reconstruction", "own", "rest"}
            assert all(kl >= -1e-9 for kl in second["add"]["answer_attribution"].values())
            assert 0 <= second["add"]["mask_shared"]["1"] <= 1 + 1e-6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["sae_guided"]["diagnostic"]["kl_own"]) == 1  # after the second task, on the first
    assert list(summary) == list(METHODS)  # every method, in the registry's order
    n_params = 16_864  # the TINY model
    assert summary["seqft"]["retained_bytes"] == summary["lwf"]["retained_bytes"] == 0
    assert summary["freeze"]["retained_bytes"] == 0
    assert all("kept@2" in row and "forced_choice" in row for row in summary.values())
    assert summary["ewc"]["retained_bytes"] == 2 * 2 * n_params * 4  # (F, theta*) per task
    assert summary["si"]["retained_bytes"] == summary["mas"]["retained_bytes"] == 2 * n_params * 4  # one anchor
    assert summary["sae_guided"]["retained_bytes"] == 2 * 4 * 32 * 4  # 2 tasks x 1 point x d_sae floats
    assert summary["replay"]["retained_bytes"] > 0
    # O-LoRA brings rank-8 adapters of its own and keeps the first task's, frozen: A (8, in) and B (out, 8) for qkv
    # (32 -> 96), attention out (32 -> 32), MLP in (32 -> 128), MLP out (128 -> 32)
    n_adapter = (8 * 32 + 96 * 8) + (8 * 32 + 32 * 8) + (8 * 32 + 128 * 8) + (8 * 128 + 32 * 8)
    assert summary["o_lora"]["retained_bytes"] == n_adapter * 4
    # SAE-FD: 8 anchors per task, each its tokens (int64) and content mask (float32), and at every position its
    # k = 8 code values (float32) and indices (int64) at the one SAE point
    length = train.task_suite(train.parse_args(argv))["add"]["train"].x.size(1)
    assert summary["sae_fd"]["retained_bytes"] == 2 * 8 * length * (8 + 4 + 8 * (4 + 8))
    assert "| seqft |" in capsys.readouterr().out

    monkeypatch.setattr(report, "DRAW_PLOTS", False)  # drawn and checked once
    assert train.main(argv) == 0  # everything cached: nothing is retrained
    out = capsys.readouterr().out
    assert "pretrain: reusing" in out and "sae: reusing" in out
    assert out.count("cl: reusing") == len(METHODS) + 1  # every method's result, and the base model's reference

    os.remove(run_dir / "report.md")  # `python report.py out/<run>` rebuilds the report from JSON
    summarize_run(str(run_dir))
    assert (run_dir / "report.md").exists()


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_sae_checkpoint_for_another_model_is_refused(tmp_path):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--sae_steps=5", "--methods=sae_guided"]
    config = train.parse_args(argv)
    base = train.pretrain(config, "cpu")
    sae_checkpoint = sae_stage.train_sae_stage(config, "cpu", base)
    wider = train.parse_args(argv + ["--n_embd=64", "--out_dir=" + str(tmp_path / "wide")])
    wide_model = train.model_from_checkpoint(train.pretrain(wider, "cpu"), "cpu")
    with pytest.raises(ValueError, match="width 32.*n_embd=64"):
        sae_stage.load_saes(sae_checkpoint, wide_model, "cpu")


@pytest.mark.parametrize("option", ["--sae_guided_protect_past=true", "--sae_guided_mask_binary=true",
                                    "--sae_guided_codes=dense", "--sae_guided_reference=base",
                                    "--sae_guided_mask_random=true"])
@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_sae_guided_ablation_options_run_end_to_end(tmp_path, option):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=sae_guided", "--sae_guided_lambda_p=100", option]
    assert train.main(argv) == 0
    result = json.loads((tmp_path / "default" / "cl" / "sae_guided_seed0.json").read_text())
    key, value = option[2:].split("=")
    assert str(result["method_settings"][key]).lower() == value  # the option reached the run and is recorded
    assert len(result["R"]) == 3 and all(0.0 <= a <= 1.0 for r in result["R"] for a in r)
    masks = 2 * 4 * 32 * 4  # the masks: 2 tasks x 1 point x d_sae floats
    base_copy = 16_864 * 4 if key == "sae_guided_reference" else 0  # the frozen base is kept between tasks too
    assert result["retained_bytes"] == masks + base_copy


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_seqft_results_depend_on_the_saes_only_through_the_diagnostic(tmp_path, capsys):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft,sae_guided", "--diagnose=false"]
    assert train.main(argv) == 0
    capsys.readouterr()
    assert train.main(argv + ["--sae_steps=20"]) == 0  # other SAEs: SAE-guided is redone, seqft is not
    out = capsys.readouterr().out
    assert "seqft_seed0.json" in out.split("cl: reusing")[1]
    assert "sae_guided_seed0.json was made with a different" in out
    seqft = json.loads((tmp_path / "default" / "cl" / "seqft_seed0.json").read_text())
    assert seqft["diagnostic"] == []
    assert train.main(argv[:-1] + ["--sae_steps=20", "--cl_dir=diagnosed"]) == 0
    capsys.readouterr()
    assert train.main(argv[:-1] + ["--cl_dir=diagnosed"]) == 0  # the diagnostic measures in the SAEs' features
    assert "seqft_seed0.json was made with a different" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["cut", "nan", "no shared key", "ragged R"])
@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_a_damaged_result_file_is_named_and_redone(tmp_path, capsys, damage):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft", "--relearn_steps=", "--forced_choice_k=0",
                            "--diagnose=false"]
    assert train.main(argv) == 0
    path = tmp_path / "default" / "cl" / "seqft_seed0.json"
    result = json.loads(path.read_text())
    if damage == "cut":
        path.write_text('{"method": "seqft", "R": [[0.1')
    else:
        if damage == "nan":
            result["lm_loss_after"] = float("nan")  # json writes it as a bare NaN
        elif damage == "no shared key":
            del result["shared"]
        else:
            result["R"][1] = result["R"][1][:1]
        path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match="seqft_seed0.json is damaged"):
        summarize_run(str(tmp_path / "default"))  # `python report.py` names it
    capsys.readouterr()
    assert train.main(argv) == 0
    assert f"{path} is damaged" in capsys.readouterr().out
    assert report.result_problem(json.loads(path.read_text())) is None  # redone and whole again


def test_parallel_jobs_give_the_same_results_as_one_process(tmp_path, tiny_stages):
    argv = TINY_PIPELINE + ["--methods=seqft,ewc"]
    for out in ("one", "two"):  # the same base and SAEs: only the runs differ
        shutil.copytree(tiny_stages, tmp_path / out / "default")
    threads = torch.get_num_threads()
    assert train.main(argv + [f"--out_dir={tmp_path / 'one'}", "--jobs=1"]) == 0
    assert torch.get_num_threads() == threads  # the runs in this process used one thread, then gave it back
    assert train.main(argv + [f"--out_dir={tmp_path / 'two'}", "--jobs=2"]) == 0  # a run in each of two workers
    for name in ("seqft_seed0", "ewc_seed0"):
        one = json.loads((tmp_path / "one" / "default" / "cl" / f"{name}.json").read_text())
        two = json.loads((tmp_path / "two" / "default" / "cl" / f"{name}.json").read_text())
        assert one["R"] == two["R"] and one["retained_bytes"] == two["retained_bytes"]
        # every run on one thread, in the main process or a worker: the same floats to the last bit
        assert one["lm_loss_after"] == two["lm_loss_after"]


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_lora_fine_tuning_runs_every_method_on_the_adapters_only(tmp_path):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--finetune=lora", "--lora_rank=2",
                            "--methods=seqft,ewc,si,o_lora,sae_fd,sae_guided", "--sae_guided_reference=base"]
    assert train.main(argv) == 0
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    # one block of width 32, rank 2: A (2, in) and B (out, 2) for qkv (32 -> 96), attention out (32 -> 32),
    # MLP in (32 -> 128) and MLP out (128 -> 32)
    n_adapter = (2 * 32 + 96 * 2) + (2 * 32 + 32 * 2) + (2 * 32 + 128 * 2) + (2 * 128 + 32 * 2)
    assert summary["ewc"]["retained_bytes"] == 2 * 2 * n_adapter * 4  # (F, theta*) per task, adapters only
    assert summary["si"]["retained_bytes"] == 2 * n_adapter * 4
    assert summary["sae_guided"]["retained_bytes"] == 2 * 4 * 32 * 4  # the masks; the base costs no copy
    assert summary["o_lora"]["retained_bytes"] == n_adapter * 4  # the first task's adapters, frozen
    result = json.loads((tmp_path / "default" / "cl" / "seqft_seed0.json").read_text())
    assert result["shared"]["config"]["finetune"] == "lora" and len(result["R"]) == 3


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_content_tokens_without_the_template_reach_the_penalties(tmp_path):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=lwf,sae_guided", "--content_tokens=no_template"]
    assert train.main(argv) == 0
    for method in ("lwf", "sae_guided"):
        result = json.loads((tmp_path / "default" / "cl" / f"{method}_seed0.json").read_text())
        assert result["shared"]["config"]["content_tokens"] == "no_template" and len(result["R"]) == 3


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_relu_base_saes_run_through_the_pipeline_with_dense_codes(tmp_path):
    from sae import ReluSAE

    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft,sae_guided", "--sae_kind=relu",
                            "--sae_l1=0.01", "--sae_guided_codes=dense"]
    assert train.main(argv) == 0
    config = train.parse_args(argv)
    base = train.pretrain(config, "cpu")
    saes = sae_stage.load_saes(sae_stage.train_sae_stage(config, "cpu", base), train.model_from_checkpoint(base, "cpu"),
                           "cpu")
    assert all(isinstance(sae, ReluSAE) for sae in saes.values())
    by_k = json.loads((tmp_path / "default" / "sae.json").read_text())["by_k"]["8"]
    assert 0 < by_k["points"]["1"]["l0"] < 4 * 32  # L0 follows the L1 weight, not a fixed k
    assert by_k["train_dead_fraction"] == {}  # AuxK's dead count needs a k; a ReLU SAE has none
    assert json.loads((tmp_path / "default" / "cl" / "sae_guided_seed0.json").read_text())["R"]
    assert train.main(argv[:-1]) == 2  # cached sparse TopK codes need TopK SAEs: a one-line error


def spawned_workers(pid):
    """The pids of the pool workers (spawned processes) whose parent is pid."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and "spawn_main" in cmdline:
            found.append(int(entry))
    return found


def ignores_ctrl_c(pid):
    """Whether process pid ignores SIGINT now (its SigIgn mask in /proc): jobs.run_all does while it starts workers."""
    import signal

    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signal.SIGINT - 1)))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
@pytest.mark.usefixtures("pipeline_out")
def test_ctrl_c_is_one_line_and_no_worker_outlives_its_parent(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, os.path.join(root, "train.py"), *TINY_PIPELINE, f"--out_dir={tmp_path}",
            "--methods=seqft,ewc", "--seeds=0,1", "--jobs=2", "--steps_per_task=5000", "--diagnose=false"]

    def start_and_wait_for_workers():
        process = subprocess.Popen(argv, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        # until both workers run and the parent handles Ctrl-C again (jobs.run_all ignores it while they start)
        deadline = time.time() + 120
        while (len(spawned_workers(process.pid)) < 2 or ignores_ctrl_c(process.pid)) and time.time() < deadline:
            time.sleep(0.05)
        workers = spawned_workers(process.pid)
        if len(workers) != 2:  # say why, with the run's last words (it may have ended early)
            exit_status = process.poll()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # the whole group has ended already
                pass
            pytest.fail(f"{len(workers)} workers after 120 s (exit status {exit_status}); stderr ends: "
                        f"{process.communicate()[1][-2000:]}")
        return process, workers

    process, workers = start_and_wait_for_workers()
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted; rerun to resume"
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)

    process, workers = start_and_wait_for_workers()
    process.kill()  # kill -9 of the parent: no clean-up of its own can run
    process.wait()
    deadline = time.time() + 15
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)  # the workers saw it and ended


def test_a_run_on_test_measures_the_sequence_a_run_on_val_trained_and_gets_a_fresh_runs_numbers(
        tmp_path, tiny_stages, monkeypatch, capsys):
    """The sequence (training, R on both splits, the final model) is keyed without the eval split or the measures
    after it: a run on test after one on val trains nothing, and its result is, bit for bit, that of a test run made
    from scratch. With the diagnostic on (measured along the sequence, on the eval split) nothing is shared."""
    def answer_likelihood(model, split, device):  # in [0, 1], and moves with every weight, unlike a tiny model's 0.0
        with torch.no_grad():
            return math.exp(-model(split.x, split.y, split.answer_mask)[1].item())

    monkeypatch.setattr(train, "task_accuracy", answer_likelihood)
    argv = TINY_PIPELINE + ["--methods=seqft,o_lora", "--finetune=lora", "--lora_rank=2", "--diagnose=false"]
    for out in ("shared", "fresh"):
        shutil.copytree(tiny_stages, tmp_path / out / "default")
    learned, original = [], train.learn_sequence
    monkeypatch.setattr(train, "learn_sequence", lambda name, seed, **kw: learned.append(name) or original(
        name, seed, **kw))
    shared = argv + [f"--out_dir={tmp_path / 'shared'}"]
    assert train.main(shared + ["--eval_split=val", "--cl_dir=val"]) == 0
    assert learned == ["seqft", "o_lora"]
    capsys.readouterr()
    assert train.main(shared + ["--eval_split=test", "--cl_dir=test", "--relearn_steps=0,3"]) == 0
    assert learned == ["seqft", "o_lora"] and capsys.readouterr().out.count("sequences/") == 2  # both reused
    assert train.main(argv + [f"--out_dir={tmp_path / 'fresh'}", "--eval_split=test", "--relearn_steps=0,3"]) == 0
    assert learned == ["seqft", "o_lora"] * 2
    for method in ("seqft", "o_lora"):  # O-LoRA: a final model of two adapter sets, rebuilt from its weights
        val, test, fresh = (json.loads((tmp_path / out / "default" / folder / f"{method}_seed0.json").read_text())
                            for out, folder in (("shared", "val"), ("shared", "test"), ("fresh", "cl")))
        assert val["eval_split"] == "val" and test["eval_split"] == "test" and val["R"] != test["R"]  # R per split
        for field in ("R", "relearn", "relearn_shuffled", "forced_choice", "lm_loss_after", "retained_bytes"):
            assert test[field] == fresh[field], (method, field)
    assert train.main(shared + ["--eval_split=test", "--cl_dir=diagnosed", "--diagnose=true",
                                "--methods=seqft"]) == 0
    assert learned[-1] == "seqft" and len(learned) == 5


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_runs_that_share_a_sequence_are_one_job(tmp_path):
    """A method at a seed on val and on test (other measures too) trains one sequence, in one job: two runs of the
    pool never train the same sequence at once. The diagnostic, read along the sequence, keeps the eval split in
    its key."""
    from runs import runs_to_do

    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft", "--diagnose=false"]
    val = train.parse_args(argv + ["--eval_split=val", "--seeds=0", "--cl_dir=val"])
    test = train.parse_args(argv + ["--eval_split=test", "--seeds=0,1", "--cl_dir=test", "--relearn_steps=0,3"])
    diagnosed = train.parse_args(argv + ["--eval_split=val", "--seeds=0", "--cl_dir=d", "--diagnose=true"])
    base = train.pretrain(val, "cpu")
    sae_checkpoint = sae_stage.train_sae_stage(val, "cpu", base)
    jobs = [j for j in runs_to_do([val, test, diagnosed], "cpu", base, sae_checkpoint) if j["name"] == "seqft"]
    assert [(j["seed"], [r["config"].cl_dir for r in j["runs"]]) for j in jobs] == [(0, ["val", "test"]), (1, ["test"]),
                                                                                  (0, ["d"])]
    assert len({j["sequence_path"] for j in jobs}) == 3 and all(j["sequence_path"].endswith(".pt") for j in jobs)


@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_a_damaged_sequence_is_noticed_and_learned_again(tmp_path, monkeypatch, capsys):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft", "--diagnose=false"]
    assert train.main(argv) == 0
    (path,) = (tmp_path / "default" / "sequences").iterdir()
    saved = torch.load(path, weights_only=False)
    next(t for t in saved["model"].values() if t.is_floating_point()).view(-1)[0] += 1.0  # key and hash unchanged
    torch.save(saved, path)
    learned, original = [], train.learn_sequence
    monkeypatch.setattr(train, "learn_sequence", lambda name, seed, **kw: learned.append(name) or original(
        name, seed, **kw))
    capsys.readouterr()
    assert train.main(argv + ["--relearn_steps=0,3"]) == 0  # another measure: the run is redone from its sequence
    assert f"{path} is damaged (its model does not match its content hash); redoing it" in capsys.readouterr().out
    assert learned == ["seqft"]
