"""Tests for the batched SimCLR augmentation in dcl.augment."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dcl.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    AugmentConfig,
    AugmentParams,
    SimCLRAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    crop_resize_flip,
    eval_transform,
    gaussian_blur,
    rgb_to_grayscale,
    sample_params,
)

torch.set_num_threads(1)

# Parameter draws for the statistical tests. At this sample size the
# tolerances below are at least 4 standard errors.
SAMPLES = 200_000


def make_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_uint8(batch: int = 8, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=make_generator(seed))


def random_float(batch: int = 6, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Float images in [0, 1] with some gray pixels and channel ties, the edge cases of HSV."""
    images = torch.rand((batch, 3, size, size), generator=make_generator(seed))
    images[:, :, 0, :4] = images[:, :1, 0, :4]
    images[:, 1, 1, :4] = images[:, 0, 1, :4]
    images[:, 2, 2, :4] = images[:, 1, 2, :4]
    return images


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return images * std + mean


@pytest.fixture(scope="module")
def square_params() -> AugmentParams:
    """Default-config parameters for SAMPLES images of 1000×1000, where rounding barely matters."""
    return sample_params(SAMPLES, 1000, 1000, AugmentConfig(), make_generator(7))


# Output basics and reproducibility.


def test_augment_output_shape():
    output = SimCLRAugment()(random_uint8(), make_generator())
    assert output.shape == (8, 3, 32, 32)


def test_augment_output_dtype():
    output = SimCLRAugment()(random_uint8(), make_generator())
    assert output.dtype == torch.float32


def test_augment_output_range():
    pixels = unnormalize(SimCLRAugment()(random_uint8(), make_generator()))
    assert pixels.min() >= -1e-5
    assert pixels.max() <= 1 + 1e-5


def test_augment_resizes_to_image_size():
    augment = SimCLRAugment(AugmentConfig(image_size=24))
    output = augment(random_uint8(height=40, width=48), make_generator())
    assert output.shape == (8, 3, 24, 24)


def test_two_views_differ():
    first, second = SimCLRAugment().two_views(random_uint8(), make_generator())
    assert first.shape == second.shape
    assert not torch.allclose(first, second)


def test_augment_same_seed_same_output():
    images = random_uint8()
    first = SimCLRAugment()(images, make_generator(3))
    second = SimCLRAugment()(images, make_generator(3))
    assert torch.equal(first, second)


def test_augment_different_seed_differs():
    images = random_uint8()
    first = SimCLRAugment()(images, make_generator(3))
    second = SimCLRAugment()(images, make_generator(4))
    assert not torch.allclose(first, second)


def test_augment_resumes_from_generator_state():
    images, generator = random_uint8(), make_generator(5)
    SimCLRAugment()(images, generator)
    state = generator.get_state()
    expected = SimCLRAugment()(images, generator)
    generator.set_state(state)
    assert torch.equal(SimCLRAugment()(images, generator), expected)


def test_augment_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        SimCLRAugment()(torch.rand(2, 3, 32, 32), make_generator())


def test_augment_rejects_channels_last():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        SimCLRAugment()(random_uint8().permute(0, 2, 3, 1), make_generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_cuda_matches_cpu():
    images = random_uint8()
    expected = SimCLRAugment()(images, make_generator(2))
    output = SimCLRAugment()(images.cuda(), make_generator(2))
    assert output.device.type == "cuda"
    assert torch.allclose(output.cpu(), expected, atol=1e-4)


# Sampled parameters.


def test_crop_area_in_scale_range(square_params):
    boxes = square_params.crop_boxes.double()
    area = boxes[:, 2] * boxes[:, 3] / 1e6
    # Rounding width and height to whole pixels moves the area by under 0.2 %.
    assert area.min() >= 0.08 - 2e-3
    assert area.max() <= 1.0


def test_crop_log_ratio_in_range(square_params):
    boxes = square_params.crop_boxes.double()
    log_ratio = torch.log(boxes[:, 3] / boxes[:, 2])
    assert log_ratio.min() >= math.log(3 / 4) - 1e-2
    assert log_ratio.max() <= math.log(4 / 3) + 1e-2


def test_crop_area_uniform_where_fitting(square_params):
    # On a square image every crop of area <= 3/4 fits, so the area density
    # is flat there and the four bins of [0.1, 0.7] hold equal counts.
    boxes = square_params.crop_boxes.double()
    area = boxes[:, 2] * boxes[:, 3] / 1e6
    counts = torch.histc(area, bins=4, min=0.1, max=0.7)
    relative = counts / counts.mean()
    assert relative.min() >= 0.97
    assert relative.max() <= 1.03


def test_crop_boxes_inside_image():
    boxes = sample_params(SAMPLES, 32, 40, AugmentConfig(), make_generator(1)).crop_boxes
    top, left, height, width = boxes.unbind(dim=1)
    assert top.min() >= 0
    assert left.min() >= 0
    assert height.min() >= 1
    assert width.min() >= 1
    assert (top + height).max() <= 32
    assert (left + width).max() <= 40


def test_crop_offsets_cover_range():
    boxes = sample_params(SAMPLES, 32, 32, AugmentConfig(), make_generator(1)).crop_boxes
    small = boxes[(boxes[:, 2] == 16) & (boxes[:, 3] == 16)]
    assert set(small[:, 0].tolist()) == set(range(17))


def test_crop_fallback_central():
    # No crop with width/height in [3, 4] fits a square image, so all fall back.
    config = AugmentConfig(crop_scale=(0.9, 1.0), crop_ratio=(3.0, 4.0))
    boxes = sample_params(100, 32, 32, config, make_generator()).crop_boxes
    expected = torch.tensor([10, 0, 11, 32])  # height round(32 / 3), top (32 - 11) // 2
    assert torch.equal(boxes, expected.expand(100, 4))


@pytest.mark.parametrize(
    ("field", "expected"),
    [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.0)],
)
def test_params_apply_rate(square_params, field, expected):
    rate = getattr(square_params, field).double().mean().item()
    assert abs(rate - expected) <= 5e-3


