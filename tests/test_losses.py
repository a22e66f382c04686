"""Tests for dcl.losses: reference values, a per-anchor loop oracle, numerics."""

import math
import re

import pytest
import torch

from dcl.losses import (
    DCLLoss,
    DCLWLoss,
    InfoNCELoss,
    build_loss,
    dclw_weight,
    npc_multiplier,
)

torch.set_num_threads(1)

F64 = torch.float64


def _oracle_anchor_parts(z1, z2, temperature):
    """Return per-anchor (k, i, s_i, U_{i,k}) by looping, on normalised inputs."""
    views = [z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)]
    n = z1.shape[0]
    pos_sim = [torch.dot(views[0][i], views[1][i]) for i in range(n)]
    parts = []
    for k in range(2):
        for i in range(n):
            neg_sum = 0.0
            for view in views:
                for j in range(n):
                    if j != i:
                        logit = torch.dot(views[k][i], view[j]) / temperature
                        neg_sum = neg_sum + torch.exp(logit)
            parts.append((k, i, pos_sim[i], neg_sum))
    return pos_sim, parts


def _oracle_weights(pos_sim, sigma, detach, weight_min):
    sims = torch.stack(pos_sim)
    if detach:
        sims = sims.detach()
    exps = [torch.exp(s / sigma) for s in sims]
    mean_exp = sum(exps) / len(exps)
    weights = []
    for e in exps:
        w = 2 - e / mean_exp
        if weight_min is not None and w < weight_min:
            w = torch.ones_like(w) * weight_min
        weights.append(w)
    return weights


def oracle_loss(z1, z2, kind, temperature, sigma=0.5, detach=True, weight_min=None):
    """Slow reference: loop over the 2N anchors and average their losses."""
    pos_sim, parts = _oracle_anchor_parts(z1, z2, temperature)
    weights = _oracle_weights(pos_sim, sigma, detach, weight_min)
    total = 0.0
    for _, i, s, neg_sum in parts:
        pos = torch.exp(s / temperature)
        if kind == "infonce":
            total = total - torch.log(pos / (pos + neg_sum))
        elif kind == "dcl":
            total = total - s / temperature + torch.log(neg_sum)
        else:
            total = total - weights[i] * s / temperature + torch.log(neg_sum)
    return total / len(parts)


def oracle_npc(z1, z2, temperature):
    _, parts = _oracle_anchor_parts(z1, z2, temperature)
    values = []
    for _, _, s, neg_sum in parts:
        pos = torch.exp(s / temperature)
        values.append(1 - pos / (pos + neg_sum))
    return torch.stack(values)


def random_views(n, d, seed, dtype=F64, noise=0.5):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen, dtype=dtype)
    z2 = z1 + noise * torch.randn(n, d, generator=gen, dtype=dtype)
    return z1, z2


