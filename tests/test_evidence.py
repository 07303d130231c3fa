"""The evidence analyses: the probe and its AUC, the collateral ratio, the features, memory by hand, the command."""

import dataclasses
import json

import pytest

import configurator as cfg
import jobs
import regularizers as reg
import train
from data.tasks import build_task_suite
from evidence import ablations, collateral, ground_truth, main as evidence_main, memory, probe, separability


@pytest.mark.plots
def test_memory_accounting_matches_a_hand_count_on_a_tiny_model(tmp_path):
    config = train.parse_args(["--n_layer=1", "--n_head=2", "--block_size=32", "--sae_expansion=4", "--sae_k=4",
                               "--tasks=add,reverse", "--n_train=40", "--n_val=4", "--n_test=4",
                               "--ewc_fisher_examples=4", "--mas_examples=4", "--sae_guided_mask_examples=8",
                               "--sae_guided_mask_knn=3", "--sae_fd_anchors=4", "--lora_rank=2",
                               "--replay_fraction=0.1"])
    full, lora = memory.memory_by_width(config, widths=(32,))
    # one block of width 32: embeddings (96 tokens, 32 positions), two LayerNorms, qkv, attention out, MLP in and
    # out, the final LayerNorm; the tied head counted once
    n_params = (96 * 32 + 32 * 32 + 2 * (2 * 32) + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128)
                + (128 * 32 + 32) + 2 * 32)
    assert full["n_params"] == lora["n_params"] == n_params
    # rank-2 adapters, A (2, in) and B (out, 2), on qkv (32 -> 96), attention out, MLP in (32 -> 128), MLP out
    adapter = (2 * 32 + 96 * 2) + (2 * 32 + 32 * 2) + (2 * 32 + 128 * 2) + (2 * 128 + 32 * 2)
    length = build_task_suite(["add", "reverse"], 40, 4, 4)["add"]["train"].x.size(1)  # the padded length
    for row, trained in ((full, n_params), (lora, adapter)):
        assert row["seqft"] == row["lwf"] == 0
        assert row["ewc"] == 2 * 2 * trained * 4  # (F, theta*) per task, float32
        assert row["si"] == row["mas"] == 2 * trained * 4  # one (w, theta*)
        assert row["sae_guided"] == 2 * 128 * 4  # a mask of d_sae = 4 * 32 floats per task at the one SAE point
        assert row["replay"] == 2 * 4 * 2 * length * 8  # 10% of 40 examples per task, tokens x and y, int64
        # 4 anchors per task: tokens (int64) and content mask (float32), and k = 4 code values (float32) and
        # indices (int64) at every position
        assert row["sae_fd"] == 2 * 4 * length * (8 + 4 + 4 * (4 + 8))
        assert row["o_lora"] == adapter * 4  # the first task's adapters, frozen
    memory.plot_memory([full, lora], tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 0
    table = memory.memory_table([full, lora])
    assert table.count("\n") == 3 and f"{full['ewc']:,}" in table  # header, rule, one row per regime


# ---------------------------------------------------------------------------------------------------------------
# the probe and its score

import torch  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402
from sae import SAEConfig, TopKSAE  # noqa: E402


def test_auc_matches_hand_counts_with_and_without_ties():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of the 4 pairs ordered right
    assert probe.auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # positives 1, 2 against the negative 1: a tie (1/2) and a win (1)
    assert probe.auc(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0, 1, 1])) == pytest.approx(0.75)
    assert probe.auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1, 1])) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        probe.auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))


def test_average_ranks_share_ties_column_by_column():
    scores = torch.tensor([[3.0, 0.0], [1.0, 0.0], [3.0, 5.0], [2.0, 0.0]])
    # column 0: 1 < 2 < 3 = 3, the tie sharing ranks 3 and 4; column 1: three zeros share ranks 1-3, then 5
    expected = torch.tensor([[3.5, 2.0], [1.0, 2.0], [3.5, 4.0], [2.0, 2.0]], dtype=torch.float64)
    assert torch.equal(probe.average_ranks(scores), expected)
    assert torch.equal(probe.average_ranks(scores[:, 0]), expected[:, 0])


def test_the_probe_reaches_the_minimum_of_its_objective_in_both_forms():
    generator = torch.Generator().manual_seed(3)
    for n, d in ((80, 5), (30, 60)):  # fewer features than examples (primal), more (in the examples' span)
        X = torch.randn(n, d, generator=generator, dtype=torch.float64)
        y = (X[:, 0] + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64) > 0).float()
        w, b = probe.fit_logistic(X, y, l2=0.05)
        w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        objective = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + 0.05 * w.square().sum()
        grad_w, grad_b = torch.autograd.grad(objective, (w, b))
        assert grad_w.abs().max() < 1e-8 and grad_b.abs() < 1e-8, (n, d)