def test_params_blur_rate_configured():
    config = AugmentConfig(blur_p=0.5)
    params = sample_params(SAMPLES, 32, 32, config, make_generator())
    assert abs(params.blur.double().mean().item() - 0.5) <= 5e-3


def test_params_blur_sigma_range():
    sigma = sample_params(SAMPLES, 32, 32, AugmentConfig(), make_generator()).blur_sigma
    assert sigma.min() >= 0.1
    assert sigma.max() <= 2.0


@pytest.mark.parametrize("column", [0, 1, 2])
def test_jitter_factor_range(square_params, column):
    factors = square_params.jitter_factors[:, column].double()
    assert factors.min() >= 0.6
    assert factors.max() <= 1.4
    assert abs(factors.mean().item() - 1.0) <= 3e-3


def test_jitter_hue_range(square_params):
    hue = square_params.jitter_factors[:, 3].double()
    assert hue.min() >= -0.1
    assert hue.max() <= 0.1
    assert abs(hue.mean().item()) <= 1e-3


def test_jitter_factor_floor_at_zero():
    factors = sample_params(1000, 32, 32, AugmentConfig(jitter_strength=2.0), make_generator()).jitter_factors
    assert factors[:, :3].min() >= 0.0


def test_jitter_order_rows_are_permutations(square_params):
    sorted_rows = square_params.jitter_order.sort(dim=1).values
    assert torch.equal(sorted_rows, torch.arange(4).expand_as(sorted_rows))


