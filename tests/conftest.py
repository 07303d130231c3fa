"""Shared test settings: the project root on sys.path, a tiny seeded model, and tiny configs of the pipeline."""

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import report  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# a pretraining run of a few seconds on one CPU core
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=60",
        "--eval_interval=20", "--eval_iters=2", "--warmup_iters=5", "--corpus_lines=3000", "--lr=3e-3"]
# the whole pipeline, every method, on two short tasks
TINY_PIPELINE = TINY + ["--sae_steps=40", "--sae_tokens=4000", "--sae_batch_size=256", "--sae_expansion=4",
                        "--tasks=add,reverse", "--steps_per_task=8", "--n_train=64", "--n_val=8", "--n_test=16",
                        "--ewc_fisher_examples=8", "--mas_examples=8", "--sae_guided_mask_examples=16",
                        "--replay_batch_size=4", "--sae_fd_anchors=8", "--sae_fd_batch_size=4",
                        "--methods=seqft,ewc,si,mas,lwf,o_lora,sae_fd,sae_guided,freeze,replay,multitask",
                        "--relearn_steps=0,2",
                        "--jobs=1"]  # in this process: no worker start-up, and test-local methods need no pickling


STAGES = ("base.pt", "pretrain.json", "sae.pt", "sae.json")  # what pretraining and the SAE stage leave in a run folder


@pytest.fixture(scope="session")
def tiny_stages(tmp_path_factory):
    """The run folder of TINY_PIPELINE's base model and SAEs, made once per test session."""
    import sae_stage
    import train

    config = train.parse_args(TINY_PIPELINE + [f"--out_dir={tmp_path_factory.mktemp('tiny_stages')}"])
    drawing, report.DRAW_PLOTS = report.DRAW_PLOTS, False
    try:
        sae_stage.train_sae_stage(config, "cpu", train.pretrain(config, "cpu"))
    finally:
        report.DRAW_PLOTS = drawing
    return os.path.join(config.out_dir, config.run)


@pytest.fixture
def pipeline_out(tmp_path, tiny_stages):
    """An out dir whose default run already holds TINY_PIPELINE's base model and SAEs, copied as a user may copy
    them: a run there reuses both (their keys hold no path) and makes only what the test asks of it."""
    (tmp_path / "default").mkdir()
    for name in STAGES:
        shutil.copy(os.path.join(tiny_stages, name), tmp_path / "default" / name)
    return tmp_path


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=96, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()


def pytest_configure(config):
    config.addinivalue_line("markers", "plots: the test looks at the PNG plots, so they are drawn")


@pytest.fixture(autouse=True)
def no_plots(request, monkeypatch):
    """Drawing the plots is most of a tiny run's report (about a second a run): only tests marked `plots` draw them.
    Processes a test starts (workers, torchrun) draw them as usual."""
    if "plots" not in request.keywords:
        monkeypatch.setattr(report, "DRAW_PLOTS", False)


@pytest.fixture(autouse=True)
def fresh_start_measures(monkeypatch):
    """Each test measures its sequences' start models afresh (train.start_measures keeps them for the process): a
    test that fakes an evaluation leaves nothing behind for the next."""
    import train

    monkeypatch.setattr(train, "START_MEASURES", {})
