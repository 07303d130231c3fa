import dataclasses

import pytest
import torch

import regularizers as reg
import pretrain
import train
from data.tasks import build_task_suite
from model import answer_log_likelihood


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


def flat(model, by_name):
    return torch.cat([by_name[name].reshape(-1) for name, _ in model.named_parameters()])


def test_ewc_modes(tiny_model):
    n = sum(p.numel() for p in tiny_model.parameters())
    theta = reg.flat_parameters(tiny_model).detach()
    separate = []
    reg.consolidate(separate, torch.ones(n), theta)
    reg.consolidate(separate, 2 * torch.ones(n), theta)
    assert len(separate) == 2
    online = []
    reg.consolidate(online, torch.ones(n), theta, mode="online", gamma=0.5)
    reg.consolidate(online, 2 * torch.ones(n), theta + 1, mode="online", gamma=0.5)
    assert len(online) == 1 and torch.allclose(online[0]["importance"], torch.full((n,), 2.5))
    assert torch.equal(online[0]["theta"], theta + 1)  # one anchor: the latest weights


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
        answer_log_likelihood(logits, y[i], mask[i]).backward()
        for name, p in tiny_model.named_parameters():
            brute[name] += p.grad.pow(2) / n
    assert torch.allclose(fisher, flat(tiny_model, brute), rtol=1e-4, atol=1e-9)
    assert fisher.sum() > 0


def test_mas_importance_matches_a_brute_force_loop(tiny_model, add_split):
    n = 10
    importance = reg.mas_importance(tiny_model, add_split, n, seed=5)
    idx = torch.randperm(len(add_split), generator=torch.Generator().manual_seed(5))[:n]
    brute = {name: torch.zeros_like(p) for name, p in tiny_model.named_parameters()}
    for i in idx.tolist():  # |d ||f(x)||^2 / d theta| per example, averaged; no labels anywhere
        tiny_model.zero_grad()
        logits = tiny_model(add_split.x[i : i + 1])[0][0]
        mask = add_split.answer_mask[i]
        ((logits.pow(2).sum(-1) * mask).sum() / mask.sum()).backward()
        for name, p in tiny_model.named_parameters():
            brute[name] += p.grad.abs() / n
    assert torch.allclose(importance, flat(tiny_model, brute), rtol=1e-4, atol=1e-7)
    # a mean of absolute values: larger than the absolute value of the mean gradient somewhere
    assert importance.min() >= 0 and importance.sum() > 0


def test_si_importance_on_a_hand_made_two_step_trajectory():
    model = torch.nn.Linear(2, 1, bias=False)
    config = dataclasses.replace(train.Config(), si_lambda=1.0, si_xi=0.5)
    si = reg.SI(config, model)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    si.before_task(model, None, 0)
    # step 1: g = (1, -2), the weights move by (-0.5, 0.5); step 2: g = (2, 1), they move by (-0.5, 0.0)
    for g, theta in (((1.0, -2.0), (0.5, 2.5)), ((2.0, 1.0), (0.0, 2.5))):
        model.weight.grad = torch.tensor([g])
        with torch.no_grad():
            model.weight.copy_(torch.tensor([theta]))
        si.after_step(model)
    si.after_task(model, None, 0)
    # path: -(1 * -0.5) - (2 * -0.5) = 1.5 and -(-2 * 0.5) - (1 * 0) = 1.0; total change (-1, 0.5)
    expected = torch.tensor([1.5 / (1.0 + 0.5), 1.0 / (0.25 + 0.5)])
    assert torch.allclose(si.anchors[0]["importance"], expected)
    assert torch.equal(si.anchors[0]["theta"], torch.tensor([0.0, 2.5]))
    assert si.path is None  # the running sums are not kept between tasks


def test_si_importance_is_never_negative():
    model = torch.nn.Linear(1, 1, bias=False)
    si = reg.SI(train.Config(), model)
    si.before_task(model, None, 0)
    model.weight.grad = torch.tensor([[1.0]])
    with torch.no_grad():
        model.weight.add_(1.0)  # a step up the gradient: -g * delta < 0
    si.after_step(model)
    si.after_task(model, None, 0)
    assert si.anchors[0]["importance"].item() == 0.0


@pytest.mark.parametrize("name", ["ewc", "si", "mas"])
def test_each_weight_space_method_is_lambda_half_w_squared_distance(tiny_model, add_split, name):
    """EWC, SI and MAS: penalty = (lambda/2) sum_i w_i (theta_i - theta*_i)^2 with each method's own w; zero at
    theta*; its gradient lambda w (theta - theta*)."""
    config = dataclasses.replace(train.Config(), ewc_lambda=7.0, si_lambda=7.0, mas_lambda=7.0,
                                 ewc_fisher_examples=8, mas_examples=8)
    method = reg.METHODS[name](config, tiny_model)
    method.before_task(tiny_model, add_split, 0)
    if name == "si":  # one real step, so that SI has a path to integrate
        tiny_model(add_split.x[:4], add_split.y[:4])[1].backward()
        with torch.no_grad():
            for p in tiny_model.parameters():
                p.sub_(0.01 * p.grad)
        method.after_step(tiny_model)
    method.after_task(tiny_model, add_split, 0)
    anchor = method.anchors[0]
    assert anchor["importance"].sum() > 0
    assert method.penalty(tiny_model, None, None)[0].item() == 0.0  # exactly zero at theta*
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    penalty, _ = method.penalty(tiny_model, None, None)
    theta = reg.flat_parameters(tiny_model)
    by_hand = 3.5 * (anchor["importance"] * (theta - anchor["theta"]) ** 2).sum()
    assert penalty.item() > 0 and penalty.item() == pytest.approx(by_hand.item(), rel=1e-5)
    tiny_model.zero_grad()
    penalty.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in tiny_model.parameters()])
    assert torch.allclose(grads, 7.0 * anchor["importance"] * (theta.detach() - anchor["theta"]), atol=1e-6)
    assert reg.tensor_bytes(method.retained()) == 2 * theta.numel() * 4  # w and theta*, float32


