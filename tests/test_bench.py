"""The benchmark scripts that make the README's numbers, on tiny settings."""

import json

import pytest
import torch

import configurator as cfg
import jobs
import pretrain
import train
from bench import calibrate, frontier, sae_reg
from conftest import TINY
from evaluate import fvu
from sae import SAEConfig, make_sae

SAE_REG = TINY + ["--sae_steps=20", "--sae_tokens=2000", "--sae_batch_size=128", "--sae_expansion=2",
                  "--sae_reg_expansion=2", "--sae_reg_k=4"]


@pytest.mark.plots
def test_sae_reg_uses_each_seeds_corpus_throughout(tmp_path, monkeypatch):
    seen = []
    real_corpus = pretrain.corpus

    def recording_corpus(path, n_lines, seed, block_size):
        seen.append(seed)
        return real_corpus(path, n_lines, seed, block_size)

    monkeypatch.setattr(pretrain, "corpus", recording_corpus)
    sae_reg.main(SAE_REG + [f"--out_dir={tmp_path}", "--seeds=1", "--k=2,4", "--refit=true"])
    assert seen and set(seen) == {1}  # pretraining, the fresh SAEs and their metrics: all on seed 1's corpus
    results = json.loads((tmp_path / "default" / "sae_reg" / "sae_reg.json").read_text())
    for variant in ("normal", "regularized"):
        run = results[variant]["1"]
        assert run["val_ce"] > 0 and [r["label"] for r in run["sweep"]] == ["k=2", "k=4"]
        assert run["sweep"][1]["total_l0"] > run["sweep"][0]["total_l0"]
        assert run["norms_during_training"][-1]["iter"] == 60 and set(run["norms"]) == {"0", "1"}
        assert set(run["activations"]) == {"0", "1"} and run["unigram_ce"] > run["val_ce"]
        assert all(0 < a["mean_share"] < 1 and 0 < a["centered_rms"] < a["rms"] for a in run["activations"].values())
    for name in ("sae_reg_per_point.png", "sae_reg_compound.png", "sae_reg_norms.png", "sae_reg_activations.png",
                 "sae_reg.md"):
        assert (tmp_path / "default" / "sae_reg" / name).exists()
    assert "At matched total L0" in (tmp_path / "default" / "sae_reg" / "sae_reg.md").read_text()
    for variant in ("normal", "regularized"):  # each sweep point's SAEs beside least-squares decoders of their codes
        run = results[variant]["1"]
        assert [r["label"] for r in run["refit"]] == [r["label"] for r in run["sweep"]]
        for refit, own in zip(run["refit"], run["sweep"]):  # 20 steps of TopK: a decoder far from its codes' best
            assert refit["compound_refit"] != own["compound_ce_increase"] and set(refit["points"]) == {"0", "1"}
            assert all(refit["points"][p]["fvu_refit"] < own["points"][p]["fvu"] for p in ("0", "1"))
    assert "compound, refit" in (tmp_path / "default" / "sae_reg" / "sae_reg.md").read_text()


