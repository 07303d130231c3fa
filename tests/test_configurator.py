import dataclasses
import json

import pytest

import cache
import configurator as cfg
import regularizers as reg
import train
from conftest import TINY_PIPELINE
from train import main, parse_args


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
    (["--methods=seqft,magic"],
     "--methods='magic' is not valid; choose from: seqft, ewc, si, mas, lwf, o_lora, sae_fd, sae_guided"),
    (["--tasks=add,juggle"], "--tasks='juggle' is not valid; choose from: stance, facts"),
    (["--tasks=add,add"], "name each task once"),
    (["--n_embd=30", "--n_head=4"], "must be divisible"),
    (["--n_head=0"], "--n_head=0: must be at least 1"),
    (["--sae_points=7"], "--sae_points: 7 is not a residual point"),
    (["--sae_k=0"], "--sae_k=0: must be at least 1"),
    (["--sae_k=2000"], "each k must be in 1..d_sae=768"),
    (["--steps_per_task=0"], "--steps_per_task=0: must be at least 1"),
    (["--ewc_lambda=-1"], "--ewc_lambda=-1.0: must be a finite number, at least 0"),
    (["--lr=-3e-4"], "--lr=-0.0003: must be a finite number"),
    (["--cl_lr=inf"], "--cl_lr=inf: must be a finite number"),
    (["--lr=0"], "--lr=0.0 and --cl_lr=0.0003 must be above 0"),
    (["--grad_clip=-1"], "--grad_clip=-1.0: must be a finite number, at least 0"),
    (["--sae_guided_mask_knn=768"], "must be below the SAE width d_sae=768"),
    (["--si_xi=0"], "--si_xi=0.0: must be above 0"),
    (["--lwf_temperature=0"], "--lwf_temperature=0.0: must be above 0"),
    (["--replay_fraction=2"], "--replay_fraction=2.0: must be in \\(0, 1\\]"),
    (["lr=3"], "arguments look like --key=value"),
    (["--lora_alpha=0"], "--lora_alpha=0.0: must be above 0"),
    (["--methods=seqft,ewc,seqft"], "--methods=seqft,ewc,seqft: name each value once"),
    (["--seeds=0,0"], "--seeds=0,0: name each value once"),
    (["--lora_targets=attn_qkv,attn_qkv"], "--lora_targets=attn_qkv,attn_qkv: name each value once"),
    (["--seeds=100000000000000000000000"], "must be below 2\\^63"),
    (["--seed=9223372036854775808"], "--seed=9223372036854775808: must be below 2\\^63"),
    (["--sae_tokens=1"], "--sae_tokens=1: must be at least --sae_batch_size=512"),
])
def test_bad_config_is_an_error_that_names_the_key(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_main_reports_config_errors_without_a_traceback(capsys):
    assert main(["--bogus=1"]) == 2
    assert "error: unknown config key --bogus" in capsys.readouterr().err


def test_help_lists_every_key_with_its_default_and_meaning_by_stage(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(train.Config):
        line = next(line for line in text.splitlines() if line.strip().startswith(f"--{field.name}="))
        assert len(line.split(None, 1)) == 2, f"--{field.name} has no meaning in --help"  # the comment beside it
    assert "--cl_lr=0.0003" in text and "\npretraining (AdamW" in text and "\nEWC: w = diagonal Fisher:" in text


def test_every_config_field_is_in_a_cache_key_or_listed_as_not_affecting_results():
    config = train.Config()
    in_keys = {k for keys in cache.STAGE_KEYS.values() for k in keys} | set(cache.NOT_RESULT_KEYS)
    in_keys |= {k for method in reg.METHODS.values() for k in method.config_keys(config)}
    missing = [f.name for f in dataclasses.fields(config) if f.name not in in_keys]
    assert missing == [], f"fields in no stage's cache key: {missing}"


def test_a_method_is_one_class_and_its_config_fields(tmp_path, monkeypatch):
    """Adding a method touches its class and its Config fields only: the loop, the cache key, the retained bytes
    and the report all follow."""

    class L2Init(reg.Method):  # L2 to the weights at task start: the README's and exercise 1's example
        name = "l2init"

        def before_task(self, model, split, t):
            self.theta0 = reg.flat_parameters(model).detach().clone()

        def penalty(self, model, batch, outputs):
            return self.config.l2init_strength * (reg.flat_parameters(model) - self.theta0).pow(2).sum(), {}

        def retained(self):
            return [self.theta0]

    @dataclasses.dataclass
    class ConfigWithL2Init(train.Config):
        l2init_strength: float = 10.0  # the weight

    monkeypatch.setitem(reg.METHODS, "l2init", L2Init)
    monkeypatch.setitem(cfg.CHOICES, "methods", tuple(reg.METHODS))
    monkeypatch.setattr(cfg, "Config", ConfigWithL2Init)
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--methods=seqft,l2init", "--l2init_strength=1000"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "default" / "cl" / "l2init_seed0.json").read_text())
    assert result["method_settings"] == {"l2init_strength": 1000.0}  # its field is in its cache key
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    n_params = sum(p.numel() for p in train.model_from_checkpoint(
        train.pretrain(parse_args(argv), "cpu"), "cpu").parameters())
    assert summary["l2init"]["retained_bytes"] == 4 * n_params  # from its retained()
    assert summary["l2init"]["step_time_ratio"] > 0  # compared with seqft of the same settings
    main(argv[:-1] + ["--l2init_strength=1"])
    assert json.loads((tmp_path / "default" / "cl" / "l2init_seed0.json").read_text())["method_settings"] == {
        "l2init_strength": 1.0}  # a change of its field redoes it


def test_key_difference_names_what_changed():
    a = cache.result_key({"lr": 1, "n": 2}, ["model.py"], "cpu", "")
    b = dict(a, config={"lr": 2, "n": 2}, device="cuda")
    assert cache.key_difference(a, b) == "config (lr), device"
    assert cache.key_difference({"config": {}}, b) == "an older format"


def test_a_suite_names_a_task_list_and_given_tasks_win():
    assert parse_args(["--suite=things"]).tasks == tuple(f"things{g}" for g in range(1, 9))
    assert parse_args(["--suite=things", "--tasks=things2,things1"]).tasks == ("things2", "things1")
    assert parse_args(["--suite=eight"]).tasks == parse_args([]).tasks
    with pytest.raises(ValueError, match="--suite='nope' is not valid"):
        parse_args(["--suite=nope"])


def test_a_preset_sets_its_keys_and_given_keys_override_it_in_any_order():
    for argv in (["--preset=paper", "--cl_lr=5e-4"], ["--cl_lr=5e-4", "--preset=paper"]):
        config = train.parse_args(argv)
        assert config.cl_lr == 5e-4  # given on the command line
        assert (config.finetune, config.instruct_tags, config.sae_guided_reference) == ("lora", 32, "base")
        assert config.ewc_lambda == 100.0
    assert train.parse_args([]).finetune == "full"  # no preset: the defaults
    with pytest.raises(ValueError, match="--preset='nope' is not valid; choose from: paper"):
        train.parse_args(["--preset=nope"])


def test_an_out_dir_that_cannot_hold_files_is_refused_before_compute(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot hold files|is a file"):
        cache.check_out_dir(str(blocker / "below"))  # under a file
    with pytest.raises(ValueError, match="cannot hold files"):
        cache.check_out_dir("/proc/saeguard_out")
    cache.check_out_dir(str(tmp_path / "new"))
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())  # made, and left empty


def test_the_tiny_preset_is_the_tests_tiny_pipeline():
    """`--preset=tiny`, the student's seconds-long run, sets what tests/conftest.py's TINY_PIPELINE sets."""
    from conftest import TINY_PIPELINE

    tiny = train.parse_args(["--preset=tiny", "--methods=seqft,ewc,si,mas,lwf,o_lora,sae_fd,sae_guided,freeze,replay,"
                             "multitask"])
    assert dataclasses.replace(tiny, preset="") == train.parse_args(TINY_PIPELINE)
