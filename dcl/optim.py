"""Optimisers for pretraining: SGD and LARS, learning-rate scaling and the warm-up-cosine schedule.

Biases and BatchNorm parameters (every parameter with one dimension) get neither
weight decay nor LARS adaptation, as in SimCLR.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For a parameter p with gradient g, the update is computed from
    ``g + weight_decay·p`` scaled by the trust ratio
    ``eta·‖p‖ / ‖g + weight_decay·p‖`` (1 where either norm is zero), then fed
    to heavy-ball momentum. Groups with ``lars_adaptation=False`` skip both the
    trust ratio and weight decay.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: momentum factor (default 0.9).
        weight_decay: L2 penalty (default 0).
        eta: trust coefficient (default 0.02; SimCLR uses 0.001 on ImageNet).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02) -> None:
        if lr <= 0:
            raise ValueError(f"LARS learning rate must be > 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lars_adaptation=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if group["lars_adaptation"]:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """Scale the base learning rate with the global batch: linear (B/256) or square root (√B)."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ValueError(f"unknown lr_scaling {rule!r}: use 'linear' or 'sqrt'")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed, adapted group and a group of biases and norms."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_adaptation": True},
        {"params": no_decay, "weight_decay": 0.0, "lars_adaptation": False},
    ]


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float, lars_eta: float = 0.02) -> torch.optim.Optimizer:
    """Build SGD or LARS over :func:`param_groups`."""
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    if name == "sgd":
        for group in groups:
            group.pop("lars_adaptation")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}: use 'sgd' or 'lars'")


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Per-step multiplier: linear warm-up from 1/warmup_steps to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