def test_lwf_is_zero_at_task_start_and_positive_after_a_change(tiny_model):
    import copy

    from data.tasks import trim_padding

    config = dataclasses.replace(train.Config(), lwf_lambda=2.0, lwf_temperature=2.0)
    start = copy.deepcopy(tiny_model)
    lwf = reg.LwF(config, tiny_model)
    split = build_task_suite(["add", "translate"], n_train=40, n_val=4, n_test=4)["add"]["train"]  # padded to 32
    lwf.before_task(tiny_model, split, 0)
    batch = trim_padding(split.rows(torch.tensor([5, 0, 3, 3])))  # as training draws them: any order, trimmed
    assert batch.x.size(1) < split.x.size(1)
    outputs = {"logits": tiny_model(batch.x)[0]}
    assert lwf.penalty(tiny_model, batch, outputs)[0].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        tiny_model.lm_head.weight.add_(0.1 * torch.randn_like(tiny_model.lm_head.weight))
    logits = tiny_model(batch.x)[0]
    penalty, logs = lwf.penalty(tiny_model, batch, {"logits": logits})
    assert penalty.item() > 0 and logs["kl"] > 0
    # by hand at one content position: 2 * T^2 * KL(softmax(ref / T) || softmax(logits / T)), padding ignored, with
    # ref the task-start model's logits on this batch (the cached ones were computed on the whole split, trimmed to
    # its longest example, not to this batch's)
    ref = start(batch.x)[0]
    p = torch.softmax(ref / 2, -1)
    kl = (p * (torch.log_softmax(ref / 2, -1) - torch.log_softmax(logits / 2, -1))).sum(-1)
    mask = batch.content_mask
    assert penalty.item() == pytest.approx((2 * 4 * (kl * mask).sum() / mask.sum()).item(), rel=1e-5)
    lwf.after_task(tiny_model, split, 0)
    assert reg.tensor_bytes(lwf.retained()) == 0 and lwf.ref_logits is None  # nothing outlives the task


def test_every_method_has_a_unique_name_and_its_config_keys_exist():
    config = train.Config()
    fields = {f.name for f in dataclasses.fields(config)}
    assert list(reg.METHODS) == ["seqft", "ewc", "si", "mas", "lwf", "o_lora", "sae_fd", "sae_guided", "freeze",
                                 "replay", "multitask"]
    assert reg.EWC.config_keys(config) == ("ewc_lambda", "ewc_mode", "ewc_gamma", "ewc_fisher_examples",
                                           "ewc_fisher_labels")
    assert "sae_guided_lambda_p" in reg.SAEGuided.config_keys(config) and reg.SeqFT.config_keys(config) == ()
    assert reg.SAEFD.config_keys(config) == ("sae_fd_lambda", "sae_fd_anchors", "sae_fd_batch_size")
    assert reg.OLoRA.config_keys(config) == ("o_lora_lambda",)
    for method in reg.METHODS.values():
        assert set(method.config_keys(config)) <= fields


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
    z_ref = torch.zeros(2, 4)  # the codes of two content tokens
    z = torch.tensor([[0.2, 0.0, 1.0, 0.0], [0.2, 0.4, 1.0, 0.0]])
    # drift d = mean over 2 tokens |z - z_ref| = (0.2, 0.2, 1.0, 0.0)
    assert torch.allclose(reg.feature_drift(z, z_ref), torch.tensor([0.2, 0.2, 1.0, 0.0]))
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0])  # features 2, 3 relevant; 0, 1 protected
    # D_prot = (0.2 + 0.2) / 2 = 0.2; D_guide = (1.0 + 0.0) / 2 = 0.5
    penalty, logs = reg.sae_guided_penalty({1: reg.feature_drift(z, z_ref)}, {1: mask}, lambda_p=10.0,
                                           lambda_g=4.0, eps=0.1, delta=0.8)
    assert logs["protect"] == pytest.approx(0.2) and logs["guide"] == pytest.approx(0.5)
    # 10 * (0.2 - 0.1)^2 + 4 * (0.8 - 0.5)^2 = 0.1 + 0.36
    assert penalty.item() == pytest.approx(0.46)


