import pytest
import torch

from evaluate import fvu, l0, sae_metrics, second_moment_split
from sae import SAEConfig, TopKSAE, check_sae_fits, normalized_mse, sae_lr, train_sae


def make_sae(d_in=8, d_sae=32, k=3, **kwargs):
    torch.manual_seed(0)
    return TopKSAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, **kwargs))


def test_exactly_k_or_fewer_nonzero_codes():
    sae = make_sae(k=3)
    z = sae.encode(torch.randn(50, 8))
    nonzero = (z != 0).sum(-1)
    assert (nonzero <= 3).all() and (nonzero == 3).float().mean() > 0.5
    assert (z >= 0).all()
    # the kept codes are the k largest pre-activations, unchanged
    x = torch.randn(20, 8)
    pre, z = sae.pre_activations(x), sae.encode(x)
    kept = z != 0
    assert torch.equal(z[kept], pre[kept])
    smallest_kept = torch.where(kept, pre, torch.full_like(pre, float("inf"))).min(-1).values
    largest_dropped = torch.where(kept, torch.full_like(pre, -float("inf")), pre).max(-1).values
    assert (smallest_kept >= largest_dropped).all()


def test_init_from_data_scales_and_centres():
    sae = make_sae()
    x = 5.0 * torch.randn(1000, 8) + 3.0
    sae.init_from_data(x)
    x_n = x * sae.input_scale
    assert abs(x_n.pow(2).sum(-1).mean().item() - 8) < 1e-3  # E ||c x||^2 = d_in
    assert torch.allclose(sae.b_dec, x_n.mean(0))
    assert torch.allclose(sae.W_enc, sae.W_dec.t())  # encoder starts as the decoder's transpose


def test_decoder_rows_unit_norm_after_a_training_step():
    sae, _ = train_sae(torch.randn(500, 8), SAEConfig(8, 32, 3), steps=5, batch_size=64)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)


def test_parallel_gradient_component_is_removed():
    sae = make_sae()
    loss, _, _, _ = sae.loss(torch.randn(64, 8))
    loss.backward()
    before = sae.W_dec.grad.clone()
    assert (before * sae.W_dec).sum(1).abs().max() > 1e-4  # there was a parallel part to remove
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
    # only the parallel part went: the perpendicular part is unchanged
    parallel = (before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
    assert torch.allclose(sae.W_dec.grad, before - parallel, atol=1e-6)


@pytest.mark.parametrize("aux_k", [4, 8])  # fewer, and more, than the 5 dead latents
def test_auxk_uses_only_dead_latents_no_bias_and_the_detached_residual(aux_k):
    sae = make_sae(d_in=8, d_sae=32, k=3, aux_k=aux_k, dead_firings=1.0)
    assert sae.config.dead_tokens == 11  # ceil(1 firing * 32 latents / k=3)
    with torch.no_grad():
        sae.b_dec.fill_(100.0)  # a bias that would dominate if AuxK decoded with it
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 7, 20, 30]] = True
    sae.tokens_since_fired[dead] = 11
    sae.tokens_since_fired[~dead] = 10  # one token short of dead
    x = torch.randn(16, 8)
    pre = sae.pre_activations(x)
    residual = torch.randn(16, 8)
    loss = sae.auxk_loss(pre, residual)

    # by hand: top-aux_k of the dead latents' pre-activations over all 32 columns, decoded without b_dec
    dead_pre = torch.where(dead, pre, torch.zeros_like(pre))
    values, indices = dead_pre.topk(min(aux_k, 5), dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, indices, values)
    assert ((z_aux != 0) & ~dead).sum() == 0  # live latents never take part
    # normalised by the residual's own variance around its batch mean
    expected = (residual - z_aux @ sae.W_dec).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    assert torch.allclose(loss, expected)

    # inside sae.loss the residual is x_n - xhat (sign!) and detached: AuxK's gradient reaches no live latent
    sae.zero_grad()
    _, _, auxk, _ = sae.loss(x)
    auxk.backward()
    assert auxk.item() > 0
    live_rows = sae.W_dec.grad[~dead]
    assert torch.count_nonzero(live_rows) == 0  # through a detached residual, only dead rows get gradient
    assert torch.count_nonzero(sae.W_dec.grad[dead]) > 0

    # inside sae.loss the target is x_n - xhat, not xhat - x_n
    with torch.no_grad():
        x_n = x * sae.input_scale
        xhat = sae.decode(sae.encode(x))
        assert torch.allclose(auxk, sae.auxk_loss(pre, x_n - xhat))
        assert not torch.allclose(auxk, sae.auxk_loss(pre, xhat - x_n))
    # and the hinge of the regression has the right sign: predicting the residual exactly gives zero loss
    right = sae.auxk_loss(pre, (z_aux @ sae.W_dec).detach())
    wrong = sae.auxk_loss(pre, -(z_aux @ sae.W_dec).detach())
    assert right.item() < 1e-8 < wrong.item()