def random_similarities(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(n, dtype=F64).uniform_(-1, 1, generator=gen)


def all_losses(temperature=0.1):
    return [InfoNCELoss(temperature), DCLLoss(temperature), DCLWLoss(temperature)]


# Reference values on z^(1) = z^(2) = [[1, 0], [0, 1]]: s = [1, 1] and every
# anchor has two negatives of similarity 0, so U = 2.
IDENTITY_CASES = [
    (1.0, InfoNCELoss, 0.551445),
    (1.0, DCLLoss, -0.306853),
    (0.5, InfoNCELoss, 0.239545),
    (0.5, DCLLoss, -1.306853),
]


@pytest.mark.parametrize("temperature, loss_cls, expected", IDENTITY_CASES)
def test_reference_values_identity_views(temperature, loss_cls, expected):
    z = torch.eye(2, dtype=F64)
    loss = loss_cls(temperature)(z, z.clone())
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("temperature, split_value", [(1.0, -1.0), (0.5, -2.0)])
def test_dcl_not_split_negatives(temperature, split_value):
    # Two separate log-sum-exps over same-view and cross-view negatives would
    # give -1/tau + log 1 + log 1 here.
    z = torch.eye(2, dtype=F64)
    loss = DCLLoss(temperature)(z, z.clone())
    assert abs(loss.item() - split_value) > 0.1


def test_dclw_weight_reference():
    weight = dclw_weight(torch.tensor([1.0, 0.0], dtype=F64), sigma=0.5)
    assert weight[0].item() == pytest.approx(0.238406, abs=1e-6)
    assert weight[1].item() == pytest.approx(1.761594, abs=1e-6)


ORACLE_CASES = [
    # (kind, n, d, temperature, detach, clamp)
    ("infonce", 2, 3, 0.5, True, False),
    ("infonce", 5, 4, 0.1, True, False),
    ("dcl", 2, 3, 0.5, True, False),
    ("dcl", 6, 5, 0.1, True, False),
    ("dclw", 4, 3, 0.2, True, False),
    ("dclw", 4, 3, 0.2, False, False),
    ("dclw", 6, 2, 0.1, True, True),
    ("dclw", 6, 2, 0.1, False, True),
]


@pytest.mark.parametrize("kind, n, d, temperature, detach, clamp", ORACLE_CASES)
def test_loss_matches_loop_oracle(kind, n, d, temperature, detach, clamp):
    z1, z2 = random_views(n, d, seed=n * 10 + d, noise=1.0)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    weight_min = None
    if clamp:
        # A bound halfway between the middle two unclamped weights clamps half
        # the pairs and keeps every weight away from the bound.
        sims = torch.nn.functional.cosine_similarity(z1, z2, dim=1).detach()
        sorted_weights = dclw_weight(sims, 0.5).sort().values
        weight_min = sorted_weights[n // 2 - 1 : n // 2 + 1].mean().item()
    loss_fn = build_loss(
        kind, temperature, sigma=0.5, detach_weight=detach, weight_min=weight_min
    )

    loss = loss_fn(z1, z2)
    expected = oracle_loss(z1, z2, kind, temperature, 0.5, detach, weight_min)
    grads = torch.autograd.grad(loss, (z1, z2))
    expected_grads = torch.autograd.grad(expected, (z1, z2))

    assert loss.item() == pytest.approx(expected.item(), abs=1e-10)
    assert torch.allclose(grads[0], expected_grads[0], rtol=0, atol=1e-10)
    assert torch.allclose(grads[1], expected_grads[1], rtol=0, atol=1e-10)


def test_dclw_detach_changes_gradient():
    z1, z2 = random_views(5, 3, seed=1, noise=1.0)
    z1.requires_grad_(True)
    loss_detached = DCLWLoss(0.1, detach_weight=True)(z1, z2)
    loss_attached = DCLWLoss(0.1, detach_weight=False)(z1, z2)
    grad_detached = torch.autograd.grad(loss_detached, z1)[0]
    grad_attached = torch.autograd.grad(loss_attached, z1)[0]
    assert not torch.allclose(grad_detached, grad_attached)


@pytest.mark.parametrize("loss_fn", all_losses(0.2), ids=["infonce", "dcl", "dclw"])
def test_loss_symmetric_in_views(loss_fn):
    z1, z2 = random_views(6, 8, seed=2)
    assert loss_fn(z1, z2).item() == pytest.approx(loss_fn(z2, z1).item(), abs=1e-12)


@pytest.mark.parametrize("loss_fn", all_losses(0.2), ids=["infonce", "dcl", "dclw"])
def test_loss_invariant_to_scale(loss_fn):
    z1, z2 = random_views(6, 8, seed=3)
    expected = loss_fn(z1, z2).item()
    assert loss_fn(3.7 * z1, 0.2 * z2).item() == pytest.approx(expected, abs=1e-12)


def test_dclw_weight_mean_one():
    sims = random_similarities(64, seed=4)
    weight = dclw_weight(sims, sigma=0.5)
    assert weight.mean().item() == pytest.approx(1.0, abs=1e-12)


def test_dclw_weight_can_be_negative():
    weight = dclw_weight(torch.tensor([1.0, -1.0, -1.0], dtype=F64), sigma=0.2)
    assert weight.min().item() < 0


def test_dclw_weight_clamp_min():
    sims = random_similarities(64, seed=5)
    weight = dclw_weight(sims, sigma=0.1, weight_min=0.25)
    assert weight.min().item() >= 0.25


def stability_inputs():
    gen = torch.Generator().manual_seed(6)
    z1 = torch.randn(16, 32, generator=gen)
    random_pair = (z1, torch.randn(16, 32, generator=gen))
    # All 32 embeddings differ from one vector by 1e-4, so every logit is near 1/tau.
    base = torch.randn(1, 32, generator=gen)
    near_identical = (
        base + 1e-4 * torch.randn(16, 32, generator=gen),
        base + 1e-4 * torch.randn(16, 32, generator=gen),
    )
    return {"random": random_pair, "near_identical": near_identical}


@pytest.mark.parametrize("case", ["random", "near_identical"])
@pytest.mark.parametrize("loss_fn", all_losses(0.01), ids=["infonce", "dcl", "dclw"])
def test_small_temperature_finite_float32(loss_fn, case):
    z1, z2 = (z.clone().requires_grad_(True) for z in stability_inputs()[case])
    loss = loss_fn(z1, z2)
    grad1, grad2 = torch.autograd.grad(loss, (z1, z2))
    assert torch.isfinite(loss)
    assert torch.isfinite(grad1).all()
    assert torch.isfinite(grad2).all()


@pytest.mark.parametrize("loss_fn", all_losses(0.01), ids=["infonce", "dcl", "dclw"])
def test_bf16_autocast_float32_result(loss_fn):
    z1, z2 = (z.to(torch.bfloat16) for z in stability_inputs()["random"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(z1, z2)
    reference = loss_fn(z1.float(), z2.float())
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("loss_fn", all_losses(0.01), ids=["infonce", "dcl", "dclw"])
def test_autocast_keeps_float32_matmul(loss_fn):
    # Under CPU autocast an unguarded matmul of float32 inputs would run in bf16.
    z1, z2 = stability_inputs()["random"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(z1, z2)
    assert loss.item() == pytest.approx(loss_fn(z1, z2).item(), rel=1e-6)


def test_npc_matches_loop_oracle():
    z1, z2 = random_views(5, 4, seed=7)
    expected = oracle_npc(z1, z2, 0.2)
    assert torch.allclose(npc_multiplier(z1, z2, 0.2), expected, rtol=0, atol=1e-12)


def test_npc_in_open_unit_interval():
    z1, z2 = random_views(32, 16, seed=8, dtype=torch.float32)
    q = npc_multiplier(z1, z2, 0.1)
    assert q.shape == (64,)
    assert q.min().item() > 0
    assert q.max().item() < 1


def test_npc_without_gradient():
    z1, z2 = random_views(4, 3, seed=9)
    z1.requires_grad_(True)
    assert not npc_multiplier(z1, z2).requires_grad


def test_npc_mean_grows_with_batch():
    means = []
    for n in (8, 64, 512):
        z1, z2 = random_views(n, 32, seed=10, dtype=torch.float32)
        means.append(npc_multiplier(z1, z2, 0.1).mean().item())
    assert means[0] < means[1]
    assert means[1] < means[2]


def test_npc_vanishes_for_easy_batch():
    # Identical positives, orthogonal negatives: q_B = 6 / (e^{20} + 6) at tau = 0.05.
    z = torch.eye(4)
    q = npc_multiplier(z, z.clone(), temperature=0.05)
    assert q.max().item() < 1e-6
    assert q[0].item() == pytest.approx(6 / (math.exp(20) + 6), rel=1e-4)


@pytest.mark.parametrize("loss_cls", [InfoNCELoss, DCLLoss, DCLWLoss])
def test_zero_temperature_rejected(loss_cls):
    with pytest.raises(ValueError, match="temperature=0"):
        loss_cls(temperature=0)


def test_npc_zero_temperature_rejected():
    z1, z2 = random_views(4, 3, seed=11)
    with pytest.raises(ValueError, match="temperature=0"):
        npc_multiplier(z1, z2, temperature=0.0)


def test_negative_sigma_rejected():
    with pytest.raises(ValueError, match="sigma=-0.5"):
        DCLWLoss(sigma=-0.5)


def test_dclw_weight_negative_sigma():
    with pytest.raises(ValueError, match="sigma=-1"):
        dclw_weight(torch.zeros(3), sigma=-1)


@pytest.mark.parametrize("loss_fn", all_losses(), ids=["infonce", "dcl", "dclw"])
def test_shape_mismatch_rejected(loss_fn):
    with pytest.raises(ValueError, match=re.escape("(4, 3)")):
        loss_fn(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.parametrize("loss_fn", all_losses(), ids=["infonce", "dcl", "dclw"])
def test_single_image_batch_rejected(loss_fn):
    with pytest.raises(ValueError, match="N=1"):
        loss_fn(torch.randn(1, 3), torch.randn(1, 3))


def test_unknown_loss_name_rejected():
    with pytest.raises(ValueError, match="'simclr'.*infonce, dcl, dclw"):
        build_loss("simclr", temperature=0.1)


def test_build_loss_passes_options():
    loss_fn = build_loss("dclw", 0.2, sigma=0.3, detach_weight=False, weight_min=0.0)
    assert isinstance(loss_fn, DCLWLoss)
    assert loss_fn.temperature == 0.2
    assert loss_fn.sigma == 0.3
    assert loss_fn.detach_weight is False
    assert loss_fn.weight_min == 0.0