def test_resuming_a_sweep_reproduces_the_uninterrupted_result(tmp_path, monkeypatch):
    argv = SAE_REG + ["--seeds=0", "--k=2,4"]
    sae_reg.main(argv + [f"--out_dir={tmp_path / 'straight'}"])
    calls, real_train_sae = [], sae_reg.train_sae

    def interrupted(*args, **kwargs):  # the run dies in the second sweep point of the regularized model
        calls.append(kwargs["desc"])
        if len(calls) > 6:
            raise KeyboardInterrupt
        return real_train_sae(*args, **kwargs)

    monkeypatch.setattr(sae_reg, "train_sae", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sae_reg.main(argv + [f"--out_dir={tmp_path / 'resumed'}"])
    monkeypatch.setattr(sae_reg, "train_sae", lambda *a, **k: calls.append(k["desc"]) or real_train_sae(*a, **k))
    sae_reg.main(argv + [f"--out_dir={tmp_path / 'resumed'}"])
    assert calls[7:] == ["k=4 point 0", "k=4 point 1"]  # only the sweep point that was missing
    straight, resumed = (json.loads((tmp_path / d / "default" / "sae_reg" / "sae_reg.json").read_text())
                         for d in ("straight", "resumed"))
    for variant in ("normal", "regularized"):
        for a, b in zip(straight[variant]["0"]["sweep"], resumed[variant]["0"]["sweep"]):
            assert a["label"] == b["label"] and a["compound_ce_increase"] == b["compound_ce_increase"]
            assert a["points"] == b["points"]


def test_a_study_under_another_norm_shares_the_normal_model_and_the_routes_adapt_every_model(tmp_path):
    from bench import sae_adapt, sae_routes

    argv = SAE_REG + [f"--out_dir={tmp_path}", "--seeds=0", "--k=2"]
    sae_reg.main(argv)
    study = tmp_path / "default" / "sae_reg"
    normal_model = (study / "normal_seed0" / "base.pt").stat().st_mtime_ns
    sae_reg.main(argv + ["--sae_reg_norm=var"])
    assert (study / "normal_seed0" / "base.pt").stat().st_mtime_ns == normal_model  # shared, not trained again
    var = json.loads((study / "sae_reg_var.json").read_text())
    assert var["norm"] == "var" and var["normal"] == json.loads((study / "sae_reg.json").read_text())["normal"]
    assert var["regularized"]["0"]["val_ce"] != var["normal"]["0"]["val_ce"]  # its own model, regularized_var_seed0
    assert (study / "regularized_var_seed0" / "base.pt").exists() and (study / "sae_reg_var.md").exists()
    by_character = var["regularized"]["0"]["by_character"]
    assert set(by_character) == {"0", "1"} and 0 < by_character["1"]["variance_share"] <= 1  # points 0..n_layer
    assert "The character whose tokens hold the largest share" in (study / "sae_reg_var.md").read_text()
    assert "compound, refit" not in (study / "sae_reg_var.md").read_text()  # --refit is off by default
    assert not (study / "normal_seed0" / "sweep_0_refit.json").exists()

    # the routes: both studies' models reused, each adapted to its sweep point's SAEs
    models = {m: (study / m / "base.pt").stat().st_mtime_ns for m in ("normal_seed0", "regularized_seed0",
                                                                      "regularized_var_seed0")}
    sweeps = (study / "regularized_var_seed0" / "sweep_0.json").stat().st_mtime_ns
    assert jobs.run_script(sae_routes.main, argv + ["--norms=norm,var", "--adapt_steps=2"]) == 0
    assert models == {m: (study / m / "base.pt").stat().st_mtime_ns for m in models}
    assert (study / "regularized_var_seed0" / "sweep_0.json").stat().st_mtime_ns == sweeps
    runs = json.loads((study / "routes.json").read_text())
    assert set(runs) == {f"{m}{a}" for m in ("normal", "regularized (norm)", "regularized (var)")
                         for a in ("", " + adapted")}
    sweep_point = json.loads((study / "normal_seed0" / "sweep_0.json").read_text())
    assert runs["normal"]["0"][0]["compound"] == sweep_point["compound_ce_increase"]
    adapted = study / "normal_seed0" / "sae_adapt" / "all_all_sweep_0.json"
    result = json.loads(adapted.read_text())
    before, after = result["before"], result["after"]  # the spliced adapted model against the model it started as
    assert runs["normal + adapted"]["0"][0]["compound"] == pytest.approx(
        after["clean_ce"] + after["compound_ce_increase"] - before["clean_ce"])
    assert runs["normal + adapted"]["0"][0]["minutes"] == pytest.approx(
        runs["normal"]["0"][0]["minutes"] + result["seconds"] / 60)  # the model, then its adaptation
    assert "| regularized (var) + adapted | 1 |" in (study / "routes.md").read_text()
    assert jobs.run_script(sae_routes.main, argv + ["--norms=", "--adapt_steps=2"]) == 0  # the normal model alone
    alone = json.loads((study / "routes.json").read_text())
    assert alone == {route: runs[route] for route in ("normal", "normal + adapted")}  # read, not made again

    normal = SAE_REG + [f"--out_dir={tmp_path}", "--sae_reg_lambda=0", "--run=default/sae_reg/normal_seed0",
                        f"--saes={study / 'normal_seed0' / 'sweep_0.pt'}"]
    written = adapted.stat().st_mtime_ns
    sae_adapt.main(normal + ["--adapt_steps=2"])  # the same model, SAEs and keys: read, not adapted again
    assert adapted.stat().st_mtime_ns == written
    assert result["before"]["compound_ce_increase"] == pytest.approx(sweep_point["compound_ce_increase"])
    assert result["after"]["total_l0"] == result["before"]["total_l0"] and result["steps"] == 2  # TopK: L0 fixed
    assert result["kl_by_tenth"] == pytest.approx([result["loss_first"], result["loss_last"]])  # 2 steps: 2 tenths
    sae_adapt.main(normal + ["--adapt_steps=3"])  # another key: adapted again
    assert json.loads(adapted.read_text())["steps"] == 3
    with pytest.raises(ValueError, match="trained on another model"):
        sae_adapt.main(normal[:-1] + [f"--saes={study / 'regularized_seed0' / 'sweep_0.pt'}"])
    for key in ("--saes=x.pt", "--refit=true"):
        with pytest.raises(ValueError, match=f"{key.split('=')[0]} is not a key of this script"):
            sae_routes.parse(argv + [key])
    with pytest.raises(ValueError, match="--norms='l2' is not valid; choose from: norm, norm2, var"):
        sae_routes.parse(argv + ["--norms=l2"])


def test_a_budget_run_retrains_the_sweeps_sae_bit_for_bit_and_caches_each_step_count(tmp_path, monkeypatch):
    from bench import sae_budget

    argv = SAE_REG + [f"--out_dir={tmp_path}", "--seeds=0", "--k=2", "--budget_point=1"]
    assert jobs.run_script(sae_budget.main, argv + ["--budget_steps=20,40"]) == 0  # the sweep's SAEs: 20 steps
    folder = tmp_path / "default" / "sae_reg" / "normal_seed0"
    sweep = json.loads((folder / "sweep_0.json").read_text())["points"]["1"]
    same = json.loads((folder / "budget_0_point1_20.json").read_text())
    assert [same[m] for m in ("fvu", "l0", "ce_increase")] == [sweep[m] for m in ("fvu", "l0", "ce_increase")]
    longer = json.loads((folder / "budget_0_point1_40.json").read_text())
    assert longer["steps"] == 40 and [s for s, _ in longer["training_fvu"]] == [0, 39]  # logged every 100 and last
    assert longer["training_fvu"][-1][1] < longer["training_fvu"][0][1]  # its training lowers its FVU
    curve = [[s, 1.0] for s in range(0, 901, 100)] + [[999, 1.0]]
    assert [s for s, _ in sae_budget.tenths(curve, 1000)] == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]
    assert [s for s, _ in sae_budget.tenths(curve[::3], 1000)] == [0, 300, 600, 900]  # the nearest that is logged
    assert not (folder.parent / "regularized_seed0").exists()  # only the model asked for
    trained, real_train_sae = [], sae_budget.train_sae
    monkeypatch.setattr(sae_budget, "train_sae", lambda *a, **k: trained.append(k["steps"]) or real_train_sae(*a, **k))
    sae_budget.main(argv + ["--budget_steps=20,40,60"])
    assert trained == [60]  # 20 and 40 steps read from their files
    table = (folder.parent / "budget_normal_0_point1.md").read_text()
    assert "| 20 (the sweep's, reproduced) |" in table and "| 60 |" in table
    for key, message in (("--budget_point=2", "--budget_point=2: the residual points are 0..1"),
                         ("--budget_sweep_point=1", "--budget_sweep_point=1: the sweep has points 0..0"),
                         ("--budget_steps=", "--budget_steps needs at least one step count"),
                         ("--budget_steps=0", "--budget_steps=0: must be at least 1"),
                         ("--budget_model=joint", "--budget_model='joint' is not valid"),
                         ("--refit=true", "--refit is not a key of this script")):
        with pytest.raises(ValueError, match=message):
            sae_budget.parse(argv + [key])