def test_both_loss_terms_are_normalised_by_their_targets_variance():
    sae = make_sae()
    x = torch.randn(64, 8)
    total, main, auxk, z = sae.loss(x)
    x_n = x * sae.input_scale
    xhat = sae.decode(sae.encode(x))
    assert torch.allclose(main, (x_n - xhat).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum())  # the batch's FVU
    assert main.item() == pytest.approx(fvu(x_n, xhat), rel=1e-5)
    assert torch.allclose(total, main + auxk / 32)
    assert normalized_mse(torch.zeros(4, 2), torch.ones(4, 2)).item() == 0.0  # constant target: no signal, not inf
    scaled = make_sae()
    scaled.input_scale.fill_(10.0)  # the loss does not depend on the units of x
    assert scaled.loss(x)[1].item() == pytest.approx(make_sae().loss(x * 10.0)[1].item(), rel=1e-4)


def test_dead_threshold_is_in_expected_firings():
    assert SAEConfig(d_in=8, d_sae=768, k=8, dead_firings=1000).dead_tokens == 96_000
    assert SAEConfig(d_in=8, d_sae=768, k=4, dead_firings=1000).dead_tokens == 192_000  # rarer firing, longer wait
    with pytest.raises(ValueError, match="relu SAE has none"):  # no k: no expected firing rate to count in
        SAEConfig(d_in=8, d_sae=768, k=0, kind="relu", l1=0.01).dead_tokens


def test_loss_uses_encode():
    """A change to the encoder (here: ReLU without TopK) reaches training through encode."""

    class DenseSAE(TopKSAE):
        def encode(self, x):
            return self.pre_activations(x)

    torch.manual_seed(0)
    sae = DenseSAE(SAEConfig(d_in=8, d_sae=32, k=3))
    x = torch.randn(16, 8)
    _, _, _, z = sae.loss(x)
    assert torch.equal(z, sae.pre_activations(x)) and (z != 0).sum(-1).max() > 3
    xhat, code = sae.reconstruct(x)
    assert torch.equal(code, z) and torch.allclose(xhat, (z @ sae.W_dec + sae.b_dec) / sae.input_scale)


def test_no_dead_latents_means_no_auxk():
    sae = make_sae()
    assert sae.auxk_loss(sae.pre_activations(torch.randn(4, 8)), torch.randn(4, 8)).item() == 0.0


def test_dead_counter_counts_tokens_and_resets_on_firing():
    sae = make_sae()
    z = torch.zeros(10, 32)
    z[3, 4] = 1.0
    sae.update_dead_counter(z)
    sae.update_dead_counter(torch.zeros(6, 32))
    assert sae.tokens_since_fired[4] == 6 and sae.tokens_since_fired[0] == 16


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    codes = torch.relu(torch.randn(2000, 16)) * (torch.rand(2000, 16) < 0.15)
    x = codes @ directions
    sae, history = train_sae(x, SAEConfig(8, 32, 4), steps=300, batch_size=128)
    assert history[-1]["fvu"] < 0.5 * history[0]["fvu"]


