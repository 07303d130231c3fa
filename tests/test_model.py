import pytest
import torch

from model import cross_entropy


def test_shapes_and_loss(tiny_model):
    x = torch.randint(0, 96, (3, 20))
    logits, loss, residuals = tiny_model(x, x, read=(0, 1, 2))
    assert logits.shape == (3, 20, 96)
    assert loss.ndim == 0 and loss.item() > 0
    assert sorted(residuals) == [0, 1, 2]
    assert all(r.shape == (3, 20, 32) for r in residuals.values())


def test_untrained_loss_is_near_uniform(tiny_model):
    x, y = torch.randint(0, 96, (4, 30)), torch.randint(0, 96, (4, 30))
    _, loss, _ = tiny_model(x, y)
    assert abs(loss.item() - torch.log(torch.tensor(96.0)).item()) < 0.2


def test_causality(tiny_model):
    """Changing a later token never changes the logits of earlier positions."""
    x = torch.randint(0, 96, (1, 24))
    x2 = x.clone()
    x2[0, 15] = (x[0, 15] + 1) % 96
    logits, _, _ = tiny_model(x)
    logits2, _, _ = tiny_model(x2)
    assert torch.allclose(logits[0, :15], logits2[0, :15], atol=1e-6)
    assert not torch.allclose(logits[0, 15:], logits2[0, 15:], atol=1e-4)


def test_patch_with_own_value_changes_nothing_and_zeros_change_loss(tiny_model):
    x = torch.randint(0, 96, (2, 16))
    _, loss, residuals = tiny_model(x, x, read=(1,))
    _, same_loss, _ = tiny_model(x, x, patch={1: residuals[1]})
    _, identity_loss, _ = tiny_model(x, x, patch={1: lambda h: h})
    _, zero_loss, _ = tiny_model(x, x, patch={1: torch.zeros_like(residuals[1])})
    assert torch.allclose(loss, same_loss) and torch.allclose(loss, identity_loss)
    assert abs(zero_loss.item() - loss.item()) > 1e-3


def test_read_returns_value_before_patch_and_later_points_see_patch(tiny_model):
    x = torch.randint(0, 96, (2, 10))
    _, _, clean = tiny_model(x, read=(1, 2))
    _, _, patched = tiny_model(x, read=(1, 2), patch={1: lambda h: 2 * h})
    assert torch.allclose(patched[1], clean[1])  # point 1 is read before its own patch
    assert not torch.allclose(patched[2], clean[2])  # point 2 sees the patched stream


def test_bad_residual_point_raises(tiny_model):
    with pytest.raises(ValueError, match="residual point 3"):
        tiny_model(torch.zeros(1, 4, dtype=torch.long), read=(3,))


def test_loss_mask_selects_positions():
    logits = torch.randn(1, 4, 5)
    targets = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    per_token = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
    expected = (per_token[1] + per_token[3]) / 2
    assert torch.allclose(cross_entropy(logits, targets, mask), expected)


def test_generate_is_greedy_and_stops(tiny_model):
    x = torch.randint(0, 96, (2, 5))
    out = tiny_model.generate(x, 6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], x)
    logits, _, _ = tiny_model(out[:, :5])
    assert torch.equal(out[:, 5], logits[:, -1].argmax(-1))  # the first new token is the argmax
    first = out[:, 5]
    # generation stops as soon as every row has written the stop token (the newline, when decoding answers)
    stopped = tiny_model.generate(x[:1], 6, stop_token=int(first[0]))
    assert stopped.shape == (1, 6) and stopped[0, 5] == first[0]
    assert tiny_model.generate(x[:1], 6, stop_token=-1).shape == (1, 11)  # a token that never comes: all 6


def test_optimizer_decays_matrices_only(tiny_model):
    opt = tiny_model.configure_optimizer(1e-3, 0.1, (0.9, 0.99))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == tiny_model.num_params()  # tied weights appear once


def test_residual_projections_get_scaled_init():
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=8, n_embd=64, n_head=4))
    std_proj = m.blocks[0].attn.c_proj.weight.std().item()
    std_fc = m.blocks[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.003
    assert abs(std_proj - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