def test_the_variance_held_by_one_token_is_computed_as_by_hand():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.0]])  # mu = (0.5, 0): 0.25, 0.25, 2.25, 0.25
    assert sae_reg.variance_by_token(x, torch.tensor([5, 6, 7, 6])) == pytest.approx(
        {"token": 7, "variance_share": 2.25 / 3.0, "token_share": 0.25})
    x = torch.tensor([[1.0], [1.0], [3.0], [3.0]])  # every token the same distance from the mean: ties go to the first
    assert sae_reg.variance_by_token(x, torch.tensor([2, 4, 2, 4])) == pytest.approx(
        {"token": 2, "variance_share": 0.5, "token_share": 0.5})


def test_the_least_squares_decoder_recovers_a_linear_decoder_and_undoes_a_shrunk_one():
    torch.manual_seed(0)
    z = torch.relu(torch.randn(400, 6)) * (torch.rand(400, 6) < 0.5)  # sparse non-negative codes
    z[:, 5] = 0.0  # a latent that never fires
    W, c = torch.randn(6, 3), torch.randn(3)
    x = z @ W + c
    chunks = [(z[:150], x[:150]), (z[150:], x[150:])]  # accumulated chunk by chunk
    W_fit, c_fit = sae_reg.least_squares_decoder(chunks)
    assert torch.allclose(W_fit[:5], W[:5], atol=1e-4) and torch.allclose(c_fit, c, atol=1e-4)
    assert W_fit[5].abs().max() < 1e-6  # the latent that never fires gets no weight

    sae = make_sae(SAEConfig(d_in=3, d_sae=6, k=0, kind="relu", l1=0.0))
    x = torch.randn(300, 3)
    with torch.no_grad():
        own = fvu(x, sae(x))
        sae.W_dec.mul_(0.5)  # a shrunk decoder: its reconstructions half the size they were
        shrunk = fvu(x, sae(x))
        refit = sae_reg.RefitDecoder(sae, *sae_reg.least_squares_decoder([(sae.encode(x), x)]))
        xhat, z = refit.reconstruct(x)
    assert torch.equal(z, sae.encode(x)) and fvu(x, xhat) < min(own, shrunk)  # same codes, a better decoder
    assert fvu(x, refit(x)) == pytest.approx(fvu(x, xhat))
    W_fit, c_fit = sae_reg.least_squares_decoder([(torch.zeros(10, 4), torch.ones(10, 2))])  # no latent fires
    assert torch.equal(W_fit, torch.zeros(4, 2)) and torch.allclose(c_fit, torch.ones(2))


