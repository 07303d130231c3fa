"""The reference solutions of docs/exercises.md (solutions/), each run once on the tiny config, with the numbers the
exercises say a student should get."""

import json
from types import SimpleNamespace

import pytest
import torch

import configurator as cfg
import regularizers as reg
import sae_stage
import train
from conftest import TINY, TINY_PIPELINE
from data.tasks import constant_guess, make_splits
from solutions import attribution, l2init, plural, relearn_area, restored, tag_anchor, var_norm

RUN = [a for a in TINY_PIPELINE if not a.startswith("--methods=")] + ["--diagnose=false"]


@pytest.fixture
def installs():
    """What a solution's main puts in place, taken back after the test."""
    with restored():
        yield


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("solutions")  # one base model and SAE for every test here


def test_l2init_penalty_by_hand_and_its_run(installs, out_dir, tiny_model):
    method = l2init.L2Init(SimpleNamespace(l2init_strength=3.0), tiny_model)
    method.before_task(tiny_model, None, 0)
    with torch.no_grad():
        tiny_model.lm_head.weight[0, :2] += 0.5  # two weights moved by 0.5 (the head is tied to the embedding)
    assert method.penalty(tiny_model, None, {})[0].item() == pytest.approx(3 * (0.25 + 0.25))
    assert l2init.main(RUN + [f"--out_dir={out_dir}", "--l2init_strength=1000"]) == 0
    result = json.loads((out_dir / "default" / "cl" / "l2init_seed0.json").read_text())
    assert result["method_settings"] == {"l2init_strength": 1000.0}
    assert result["retained_bytes"] == 4 * 16_864  # one float32 weight vector of the tiny model


def test_tag_anchor_is_zero_at_its_reference_and_keeps_no_tensors(installs, out_dir, tiny_model):
    method = tag_anchor.TagAnchor(SimpleNamespace(tag_anchor_lambda=1.0), tiny_model)
    method.after_task(tiny_model, SimpleNamespace(examples=make_splits("add", 8, 2, 2)["train"]), 0)
    assert method.tags == ["add"] and reg.tensor_bytes(method.retained()) == 0
    method.before_task(tiny_model, None, 1)
    assert method.penalty(tiny_model, None, {})[0].item() == 0.0
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert method.penalty(tiny_model, None, {})[0].item() > 0
    assert tag_anchor.main(RUN + [f"--out_dir={out_dir}"]) == 0
    assert json.loads((out_dir / "default" / "cl" / "tag_anchor_seed0.json").read_text())["retained_bytes"] == 0


def test_plural_answers_follow_from_the_rule_and_the_task_runs(installs, out_dir):
    splits = make_splits("plural", 200, 20, 40, tasks={"plural": plural.plural})
    questions = [{q for q, _ in splits[s]} for s in ("train", "val", "test")]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    for q, a in splits["train"]:
        adjective, noun = q.split(": ")[1].split()
        assert a == adjective + " " + {"peach": "peaches", "cherry": "cherries", "fish": "fishes"}.get(noun, noun + "s")
    assert constant_guess([a for _, a in splits["train"]], [a for _, a in splits["test"]])[1] <= 0.25
    argv = RUN + [f"--out_dir={out_dir}", "--tasks=add,plural", "--methods=seqft", "--block_size=40"]  # 33 positions
    assert plural.main(argv) == 0


def test_attribution_gives_a_silenced_feature_no_relevance(out_dir, capsys):
    config = cfg.parse_args(RUN + [f"--out_dir={out_dir}"])
    base = train.pretrain(config, "cpu")
    model = train.model_from_checkpoint(base, "cpu").eval()
    saes = sae_stage.load_saes(sae_stage.train_sae_stage(config, "cpu", base), model, "cpu")
    split = train.task_suite(config)["add"]["train"]
    by_size = reg.feature_relevance(model, saes, split, 32)[1]
    j = int(by_size.argmax())  # the feature that fires most: silenced, it still fires as much
    with torch.no_grad():
        saes[1].W_dec[j] = 0
    assert reg.feature_relevance(model, saes, split, 32)[1][j] == 1.0
    assert attribution.attribution_relevance(model, saes, split, 32)[1][j] == 0.0
    assert attribution.main(RUN + [f"--out_dir={out_dir}"]) == 0
    assert "attribution: point 1:" in capsys.readouterr().out


def test_relearn_area_by_hand_and_on_a_run(out_dir, capsys):
    assert relearn_area.area_between([0, 1, 2], [0.0, 0.5, 1.0], [0.0, 0.5, 1.0]) == 0.0
    assert relearn_area.area_between([0, 1, 2], [0.0, 0.5, 1.0], [0.0, 0.0, 0.0]) == pytest.approx(0.5)
    assert train.main(RUN + [f"--out_dir={out_dir}", "--methods=seqft"]) == 0
    assert relearn_area.main([f"--out_dir={out_dir}"]) == 0
    assert "seqft: " in capsys.readouterr().out


def test_var_norm_keeps_less_of_the_stream_in_its_mean_than_norm(tmp_path, capsys):
    argv = TINY + ["--n_layer=2", f"--out_dir={tmp_path}"]  # 60 steps: var 0.49 at most, norm 0.87
    assert var_norm.main(argv) == 0
    rows = {line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines() if "by point" in line}
    share = {name: [float(s.split(": ")[1]) for s in line.split("by point: ")[1].split(", ")]
             for name, line in rows.items()}
    assert set(share) == {"normal", "norm", "var"}
    assert max(share["var"][1:]) < max(share["norm"][1:])
