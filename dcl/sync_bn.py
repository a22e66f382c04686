"""BatchNorm over the global batch of all ranks (SimCLR's global BN), on CPUs and GPUs.

PyTorch's ``nn.SyncBatchNorm`` runs only on GPUs. :class:`GlobalBatchNorm` computes the
same statistics with two differentiable all-reduces, so CPU ranks on gloo (tests, small
clusters) train as one process on the whole batch would:

    mean = sum_ranks sum_x x / M,   var = sum_ranks sum_x (x - mean)^2 / M,

over the M values of each channel on all ranks; the running variance is unbiased,
var * M / (M - 1), as in ``nn.BatchNorm2d``. :func:`convert_sync_batchnorm` uses PyTorch's
CUDA kernels on GPUs and this module elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dcl import dist


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for (B, C) or (B, C, ...) inputs with statistics over all ranks in training."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (B, C, ...), got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype, device=input.device)
        total = dist.all_reduce_sum(count.clone()).detach()
        mean = dist.all_reduce_sum(input.sum(dims)) / total
        centred = input - mean.view(shape)
        var = dist.all_reduce_sum((centred * centred).sum(dims)) / total
        output = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total.item())
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, total: float) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * total / max(total - 1, 1)
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased, momentum)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by one over the global batch.

    Parameters and buffers are copied, so the state_dict keys and values are unchanged.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        reference = module.weight if module.affine else module.running_mean
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum,
                                    module.affine, module.track_running_stats)
        converted = converted.to(device=reference.device, dtype=reference.dtype)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module