def test_routes_are_compared_where_every_curve_reaches_and_marked_where_one_does_not():
    from bench import sae_routes

    def run(*points):  # (total L0, compound CE increase) per sweep point
        return [{"total_l0": l0, "compound": ce, "clean_ce": 1.5, "spliced_ce": 1.5 + ce, "minutes": 2.0}
                for l0, ce in points]

    runs = {"normal": {0: run((100, 3.0), (200, 2.0)), 1: run((120, 3.0), (220, 1.0))},
            "normal + adapted": {0: run((150, 1.0), (250, 0.5))}}
    assert sae_routes.matched_l0s(runs) == [200, 175, 150]  # the range every curve covers: 150..200
    assert sae_routes.at_l0(runs["normal"], 150, "compound") == pytest.approx((2.45, 0.05 * 2 ** 0.5))  # 2.5, 2.4
    runs["regularized (var)"] = {0: run((20, 4.0), (40, 3.5))}  # no L0 in common with the others
    assert sae_routes.matched_l0s(runs) == [200, 160, 120]  # then the normal model's range, 120..200
    assert all(sae_routes.at_l0(runs["normal"], l0, "compound") for l0 in (200, 160, 120))
    assert sae_routes.at_l0(runs["normal + adapted"], 120, "compound") is None  # it starts at 150
    assert "| regularized (var) | 1 | outside its sweep | outside its sweep | outside its sweep |" in sae_routes.table(
        runs)
    assert sae_routes.matched_l0s({"normal": {0: run((100, 3.0), (120, 2.0)), 1: run((130, 3.0), (150, 2.0))}}) == []


def test_the_gpt_circuits_preset_and_sweep_are_the_original_numbers():
    config = train.parse_args(["--preset=gpt_circuits"])
    assert (config.n_layer, config.n_embd, config.n_head, config.block_size) == (4, 64, 4, 128)
    assert (config.batch_size, config.max_iters, config.lr, config.min_lr) == (128, 15_000, 1e-3, 1e-5)
    assert (config.sae_reg_lambda, config.sae_reg_kind, config.sae_reg_norm) == (3.0, "relu", "norm")
    assert config.sae_reg_widths == (512, 512, 2048, 4096, 4096)
    assert config.sae_reg_l1 == (0.020, 0.035, 0.085, 0.07, 0.075)
    joint = pretrain.joint_sae_configs(config)
    assert [joint[p].d_sae for p in range(5)] == [512, 512, 2048, 4096, 4096] and joint[2].l1 == 0.085
    normal = sae_reg.l1_sweep("normal", 8)
    assert len(normal) == 8 and normal[0] == (0.0021, 0.0175, 0.056, 0.09, 0.275)
    assert normal[-1] == pytest.approx((0.009, 0.105, 0.33, 0.39, 0.87))
    assert sae_reg.l1_sweep("regularized", 8)[0] == (0.0005, 0.002, 0.006, 0.010, 0.02)
    assert (sae_reg.ORIGINAL["sae_steps"], sae_reg.ORIGINAL["sae_batch_size"]) == (7500, 128 * 128)


