"""The CUDA path: the same numbers as on CPU, and the whole pipeline on a GPU. Skipped where there is no GPU (CI)."""

import copy
import json

import pytest
import torch

import regularizers as reg
import train
from data.tasks import build_task_suite
from sae import SAEConfig, TopKSAE
from conftest import TINY_PIPELINE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    # the comparisons below are against float32 CPU results: keep TF32 off whatever the defaults are
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_forward_loss_and_gradients_match_cpu(tiny_model):
    gpu_model = copy.deepcopy(tiny_model).cuda()
    x = torch.randint(96, (4, 48), generator=torch.Generator().manual_seed(0))
    logits, loss, residuals = tiny_model(x, targets=x, read=(0, 2))
    logits_gpu, loss_gpu, residuals_gpu = gpu_model(x.cuda(), targets=x.cuda(), read=(0, 2))
    assert torch.allclose(logits, logits_gpu.cpu(), atol=1e-4)
    assert torch.allclose(residuals[2], residuals_gpu[2].cpu(), atol=1e-4)
    loss.backward()
    loss_gpu.backward()
    for (name, p), p_gpu in zip(tiny_model.named_parameters(), gpu_model.parameters()):
        assert torch.allclose(p.grad, p_gpu.grad.cpu(), atol=1e-4, rtol=1e-3), name


def test_fisher_on_cuda_matches_cpu(tiny_model):
    split = build_task_suite(["add"], n_train=40, n_val=5, n_test=5)["add"]["train"]
    fisher = reg.fisher_diagonal(tiny_model, split, 16, labels="empirical", seed=1)
    fisher_gpu = reg.fisher_diagonal(copy.deepcopy(tiny_model).cuda(), split, 16, labels="empirical", seed=1)
    assert fisher_gpu.is_cuda
    assert torch.allclose(fisher, fisher_gpu.cpu(), rtol=1e-3, atol=1e-8)
    true_gpu = reg.fisher_diagonal(copy.deepcopy(tiny_model).cuda(), split, 16, labels="true", seed=1)
    assert torch.isfinite(true_gpu).all() and true_gpu.sum() > 0


def test_sae_encode_decode_match_cpu():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, d_sae=64, k=4))
    x = torch.randn(32, 16)
    sae_gpu = copy.deepcopy(sae).cuda()
    z, x_hat = sae.encode(x), sae(x)
    z_gpu, x_hat_gpu = sae_gpu.encode(x.cuda()), sae_gpu(x.cuda())
    assert torch.equal((z != 0), (z_gpu != 0).cpu())  # the same k features win on both devices
    assert torch.allclose(x_hat, x_hat_gpu.cpu(), atol=1e-5)


def test_pipeline_on_cuda(tmp_path):
    argv = TINY_PIPELINE + [f"--out_dir={tmp_path}", "--device=cuda"]
    assert train.main(argv) == 0
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    for method in ("seqft", "ewc", "si", "mas", "lwf", "sae_guided", "replay", "multitask"):
        result = json.loads((tmp_path / "default" / "cl" / f"{method}_seed0.json").read_text())
        assert all(0.0 <= a <= 1.0 for row in result["R"] for a in row)
        assert summary[method]["step_ms"] > 0