def test_fvu_and_l0_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    xhat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    # mean x = (2, 1); sum ||x - mean||^2 = (1 + 1) + (1 + 1) = 4; sum ||x - xhat||^2 = 1 + 1 = 2
    assert fvu(x, xhat) == pytest.approx(0.5)
    z = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 3.0]])
    assert l0(z) == pytest.approx(2.0)


def test_learning_rate_rule():
    assert sae_lr(2**14) == pytest.approx(2e-4)
    assert sae_lr(2**12) == pytest.approx(4e-4)


def test_splicing_x_itself_gives_zero_ce_increase(tiny_model):
    class Identity(torch.nn.Module):  # an "SAE" that reconstructs perfectly
        def __init__(self):
            super().__init__()
            self.config = SAEConfig(d_in=32, d_sae=32, k=32)
            self.register_buffer("input_scale", torch.tensor(1.0))
            self.b_dec = torch.zeros(32)

        def encode(self, x):
            return x

        def decode(self, z):
            return z

        def reconstruct(self, x):
            return x, x

        def forward(self, x):
            return x

    ids = torch.randint(0, 96, (5000,))
    metrics = sae_metrics(tiny_model, {1: Identity(), 2: Identity()}, ids, 32, "cpu", n_batches=2, batch_size=4)
    assert metrics["compound_ce_increase"] == pytest.approx(0.0, abs=1e-6)
    for point in (1, 2):
        assert metrics["points"][point]["ce_increase"] == pytest.approx(0.0, abs=1e-6)
        assert metrics["points"][point]["fvu"] == pytest.approx(0.0, abs=1e-6)


def test_a_real_sae_increases_ce(tiny_model):
    ids = torch.randint(0, 96, (5000,))
    sae = make_sae(d_in=32, d_sae=64, k=2)
    with torch.no_grad():
        sae.init_from_data(tiny_model(ids[:400].view(4, 100)[:, :48], read=(1,))[2][1].reshape(-1, 32))
    metrics = sae_metrics(tiny_model, {1: sae}, ids, 32, "cpu", n_batches=2, batch_size=4)
    point = metrics["points"][1]
    assert point["fvu"] > 0.01 and point["l0"] <= 2.0
    assert point["ce_increase"] > 1e-3  # an imperfect reconstruction spliced in costs cross-entropy
    assert metrics["compound_ce_increase"] == pytest.approx(point["ce_increase"])  # one point: the same splice
    # the constant and varying parts are the model's activations' on the same windows, not the reconstruction's
    from data.corpus import get_batch
    generator = torch.Generator().manual_seed(1234)
    x = torch.cat([tiny_model(get_batch(ids, 4, 32, generator, "cpu")[0], read=(1,))[2][1].reshape(-1, 32)
                   for _ in range(2)])
    expected = second_moment_split(x)
    assert {k: point[k] for k in expected} == pytest.approx(expected)
    assert second_moment_split(sae(x))["centered_rms"] != pytest.approx(expected["centered_rms"])


def test_sae_that_does_not_fit_the_model_is_refused(tiny_model):
    with pytest.raises(ValueError, match="width 16.*n_embd=32"):
        check_sae_fits(make_sae(d_in=16), tiny_model, point=1)
    with pytest.raises(ValueError, match="points 0..2"):
        check_sae_fits(make_sae(d_in=32), tiny_model, point=5)
    check_sae_fits(make_sae(d_in=32), tiny_model, point=2)  # fits: no error


def test_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="k=40"):
        TopKSAE(SAEConfig(d_in=8, d_sae=32, k=40))


# ---------------------------------------------------------------------------------------------------------------
# ReLU + L1 SAEs


