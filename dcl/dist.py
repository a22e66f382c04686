"""Data-parallel helpers: process group set-up, a gradient-summing gather, global BatchNorm.

One process runs per GPU (or per CPU task in tests). Ranks and the rendezvous come
from the environment that ``torchrun`` or ``submitit.helpers.TorchDistributedEnvironment``
exports: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.
Without ``WORLD_SIZE`` > 1 every helper here is the single-process identity.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """Return True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Return True on rank 0, the process that writes files and logs to MLflow."""
    return rank() == 0


def env_world_size() -> int:
    """Return ``WORLD_SIZE`` from the environment (1 when unset)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} is not an integer: unset it or export a number") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE={size} must be at least 1")
    return size


def init_from_env() -> torch.device:
    """Join the process group described by the environment and return this rank's device.

    NCCL and ``cuda:LOCAL_RANK`` when CUDA is visible, else gloo on the CPU. A process
    without ``WORLD_SIZE`` > 1 joins nothing and gets the default device.
    """
    cuda = torch.cuda.is_available()
    if env_world_size() == 1 or is_distributed():
        return _local_cuda_device() if cuda else torch.device("cpu")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: launch "
            "with torchrun, or through 'dcl launch' with several tasks, which exports them")
    device = torch.device("cpu")
    if cuda:
        device = _local_cuda_device()
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    log.info("rank %d of %d joined the process group on %s", dist.get_rank(), dist.get_world_size(), device)
    return device


def _local_cuda_device() -> torch.device:
    """Return ``cuda:LOCAL_RANK``, or cuda:0 when the job shows each task only its own GPU."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local if local < torch.cuda.device_count() else 0)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Gather(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        # all_reduce rather than reduce_scatter, which gloo does not implement.
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradient over ranks as well."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Return the sum of ``tensor`` over ranks, differentiably (the tensor itself without a group)."""
    return _AllReduceSum.apply(tensor) if is_distributed() else tensor


def gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (n, ...) of every rank into (world_size * n, ...), rank order.

    The gradient of this rank's slice is the sum of the gradients all ranks computed for it,
    so each rank's loss may use every rank's embeddings as negatives. Identity without a
    process group.
    """
    return _Gather.apply(tensor) if is_distributed() else tensor


@torch.no_grad()
def gather_detached(tensor: Tensor) -> Tensor:
    """:func:`gather` without gradient, for statistics every rank computes alike."""
    return _Gather.apply(tensor.detach()) if is_distributed() else tensor.detach()


def mean_over_ranks(value: float) -> float:
    """Return the mean of a Python number over ranks (the number itself without a group)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def check_batch(batch: int, size: int) -> None:
    """Raise ValueError unless a global batch of ``batch`` splits evenly over ``size`` ranks."""
    if batch % size:
        raise ValueError(
            f"batch size {batch} does not divide over {size} processes: choose a batch size "
            f"that is a multiple of {size}, or another number of GPUs (tasks)")


def shard(batch: int) -> slice:
    """Return this rank's slice of a global batch, which must split evenly over the ranks."""
    size = world_size()
    check_batch(batch, size)
    local = batch // size
    return slice(rank() * local, (rank() + 1) * local)