def test_the_original_sweep_trains_relu_saes_of_its_widths(tmp_path):
    argv = [a for a in SAE_REG if not a.startswith("--n_layer")] + [
        "--n_layer=4", "--max_iters=20", "--eval_interval=10", "--sae_reg_kind=relu",
        "--sae_reg_l1=0.02,0.035,0.085,0.07,0.075", "--sae_reg_widths=8,8,16,32,32", "--sae_reg_lambda=3",
        "--seeds=0", "--sweep=original", "--sweep_points=2", "--sweep_steps=5", "--sweep_batch_size=64",
        f"--out_dir={tmp_path}"]
    sae_reg.main(argv)
    results = json.loads((tmp_path / "default" / "sae_reg" / "sae_reg.json").read_text())
    assert results["sweep"] == "original" and results["lambda"] == 3.0
    labels = [r["label"] for r in results["regularized"]["0"]["sweep"]]
    assert labels == ["l1=0.0005,0.002,0.006,0.01,0.02", "l1=0.0055,0.014,0.044,0.048,0.06"]
    assert sorted(results["normal"]["0"]["sweep"][0]["points"]) == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("argv, message", [(["--k=0"], "--k=0: must be at least 1"),
                                           (["--k=999"], "each k must be in 1..d_sae"),
                                           (["--sweep=kk"], "--sweep='kk' is not valid; choose from: k, original"),
                                           (["--seeds="], "need at least one value"),
                                           (["--n_layr=2"], "unknown config key --n_layr")])
