import pytest
import torch

import regularizers as reg
from data.tasks import build_task_suite


@pytest.fixture(scope="module")
def add_split():
    return build_task_suite(["add"], n_train=40, n_val=5, n_test=5)["add"]["train"]


def test_hinge_forms_by_hand():
    drift = torch.tensor([0.1, 0.5, 0.3])
    weight = torch.tensor([1.0, 0.0, 3.0])
    # aggregate, upper: weighted mean = (0.1 + 0.9) / 4 = 0.25; relu(0.25 - 0.2)^2 = 0.0025
    assert reg.hinge_penalty(drift, weight, 0.2).item() == pytest.approx(0.0025)
    assert reg.hinge_penalty(drift, weight, 0.3).item() == 0.0
    # aggregate, lower: relu(0.4 - 0.25)^2 = 0.0225
    assert reg.hinge_penalty(drift, weight, 0.4, upper=False).item() == pytest.approx(0.0225)
    # per coordinate, upper, bound 0.2: 1 * 0 + 0 * 0.09 + 3 * 0.01 = 0.03
    assert reg.hinge_penalty(drift, weight, 0.2, per_coordinate=True).item() == pytest.approx(0.03)


def test_ewc_identity_and_zero_at_anchor(tiny_model):
    """EWC = per-coordinate hinge with Fisher weights and bound 0 = (lambda/2) sum F (theta - theta*)^2."""
    torch.manual_seed(1)
    fisher = {n: torch.rand_like(p) for n, p in tiny_model.named_parameters()}
    theta_star = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    state = reg.ewc_consolidate({"anchors": []}, tiny_model, fisher)
    assert reg.ewc_penalty(tiny_model, state, lam=7.0).item() == 0.0  # exactly zero at theta*
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    penalty = reg.ewc_penalty(tiny_model, state, lam=7.0)
    by_hand = sum(3.5 * (fisher[n] * (p - theta_star[n]) ** 2).sum()
                  for n, p in tiny_model.named_parameters())
    assert penalty.item() > 0
    assert penalty.item() == pytest.approx(by_hand.item(), rel=1e-5)
    penalty.backward()  # the penalty pulls the weights back: its gradient is F (theta - theta*) * lambda
    for name, p in tiny_model.named_parameters():  # every parameter gets its own F and theta* back
        expected = 7.0 * fisher[name] * (p.detach() - theta_star[name])
        assert torch.allclose(p.grad, expected, atol=1e-6), name


def test_ewc_modes(tiny_model):
    f1 = {n: torch.ones_like(p) for n, p in tiny_model.named_parameters()}
    f2 = {n: 2 * torch.ones_like(p) for n, p in tiny_model.named_parameters()}
    separate = reg.ewc_consolidate(reg.ewc_consolidate({"anchors": []}, tiny_model, f1), tiny_model, f2)
    assert len(separate["anchors"]) == 2
    online = {"anchors": []}
    reg.ewc_consolidate(online, tiny_model, f1, mode="online", gamma=0.5)
    reg.ewc_consolidate(online, tiny_model, f2, mode="online", gamma=0.5)
    assert len(online["anchors"]) == 1
    n_params = sum(p.numel() for p in tiny_model.parameters())
    assert online["anchors"][0]["fisher"].shape == (n_params,)
    assert torch.allclose(online["anchors"][0]["fisher"], torch.full((n_params,), 2.5))


@pytest.mark.parametrize("labels", ["empirical", "true"])
def test_fisher_matches_a_brute_force_loop(tiny_model, add_split, labels):
    n = 12
    fisher = reg.fisher_diagonal(tiny_model, add_split, n, labels=labels, seed=3)
    idx = torch.randperm(len(add_split), generator=torch.Generator().manual_seed(3))[:n]
    x, y, mask = add_split.x[idx], add_split.y[idx], add_split.answer_mask[idx]
    if labels == "true":  # the same model-sampled labels as fisher_diagonal draws
        probs = torch.softmax(tiny_model(x)[0].detach(), -1)
        y = torch.multinomial(probs.reshape(-1, 96), 1, generator=torch.Generator().manual_seed(3)).view_as(y)
    brute = {name: torch.zeros_like(p) for name, p in tiny_model.named_parameters()}
    for i in range(n):
        tiny_model.zero_grad()
        logits = tiny_model(x[i : i + 1])[0][0]
        reg.answer_log_likelihood(logits, y[i], mask[i]).backward()
        for name, p in tiny_model.named_parameters():
            brute[name] += p.grad.pow(2) / n
    for name in brute:
        assert torch.allclose(fisher[name], brute[name], rtol=1e-4, atol=1e-9), name
    # not the square of the mean gradient: that would be much smaller
    assert sum(f.sum() for f in fisher.values()) > 0


def test_mask_propagation_on_a_hand_made_dictionary():
    # features 0 and 1 point almost the same way, 2 and 3 are orthogonal to them and to each other
    decoder = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    relevance = torch.tensor([1.0, 0.0, 0.0, 0.2])
    mask = reg.propagate_mask(relevance, decoder, knn=1, alpha=0.5)
    # m_1 = max(0, 0.5 * cos(1, 0) * r_0) = 0.5 * 0.8 = 0.4; feature 0 keeps r_0 = 1;
    # feature 3's nearest neighbour is 1 (cos 0.6, r_1 = 0): m_3 = max(0.2, 0) = 0.2; feature 2: cos 0 -> 0
    assert torch.allclose(mask, torch.tensor([1.0, 0.4, 0.0, 0.2]))
    assert torch.allclose(reg.propagate_mask(relevance, decoder, knn=1, alpha=0.0), relevance)