def test_relu_sae_loss_on_a_hand_made_case():
    from sae import make_sae

    sae = make_sae(SAEConfig(d_in=2, d_sae=2, k=0, kind="relu", l1=0.5))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))  # row norms 2 and 1
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    # z = ReLU(x) = [[1, 0], [3, 1]]; xhat = z W_dec = [[2, 0], [6, 1]]
    # squared error per token: (1 + 4) and (9 + 0) -> mean 7; sparsity per token: 1*2 = 2 and 3*2 + 1*1 = 7
    total, fvu_, sparsity, z = sae.loss(x)
    assert torch.equal(z, torch.tensor([[1.0, 0.0], [3.0, 1.0]]))
    assert sparsity.item() == pytest.approx(0.5 * (2 + 7) / 2)
    assert total.item() == pytest.approx(7 + 0.5 * 4.5)
    assert l0(z) == pytest.approx(1.5)  # every positive pre-activation is kept: no fixed k


def test_relu_sae_training_lowers_its_loss_and_leaves_decoder_norms_free():
    from sae import make_sae

    torch.manual_seed(0)
    x = torch.randn(2048, 8) @ torch.randn(8, 8)
    config = SAEConfig(d_in=8, d_sae=32, k=0, kind="relu", l1=1e-3)
    first = make_sae(config).loss(x)[0].item()
    sae, history = train_sae(x, config, steps=300, batch_size=256, lr=1e-2)
    assert sae.loss(x)[0].item() < 0.2 * first and history[-1]["fvu"] < 0.2
    assert "sparsity" in history[-1]
    norms = sae.W_dec.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-2)  # no unit-norm constraint
    assert sae.input_scale.item() == 1.0  # raw activations, as the original


def test_a_stronger_l1_gives_a_sparser_relu_sae():
    torch.manual_seed(0)
    x = torch.randn(2048, 8)
    l0s = []
    for l1 in (1e-4, 1.0):
        sae, _ = train_sae(x, SAEConfig(d_in=8, d_sae=32, k=0, kind="relu", l1=l1), steps=300, batch_size=256,
                           lr=1e-2)
        l0s.append(l0(sae.encode(x)))
    assert l0s[1] < 0.8 * l0s[0]  # 12.5 -> 8.5 active latents of 32


def test_sae_kinds_round_trip_and_an_unknown_kind_is_refused():
    from sae import ReluSAE, make_sae, sae_from_dict, sae_to_dict

    sae = make_sae(SAEConfig(d_in=4, d_sae=8, k=0, kind="relu", l1=0.1))
    again = sae_from_dict(sae_to_dict(sae))
    assert isinstance(again, ReluSAE) and torch.equal(again.W_dec, sae.W_dec)
    with pytest.raises(ValueError, match="choose one of topk, relu"):
        make_sae(SAEConfig(d_in=4, d_sae=8, k=2, kind="gated"))


def test_sae_lr_schedule_warms_up_then_decays_to_min_lr():
    from model import warmup_cosine

    assert warmup_cosine(0, 100, 1e-3, min_lr=1e-4, warmup=10) == pytest.approx(1e-4)
    assert warmup_cosine(9, 100, 1e-3, min_lr=1e-4, warmup=10) == pytest.approx(1e-3)
    assert warmup_cosine(55, 100, 1e-3, min_lr=1e-4, warmup=10) == pytest.approx(5.5e-4)  # half way down
    assert warmup_cosine(100, 100, 1e-3, min_lr=1e-4, warmup=10) == pytest.approx(1e-4)


def test_total_loss_adds_auxk_with_its_coefficient_when_latents_are_dead():
    sae = make_sae(d_sae=32, k=3, aux_k=4)
    sae.tokens_since_fired[:12] = sae.config.dead_tokens  # 12 latents dead
    x = torch.randn(64, 8)
    total, main, auxk, _ = sae.loss(x)
    x_n = x * sae.input_scale
    residual = (x_n - sae.decode(sae.encode(x))).detach()
    assert auxk.item() > 0 and torch.allclose(auxk, sae.auxk_loss(sae.pre_activations(x), residual))
    assert torch.allclose(total, main + auxk / 32) and total.item() > main.item()
