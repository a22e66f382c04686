"""ResNet backbones with an optional CIFAR stem and width, and the SimCLR projector.

The backbones are torchvision's ResNet-18/ResNet-50 built from torchvision's own
blocks; only the stem and the stage widths change. With ``width=64`` and
``cifar_stem=False`` the backbone is exactly torchvision's ``resnet18()`` or
``resnet50()`` without the classification layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

BLOCKS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and projector settings.

    Attributes:
        backbone: "resnet18" or "resnet50".
        width: channels of the first stage (64 in torchvision); stages use
            width, 2·width, 4·width and 8·width channels.
        cifar_stem: replace the 7×7 stride-2 convolution and the max-pool by
            one 3×3 stride-1 convolution, for 32×32 inputs.
        projector_hidden_dim: hidden size of the projector MLP; None uses the
            backbone's feature dimension.
        projector_dim: output size of the projector (128 in SimCLR).
        channels_last: keep weights and inputs in the channels-last (NHWC)
            memory layout. It made the width-16 training step faster on a
            2-core AMD EPYC CPU (docs/benchmarks.md), with the same outputs up
            to float rounding. Needs width >= 8.
    """

    backbone: str = "resnet18"
    width: int = 64
    cifar_stem: bool = False
    projector_hidden_dim: int | None = None
    projector_dim: int = 128
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BLOCKS:
            raise ValueError(
                f"unknown backbone {self.backbone!r}: use one of {sorted(BLOCKS)}"
            )
        if self.width < 1:
            raise ValueError(f"backbone width must be >= 1, got {self.width}")
        if self.channels_last and self.width < 8:
            # torch 2.14.1 on CPU: the weight gradient of a channels-last 1x1 stride-2
            # convolution with at most 4 input channels (the first downsample) crashes.
            raise ValueError(f"channels_last needs a backbone width >= 8, got {self.width}: "
                             "raise the width or set channels_last: false")


def build_backbone(config: ModelConfig) -> nn.Module:
    """Build a ResNet whose forward returns pooled features of shape (B, feature_dim).

    The feature dimension is stored as the attribute ``feature_dim``.
    """
    block, layers = BLOCKS[config.backbone]
    net = ResNet(block, layers)
    width = config.width

    # ResNet._make_layer reads self.inplanes, so rebuilding the stages at another
    # width only needs the stem's output channels set first.
    net.inplanes = width
    if config.cifar_stem:
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, layers[0])
    net.layer2 = net._make_layer(block, 2 * width, layers[1], stride=2)
    net.layer3 = net._make_layer(block, 4 * width, layers[2], stride=2)
    net.layer4 = net._make_layer(block, 8 * width, layers[3], stride=2)
    net.fc = nn.Identity()
    net.feature_dim = 8 * width * block.expansion

    _init_weights(net)
    return net


def _init_weights(net: nn.Module) -> None:
    """Apply torchvision's ResNet initialisation to the rebuilt layers."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)


def build_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """SimCLR's projection head: Linear → BN → ReLU → Linear, (B, in_dim) → (B, out_dim)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class SimCLRModel(nn.Module):
    """Backbone followed by the projector; forward returns projector outputs (B, projector_dim)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        hidden = config.projector_hidden_dim or self.backbone.feature_dim
        self.projector = build_projector(self.backbone.feature_dim, hidden, config.projector_dim)
        if config.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.projector(self.backbone(images))
