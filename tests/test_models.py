"""Tests for dcl.models: torchvision equivalence, CIFAR stem, width scaling, projector."""

import pytest
import torch
import torchvision

from dcl.models import ModelConfig, SimCLRModel, build_backbone

torch.set_num_threads(1)


def _shapes_without_fc(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: tuple(param.shape)
        for name, param in model.named_parameters()
        if not name.startswith("fc.")
    }


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_matches_torchvision(name):
    ours = build_backbone(ModelConfig(backbone=name, width=64, cifar_stem=False))
    reference = getattr(torchvision.models, name)()

    ours_shapes = _shapes_without_fc(ours)
    reference_shapes = _shapes_without_fc(reference)
    assert ours_shapes == reference_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for n, p in reference.named_parameters() if not n.startswith("fc.")
    )


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_buffers_match_torchvision(name):
    ours = build_backbone(ModelConfig(backbone=name, width=64))
    reference = getattr(torchvision.models, name)()

    ours_buffers = {n: tuple(b.shape) for n, b in ours.named_buffers()}
    reference_buffers = {n: tuple(b.shape) for n, b in reference.named_buffers()}
    assert ours_buffers == reference_buffers


def test_backbone_loads_torchvision_weights():
    reference = torchvision.models.resnet18()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    ours = build_backbone(ModelConfig(backbone="resnet18", width=64))

    ours.load_state_dict(state, strict=True)

    images = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    reference.eval()
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(images), reference(images))


def test_cifar_stem_keeps_resolution():
    backbone = build_backbone(ModelConfig(width=4, cifar_stem=True))
    seen = {}
    backbone.layer1.register_forward_pre_hook(lambda module, args: seen.update(shape=args[0].shape))

    backbone(torch.zeros(2, 3, 32, 32))

    assert seen["shape"] == (2, 4, 32, 32)
    assert backbone.conv1.kernel_size == (3, 3)
    assert backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, torch.nn.Identity)


def test_imagenet_stem_downsamples_four_times():
    backbone = build_backbone(ModelConfig(width=4, cifar_stem=False))
    seen = {}
    backbone.layer1.register_forward_pre_hook(lambda module, args: seen.update(shape=args[0].shape))

    backbone(torch.zeros(2, 3, 32, 32))

    assert seen["shape"] == (2, 4, 8, 8)


@pytest.mark.parametrize(
    ("name", "width", "expected"),
    [("resnet18", 2, 16), ("resnet18", 8, 64), ("resnet50", 2, 64), ("resnet50", 4, 128)],
)
def test_feature_dim_scales_with_width(name, width, expected):
    backbone = build_backbone(ModelConfig(backbone=name, width=width, cifar_stem=True))

    features = backbone(torch.zeros(2, 3, 32, 32))

    assert backbone.feature_dim == expected
    assert features.shape == (2, expected)


def test_projector_output_shape():
    model = SimCLRModel(ModelConfig(width=2, cifar_stem=True))

    out = model(torch.randn(4, 3, 32, 32))

    assert out.shape == (4, 128)


def test_projector_hidden_dim_is_used():
    model = SimCLRModel(ModelConfig(width=2, cifar_stem=True, projector_hidden_dim=7,
                                    projector_dim=5))

    out = model(torch.randn(3, 3, 32, 32))

    assert model.projector[0].out_features == 7
    assert out.shape == (3, 5)


def test_unknown_backbone_raises():
    with pytest.raises(ValueError, match="'resnet34'"):
        ModelConfig(backbone="resnet34")


def test_zero_width_raises():
    with pytest.raises(ValueError, match="got 0"):
        ModelConfig(width=0)


def test_channels_last_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = SimCLRModel(ModelConfig(width=8, cifar_stem=True))
    fast = SimCLRModel(ModelConfig(width=8, cifar_stem=True, channels_last=True))
    fast.load_state_dict(plain.state_dict())
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(6, 3, 32, 32)
    outputs = [model(images) for model in (plain, fast)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for output in outputs:
        output.square().sum().backward()
    # Sums over the batch run in another order, so compare against the gradient's scale.
    expected = plain.backbone.conv1.weight.grad
    gap = (fast.backbone.conv1.weight.grad - expected).abs().max()
    assert gap <= 1e-3 * expected.abs().max()


def test_channels_last_refuses_widths_below_8():
    with pytest.raises(ValueError, match="channels_last needs a backbone width >= 8, got 4"):
        ModelConfig(width=4, channels_last=True)
