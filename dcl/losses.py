"""Contrastive losses: InfoNCE (NT-Xent), DCL and DCLW.

Reference: Yeh et al., "Decoupled Contrastive Learning", ECCV 2022
(arXiv:2110.06848). Notation, for a batch of N images with two views k:

- z_i^(k): L2-normalised projector output of view k of image i.
- s_i = <z_i^(1), z_i^(2)>: cosine similarity of the positive pair.
- U_{i,k} = sum_{l in {1,2}} sum_{j != i} exp(<z_i^(k), z_j^(l)> / tau): the
  2N - 2 negatives of anchor z_i^(k) are both views of every other image.

Every loss treats all 2N embeddings as anchors and returns the mean over them.
The paper sums over anchors instead, which only rescales the loss by 2N.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcl import dist


class _AnchorTerms(NamedTuple):
    """Per-anchor terms shared by all losses, local anchors ordered view 1 then view 2."""

    pos_sim: Tensor  # (n,) cosine similarity s_i of each local positive pair
    log_pos_and_neg: Tensor  # (2n,) log(e^{s_i/tau} + U_{i,k})
    log_neg: Tensor  # (2n,) log U_{i,k}
    global_pos_sim: Tensor  # (N,) s_i of every pair of the global batch, rank order
    offset: int  # index of this rank's first pair in the global batch


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {name}={value}")


def _anchor_terms(z1: Tensor, z2: Tensor, temperature: float, gather: bool = False) -> _AnchorTerms:
    """Compute the normalised similarities and both log-sum-exps of each anchor.

    With ``gather`` and a process group, the n local pairs are anchors and the
    N = n * world_size pairs of all ranks are the candidates, so every rank sees the
    negatives of the global batch; gradients reach the rank that computed each embedding
    (see :func:`dcl.dist.gather`). Otherwise n = N.

    Runs with autocast disabled in float32, or float64 for float64 inputs,
    because at tau = 0.01 the logits reach 100, where bf16 resolves only steps
    of 0.5 and e^100 overflows float16. Self-similarities and positives are
    masked with -inf, never subtracted after exponentiation.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            "z1 and z2 must both have shape (N, d), "
            f"got z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    ranks = dist.world_size() if gather else 1
    if n * ranks < 2:
        raise ValueError(
            f"batch size N must be at least 2 to have negatives, got N={n * ranks}"
        )

    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1 = F.normalize(z1.to(dtype), dim=1)
        z2 = F.normalize(z2.to(dtype), dim=1)
        z = torch.cat([z1, z2], dim=0)  # (2n, d) anchors
        offset = dist.rank() * n if gather else 0
        all1, all2 = (dist.gather(z1), dist.gather(z2)) if gather else (z1, z2)
        total = all1.shape[0]
        logits = z @ torch.cat([all1, all2], dim=0).T / temperature  # (2n, 2N)

        # Local anchor a is global anchor g(a); its positive is column (g(a) + N) mod 2N.
        local = torch.arange(2 * n, device=z.device)
        anchor = torch.where(local < n, offset + local, total + offset + local - n)
        column = torch.arange(2 * total, device=z.device)
        self_mask = column[None, :] == anchor[:, None]
        pos_mask = column[None, :] == ((anchor[:, None] + total) % (2 * total))

        logits = logits.masked_fill(self_mask, float("-inf"))
        log_pos_and_neg = torch.logsumexp(logits, dim=1)
        log_neg = torch.logsumexp(logits.masked_fill(pos_mask, float("-inf")), dim=1)
        pos_sim = (z1 * z2).sum(dim=1)
        global_pos_sim = (all1 * all2).sum(dim=1) if gather else pos_sim

    return _AnchorTerms(pos_sim, log_pos_and_neg, log_neg, global_pos_sim, offset)


def dclw_weight(
    pos_sim: Tensor, sigma: float = 0.5, weight_min: Optional[float] = None
) -> Tensor:
    """Compute the DCLW negative von Mises-Fisher weight of each positive pair.

    w_i = 2 - exp(s_i/sigma) / mean_j exp(s_j/sigma) = 2 - N * softmax(s/sigma)_i.
    Without clamping mean(w) = 1, and w_i < 0 when one pair dominates the softmax.

    Args:
        pos_sim: Cosine similarities s of the N positive pairs. Shape: (N,).
        sigma: Scale of the weighting, default 0.5.
        weight_min: Lower bound for w, or None (default) for no clamp.

    Returns:
        Weights w. Shape: (N,). Differentiable in pos_sim, so detach pos_sim
        first for a constant weight.
    """
    _check_positive("sigma", sigma)
    weight = 2 - pos_sim.shape[0] * torch.softmax(pos_sim / sigma, dim=0)
    if weight_min is not None:
        weight = weight.clamp(min=weight_min)
    return weight