def test_jitter_order_all_24_uniform(square_params):
    codes = (square_params.jitter_order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    _, counts = codes.unique(return_counts=True)
    relative = counts.double() / (SAMPLES / 24)
    assert len(counts) == 24
    assert relative.min() >= 0.95
    assert relative.max() <= 1.05


def test_params_to_device_keeps_values(square_params):
    moved = square_params.to("cpu")
    assert torch.equal(moved.crop_boxes, square_params.crop_boxes)


# Colour ops against torchvision.transforms.v2.functional.


def per_image_reference(function, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.stack([function(image, float(factor)) for image, factor in zip(images, factors)])


def test_grayscale_matches_torchvision():
    images = random_float()
    expected = TF.rgb_to_grayscale(images)
    assert (rgb_to_grayscale(images) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("ours", "reference"),
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
def test_blend_op_matches_torchvision(ours, reference):
    images = random_float()
    factors = torch.tensor([0.0, 0.3, 0.9, 1.0, 1.4, 2.0])
    expected = per_image_reference(reference, images, factors)
    assert (ours(images, factors) - expected).abs().max() <= 1e-5


def test_hue_matches_torchvision():
    images = random_float()
    shifts = torch.tensor([-0.5, -0.2, -0.01, 0.0, 0.13, 0.5])
    expected = per_image_reference(TF.adjust_hue, images, shifts)
    assert (adjust_hue(images, shifts) - expected).abs().max() <= 1e-5


def test_color_jitter_follows_order():
    images = random_float(batch=48)
    generator = make_generator(9)
    apply = torch.rand(48, generator=generator) < 0.8
    factors = torch.rand((48, 4), generator=generator) * 0.8 + 0.6
    factors[:, 3] -= 1.0  # hue shifts in [-0.4, 0.4]
    order = torch.rand((48, 4), generator=generator).argsort(dim=1)
    reference_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = images.clone()
    for i in torch.nonzero(apply).flatten().tolist():
        for op_index in order[i].tolist():
            expected[i] = reference_ops[op_index](expected[i], float(factors[i, op_index]))
    output = color_jitter(images, apply, factors, order)
    assert (output - expected).abs().max() <= 1e-5


# Crop, flip, blur and evaluation transform.


def test_crop_full_box_is_identity():
    images = random_float(batch=4, size=32)
    boxes = torch.tensor([[0, 0, 32, 32]]).expand(4, 4)
    output = crop_resize_flip(images, boxes, torch.zeros(4, dtype=torch.bool), 32)
    assert (output - images).abs().max() <= 1e-6


def test_crop_full_box_flip_mirrors():
    images = random_float(batch=4, size=32)
    boxes = torch.tensor([[0, 0, 32, 32]]).expand(4, 4)
    output = crop_resize_flip(images, boxes, torch.ones(4, dtype=torch.bool), 32)
    assert (output - images.flip(-1)).abs().max() <= 1e-6


@pytest.mark.parametrize(("height", "width", "size"), [(32, 32, 32), (90, 100, 24)])
def test_crop_matches_torchvision(height, width, size):
    images = torch.rand((16, 3, height, width), generator=make_generator(4))
    params = sample_params(16, height, width, AugmentConfig(), make_generator(5))
    expected = []
    for image, box, flip in zip(images, params.crop_boxes.tolist(), params.flip.tolist()):
        crop = TF.resized_crop(image, *box, [size, size], antialias=True)
        expected.append(crop.flip(-1) if flip else crop)
    output = crop_resize_flip(images, params.crop_boxes, params.flip, size)
    assert (output - torch.stack(expected)).abs().max() <= 1e-5


def test_blur_kernel_size_odd():
    assert AugmentConfig(image_size=64).blur_kernel_size == 7
    assert AugmentConfig(image_size=224).blur_kernel_size == 23
    assert AugmentConfig(image_size=32).blur_kernel_size == 3


def test_blur_matches_torchvision():
    images = random_float(batch=4, size=24)
    sigma = torch.tensor([0.1, 0.5, 1.2, 2.0])
    expected = torch.stack([TF.gaussian_blur(image, [5, 5], [float(s)]) for image, s in zip(images, sigma)])
    assert (gaussian_blur(images, sigma, 5) - expected).abs().max() <= 1e-5


def test_augment_grayscale_forced_channels_equal():
    config = AugmentConfig(jitter_p=0.0, grayscale_p=1.0)
    pixels = unnormalize(SimCLRAugment(config)(random_uint8(), make_generator()))
    assert (pixels[:, 0] - pixels[:, 1]).abs().max() <= 1e-5
    assert (pixels[:, 1] - pixels[:, 2]).abs().max() <= 1e-5


def test_augment_identity_settings_normalise_only():
    config = AugmentConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0
    )
    images = random_uint8()
    expected = TF.normalize(images.float() / 255, list(CIFAR10_MEAN), list(CIFAR10_STD))
    output = SimCLRAugment(config)(images, make_generator())
    assert (output - expected).abs().max() <= 1e-5


def test_augment_blur_changes_output():
    images = random_uint8(height=64, width=64)
    plain = SimCLRAugment(AugmentConfig(image_size=64))(images, make_generator())
    blurred = SimCLRAugment(AugmentConfig(image_size=64, blur_p=1.0))(images, make_generator())
    assert not torch.allclose(plain, blurred)


def test_eval_transform_normalises_only():
    images = random_uint8()
    expected = TF.normalize(images.float() / 255, list(CIFAR10_MEAN), list(CIFAR10_STD))
    assert (eval_transform(images) - expected).abs().max() <= 1e-6


def test_eval_transform_center_crop_resize():
    images = random_uint8(batch=2, height=40, width=48)
    square = TF.center_crop(images.float() / 255, [40, 40])
    resized = TF.resize(square, [32, 32], antialias=True).clamp(0, 1)
    expected = TF.normalize(resized, list(CIFAR10_MEAN), list(CIFAR10_STD))
    assert (eval_transform(images, image_size=32) - expected).abs().max() <= 1e-5


def test_eval_transform_deterministic():
    images = random_uint8(height=40, width=48)
    assert torch.equal(eval_transform(images), eval_transform(images))


# Settings validation.


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 0),
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.5, 0.2)),
        ("crop_scale", (0.5, 1.5)),
        ("crop_ratio", (2.0, 1.0)),
        ("flip_p", 1.5),
        ("jitter_p", -0.1),
        ("grayscale_p", 2.0),
        ("blur_p", -1.0),
        ("jitter_strength", -0.5),
        ("jitter_strength", 3.0),
        ("blur_kernel_fraction", 0.0),
        ("blur_sigma", (0.0, 1.0)),
        ("std", (0.2, 0.0, 0.2)),
        ("mean", (0.5, 0.5)),
    ],
)
def test_config_rejects_invalid(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})


def test_config_lists_become_tuples():
    config = AugmentConfig(crop_scale=[0.2, 1.0])
    assert config.crop_scale == (0.2, 1.0)