def test_protect_and_guide_on_hand_made_codes():
    class CodeSAE(torch.nn.Module):  # the "SAE" returns its input as the code
        def encode(self, x):
            return x

    z_ref = torch.zeros(1, 2, 4)
    z = torch.tensor([[[0.2, 0.0, 1.0, 0.0], [0.2, 0.4, 1.0, 0.0]]])
    content = torch.tensor([[1.0, 1.0]])
    # drift d = mean over 2 tokens |z - z_ref| = (0.2, 0.2, 1.0, 0.0)
    assert torch.allclose(reg.feature_drift(z, z_ref, content), torch.tensor([0.2, 0.2, 1.0, 0.0]))
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0])  # features 2, 3 relevant; 0, 1 protected
    # D_prot = (0.2 + 0.2) / 2 = 0.2; D_guide = (1.0 + 0.0) / 2 = 0.5
    penalty, logs = reg.sae_guided_penalty({1: z}, {1: z_ref}, {1: CodeSAE()}, {1: mask}, content,
                                           lambda_p=10.0, lambda_g=4.0, eps=0.1, delta=0.8)
    assert logs["protect"] == pytest.approx(0.2) and logs["guide"] == pytest.approx(0.5)
    # 10 * (0.2 - 0.1)^2 + 4 * (0.8 - 0.5)^2 = 0.1 + 0.36
    assert penalty.item() == pytest.approx(0.46)
    # padding is not content: a padded position does not count
    padded = reg.feature_drift(torch.cat([z, torch.ones(1, 1, 4)], 1), torch.zeros(1, 3, 4),
                               torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(padded, torch.tensor([0.2, 0.2, 1.0, 0.0]))


def test_reference_model_gets_no_gradient(tiny_model):
    from sae import SAEConfig, TopKSAE

    reference = reg.frozen_copy(tiny_model)
    with torch.no_grad():  # move the model away from its reference so that the drift is not zero
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sae = TopKSAE(SAEConfig(d_in=32, d_sae=64, k=4)).requires_grad_(False)
    x = torch.randint(0, 96, (2, 12))
    _, _, residuals = tiny_model(x, read=(1,))
    _, _, ref_residuals = reference(x, read=(1,))
    penalty, _ = reg.sae_guided_penalty(residuals, ref_residuals, {1: sae}, {1: torch.rand(64)}, torch.ones(2, 12),
                                        lambda_p=1.0, lambda_g=1.0, eps=0.0, delta=10.0)
    penalty.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


def test_feature_masks_keep_no_task_data(tiny_model, add_split):
    from sae import SAEConfig, TopKSAE

    torch.manual_seed(0)
    saes = {1: TopKSAE(SAEConfig(32, 64, 4)), 2: TopKSAE(SAEConfig(32, 64, 4))}
    masks = reg.build_feature_masks(tiny_model, saes, add_split, 32, knn=3, alpha=0.5)
    assert sorted(masks) == [1, 2]
    for m in masks.values():  # one vector of d_sae values in [0, 1] per layer, nothing else
        assert m.shape == (64,) and m.min() >= 0 and m.max() == pytest.approx(1.0)
        assert not m.requires_grad
    assert reg.tensor_bytes(masks) == 2 * 64 * 4
    binary = reg.build_feature_masks(tiny_model, saes, add_split, 32, 3, 0.5, binary_threshold=0.5)
    assert set(torch.cat(list(binary.values())).tolist()) <= {0.0, 1.0}


def test_merge_past_masks():
    current = torch.tensor([1.0, 1.0, 0.5])
    past = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.5, 0.5])]
    assert torch.allclose(reg.merge_past_masks(current, past), torch.tensor([1.0, 0.0, 0.25]))
    assert torch.equal(reg.merge_past_masks(current, []), current)


def test_replay_sample_size(add_split):
    idx = reg.replay_sample(add_split, 0.1, seed=0)
    assert len(idx) == 4 and len(set(idx.tolist())) == 4


def identity_sae(d=2):
    """A TopK SAE with W_enc = W_dec = I and zero biases: z = ReLU(x), xhat = z."""
    from sae import SAEConfig, TopKSAE

    sae = TopKSAE(SAEConfig(d_in=d, d_sae=d, k=d))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def test_sae_training_penalty_by_hand():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # xhat = ReLU(x) = [[1, 0], [3, 0]]
    # squared error per token: 4 and 0 -> mean 2; norms sqrt(5) and 3 -> mean (sqrt(5) + 3) / 2
    mean_norm = (5**0.5 + 3) / 2
    penalty = reg.sae_training_penalty({0: x}, {0: identity_sae()}, lam=3.0)
    assert penalty.item() == pytest.approx(3.0 * 2 / mean_norm)
    # L1 of z per token: 1 and 3 -> mean 2; and the mean over the points that have an SAE
    with_l1 = reg.sae_training_penalty({0: x, 1: torch.zeros(1, 2, 2) + 1.0}, {0: identity_sae(), 1: identity_sae()},
                                       lam=3.0, l1_coef=0.5)
    assert with_l1.item() == pytest.approx((3.0 * 2 / mean_norm + 0.5 * 2 + 0.0 + 0.5 * 2) / 2)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_sae_training_gradient_reaches_the_model_only_when_on(tiny_model, lam):
    from sae import SAEConfig, TopKSAE

    torch.manual_seed(0)
    saes = {p: TopKSAE(SAEConfig(32, 64, 4)) for p in (0, 1, 2)}
    x = torch.randint(0, 96, (2, 12))
    _, _, residuals = tiny_model(x, read=(0, 1, 2))
    reg.sae_training_penalty(residuals, saes, lam).backward()
    grads = [p.grad for p in tiny_model.parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached == (lam > 0)
    if lam > 0:  # the SAEs learn too
        assert saes[1].W_dec.grad.abs().sum() > 0