def test_sae_reg_options_are_checked_before_anything_is_trained(tmp_path, capsys, argv, message):
    assert jobs.run_script(sae_reg.main, SAE_REG + [f"--out_dir={tmp_path}", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "default").exists()


@pytest.mark.parametrize("final_first, lost, fits", [(0.5, (0.3, 0.8), True), (0.0, (0.3, 0.8), False),
                                                     (0.75, (0.3, 0.8), False), (0.75, (0.2, 0.8), True)])
def test_a_calibration_point_fits_only_with_partial_forgetting(tmp_path, final_first, lost, fits):
    # two tasks, both learned (R[t][t] = 1); BWT = R[2][0] - R[1][0] = final_first - 1
    seqft = {"tasks": ["add", "sort"], "R": [[0, 0], [1, 0], [final_first, 1]], "aux_accuracy": [0.5, 0.2, 0.0],
             "diagnostic": [{}, {"add": {"format_confusion": 0.25}}]}
    multitask = {"tasks": ["add", "sort"], "R": [[0, 0], [0.9, 1.0]], "aux_accuracy": []}
    (tmp_path / "seqft_seed0.json").write_text(json.dumps(seqft))
    (tmp_path / "multitask_seed0.json").write_text(json.dumps(multitask))
    row = calibrate.read_point(str(tmp_path), [0], calibrate.Options(lost=lost))
    assert row["multitask_avg"] == pytest.approx(0.95) and min(row["seqft_diagonal"]) == 1
    assert row["seqft_format_confusion"] == 0.25  # after the last task, on the earlier one
    assert row["seqft_bwt"] == pytest.approx(final_first - 1)
    assert row["seqft_aux"] == [0.5, 0.2, 0.0] and row["fits"] is fits


def test_the_estimate_times_each_stage_and_trains_nothing_it_keeps(tmp_path, capsys):
    sae_reg.main(SAE_REG + [f"--out_dir={tmp_path}", "--k=2", "--estimate=true"])
    out = capsys.readouterr().out
    for stage in ("pretrain normal", "pretrain regularized", "fresh SAEs of one sweep point"):
        assert f"{stage}: " in out and " s per step" in out
    assert "one seed (two models, 60 steps each, and their sweeps): about" in out
    assert not (tmp_path / "default" / "sae_reg" / "sae_reg.json").exists()  # no study was run


def test_the_cpu_preset_is_the_original_but_for_the_compute_it_shrinks():
    original, cpu = cfg.PRESETS["gpt_circuits"], cfg.PRESETS["gpt_circuits_cpu"]
    shrunk = {key for key in set(original) | set(cpu) if original.get(key) != cpu.get(key)}
    assert shrunk == {"batch_size", "max_iters", "warmup_iters", "eval_iters", "sae_reg_widths", "sae_tokens"}
    assert cpu["batch_size"] < original["batch_size"] and cpu["max_iters"] < original["max_iters"]
    assert cpu["sae_reg_widths"] == (512,) * 5 and cpu["sae_tokens"] < original["sae_tokens"]
    config = cfg.parse_args(["--preset=gpt_circuits_cpu"])  # the model, SAE kind, lambda and L1s: the original's
    assert (config.n_layer, config.n_embd, config.block_size, config.sae_reg_lambda) == (4, 64, 128, 3.0)
    assert (config.sae_reg_kind, config.sae_reg_l1) == ("relu", (0.020, 0.035, 0.085, 0.07, 0.075))
    options = sae_reg.Options(sweep="original", sweep_points=4, sweep_steps=3000, sweep_batch_size=4096)
    points = sae_reg.sweep(config, options, "normal")
    assert len(points) == 4 and points[0][1][2].d_sae == 512 and points[0][2]["warmup"] == 300
    assert points[0][1][0].l1 == 0.0021 and points[-1][1][4].l1 == pytest.approx(0.87)  # the original's range


def test_unigram_ce_by_hand():
    # train counts of tokens 0..3 with add-one: (2 + 1, 0 + 1, 1 + 1, 0 + 1) / 7 (token 3 never seen); held out: 0, 1
    expected = -(torch.log(torch.tensor(3 / 7)) + torch.log(torch.tensor(1 / 7))).item() / 2
    assert sae_reg.unigram_ce([0, 0, 2], [0, 1], 4) == pytest.approx(expected)


def sweep_result(*points):
    return {"sweep": [{"total_l0": l0, "compound_ce_increase": ce} for l0, ce in points]}


def test_matched_l0_reads_every_curve_over_the_range_all_cover():
    results = {"normal": {"0": sweep_result((100, 3.0), (200, 2.0)), "1": sweep_result((220, 1.0), (120, 3.0))},
               "regularized": {"0": sweep_result((150, 2.0), (250, 1.0)), "1": sweep_result((90, 2.5), (210, 1.3))}}
    high, middle, low = sae_reg.at_matched_l0(results)
    assert (high["l0"], middle["l0"], low["l0"]) == (200, 175, 150)  # smallest largest L0 .. largest smallest L0
    # at 200, normal: seed 0 ends at 2.0; seed 1 between (120, 3.0) and (220, 1.0): 3.0 - 2.0 * 80 / 100 = 1.4
    assert high["normal"][0] == pytest.approx((2.0 + 1.4) / 2)
    # regularized: 2.0 - 1.0 * 50 / 100 = 1.5 and 2.5 - 1.2 * 110 / 120 = 1.4
    assert high["regularized"][0] == pytest.approx((1.5 + 1.4) / 2)
    # at 175, normal: 3.0 - 75 / 100 = 2.25 and 3.0 - 2.0 * 55 / 100 = 1.9 (std of the two: 0.35 / sqrt 2)
    assert middle["normal"][0] == pytest.approx((2.25 + 1.9) / 2)
    assert middle["normal"][1] == pytest.approx(0.35 / 2**0.5)
    # at 150, normal: 3.0 - 50 / 100 = 2.5 and 3.0 - 2.0 * 30 / 100 = 2.4
    # regularized: 2.0 (seed 0's first point) and 2.5 - 1.2 * 60 / 120 = 1.9
    assert low["normal"][0] == pytest.approx(2.45) and low["regularized"][0] == pytest.approx((2.0 + 1.9) / 2)
    apart = {"normal": {"0": sweep_result((10, 1.0), (20, 0.5))},
             "regularized": {"0": sweep_result((30, 1.0), (40, 0.5))}}
    assert sae_reg.at_matched_l0(apart) == []
    # the ends are read exactly where the curves start and stop, whatever the rounding of high - (high - low)
    low, high = 114.15918208712814, 667.2505084667708
    wide = {v: {"0": sweep_result((low, 2.0), (high, 1.0))} for v in ("normal", "regularized")}
    assert [m["l0"] for m in sae_reg.at_matched_l0(wide)][::2] == [high, low]
    with pytest.raises(ValueError, match="outside"):
        sae_reg.interpolate([(10, 1.0), (20, 0.5)], 25)


def test_a_sweep_point_is_keyed_on_the_code_that_trains_and_measures_it(tmp_path, monkeypatch):
    """An edit inside fresh_sae_sweep (or the SAE stage's code) redoes the sweep points; an edit of the script's
    tables or plots does not."""
    import shutil

    import cache

    copy = tmp_path / "project"
    shutil.copytree(cache.ROOT, copy, ignore=shutil.ignore_patterns("out", ".git", "__pycache__", "tests", "*.tmp"))
    monkeypatch.setattr(cache, "ROOT", str(copy))
    config = cfg.parse_args(SAE_REG)
    key = lambda: sae_reg.sweep_point_key(config, {"saes": {}}, "cpu", {"sha": "b"})  # noqa: E731
    before = key()

    def edit_inside(function):
        path = copy / "bench" / "sae_reg.py"
        head, rest = path.read_text().split(f"def {function}(", 1)
        signature, body = rest.split("\n", 1)
        path.write_text(f"{head}def {function}({signature}\n    # an edit\n{body}")

    edit_inside("table")
    assert key() == before
    edit_inside("fresh_sae_sweep")
    assert key() != before
    assert "data/world.py" not in cache.stage_code(cfg.parse_args(["--corpus=x.txt"]), "pretrain")
    assert "data/tasks.py" not in cache.stage_code(cfg.parse_args([]), "pretrain")  # no instruction phase: no tasks
    assert "data/tasks.py" in cache.stage_code(cfg.parse_args(["--instruct_tags=4"]), "pretrain")


def test_matched_points_take_the_nearest_plasticity_on_a_hand_made_set():
    curves = {"ewc": [(10, 0.9), (100, 0.6), (1000, 0.3)], "sae_guided": [(1e2, 0.95), (1e4, 0.85), (1e6, 0.2)],
              "flat": [(1, 0.5), (2, 0.5)]}
    matched = frontier.matched_points(curves, reference=1.0, levels=(0.5, 0.8))
    assert matched[0.5] == {"ewc": (100, 0.6), "sae_guided": (1e6, 0.2), "flat": (1, 0.5)}  # |0.2-0.5| < |0.85-0.5|
    assert matched[0.8] == {"ewc": (10, 0.9), "sae_guided": (1e4, 0.85), "flat": (1, 0.5)}  # a tie: the first
    assert frontier.matched_points(curves, reference=0.5, levels=(1.0,))[1.0]["ewc"] == (100, 0.6)
    assert frontier.beyond_spread({"r": 0.5, "r_std": 0.1}, {"r": 0.2, "r_std": 0.1}, "r") == "more"
    assert frontier.beyond_spread({"r": 0.35, "r_std": 0.1}, {"r": 0.2, "r_std": 0.1}, "r") == "within"
    assert frontier.reaches(0.55, 0.5, 1.0) and not frontier.reaches(0.61, 0.5, 1.0)  # REACH = 0.1 of plasticity
    assert frontier.strength_values(["ewc=1:10", "si=0.5"]) == {"ewc": (1.0, 10.0), "si": (0.5,)}
    for bad, message in (("ewc=1:x", "is not method=v1:v2"), ("seqft=1", "has no strength")):
        with pytest.raises(ValueError, match=message):
            frontier.strength_values([bad])


def test_a_point_that_does_not_reach_its_level_is_tabled_without_test_numbers():
    result = {"seqft_val_plasticity": 1.0, "columns": [("BWT + 1", "retention")],
              "seqft": {"plasticity": 0.9, "plasticity_std": 0.01, "retention": 0.1, "retention_std": 0.01},
              "matched": {"0.5": {"ewc": {"value": 10, "val_plasticity": 0.52, "plasticity": 0.5, "plasticity_std":
                                          0.02, "retention": 0.6, "retention_std": 0.05},
                                  "sae_guided": {"value": 1e7, "val_plasticity": 0.85}}}}
    table = frontier.frontier_table(result)
    assert "| sae_guided | 1e+07 | 0.850 (not reached) | - | - | - |" in table
    assert "| ewc | 10 | 0.520 | 0.500 ± 0.020 | 0.600 ± 0.050 | - |" in table  # nothing to compare it with


@pytest.mark.plots
def test_the_frontier_script_runs_end_to_end_on_a_tiny_config(tmp_path, monkeypatch):
    from regularizers import METHODS

    monkeypatch.setattr(METHODS["ewc"], "strength", ("ewc_lambda", (1.0,)))
    argv = TINY + [f"--out_dir={tmp_path}", "--sae_steps=20", "--sae_tokens=2000", "--sae_batch_size=128",
                   "--sae_expansion=2", "--tasks=add,reverse", "--steps_per_task=4", "--n_train=32", "--n_val=8",
                   "--n_test=8", "--relearn_steps=0,2", "--diagnose=false", "--jobs=1", "--methods=ewc,freeze",
                   "--levels=1.0", "--final_seeds=0"]
    monkeypatch.setattr(METHODS["freeze"], "strength", ("freeze_layers", (1, 2)))
    calls, original = [], train.continual_learning_many
    monkeypatch.setattr(train, "continual_learning_many", lambda configs, *args, **kwargs: calls.append(
        [c.cl_dir for c in configs]) or original(configs, *args, **kwargs))
    assert jobs.run_script(frontier.main, argv) == 0
    # seqft's test in the sweep's pool
    assert calls[0][-1] == "frontier/test/seqft" and "frontier/val/seqft" in calls[0]
    result = json.loads((tmp_path / "default" / "frontier" / "frontier.json").read_text())
    assert set(result["sweep"]) == {"ewc", "freeze"} and len(result["sweep"]["ewc"]) == 1
    assert [r["value"] for r in result["sweep"]["freeze"]] == [1]  # 2 blocks: more than the model has
    for level in ("1.0",):
        for method, row in result["matched"][level].items():
            assert row["value"] in [r["value"] for r in result["sweep"][method]] and row["seeds"] == [0]
    assert (tmp_path / "default" / "frontier" / "frontier.png").exists()
    assert not list((tmp_path / "default" / "frontier").glob("*/*/*.png"))  # no run folder's own plots
    assert (tmp_path / "default" / "frontier" / "test" / "seqft" / "summary.json").exists()
    assert "| ewc |" in (tmp_path / "default" / "frontier" / "frontier.md").read_text()


def test_adapting_to_the_saes_starts_at_the_identity_and_lowers_the_kl(tmp_path):
    from bench import sae_adapt
    from sae import SAEConfig, TopKSAE

    config = cfg.parse_args(TINY + [f"--out_dir={tmp_path}", "--lora_rank=4"])
    model = train.model_from_checkpoint(train.pretrain(config, "cpu"), "cpu")
    torch.manual_seed(0)
    saes = {1: TopKSAE(SAEConfig(32, 64, 4)).requires_grad_(False)}  # an untrained SAE: a large KL to close
    x = torch.randint(0, 96, (4, 32))
    assert sae_adapt.adaptation_loss(model, {1: lambda h: h}, x).item() == 0.0  # an exact reconstruction
    original = model(x)[0]
    sae_adapt.add_adapters(model, config)
    assert torch.equal(model(x)[0], original)  # the adapters start as the identity
    teacher = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    sae_weights = saes[1].W_dec.detach().clone()
    options = sae_adapt.Options(adapt_steps=30, adapt_lr=1e-2, adapt_batch_size=8)
    losses = sae_adapt.adapt(model, saes, train.corpus_of(config)[0], options, config, "cpu")
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5])  # the spliced model moves towards the original (0.16 -> 0.12)
    assert all(torch.equal(p, teacher[n]) for n, p in model.named_parameters() if n in teacher)  # frozen
    assert torch.equal(saes[1].W_dec, sae_weights)
    with model.adapters_off():
        assert torch.equal(model(x)[0], original)  # the teacher is the original, untouched


