import pytest
import torch

from model import GPT, GPTConfig, LoRALinear, cross_entropy


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


def test_the_head_at_some_positions_gives_their_logits_loss_and_gradients_and_runs_the_last_mlp_there_only():
    """head_at: the last block's MLP and the head run at the chosen positions alone, with the same logits there, the
    same loss and the same gradients as the whole forward pass (nothing after the last attention mixes positions);
    the last point cannot be read with it; a model with no block gives its head the embedding of those positions."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=48, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 96, (3, 12)), torch.randint(0, 96, (3, 12))
    mask = torch.zeros(3, 12)
    mask[0, 4:7], mask[1, 9:12], mask[2, 2] = 1.0, 1.0, 1.0  # 7 answer positions, at another place in each row
    rows = []
    model.blocks[-1].mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1]))

    full_logits, full_loss, _ = model(x, y, mask)
    full_grads = torch.autograd.grad(full_loss, list(model.parameters()))
    logits, loss, residuals = model(x, y, mask, read=(1,), head_at=mask.bool())
    grads = torch.autograd.grad(loss, list(model.parameters()))

    assert rows == [(3, 12), (7,)]  # the whole batch, then the 7 positions only
    assert logits.shape == (7, 96) and torch.allclose(logits, full_logits[mask.bool()], atol=1e-6)
    assert torch.allclose(loss, full_loss, atol=1e-6) and residuals[1].shape == (3, 12, 32)
    assert all(torch.allclose(g, f, atol=1e-6) for g, f in zip(grads, full_grads))
    wider = mask.bool() | (torch.arange(12) == 0)  # the first position of every row too: the loss still reads mask's
    assert torch.allclose(model(x, y, mask, head_at=wider)[1], full_loss, atol=1e-6)
    with pytest.raises(ValueError, match="last point"):
        model(x, read=(2,), head_at=mask.bool())

    blind = GPT(GPTConfig(vocab_size=96, block_size=48, n_layer=0, n_head=2, n_embd=32))
    assert torch.allclose(blind(x, head_at=mask.bool())[0], blind(x)[0][mask.bool()])


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


def lora_model(tiny_model, rank=4, targets=None):
    from model import LORA_TARGETS

    return tiny_model.add_lora(rank, alpha=8.0, targets=targets or LORA_TARGETS)


def test_lora_with_b_zero_is_the_base_exactly(tiny_model):
    x = torch.randint(0, 96, (2, 16))
    before = tiny_model(x)[0]
    after = lora_model(tiny_model)(x)[0]
    assert torch.equal(before, after)


def test_only_adapter_parameters_get_gradients(tiny_model):
    model = lora_model(tiny_model, targets=("attn_qkv", "mlp_out"))
    x = torch.randint(0, 96, (2, 16))
    model(x, x)[1].backward()
    named = dict(model.named_parameters())
    learning = {name for name, p in named.items() if p.grad is not None}
    assert learning == {f"blocks.{b}.{m}.{w}" for b in (0, 1) for m in ("attn.c_attn", "mlp.c_proj") for w in "AB"}
    assert all(not p.requires_grad for name, p in named.items() if name not in learning)
    assert sum(named[n].numel() for n in learning) == 2 * (4 * 32 + 96 * 4) + 2 * (4 * 128 + 32 * 4)


def test_adapters_off_is_the_base_after_training_and_merging_keeps_the_function(tiny_model):
    import copy

    base = copy.deepcopy(tiny_model)
    model = lora_model(tiny_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 96, (4, 16))
    for _ in range(5):
        optimizer.zero_grad()
        model(x, x)[1].backward()
        optimizer.step()
    with torch.no_grad():
        trained = model(x)[0]
        assert not torch.allclose(trained, base(x)[0], atol=1e-3)  # the adapters learned something
        with model.adapters_off():
            assert torch.equal(model(x)[0], base(x)[0])  # the frozen base, exactly, without a copy
        assert torch.allclose(model(x)[0], trained)  # and back on afterwards
        merged = model.merged()
        assert not merged.has_adapters() and torch.allclose(merged(x)[0], trained, atol=1e-5)


def test_stacked_adapters_add_up_and_only_the_newest_learns(tiny_model):
    import copy

    base = copy.deepcopy(tiny_model)
    model = lora_model(tiny_model)
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():  # a first adapter set that has learned something
        for layer in model.lora_layers():
            layer.B.normal_(0, 0.1)
    first = model(x)[0].detach()
    model.stack_adapters()
    # the new set starts at B = 0: the function is unchanged (the first set now folded into the weight: to rounding)
    assert torch.allclose(model(x)[0], first, atol=1e-6)
    layer = model.lora_layers()[0]
    assert len(layer.pairs()) == 2 and not any(p.requires_grad for p in layer.past)
    model(x, x)[1].backward()
    assert all(p.grad is None for m in model.lora_layers() for p in m.past)  # earlier adapters: no gradient
    assert all(m.A.grad is not None for m in model.lora_layers())
    with torch.no_grad():
        layer.B.normal_(0, 0.1)
        both = model(x)[0]
        assert torch.allclose(model.merged()(x)[0], both, atol=1e-5)  # the sum of both sets
        with model.adapters_off():
            assert torch.equal(model(x)[0], base(x)[0])  # every set off: the base
    assert torch.allclose(model(x)[0], both, atol=1e-5)  # with gradients on: the same map


def test_folded_adapters_give_the_thin_products_function_and_the_current_pair_s_gradients(tiny_model):
    """LoRALinear.fold (the default) computes x (W + (alpha / r) sum_s B_s A_s)^T in one product; with it off, the
    thin products base(x) + (alpha / r) sum_s (x A_s^T) B_s^T. The same output, and the same gradients for the
    current pair."""
    model = lora_model(tiny_model)
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():  # two adapter sets, both nonzero
        for layer in model.lora_layers():
            layer.B.normal_(0, 0.1)
        model.stack_adapters()
        for layer in model.lora_layers():
            layer.B.normal_(0, 0.1)
    layer = model.lora_layers()[0]
    expected = layer.base.weight + layer.scale * sum(B @ A for A, B in layer.pairs())
    assert torch.allclose(layer.merged_weight(), expected)
    outputs, gradients = {}, {}
    try:
        for fold in (True, False):
            LoRALinear.fold = fold
            model.zero_grad(set_to_none=True)
            logits, loss, _ = model(x, x)
            loss.backward()
            outputs[fold] = logits.detach()
            gradients[fold] = [p.grad.clone() for m in model.lora_layers() for p in (m.A, m.B)]
    finally:
        LoRALinear.fold = True
    assert torch.allclose(outputs[True], outputs[False], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gradients[True], gradients[False]))
    assert any(g.abs().max() > 1e-4 for g in gradients[True])  # the gradients compared are not all zero
    with torch.no_grad(), model.adapters_off():
        assert not torch.allclose(outputs[True], model(x)[0], atol=1e-3)  # the adapters are in it


def test_positions_and_an_attention_mask_let_one_row_hold_two_sequences_that_share_a_prefix(tiny_model):
    """forward(positions=, attention=): with 0..T-1 and the causal mask it is the default forward; with a row
    packed as prefix + a + b, b's tokens at the positions they have after the prefix and reading the prefix and
    themselves only, each sequence gets the logits it gets in a row of its own."""
    prefix, a, b = [5, 6, 7, 8], [20, 21], [30, 31, 32]
    T = 9
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = torch.tensor([prefix + a + b])
    default = tiny_model(x)[0]
    explicit = tiny_model(x, positions=torch.arange(T)[None], attention=causal[None])[0]
    assert torch.allclose(default, explicit, atol=1e-5)
    segment = torch.tensor([0] * 4 + [1] * 2 + [2] * 3)
    attention = causal & ((segment[None, :] == 0) | (segment[:, None] == segment[None, :]))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 4, 5, 6]])
    packed = tiny_model(x, positions=positions, attention=attention[None])[0][0]
    alone_a, alone_b = tiny_model(torch.tensor([prefix + a]))[0][0], tiny_model(torch.tensor([prefix + b]))[0][0]
    assert torch.allclose(packed[:6], alone_a, atol=1e-5)
    assert torch.allclose(packed[6:], alone_b[4:], atol=1e-5)
    assert not torch.allclose(default[0, 6:], alone_b[4:], atol=1e-3)  # without the mask, b would read a