def test_only_content_tokens_are_encoded():
    sae = identity_sae(3)  # z = ReLU(x) (k = d)
    residual = torch.tensor([[[1.0, -1.0, 2.0], [5.0, 5.0, 5.0]], [[0.0, 3.0, 0.0], [4.0, 4.0, 4.0]]])
    content = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the second position of each row is padding
    codes = reg.sparse_to_dense(*reg.content_codes(sae, residual, content), 3)
    assert torch.equal(codes, torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))
    assert torch.equal(reg.content_codes(sae, residual, content, codes="dense"), codes)  # ReLU(x) again


def test_sparse_encoding_equals_the_dense_one_with_the_same_gradient():
    from sae import SAEConfig, TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, d_sae=64, k=4))
    with torch.no_grad():
        sae.b_enc.normal_()
    x1 = torch.randn(10, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    dense = sae.encode(x1)
    sparse = reg.sparse_to_dense(*sae.encode_sparse(x2), 64)
    assert torch.allclose(dense, sparse, atol=1e-6) and (sparse > 0).sum(-1).max() <= 4
    weights = torch.randn(10, 64)
    (dense * weights).sum().backward()
    (sparse * weights).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)


def test_reference_model_gets_no_gradient(tiny_model):
    from sae import SAEConfig, TopKSAE

    reference = reg.frozen_copy(tiny_model)
    with torch.no_grad():  # move the model away from its reference so that the drift is not zero
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sae = TopKSAE(SAEConfig(d_in=32, d_sae=64, k=4)).requires_grad_(False)
    x, content = torch.randint(0, 96, (2, 12)), torch.ones(2, 12)
    _, _, residuals = tiny_model(x, read=(1,))
    _, _, ref_residuals = reference(x, read=(1,))
    code, ref_code = (reg.content_codes(sae, r[1], content) for r in (residuals, ref_residuals))
    penalty, _ = reg.sae_guided_penalty({1: reg.sparse_feature_drift(code, ref_code, 64)}, {1: torch.rand(64)},
                                        lambda_p=1.0, lambda_g=1.0, eps=0.0, delta=10.0)
    penalty.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


def test_feature_masks_keep_no_task_data(tiny_model, add_split):
    from sae import SAEConfig, TopKSAE

    torch.manual_seed(0)
    saes = {1: TopKSAE(SAEConfig(32, 64, 4)), 2: TopKSAE(SAEConfig(32, 64, 4))}
    masks = reg.build_feature_masks(tiny_model, saes, add_split, n_examples=32, knn=3, alpha=0.5)
    assert sorted(masks) == [1, 2]
    for m in masks.values():  # one vector of d_sae values in [0, 1] per layer, nothing else
        assert m.shape == (64,) and m.min() >= 0 and m.max() == pytest.approx(1.0)
        assert not m.requires_grad
    assert reg.tensor_bytes(masks) == 2 * 64 * 4
    binary = reg.build_feature_masks(tiny_model, saes, add_split, n_examples=32, knn=3, alpha=0.5,
                                     binary_threshold=0.5)
    assert set(torch.cat(list(binary.values())).tolist()) <= {0.0, 1.0}


def test_merge_past_masks():
    current = torch.tensor([1.0, 1.0, 0.5])
    past = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.5, 0.5])]
    assert torch.allclose(reg.merge_past_masks(current, past), torch.tensor([1.0, 0.0, 0.25]))
    assert torch.equal(reg.merge_past_masks(current, []), current)


def test_random_mask_control_keeps_the_values_on_other_features(tiny_model, add_split):
    masks = {1: torch.linspace(0, 1, 64), 2: torch.rand(64, generator=torch.Generator().manual_seed(0))}
    shuffled = reg.shuffled_masks(masks, seed=3)
    for p, m in masks.items():  # the same values, so the same mass, on a permutation of the features
        assert torch.equal(shuffled[p].sort().values, m.sort().values) and not torch.equal(shuffled[p], m)
    assert torch.equal(reg.shuffled_masks(masks, seed=3)[1], shuffled[1])  # seeded
    config = dataclasses.replace(train.Config(), sae_guided_mask_examples=16, sae_guided_mask_knn=3,
                                 sae_guided_mask_random=True)
    saes = tiny_saes()
    method = reg.SAEGuided(config, tiny_model, saes, seed=0)
    method.before_task(tiny_model, add_split, 0)
    data_mask = reg.build_feature_masks(tiny_model, saes, add_split, n_examples=16, knn=3, alpha=0.5)
    for p in saes:
        assert torch.equal(method.mask[p].sort().values, data_mask[p].sort().values)
        assert not torch.equal(method.mask[p], data_mask[p])


def test_the_frozen_head_ablation_trains_everything_but_the_final_layernorm_and_the_tied_head(tiny_model):
    config = dataclasses.replace(train.Config(), sae_guided_freeze_head=True)
    reg.SAEGuided(config, tiny_model, tiny_saes())
    frozen = {n for n, p in tiny_model.named_parameters() if not p.requires_grad}
    assert frozen == {"wte.weight", "ln_f.weight"} | ({"ln_f.bias"} if tiny_model.ln_f.bias is not None else set())
    assert tiny_model.lm_head.weight is tiny_model.wte.weight  # the head is the token embedding: frozen with it