def test_probe_auc_is_about_one_on_separable_data_and_one_half_with_shuffled_labels():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    X = torch.randn(400, 50, generator=generator)
    X[:, :3] += 2.0 * labels.unsqueeze(1)  # three informative dimensions among 50
    assert probe.cv_auc(X, labels) > 0.97
    shuffled = labels[torch.randperm(400, generator=generator)]
    assert abs(probe.cv_auc(X, shuffled) - 0.5) < 0.1


def test_best_unit_auc_finds_the_informative_unit_in_either_direction():
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(300) % 3 == 0
    X = torch.randn(300, 20, generator=generator)
    X[:, 7] -= 3.0 * labels  # lower for the positives: found by its sign
    score, unit = probe.best_unit_auc(X, labels)
    assert unit == 7 and score > 0.95
    score, _ = probe.best_unit_auc(torch.randn(300, 20, generator=generator), labels)
    assert score < 0.7  # chosen on one half, scored on the other: no selection bias towards 1


# ---------------------------------------------------------------------------------------------------------------
# collateral constraint


def test_collateral_ratio_is_one_for_a_protection_identical_on_both_tasks():
    free = torch.tensor([1.0, 2.0, 3.0, 4.0])
    protected = torch.tensor([0.1, 1.0, 3.0, 2.0])
    same = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert collateral.collateral_ratio(free, protected, same, same) == pytest.approx(1.0)
    # a protection that scales every drift alike is not selective either, whatever the two feature sets
    assert collateral.collateral_ratio(free, 0.3 * free, same, 1 - same) == pytest.approx(1.0)
    # a protection that holds A's features only: restriction 1 - (0.1 + 1) / 3 of A's, none of B's -> ratio 0
    assert collateral.restriction(free, protected, same) == pytest.approx(1 - 1.1 / 3)
    assert collateral.collateral_ratio(free, torch.tensor([0.1, 1.0, 3.0, 4.0]), same, 1 - same) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------------
# the analyses on a tiny model


def tiny_model_and_saes(width=16, layers=2):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=32, n_layer=layers, n_head=2, n_embd=width, dropout=0.0,
                          bias=True)).eval()
    saes = {p: TopKSAE(SAEConfig(width, 4 * width, 4)) for p in range(1, layers + 1)}
    return model, saes


def test_example_features_and_gradient_importance_have_one_row_per_example():
    model, saes = tiny_model_and_saes()
    split = build_task_suite(["add"], 6, 0, 0, block_size=32, template_is_content=False)["add"]["train"]
    features = separability.example_features(model, saes, split.x, split.content_mask, batch_size=4)
    assert features["sae"][1].shape == (6, 64) and features["neurons"][2].shape == (6, 64)
    assert features["residual"][2].shape == (6, 16)
    # the mean over the content tokens: one example by hand
    _, _, residuals = model(split.x[:1], read=(2,))
    m = split.content_mask[0].bool()
    assert torch.allclose(features["residual"][2][0], residuals[2][0, m].mean(0), atol=1e-6)
    grads = separability.gradient_importance(model, split, point=1)
    assert grads.shape == (6, 2 * 16 * 64) and (grads >= 0).all() and grads.sum() > 0


def test_ground_truth_lines_carry_each_variable_on_its_own_kind_of_line():
    texts, values = ground_truth.latent_lines(300, seed=0)
    assert len(texts) == 300 and all(len(v) == 300 for v in values.values())
    for text, person, digit in zip(texts, values["person"], values["digit"]):
        if person is not None:
            assert person in text
        if digit is not None:
            assert text.startswith(f"{digit} + ")
    assert sum(v is not None for v in values["mood"]) > 0


def test_ablation_variants_are_valid_configs_and_change_one_thing_each():
    config = train.parse_args(["--n_layer=2"])
    variants = ablations.ablation_variants(config)
    assert variants["point 1 only"] == ("sae_guided", {"sae_guided_points": (1,)})
    assert variants["reference: frozen base"] == ("sae_guided", {"sae_guided_reference": "base"})
    for method, settings in variants.values():
        assert len(settings) <= 1
        cfg.validate(dataclasses.replace(config, methods=(method,), **settings))
    assert len({ablations.slug(v) for v in variants}) == len(variants)  # each its own results folder


def test_parts_are_checked_and_the_rest_goes_to_the_run_config():
    parts, config = evidence_main.parse_args(["--parts=memory,ablations", "--n_embd=48"])
    assert parts == ("memory", "ablations") and config.n_embd == 48 and config.seeds == (0, 1, 2)
    assert evidence_main.parse_args(["--seeds=4"])[1].seeds == (4,)
    with pytest.raises(ValueError, match="--parts='memroy' is not valid; choose from: separability"):
        evidence_main.parse_args(["--parts=memroy"])