@torch.no_grad()
def npc_multiplier(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """Compute the negative-positive-coupling multiplier q_B of each anchor.

    q_{B,i}^(k) = 1 - e^{s_i/tau} / (e^{s_i/tau} + U_{i,k}). The InfoNCE gradient
    of every anchor carries the factor q_B / tau, and the DCL gradient equals it
    with q_B = 1. Computed without gradient, in at least float32.

    Args:
        z1, z2: Projector outputs of the two views. Shape: (N, d).
        temperature: tau, default 0.1.

    Returns:
        q_B, in (0, 1) up to float rounding, which can give exactly 0 or 1.
        Shape: (2N,), view-1 anchors first, then view-2 anchors.
    """
    _check_positive("temperature", temperature)
    terms = _anchor_terms(z1, z2, temperature)
    # q_B = U / (e^{s/tau} + U), a ratio that keeps precision when q_B is tiny.
    return torch.exp(terms.log_neg - terms.log_pos_and_neg)


class _ContrastiveLoss(nn.Module):
    """Base class that stores and validates the temperature tau.

    With ``gather_distributed`` (default False) and a process group, each rank's
    anchors are contrasted with the embeddings of all ranks, and the loss is the mean
    over this rank's anchors; averaging gradients over ranks (DDP) then gives the
    gradient of the loss of the global batch.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def _terms(self, z1: Tensor, z2: Tensor) -> _AnchorTerms:
        return _anchor_terms(z1, z2, self.temperature, self.gather_distributed)


class InfoNCELoss(_ContrastiveLoss):
    """InfoNCE loss as used by SimCLR (NT-Xent), the baseline for DCL.

    L_i^(k) = -log( e^{s_i/tau} / (e^{s_i/tau} + U_{i,k}) ), averaged over 2N anchors.

    Args:
        temperature: tau, default 0.1.

    Shapes: z1 and z2 are (N, d) with N >= 2, normalised inside. The output
    is a scalar.

    Example:
        >>> loss_fn = InfoNCELoss(temperature=0.1)
        >>> loss = loss_fn(projector(view1), projector(view2))
    """

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        terms = self._terms(z1, z2)
        pos_logit = terms.pos_sim.repeat(2) / self.temperature
        return (terms.log_pos_and_neg - pos_logit).mean()


class DCLLoss(_ContrastiveLoss):
    """Decoupled contrastive loss (DCL, Eq. 6 of Yeh et al.).

    L_i^(k) = -s_i/tau + log U_{i,k}, averaged over 2N anchors. The positive is
    removed from the denominator, and U_{i,k} is a single log-sum-exp over the
    union of all 2N - 2 negatives (same-view and cross-view together).

    Args:
        temperature: tau, default 0.1.

    Shapes: z1 and z2 are (N, d) with N >= 2, normalised inside. The output
    is a scalar.

    Example:
        >>> loss_fn = DCLLoss(temperature=0.1)
        >>> loss = loss_fn(projector(view1), projector(view2))
    """

    def _positive_weight(self, terms: _AnchorTerms) -> Optional[Tensor]:
        return None

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        terms = self._terms(z1, z2)
        pos_term = terms.pos_sim / self.temperature
        weight = self._positive_weight(terms)
        if weight is not None:
            pos_term = weight * pos_term
        return (terms.log_neg - pos_term.repeat(2)).mean()


class DCLWLoss(DCLLoss):
    """Weighted decoupled contrastive loss (DCLW).

    L_i^(k) = -w_i * s_i/tau + log U_{i,k}, averaged over 2N anchors, with the
    negative von Mises-Fisher weight w_i = 2 - N * softmax(s/sigma)_i (see
    `dclw_weight`). The weight is the same for both views of image i.

    The paper does not say whether w carries gradient or is bounded, so both
    are options. By default w is detached and not clamped. lightly's
    `lightly/loss/dcl_loss.py` also never clamps w, and detaches it at commit
    30b2e45 but not at commit 8cf75a5, so our defaults match the former.

    Args:
        temperature: tau, default 0.1.
        sigma: Scale of the weighting, default 0.5.
        detach_weight: Treat w as a constant in backprop, default True.
        weight_min: Lower bound for w, or None (default) for no clamp. Clamping
            breaks mean(w) = 1.

    Shapes: z1 and z2 are (N, d) with N >= 2, normalised inside. The output
    is a scalar.

    Example:
        >>> loss_fn = DCLWLoss(temperature=0.1, sigma=0.5)
        >>> loss = loss_fn(projector(view1), projector(view2))
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sigma: float = 0.5,
        detach_weight: bool = True,
        weight_min: Optional[float] = None,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(temperature, gather_distributed)
        _check_positive("sigma", sigma)
        self.sigma = sigma
        self.detach_weight = detach_weight
        self.weight_min = weight_min

    def _positive_weight(self, terms: _AnchorTerms) -> Optional[Tensor]:
        # The softmax runs over the N pairs of the global batch, as in one process.
        pos_sim = terms.global_pos_sim
        if self.detach_weight:
            pos_sim = pos_sim.detach()
        weight = dclw_weight(pos_sim, self.sigma, self.weight_min)
        return weight[terms.offset:terms.offset + len(terms.pos_sim)]


LOSS_NAMES = ("infonce", "dcl", "dclw")


def build_loss(
    name: str,
    temperature: float,
    sigma: float = 0.5,
    detach_weight: bool = True,
    weight_min: Optional[float] = None,
    gather_distributed: bool = False,
) -> nn.Module:
    """Build a loss by name: "infonce", "dcl" or "dclw".

    sigma, detach_weight and weight_min apply only to "dclw" and are ignored
    for the other names.
    """
    if name == "infonce":
        return InfoNCELoss(temperature, gather_distributed)
    if name == "dcl":
        return DCLLoss(temperature, gather_distributed)
    if name == "dclw":
        return DCLWLoss(temperature, sigma, detach_weight, weight_min, gather_distributed)
    raise ValueError(
        f"unknown loss name {name!r}, expected one of {', '.join(LOSS_NAMES)}"
    )