def test_adapters_after_a_point_leave_the_blocks_before_it_frozen(tiny_model):
    from bench import sae_adapt

    config = cfg.parse_args(["--lora_rank=4"])
    sae_adapt.add_adapters(tiny_model, config, first_point=1, layers="after")
    learning = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert learning and all(n.startswith("blocks.1.") for n in learning)  # block 1 reads point 1; block 0 does not
    with pytest.raises(ValueError, match="--adapt_points: no SAE at point 5"):
        sae_adapt.spliced({1: None, 2: None}, (5,))
    assert list(sae_adapt.spliced({1: None, 2: None}, ())) == [1, 2]


@pytest.mark.usefixtures("pipeline_out")
def test_step_cost_times_seqft_with_the_head_everywhere_and_the_adapters_thin_too_and_leaves_the_fold_on(
        tmp_path, capsys, monkeypatch):
    from bench import step_cost
    from conftest import TINY_PIPELINE
    from model import LoRALinear

    monkeypatch.setattr(step_cost, "STEPS", 3)
    assert jobs.run_script(step_cost.main, TINY_PIPELINE + [f"--out_dir={tmp_path}", "--finetune=lora"]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if "ms per step" in line] == [
        "seqft", "sae_guided", "seqft, head everywhere", "seqft, adapters thin"]
    assert "SAE-guided's penalty" in out and LoRALinear.fold


def test_eval_cost_times_both_paths_under_lora_and_leaves_the_fold_on(tmp_path, capsys):
    from bench import eval_cost
    from model import LoRALinear

    argv = TINY + [f"--out_dir={tmp_path}", "--tasks=add,reverse", "--n_train=20", "--n_val=8", "--n_test=8",
                   "--finetune=lora", "--forced_choice_k=2"]
    assert jobs.run_script(eval_cost.main, argv) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "one row of R" in line]
    assert [line.split(":")[0] for line in lines] == ["adapters folded", "adapters as thin products"]
    assert LoRALinear.fold
    assert "a sequence's start measures" in out