def test_sae_guided_points_pick_the_saes_the_penalty_uses(tiny_model, add_split):
    config = dataclasses.replace(train.Config(), sae_guided_mask_examples=16, sae_guided_mask_knn=3,
                                 sae_guided_points=(2,))
    method = reg.SAEGuided(config, tiny_model, tiny_saes())
    assert method.reads == (2,) and list(method.saes) == [2]
    method.before_task(tiny_model, add_split, 0)
    assert list(method.mask) == [2] and list(method.cached_codes["codes"]) == [2]
    with pytest.raises(ValueError, match="--sae_guided_points: 3 has no SAE; valid points are 1, 2"):
        train.parse_args(["--sae_guided_points=3"])


def test_replay_sample_size(add_split):
    idx = reg.replay_sample(add_split, 0.1, seed=0)
    assert len(idx) == 4 and len(set(idx.tolist())) == 4


def identity_sae(d=2, l1=0.0):
    """A TopK SAE with W_enc = W_dec = I and zero biases: z = ReLU(x), xhat = z."""
    from sae import SAEConfig, TopKSAE

    sae = TopKSAE(SAEConfig(d_in=d, d_sae=d, k=d, l1=l1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def test_sae_training_penalty_by_hand():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # xhat = ReLU(x) = [[1, 0], [3, 0]]
    # squared error per token: 4 and 0 -> mean 2; norms sqrt(5) and 3 -> mean (sqrt(5) + 3) / 2
    mean_norm = (5**0.5 + 3) / 2
    penalty = pretrain.sae_training_penalty({0: x}, {0: identity_sae()}, lam=3.0)
    assert penalty.item() == pytest.approx(3.0 * 2 / mean_norm)
    # the scale-free form: mean squared norm (5 + 9) / 2
    assert pretrain.sae_training_penalty({0: x}, {0: identity_sae()}, lam=3.0, norm="norm2").item() == pytest.approx(
        3.0 * 2 / 7)
    # the variance: mu = (2, -1), x - mu = (-1, -1) and (1, 1), E||x - mu||^2 = 2
    assert pretrain.sae_training_penalty({0: x}, {0: identity_sae()}, lam=3.0, norm="var").item() == pytest.approx(
        3.0 * 2 / 2)
    # L1 of z per token: 1 and 3 -> mean 2, times the SAE's l1; and the mean over the points that have an SAE
    with_l1 = pretrain.sae_training_penalty({0: x, 1: torch.zeros(1, 2, 2) + 1.0},
                                       {0: identity_sae(l1=0.5), 1: identity_sae(l1=0.5)}, lam=3.0)
    assert with_l1.item() == pytest.approx((3.0 * 2 / mean_norm + 0.5 * 2 + 0.0 + 0.5 * 2) / 2)


def test_only_the_variance_is_blind_to_a_constant_and_every_form_but_norm_to_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    constant = torch.tensor([5.0, -3.0, 0.0, 2.0])  # the same vector at every token
    scale = {n: pretrain.reconstruction_scale(x, n).item() for n in ("norm", "norm2", "var")}
    shifted = {n: pretrain.reconstruction_scale(x + constant, n).item() for n in scale}
    scaled = {n: pretrain.reconstruction_scale(3 * x, n).item() for n in scale}
    assert shifted["var"] == pytest.approx(scale["var"])
    assert shifted["norm"] > 2 * scale["norm"] and shifted["norm2"] > 5 * scale["norm2"]
    assert scaled["norm"] == pytest.approx(3 * scale["norm"])
    assert scaled["norm2"] == pytest.approx(9 * scale["norm2"]) and scaled["var"] == pytest.approx(9 * scale["var"])
    with pytest.raises(ValueError, match="--sae_reg_norm=norm3: choose from norm, norm2, var"):
        pretrain.reconstruction_scale(x, "norm3")


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_sae_training_gradient_reaches_the_model_only_when_on(tiny_model, lam):
    from sae import SAEConfig, TopKSAE

    torch.manual_seed(0)
    saes = {p: TopKSAE(SAEConfig(32, 64, 4)) for p in (0, 1, 2)}
    x = torch.randint(0, 96, (2, 12))
    _, _, residuals = tiny_model(x, read=(0, 1, 2))
    pretrain.sae_training_penalty(residuals, saes, lam).backward()
    grads = [p.grad for p in tiny_model.parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached == (lam > 0)
    if lam > 0:  # the SAEs learn too
        assert saes[1].W_dec.grad.abs().sum() > 0


def test_orthogonality_loss_is_zero_for_orthogonal_adapters_and_matches_a_hand_computation(tiny_model):
    model = tiny_model.add_lora(2, alpha=4.0, targets=("mlp_in",))  # one adapted layer per block, A (2, 32)
    layers = model.lora_layers()
    model.stack_adapters()
    eye = torch.eye(32)
    with torch.no_grad():
        for layer in layers:
            layer.past[0].copy_(eye[:2])  # A_1 reads directions 0, 1
            layer.A.copy_(eye[2:4])  # A_2 reads directions 2, 3: orthogonal
    assert reg.orthogonality_loss(model).item() == 0.0
    with torch.no_grad():
        layers[0].A.copy_(torch.tensor([[1.0, 2.0] + [0.0] * 30, [0.0, 0.0, 3.0] + [0.0] * 29]))
    # A_2 A_1^T = [[1, 2], [0, 0]] in block 0 (block 1 stays orthogonal): ||.||_F^2 = 1 + 4
    assert reg.orthogonality_loss(model).item() == pytest.approx(5.0)


def test_o_lora_trains_a_new_adapter_per_task_and_keeps_the_earlier_ones_frozen(tiny_model, add_split):
    config = dataclasses.replace(train.Config(), o_lora_lambda=2.0, lora_rank=2, lora_targets=("mlp_in",))
    method = reg.OLoRA(config, tiny_model)  # under full fine-tuning it brings its own adapters
    assert tiny_model.has_adapters() and not any(p.requires_grad for p in tiny_model.blocks[0].attn.parameters())
    method.before_task(tiny_model, add_split, 0)
    batch = add_split.rows(slice(0, 4))
    assert method.penalty(tiny_model, batch, {})[0] is None  # no earlier adapter yet
    method.after_task(tiny_model, add_split, 0)
    method.before_task(tiny_model, add_split, 1)
    penalty, logs = method.penalty(tiny_model, batch, {})
    assert penalty.item() == pytest.approx(2.0 * reg.orthogonality_loss(tiny_model).item()) and logs["orth"] > 0
    (tiny_model(batch.x, batch.y, batch.answer_mask)[1] + penalty).backward()
    for layer in tiny_model.lora_layers():
        assert all(p.grad is None for p in layer.past) and layer.A.grad.abs().sum() > 0
    # retained: the frozen first set, A (2, 32) and B (128, 2) in each of the 2 blocks, float32
    assert reg.tensor_bytes(method.retained()) == 2 * (2 * 32 + 128 * 2) * 4


def tiny_saes(points=(1, 2)):
    from sae import SAEConfig, TopKSAE

    torch.manual_seed(1)
    return {p: TopKSAE(SAEConfig(32, 64, 4)).requires_grad_(False) for p in points}


def test_sae_fd_is_zero_after_its_snapshot_and_positive_after_a_change(tiny_model, add_split):
    config = dataclasses.replace(train.Config(), sae_fd_lambda=3.0, sae_fd_anchors=8, sae_fd_batch_size=4)
    saes = tiny_saes()
    method = reg.SAEFD(config, tiny_model, saes, seed=0)
    assert method.penalty(tiny_model, None, {}) == (None, {})  # no finished task yet
    method.after_task(tiny_model, add_split, 0)
    penalty, _ = method.penalty(tiny_model, None, {})
    assert penalty.item() == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        tiny_model.blocks[0].mlp.c_fc.weight.add_(0.2 * torch.randn_like(tiny_model.blocks[0].mlp.c_fc.weight))
    penalty, logs = method.penalty(tiny_model, None, {})
    assert penalty.item() > 1e-3 and penalty.item() == pytest.approx(3.0 * logs["fd"])
    penalty.backward()
    assert tiny_model.blocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
    # retained: 8 anchors' tokens (int64) and content masks (float32), and per point their TopK codes (values
    # float32, indices int64) at every position
    n, length = 8, add_split.x.size(1)
    assert reg.tensor_bytes(method.retained()) == n * length * (8 + 4) + 2 * n * length * 4 * (4 + 8)
    method.after_task(tiny_model, add_split, 1)  # a second task's anchors join the pool
    assert len(method.anchors["x"]) == 16 and method.anchors["codes"][1][0].shape == (16, length, 4)


def test_cached_reference_codes_equal_recomputed_ones_and_end_with_the_task(tiny_model):
    from data.tasks import trim_padding

    # the template ('add: ', ' > ') is not content here: codes are cached at the content tokens only
    split = build_task_suite(["add"], n_train=40, n_val=5, n_test=5, template_is_content=False)["add"]["train"]
    config = dataclasses.replace(train.Config(), sae_guided_mask_examples=16, sae_guided_mask_knn=3)
    saes = tiny_saes()
    method = reg.SAEGuided(config, tiny_model, saes)
    method.before_task(tiny_model, split, 0)  # the reference: the model at task start
    reference = reg.frozen_copy(tiny_model)
    with torch.no_grad():  # training moves the model; the cache must not move with it
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = trim_padding(split.batch(12, torch.Generator().manual_seed(0), "cpu"))
    cached = reg.lookup_codes(method.cached_codes, batch)
    _, _, residuals = reference(batch.x, read=(1, 2))
    for p, sae in saes.items():
        values, indices = reg.content_codes(sae, residuals[p], batch.content_mask)
        assert cached[p][0].shape == values.shape == (int(batch.content_mask.sum()), 4)
        assert torch.equal(cached[p][0], values) and torch.equal(cached[p][1], indices)
    template = ~split.content_mask.bool()
    assert template.any() and all((v[template] == 0).all() for v, _ in method.cached_codes["codes"].values())
    method.after_task(tiny_model, split, 0)
    assert method.cached_codes is None
    state = {k: v for k, v in vars(method).items() if k not in ("saes", "config")}
    assert reg.tensor_bytes(state) == reg.tensor_bytes(method.masks) == 2 * 64 * 4  # the mask, nothing else


def test_sparse_drift_equals_the_dense_drift():
    torch.manual_seed(0)
    n, k, d_sae = 50, 4, 12  # few latents, so that the two codes share many
    pre, ref_pre = torch.rand(n, d_sae), torch.rand(n, d_sae)
    code, ref_code = pre.topk(k, dim=-1), ref_pre.topk(k, dim=-1)
    code, ref_code = (code.values, code.indices), (ref_code.values, ref_code.indices)
    dense = reg.feature_drift(reg.sparse_to_dense(*code, d_sae), reg.sparse_to_dense(*ref_code, d_sae))
    assert torch.allclose(reg.sparse_feature_drift(code, ref_code, d_sae), dense, atol=1e-6)
    assert torch.allclose(reg.code_drift(code, ref_code, d_sae), dense, atol=1e-6)
    assert reg.sparse_feature_drift(code, code, d_sae).abs().max() == 0  # a code does not drift from itself


def test_freeze_leaves_the_bottom_bit_identical_and_trains_the_rest(tiny_model, add_split):
    config = dataclasses.replace(train.Config(), freeze_layers=1, cl_batch_size=8)
    method = reg.Freeze(config, tiny_model)
    frozen = {n: p.detach().clone() for n, p in tiny_model.named_parameters()
              if n.startswith(("wte.", "wpe.", "blocks.0."))}
    others = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if n not in frozen}
    assert frozen and others
    bar = type("Bar", (), {"update": lambda *a: None, "set_postfix": lambda *a, **k: None})()
    train.train_steps(tiny_model, add_split, 3, method, config=config, device="cpu",
                      generator=torch.Generator().manual_seed(0), bar=bar)
    params = dict(tiny_model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())  # embeddings (and the tied head), block 1
    assert all(not torch.equal(params[n], p) for n, p in others.items())  # block 2 and the final LayerNorm
    with pytest.raises(ValueError, match="--freeze_layers=3: must be in 0..2 \\(n_layer=2\\)"):
        reg.Freeze.check(dataclasses.replace(train.Config(), freeze_layers=3, methods=("freeze",)))
    with pytest.raises(ValueError, match="--freeze_layers=2: must be in 0..1 .*under LoRA one block keeps its"):
        reg.Freeze.check(dataclasses.replace(train.Config(), freeze_layers=2, finetune="lora", methods=("freeze",)))


@pytest.mark.parametrize("reads_logits, reads, expected", [(False, (), "answers"), (False, (1,), "answers"),
                                                           (True, (), "every position"),
                                                           (False, (2,), "every position")])
def test_a_step_computes_the_logits_at_the_answers_only_unless_the_penalty_reads_more(tiny_model, add_split,
                                                                                      reads_logits, reads, expected):
    """The loss reads the answers' logits; a penalty that reads the logits everywhere (LwF) or the last point
    (SAE-guided) gets the whole forward pass."""
    seen = []

    class Spy(reg.Method):
        def penalty(self, model, batch, outputs):
            n_answers = int(batch.answer_mask.sum())
            seen.append("answers" if outputs["logits"].shape[:-1] == (n_answers,) else
                        "every position" if outputs["logits"].shape[:-1] == batch.x.shape else "other")
            assert sorted(outputs["residuals"]) == sorted(self.reads)
            return None, {}

    config = dataclasses.replace(train.Config(), cl_batch_size=8)
    bar = type("Bar", (), {"update": lambda *a: None, "set_postfix": lambda *a, **k: None})()
    spy = Spy(config, tiny_model)
    spy.reads_logits, spy.reads = reads_logits, reads
    tiny_model.train()
    train.train_steps(tiny_model, add_split, 1, spy, config=config, device="cpu",
                      generator=torch.Generator().manual_seed(0), bar=bar)
    assert seen == [expected]


# ----------------------------------------------------------------------------------------------------------------
# the core math, each against a computation by hand (each fails on a plausible slip in the code it checks)


def test_sae_guided_penalty_is_zero_at_task_start_and_measured_against_the_task_start_codes(tiny_model, add_split):
    from data.tasks import trim_padding

    config = dataclasses.replace(train.Config(), sae_guided_mask_examples=16, sae_guided_mask_knn=3,
                                 sae_guided_lambda_p=5.0, sae_guided_lambda_g=0.0, sae_guided_eps=0.0,
                                 sae_guided_delta=0.0)
    saes = tiny_saes()
    method = reg.SAEGuided(config, tiny_model, saes)
    method.before_task(tiny_model, add_split, 0)
    reference = reg.frozen_copy(tiny_model)  # the model at task start
    batch = trim_padding(add_split.batch(8, torch.Generator().manual_seed(0), "cpu"))

    def penalty():
        _, _, residuals = tiny_model(batch.x, read=method.reads)
        return method.penalty(tiny_model, batch, {"residuals": residuals})[0]

    assert penalty().item() == 0.0  # nothing has moved yet
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, _, now = tiny_model(batch.x, read=(1, 2))
    _, _, start = reference(batch.x, read=(1, 2))
    drifts = {p: reg.code_drift(reg.content_codes(sae, now[p], batch.content_mask),
                                reg.content_codes(sae, start[p], batch.content_mask), 64) for p, sae in saes.items()}
    # by hand: 5 * sum_l (sum_j (1 - m_j) d_j / sum_j (1 - m_j))^2
    expected = sum(5.0 * (((1 - method.mask[p]) * d).sum() / (1 - method.mask[p]).sum()) ** 2
                   for p, d in drifts.items())
    assert expected.item() > 0 and penalty().item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_error_ablation_adds_the_drift_of_the_sae_error_against_the_task_start_model_by_hand(tiny_model,
                                                                                                   add_split):
    """--sae_guided_error_lambda: lambda_e sum_l D_err_l^2 beside the codes' hinge, D_err = mean ||e - e_ref|| /
    mean ||x_ref|| on the content tokens, e = x - xhat; 0 at task start; only the model gets gradients."""
    from data.tasks import trim_padding

    config = dataclasses.replace(train.Config(), sae_guided_mask_examples=16, sae_guided_mask_knn=3,
                                 sae_guided_lambda_p=0.0, sae_guided_lambda_g=0.0, sae_guided_eps=0.0,
                                 sae_guided_delta=0.0, sae_guided_error_lambda=3.0)
    saes = tiny_saes()
    method = reg.SAEGuided(config, tiny_model, saes)
    method.before_task(tiny_model, add_split, 0)
    start = reg.frozen_copy(tiny_model)
    batch = trim_padding(add_split.batch(8, torch.Generator().manual_seed(0), "cpu"))

    def penalty():
        _, _, residuals = tiny_model(batch.x, read=method.reads)
        return method.penalty(tiny_model, batch, {"residuals": residuals})

    assert penalty()[0].item() == 0.0  # nothing has moved yet
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, _, now = tiny_model(batch.x, read=(1, 2))
    _, _, then = start(batch.x, read=(1, 2))
    content = batch.content_mask.bool()
    expected = 0.0
    for p, sae in saes.items():
        x, x_ref = now[p][content], then[p][content]
        e, e_ref = x - sae.reconstruct(x)[0], x_ref - sae.reconstruct(x_ref)[0]
        expected += 3.0 * ((e - e_ref).norm(dim=-1).mean() / x_ref.norm(dim=-1).mean()) ** 2
    value, logs = penalty()
    assert expected.item() > 0 and value.item() == pytest.approx(expected.item(), rel=1e-5) and logs["error"] > 0
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())
    assert all(p.grad is None for sae in saes.values() for p in sae.parameters())
    assert all(p.grad is None for p in method.reference.parameters())  # the task-start copy is frozen
    off = reg.SAEGuided(dataclasses.replace(config, sae_guided_error_lambda=0.0), tiny_model, saes)
    off.before_task(tiny_model, add_split, 0)
    assert off.reference is None  # without the ablation the reference's codes are cached: no copy is run


def test_mask_propagation_takes_the_strongest_of_several_neighbours():
    decoder = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.0, 0.8], [0.0, 0.0, 1.0]])
    relevance = torch.tensor([0.0, 0.5, 1.0, 0.0])
    # cosines: S01 = 0.8, S02 = 0.6, S12 = 0.48, S23 = 0.8, S03 = S13 = 0. With knn = 2 and alpha = 1:
    # m_0 = max(0, 0.8 * 0.5, 0.6 * 1.0) = 0.6     m_1 = max(0.5, 0.8 * 0, 0.48 * 1.0) = 0.5
    # m_2 = max(1.0, ...) = 1.0                      m_3 = max(0, 0.8 * 1.0, 0 * ...) = 0.8
    mask = reg.propagate_mask(relevance, decoder, knn=2, alpha=1.0)
    assert torch.allclose(mask, torch.tensor([0.6, 0.5, 1.0, 0.8]))


