"""Tests for dcl.optim: learning-rate scaling, parameter groups, LARS and the schedule."""

import math

import pytest
import torch
from torch import nn

from dcl.optim import LARS, build_optimizer, param_groups, scaled_lr, warmup_cosine

torch.set_num_threads(1)


def test_scaled_lr_linear():
    assert scaled_lr(0.4, 512, "linear") == pytest.approx(0.8)
    assert scaled_lr(0.4, 256, "linear") == pytest.approx(0.4)


def test_scaled_lr_sqrt():
    assert scaled_lr(0.025, 256, "sqrt") == pytest.approx(0.4)
    assert scaled_lr(0.1, 64, "sqrt") == pytest.approx(0.8)


def test_scaled_lr_unknown_rule():
    with pytest.raises(ValueError, match="'cubic'"):
        scaled_lr(0.1, 64, "cubic")


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2),
        nn.BatchNorm1d(2),
    )


def test_param_groups_split_by_ndim():
    net = _small_net()

    decay, no_decay = param_groups(net, weight_decay=1e-4)

    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name, param in net.named_parameters():
        if param.ndim == 1:
            assert id(param) in no_decay_ids, name
        else:
            assert id(param) in decay_ids, name
    assert len(decay_ids) + len(no_decay_ids) == len(list(net.parameters()))


def test_param_groups_settings():
    decay, no_decay = param_groups(_small_net(), weight_decay=1e-4)

    assert decay["weight_decay"] == 1e-4
    assert decay["lars_adaptation"] is True
    assert no_decay["weight_decay"] == 0.0
    assert no_decay["lars_adaptation"] is False


def test_param_groups_skip_frozen():
    net = _small_net()
    net[0].weight.requires_grad_(False)

    decay, no_decay = param_groups(net, weight_decay=0.0)

    all_ids = {id(p) for p in decay["params"] + no_decay["params"]}
    assert id(net[0].weight) not in all_ids


def _lars_reference(param, grads, lr, momentum, weight_decay, eta):
    """Apply LARS by hand with float64 Python arithmetic on a list of values."""
    p = list(param)
    buffer = None
    for g in grads:
        update = [gi + weight_decay * pi for gi, pi in zip(g, p)]
        param_norm = math.sqrt(sum(x * x for x in p))
        update_norm = math.sqrt(sum(x * x for x in update))
        trust = eta * param_norm / update_norm
        update = [trust * u for u in update]
        if buffer is None:
            buffer = update
        else:
            buffer = [momentum * b + u for b, u in zip(buffer, update)]
        p = [pi - lr * b for pi, b in zip(p, buffer)]
    return p


def test_lars_step_matches_hand_computation():
    start = [3.0, -4.0]
    grads = [[0.5, 1.0], [-2.0, 0.25], [1.0, 1.0]]
    lr, momentum, weight_decay, eta = 0.7, 0.9, 0.1, 0.02
    param = nn.Parameter(torch.tensor(start, dtype=torch.float64).reshape(1, 2))
    optimizer = LARS([{"params": [param], "weight_decay": weight_decay}], lr=lr,
                     momentum=momentum, eta=eta)

    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64).reshape(1, 2)
        optimizer.step()

    expected = _lars_reference(start, grads, lr, momentum, weight_decay, eta)
    assert param.detach().flatten().tolist() == pytest.approx(expected, rel=1e-12)


def test_lars_first_step_value():
    # With p = (3, -4), g = 0 and wd = 1, both ‖p‖ and ‖g + wd·p‖ are 5. So the trust
    # ratio is eta and the step is lr·eta·p = 0.5·0.1·p.
    param = nn.Parameter(torch.tensor([[3.0, -4.0]], dtype=torch.float64))
    optimizer = LARS([{"params": [param], "weight_decay": 1.0}], lr=0.5, eta=0.1)
    param.grad = torch.zeros_like(param)

    optimizer.step()

    assert param.detach().flatten().tolist() == pytest.approx([3.0 * 0.95, -4.0 * 0.95])


def test_lars_no_adaptation_is_sgd():
    start = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grads = [torch.tensor(g, dtype=torch.float64) for g in ([0.3, 0.1, -0.2], [1.0, -1.0, 2.0])]
    lars_param = nn.Parameter(start.clone())
    sgd_param = nn.Parameter(start.clone())
    lars = LARS([{"params": [lars_param], "weight_decay": 0.5, "lars_adaptation": False}],
                lr=0.1, momentum=0.9, eta=0.02)
    sgd = torch.optim.SGD([sgd_param], lr=0.1, momentum=0.9)

    for g in grads:
        lars_param.grad = g.clone()
        sgd_param.grad = g.clone()
        lars.step()
        sgd.step()

    assert torch.allclose(lars_param, sgd_param, rtol=0, atol=1e-15)


def test_lars_zero_param_uses_unit_trust():
    param = nn.Parameter(torch.zeros(1, 2, dtype=torch.float64))
    optimizer = LARS([param], lr=0.1, eta=0.02)
    param.grad = torch.tensor([[1.0, 2.0]], dtype=torch.float64)

    optimizer.step()

    assert param.detach().flatten().tolist() == pytest.approx([-0.1, -0.2])


def test_lars_rejects_nonpositive_lr():
    with pytest.raises(ValueError, match="got 0"):
        LARS([nn.Parameter(torch.ones(2))], lr=0)


def test_build_optimizer_lars_groups():
    optimizer = build_optimizer(_small_net(), "lars", lr=0.3, momentum=0.9, weight_decay=1e-5,
                                lars_eta=0.01)

    assert isinstance(optimizer, LARS)
    assert [g["lars_adaptation"] for g in optimizer.param_groups] == [True, False]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-5, 0.0]
    assert optimizer.param_groups[0]["eta"] == 0.01


def test_build_optimizer_sgd_groups():
    optimizer = build_optimizer(_small_net(), "sgd", lr=0.3, momentum=0.9, weight_decay=1e-5)

    assert type(optimizer) is torch.optim.SGD
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-5, 0.0]


def test_build_optimizer_unknown_name():
    with pytest.raises(ValueError, match="'adam'"):
        build_optimizer(_small_net(), "adam", lr=0.1, momentum=0.9, weight_decay=0.0)


def test_warmup_cosine_start():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)

    assert factor(0) == pytest.approx(1 / 10)


def test_warmup_cosine_end_of_warmup():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)

    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)


def test_warmup_cosine_warmup_is_linear():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)

    values = [factor(step) for step in range(10)]

    assert values == pytest.approx([(step + 1) / 10 for step in range(10)])


def test_warmup_cosine_ends_near_zero():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)

    assert factor(99) < 1e-3
    assert factor(100) == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_monotone_after_warmup():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)

    values = [factor(step) for step in range(10, 101)]

    assert all(a > b for a, b in zip(values, values[1:]))


def test_warmup_cosine_without_warmup():
    factor = warmup_cosine(total_steps=50, warmup_steps=0)

    assert factor(0) == pytest.approx(1.0)
    assert factor(25) == pytest.approx(0.5)


def test_warmup_cosine_drives_scheduler():
    param = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(20, 4))

    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    assert lrs[0] == pytest.approx(0.05)
    assert lrs[3] == pytest.approx(0.2)
    assert max(lrs) == pytest.approx(0.2)