def test_weight_protection_freezes_exactly_the_protected_weights_and_collateral_runs_end_to_end():
    model, saes = tiny_model_and_saes()
    config = train.parse_args(["--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=32", "--steps_per_task=3",
                               "--cl_batch_size=4", "--diagnose_examples=4", "--ewc_fisher_examples=4",
                               "--sae_guided_mask_examples=8", "--sae_expansion=4", "--sae_k=4"])
    suite = build_task_suite(["add", "reverse"], 16, 2, 8, block_size=32, template_is_content=False)
    theta = reg.flat_parameters(model).detach().clone()
    protected = torch.zeros_like(theta)
    protected[::3] = 1.0
    method = collateral.ProtectWeights(config, model, protected, theta)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    method.after_step(model)
    moved = reg.flat_parameters(model).detach() != theta
    assert not moved[protected.bool()].any() and moved[~protected.bool()].all()
    model, saes = tiny_model_and_saes()  # an unperturbed model as task A's
    result = collateral.collateral(config, model, saes, suite, "add", "reverse", q=0.25)
    for name in ("weights", "features"):
        assert set(result[name]) == {"restriction_a", "restriction_b", "ratio"}
        assert all(torch.isfinite(torch.tensor(v)) for v in result[name].values())
    assert result["features_a"] > 0 and result["features_b"] > 0 and result["drift_free"] > 0


@pytest.mark.plots
@pytest.mark.usefixtures("pipeline_out")  # tmp_path holds the base model and SAEs already
def test_one_command_writes_every_part_with_its_plot_and_table(tmp_path, monkeypatch):
    from conftest import TINY_PIPELINE

    monkeypatch.setattr(evidence_main, "MEMORY_WIDTHS", (16, 32))
    monkeypatch.setattr(evidence_main, "ablation_variants", lambda config: {  # two variants: the loop, not the list
        "seqft (no penalty)": ("seqft", {}),
        "random mask, same mass": ("sae_guided", {"sae_guided_mask_random": True})})
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--seeds=0"]
    threads_seen, original = [], separability.separability
    monkeypatch.setattr(evidence_main, "separability", lambda *args, **kwargs: threads_seen.append(
        torch.get_num_threads()) or original(*args, **kwargs))
    threads = torch.get_num_threads()
    assert evidence_main.main(argv) == 0
    assert threads_seen == [1] and torch.get_num_threads() == threads  # an analysis on one thread, then all back
    out = tmp_path / "default" / "evidence"
    for part in evidence_main.PARTS:
        assert (out / f"{part}.json").exists() and (out / f"{part}.png").stat().st_size > 0
    report = (out / "evidence.md").read_text()
    assert all(f"## {part} (" in report for part in evidence_main.PARTS)
    separated = json.loads((out / "separability.json").read_text())
    assert separated["pairs"] == [["add", "reverse"]] and set(separated["auc"]) == {"sae", "neurons", "gradient"}
    ablated = json.loads((out / "ablations.json").read_text())
    assert set(ablated) == {"seqft (no penalty)", "random mask, same mass"}
    assert all(0.0 <= row["OP"][0] <= 1.0 and row["seeds"] == [0] for row in ablated.values())
    assert jobs.run_script(evidence_main.main, argv + ["--parts=nothing"]) == 2  # a bad part: a one-line error
    assert evidence_main.main(argv + ["--parts=memory"]) == 0  # one part again: the others' sections stay
    again = (out / "evidence.md").read_text()
    assert all(f"## {part} (" in again for part in evidence_main.PARTS) and "--parts=memory`" in again
    assert again.index("## separability") < again.index("## memory") < again.index("## ablations")
    assert jobs.run_script(evidence_main.main, argv + ["--tasks=add"]) == 2  # the analyses compare tasks


def test_collateral_over_seeds_takes_the_ratio_of_the_mean_restrictions():
    def result(a, b, pair, seed):
        values = {"restriction_a": a, "restriction_b": b, "ratio": b / a}
        return {"task_a": pair[0], "task_b": pair[1], "seed": seed, "weights": values, "features": values}

    results = [result(0.4, 0.2, ("x", "y"), 0), result(0.01, 0.05, ("y", "z"), 0),  # a pair that barely holds A
               result(0.6, 0.2, ("x", "y"), 1), result(0.03, 0.03, ("y", "z"), 1)]
    rows = collateral.collateral_over_seeds(results)
    assert rows[("x", "y")]["weights"]["restriction_a"][0] == pytest.approx(0.5)  # mean over the two seeds
    assert rows[("y", "z")]["weights"]["ratio"][0] == pytest.approx((5.0 + 1.0) / 2)
    everything = rows["all pairs"]["weights"]
    # seed 0: A 0.205, B 0.125 -> 0.6098; seed 1: A 0.315, B 0.115 -> 0.3651
    assert everything["restriction_a"][0] == pytest.approx((0.205 + 0.315) / 2)
    assert everything["ratio"][0] == pytest.approx((0.125 / 0.205 + 0.115 / 0.315) / 2)