def test_feature_relevance_is_the_mean_absolute_topk_code_over_content_tokens(tiny_model, add_split):
    saes = tiny_saes()
    relevance = reg.feature_relevance(tiny_model, saes, add_split, n_examples=12, batch_size=5)
    _, _, residuals = tiny_model(add_split.x[:12], read=(1, 2))
    content = add_split.content_mask[:12].bool()
    for p, sae in saes.items():
        r = sae.encode(residuals[p][content]).abs().mean(0)  # mean over the content tokens of |z_j|
        assert torch.allclose(relevance[p], r / r.max(), atol=1e-6)
        assert (relevance[p] == 0).sum() > 0  # TopK codes: latents that never win have relevance 0


def test_sae_fd_distance_is_the_squared_code_distance_by_hand(tiny_model, add_split):
    config = dataclasses.replace(train.Config(), sae_fd_lambda=2.0, sae_fd_anchors=8, sae_fd_batch_size=4)
    saes = tiny_saes()
    method = reg.SAEFD(config, tiny_model, saes, seed=0)
    method.after_task(tiny_model, add_split, 0)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    draw = torch.Generator().set_state(method.generator.get_state())  # the anchors the penalty will draw
    penalty, logs = method.penalty(tiny_model, None, {})
    idx = torch.randint(8, (4,), generator=draw)
    x, content = method.anchors["x"][idx], method.anchors["content_mask"][idx].bool()
    _, _, residuals = tiny_model(x, read=(1, 2))
    distance = 0.0
    for p, sae in saes.items():
        stored = reg.sparse_to_dense(*(c[idx][content] for c in method.anchors["codes"][p]), 64)
        z = sae.encode(residuals[p][content])
        distance += (z - stored).pow(2).sum(-1).mean().item()  # mean over tokens of ||z - z*||^2, summed over points
    assert distance > 0 and logs["fd"] == pytest.approx(distance, rel=1e-4)
    assert penalty.item() == pytest.approx(2.0 * distance, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# tests that bite: SAE-guided's masks, and the gradient of the SAE-training penalty


def test_protect_past_merges_the_earlier_tasks_masks_only(tiny_model, add_split):
    """With protect_past, the mask of task t is m_t * (1 - max_{s<t} m_s): the earlier masks, never task t's own
    (which would turn every relevant feature into a protected one)."""
    config = dataclasses.replace(train.Config(), sae_guided_mask_examples=16, sae_guided_mask_knn=3,
                                 sae_guided_protect_past=True)
    saes = tiny_saes()
    sort_split = build_task_suite(["sort"], n_train=40, n_val=5, n_test=5)["sort"]["train"]
    method = reg.SAEGuided(config, tiny_model, saes)
    method.before_task(tiny_model, add_split, 0)
    first = reg.build_feature_masks(tiny_model, saes, add_split, n_examples=16, knn=3, alpha=0.5)
    assert all(torch.equal(method.mask[p], first[p]) for p in saes)  # nothing before the first task
    method.after_task(tiny_model, add_split, 0)
    method.before_task(tiny_model, sort_split, 1)
    second = reg.build_feature_masks(tiny_model, saes, sort_split, n_examples=16, knn=3, alpha=0.5)
    for p in saes:
        assert torch.allclose(method.mask[p], second[p] * (1 - first[p]))


def test_the_base_reference_builds_the_mask_from_the_base_not_from_the_trained_model(tiny_model, add_split):
    config = dataclasses.replace(train.Config(), sae_guided_mask_examples=16, sae_guided_mask_knn=3,
                                 sae_guided_reference="base")
    saes = tiny_saes()
    base_mask = reg.build_feature_masks(tiny_model, saes, add_split, n_examples=16, knn=3, alpha=0.5)
    method = reg.SAEGuided(config, tiny_model, saes)
    with torch.no_grad():  # the model moves away from the base, as a task's training moves it
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved_mask = reg.build_feature_masks(tiny_model, saes, add_split, n_examples=16, knn=3, alpha=0.5)
    method.before_task(tiny_model, add_split, 1)
    for p in saes:
        assert torch.equal(method.mask[p], base_mask[p]) and not torch.equal(method.mask[p], moved_mask[p])


@pytest.mark.parametrize("norm", ["norm", "norm2", "var"])
def test_sae_training_penalty_gradient_matches_finite_differences(norm):
    """The denominator D(x) is part of the loss: its gradient reaches x (gradcheck compares autograd with finite
    differences; a detached D would differ)."""
    sae = identity_sae().double()
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.5], [-0.7, 1.3]]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pretrain.sae_training_penalty({0: x}, {0: sae}, 3.0, norm=norm), (x,))


def test_a_task_s_references_and_importances_read_its_examples_up_to_its_longest_only(tiny_model):
    """The same add examples padded to their own length, or to translate's as the suite pads them: LwF's reference
    logits, SAE-guided's mask and cached codes, EWC's Fisher and MAS's importance are the same (on the columns the
    examples have), and the model never reads a column past the longest example."""
    from sae import SAEConfig, TopKSAE

    from data.tasks import example_lengths

    alone = build_task_suite(["add"], n_train=40, n_val=4, n_test=4)["add"]["train"]
    padded = build_task_suite(["add", "translate"], n_train=40, n_val=4, n_test=4)["add"]["train"]
    longest = int(example_lengths(alone).max())
    assert alone.x.size(1) == longest < padded.x.size(1) and torch.equal(padded.x[:, :longest], alone.x)
    torch.manual_seed(0)
    saes = {1: TopKSAE(SAEConfig(32, 64, 4)), 2: TopKSAE(SAEConfig(32, 64, 4))}
    config = dataclasses.replace(train.Config(), lwf_temperature=2.0)

    def outputs(split):
        lwf = reg.LwF(config, tiny_model)
        lwf.before_task(tiny_model, split, 0)
        codes = reg.reference_codes(tiny_model, saes, split)["codes"]
        return {"lwf": lwf.ref_logits, **{f"codes {p}": c for p, c in codes.items()},
                **{f"mask {p}": m for p, m in reg.build_feature_masks(tiny_model, saes, split, n_examples=32, knn=3,
                                                                     alpha=0.5).items()},
                "fisher": reg.fisher_diagonal(tiny_model, split, 8, seed=3),
                "mas": reg.mas_importance(tiny_model, split, 8, seed=3)}

    widths = []
    hook = tiny_model.register_forward_pre_hook(lambda module, args: widths.append(args[0].size(-1)))
    try:
        expected, got = outputs(alone), outputs(padded)
    finally:
        hook.remove()
    assert max(widths) == longest
    for name, value in expected.items():
        if name.startswith("codes"):
            assert all(torch.equal(a, b) for a, b in zip(value, got[name])), name
        else:
            assert torch.allclose(value, got[name], atol=1e-6), name
