"""SimCLR's augmentation pipeline, applied to whole batches on the data's device.

Images enter as uint8 tensors of shape (B, 3, H, W), channels first as in
torchvision, and leave as normalised float32 tensors of shape (B, 3, S, S).
Every image gets its own random parameters, drawn in one vectorised call from a
``torch.Generator`` that the caller owns, so a run is reproducible and its
generator state can be saved with a checkpoint. The generator may live on the
CPU or on the data's device. A CPU generator draws the same parameters whatever
device the images are on, so it is the one to use for device-independent runs.

The steps and their sampling follow torchvision 0.29 as SimCLR uses them:
RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter),
RandomGrayscale, optionally RandomApply(GaussianBlur), then Normalize. Each
step matches ``torchvision.transforms.v2.functional`` on float tensors within
1e-5. Torchvision's PIL pipeline differs slightly because it rounds to uint8
after every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# torchvision's rgb_to_grayscale weights, which round ITU-R 601's 0.299 to 0.2989.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this often before its fallback


@dataclass(frozen=True)
class AugmentConfig:
    """Settings of :class:`SimCLRAugment`. The defaults are SimCLR's CIFAR-10 ones.

    Attributes:
        image_size: output side S in pixels.
        crop_scale: range of the crop's area as a fraction of the image area.
        crop_ratio: range of the crop's width/height ratio, sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter_strength: s; brightness, contrast and saturation use 0.8·s and
            hue uses 0.2·s. At most 2.5, because hue shifts beyond ±0.5 are
            rejected by torchvision's ColorJitter.
        jitter_p: probability of applying colour jitter.
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of Gaussian blur (SimCLR uses 0.5 for ImageNet).
        blur_kernel_fraction: blur kernel side as a fraction of S, made odd.
        blur_sigma: range of the blur's standard deviation in pixels.
        mean, std: per-channel normalisation, applied last.
    """

    image_size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_strength: float = 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel_fraction: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def __post_init__(self) -> None:
        # Lists (from YAML or JSON) become tuples so the config stays hashable.
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(float(v) for v in value))
        self._validate()

    def _validate(self) -> None:
        scale, ratio, sigma = self.crop_scale, self.crop_ratio, self.blur_sigma
        checks = [
            ("image_size", isinstance(self.image_size, int) and self.image_size >= 1, "must be an int >= 1"),
            ("crop_scale", _is_pair(scale) and 0 < scale[0] <= scale[1] <= 1, "must be (a, b), 0<a<=b<=1"),
            ("crop_ratio", _is_pair(ratio) and 0 < ratio[0] <= ratio[1], "must be (a, b), 0 < a <= b"),
            ("jitter_strength", 0 <= self.jitter_strength <= 2.5, "must be in [0, 2.5]"),
            ("blur_kernel_fraction", 0 < self.blur_kernel_fraction <= 1, "must be in (0, 1]"),
            ("blur_sigma", _is_pair(sigma) and 0 < sigma[0] <= sigma[1], "must be (a, b), 0 < a <= b"),
            ("mean", len(self.mean) == 3, "must have 3 values"),
            ("std", len(self.std) == 3 and all(v > 0 for v in self.std), "must have 3 positive values"),
        ]
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            checks.append((name, 0 <= getattr(self, name) <= 1, "must be in [0, 1]"))
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid AugmentConfig.{name}={getattr(self, name)!r}: {rule}")

    @property
    def blur_kernel_size(self) -> int:
        """Odd blur kernel side: int(fraction·S), plus one if even, as SimCLR does."""
        size = int(self.blur_kernel_fraction * self.image_size)
        return size + 1 if size % 2 == 0 else size


def _is_pair(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2


@dataclass
class AugmentParams:
    """Per-image random parameters of one batch of B images.

    Attributes:
        crop_boxes: (B, 4) int64, (top, left, height, width) in input pixels.
        flip: (B,) bool, mirror horizontally.
        jitter: (B,) bool, apply colour jitter.
        jitter_factors: (B, 4) float32, brightness, contrast and saturation
            factors and hue shift (in turns), sampled even where unused.
        jitter_order: (B, 4) int64; column p is the op (0 brightness,
            1 contrast, 2 saturation, 3 hue) applied p-th.
        grayscale: (B,) bool, convert to grayscale.
        blur: (B,) bool, apply Gaussian blur.
        blur_sigma: (B,) float32, blur standard deviation in output pixels.
    """

    crop_boxes: Tensor
    flip: Tensor
    jitter: Tensor
    jitter_factors: Tensor
    jitter_order: Tensor
    grayscale: Tensor
    blur: Tensor
    blur_sigma: Tensor

    def to(self, device: torch.device | str) -> AugmentParams:
        """Return a copy with every tensor on ``device``."""
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: Tensor) -> AugmentParams:
        """Return the parameters of the images at ``index`` (a 1-D int64 tensor)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[index.to(getattr(self, f.name).device)]
                                for f in fields(self)})


def sample_crop_boxes(
    batch_size: int, height: int, width: int, config: AugmentConfig, generator: torch.Generator
) -> Tensor:
    """Sample RandomResizedCrop boxes, (B, 4) int64 (top, left, height, width).

    All attempts of all images are drawn at once, and each image takes its
    first attempt that fits. Images without one fall back to torchvision's
    central crop, with the aspect ratio clamped to ``config.crop_ratio``.
    """
    options = {"device": generator.device, "dtype": torch.float64}
    shape = (batch_size, CROP_ATTEMPTS)
    area = torch.empty(shape, **options).uniform_(*config.crop_scale, generator=generator) * (height * width)
    log_ratio = torch.empty(shape, **options).uniform_(*map(math.log, config.crop_ratio), generator=generator)
    aspect = torch.exp(log_ratio)
    crop_w = torch.round(torch.sqrt(area * aspect))
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    crop_w = crop_w.gather(1, first).squeeze(1)
    crop_h = crop_h.gather(1, first).squeeze(1)

    fallback_h, fallback_w = height, width
    if width / height < config.crop_ratio[0]:
        fallback_h = round(width / config.crop_ratio[0])
    elif width / height > config.crop_ratio[1]:
        fallback_w = round(height * config.crop_ratio[1])
    found = fits.any(dim=1)
    crop_h = torch.where(found, crop_h, float(fallback_h))
    crop_w = torch.where(found, crop_w, float(fallback_w))

    offsets = torch.rand((batch_size, 2), generator=generator, **options)
    top = torch.floor(offsets[:, 0] * (height - crop_h + 1))
    left = torch.floor(offsets[:, 1] * (width - crop_w + 1))
    top = torch.where(found, top, float((height - fallback_h) // 2))
    left = torch.where(found, left, float((width - fallback_w) // 2))
    return torch.stack((top, left, crop_h, crop_w), dim=1).long()


def sample_params(
    batch_size: int, height: int, width: int, config: AugmentConfig, generator: torch.Generator
) -> AugmentParams:
    """Draw every random parameter for B input images of size H×W.

    The tensors are on ``generator.device``. The draw order is fixed, so one
    generator state always gives the same parameters.
    """
    device = generator.device
    crop_boxes = sample_crop_boxes(batch_size, height, width, config, generator)
    coins = torch.rand((batch_size, 4), generator=generator, device=device)

    strength = 0.8 * config.jitter_strength
    hue = 0.2 * config.jitter_strength
    low = torch.tensor([max(0.0, 1 - strength)] * 3 + [-hue], device=device)
    high = torch.tensor([1 + strength] * 3 + [hue], device=device)
    factors = low + (high - low) * torch.rand((batch_size, 4), generator=generator, device=device)
    # Sorting i.i.d. uniforms gives a uniformly random permutation per row.
    order = torch.rand((batch_size, 4), generator=generator, device=device).argsort(dim=1)

    sigma_low, sigma_high = config.blur_sigma
    sigma = sigma_low + (sigma_high - sigma_low) * torch.rand(batch_size, generator=generator, device=device)
    return AugmentParams(
        crop_boxes=crop_boxes,
        flip=coins[:, 0] < config.flip_p,
        jitter=coins[:, 1] < config.jitter_p,
        jitter_factors=factors,
        jitter_order=order,
        grayscale=coins[:, 2] < config.grayscale_p,
        blur=coins[:, 3] < config.blur_p,
        blur_sigma=sigma,
    )


def _resize_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Return (B, out_size, in_size) weights resizing each span [start, start + length).

    Triangle filter widened by the downscale factor, truncated to the span and
    renormalised: torch's bilinear resize with antialias=True applied to the crop.
    """
    scale = length / out_size
    support = scale.clamp_min(1.0)
    centres = start[:, None] + (torch.arange(out_size, device=start.device) + 0.5) * scale[:, None]
    pixels = torch.arange(in_size, device=start.device) + 0.5
    inside = (pixels >= start[:, None]) & (pixels < (start + length)[:, None])
    # The steps run in place because on CPU each fresh large tensor can cost page faults.
    weights = pixels - centres[:, :, None]
    weights.abs_().div_(support[:, None, None]).neg_().add_(1).clamp_min_(0).mul_(inside[:, None, :])
    return weights.div_(weights.sum(dim=2, keepdim=True))


def crop_resize_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop each box, resize it to S×S, mirror where ``flip``: (B, C, H, W) -> (B, C, S, S).

    Matches torchvision's ``resized_crop`` with bilinear antialiased
    interpolation. uint8 input is scaled to float32 in [0, 1]. The resize is two
    batched matrix products, so it costs O(S·H·W) per channel: cheap for CIFAR,
    and meant for the GPU on large images. The output is a channel-transposed
    view, not contiguous. With TF32 matmuls enabled on CUDA (float32 matmul
    precision "high"), the resize keeps only about 3 significant digits.
    """
    batch, channels, height, width = images.shape
    dtype = images.dtype if images.is_floating_point() else torch.float32
    top, left, crop_h, crop_w = boxes.to(dtype).unbind(dim=1)
    row_weights = _resize_weights(top, crop_h, height, size)
    if images.dtype == torch.uint8:
        row_weights.div_(255)
    column_weights = _resize_weights(left, crop_w, width, size)
    column_weights[flip] = column_weights[flip].flip(1)
    # Plain bmm on (B, H, C·W) and (B, S·C, W) layouts, because a matmul that
    # broadcasts over the channel axis ran about 7× slower on CPU (torch 2.14).
    rows_input = images.transpose(1, 2).reshape(batch, height, channels * width).to(dtype)
    rows = torch.bmm(row_weights, rows_input)
    resized = torch.bmm(rows.view(batch, size * channels, width), column_weights.transpose(1, 2))
    return resized.view(batch, size, channels, size).transpose(1, 2)


def _per_image(factor: Tensor) -> Tensor:
    return factor.view(-1, 1, 1, 1)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Return the luma of float RGB images, (N, 3, H, W) -> (N, 1, H, W)."""
    red, green, blue = images.unbind(dim=1)
    luma = red * GRAY_WEIGHTS[0] + green * GRAY_WEIGHTS[1] + blue * GRAY_WEIGHTS[2]
    return luma.unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    factor = _per_image(factor)
    return (images * factor).add_(other * (1 - factor)).clamp_(0, 1)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Scale (N, 3, H, W) images in [0, 1] by per-image ``factor`` (N,), then clamp."""
    return (images * _per_image(factor)).clamp_(0, 1)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its grayscale version, weight ``factor`` (N,)."""
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its grayscale version, weight ``factor`` (N,)."""
    return _blend(images, rgb_to_grayscale(images), factor)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of (N, 3, H, W) images in [0, 1] by per-image ``shift`` (N,) turns.

    Equal, up to float32 rounding, to torchvision's RGB -> HSV -> RGB round
    trip. A hue rotation keeps each pixel's max channel v and min channel, so
    channel c becomes v - chroma·w(k) with k = (n_c + 6·hue) mod 6, n = 5, 3, 1
    for R, G, B, and w(k) = clamp(min(k, 4 - k), 0, 1): the closed form of
    torchvision's six-sector table, without its gather, which is slow on CPU.
    """
    red, green, blue = images.split(1, dim=1)
    max_c = torch.maximum(torch.maximum(red, green), blue)
    chroma = max_c - torch.minimum(torch.minimum(red, green), blue)
    # Gray pixels have chroma 0, so any finite hue works there; the floor avoids 0 / 0.
    rc, gc, bc = ((max_c - images) / chroma.clamp_min(_TINY)).split(1, dim=1)
    max_is_red = max_c == red
    max_is_green = (max_c == green) & ~max_is_red
    max_is_blue = ~(max_is_red | max_is_green)
    # Hue in sixths of a turn, by torchvision's formula (from Pillow's Convert.c).
    hue6 = (bc - gc) * max_is_red + (rc - bc + 2.0) * max_is_green + (gc - rc + 4.0) * max_is_blue
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = hue6 + (offsets + 6.0 * shift.view(-1, 1, 1, 1))
    k -= 6.0 * torch.floor(k / 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return (max_c - chroma * weight).clamp_(0, 1)


_TINY = torch.finfo(torch.float32).tiny


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: Tensor, apply: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Apply ColorJitter where ``apply`` (N,), each image's ops in its own ``order``.

    For each position p and op k, the images whose p-th op is k form one
    sub-batch, so every op runs at most four times per batch.
    """
    images = images.clone()
    for position in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            index = torch.nonzero(apply & (order[:, position] == op_index)).squeeze(1)
            if index.numel() == 0:
                continue
            images[index] = op(images[index], factors[index, op_index])
    return images


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur (N, 3, H, W) images with per-image ``sigma`` (N,), reflect padding.

    The kernel matches torchvision's GaussianBlur; the two separable passes are
    depthwise convolutions with one group per image channel.
    """
    batch, channels, height, width = images.shape
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1).to(images.dtype)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    pad = kernel_size // 2
    flat = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Subtract ``mean`` and divide by ``std`` per channel of (N, 3, H, W) images."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return ((images - mean_t) / std_t).contiguous()


def _check_uint8_batch(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            "invalid images: expected a uint8 tensor of shape (B, 3, H, W), "
            f"got {images.dtype} of shape {tuple(images.shape)}"
        )


class SimCLRAugment:
    """SimCLR augmentation of uint8 (B, 3, H, W) batches into float32 (B, 3, S, S).

    NOTE: on CPU with glibc's default malloc, page faults on fresh large
    temporaries took about 40 % of the time (batch 256, one thread, 2-core
    AMD EPYC VM). Raising MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
    to 1e9 in the environment removed that cost there.
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config if config is not None else AugmentConfig()

    def sample_params(
        self, batch_size: int, height: int, width: int, generator: torch.Generator
    ) -> AugmentParams:
        """Draw per-image parameters on ``generator.device``; see :func:`sample_params`."""
        return sample_params(batch_size, height, width, self.config, generator)

    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Augment uint8 (B, 3, H, W) ``images`` with given ``params``, on the images' device."""
        _check_uint8_batch(images)
        config = self.config
        params = params.to(images.device)
        output = crop_resize_flip(images, params.crop_boxes, params.flip, config.image_size)
        if config.jitter_strength > 0:
            output = color_jitter(output, params.jitter, params.jitter_factors, params.jitter_order)
        gray_index = torch.nonzero(params.grayscale).squeeze(1)
        output[gray_index] = rgb_to_grayscale(output[gray_index]).expand(-1, 3, -1, -1)
        blur_index = torch.nonzero(params.blur).squeeze(1)
        if blur_index.numel() > 0 and config.blur_kernel_size > 1:
            sigma = params.blur_sigma[blur_index]
            output[blur_index] = gaussian_blur(output[blur_index], sigma, config.blur_kernel_size)
        return normalize(output, config.mean, config.std)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augment uint8 (B, 3, H, W) ``images`` into float32 (B, 3, S, S) with fresh parameters."""
        _check_uint8_batch(images)
        batch, _, height, width = images.shape
        return self.apply(images, self.sample_params(batch, height, width, generator))

    def two_views(
        self, images: Tensor, generator: torch.Generator, part: slice | None = None,
        total: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return two independent augmentations of each image, each float32 (B, 3, S, S).

        Both views come from one call on the doubled batch, so they draw
        2B parameter sets from ``generator`` at once. With ``part`` and ``total``,
        ``images`` is the slice ``part`` of a batch of ``total`` images, and gets the
        parameters that slice gets in the whole batch: the ranks of a data-parallel run
        share one generator and each augments its own part.
        """
        if part is None:
            views = self(torch.cat((images, images)), generator)
            return views[: len(images)], views[len(images) :]
        _check_uint8_batch(images)
        _, _, height, width = images.shape
        rows = torch.arange(total)[part]
        if len(rows) != len(images):
            raise ValueError(f"part {part} of {total} images has {len(rows)} rows, got {len(images)} images")
        params = self.sample_params(2 * total, height, width, generator)
        views = self.apply(torch.cat((images, images)), params.select(torch.cat((rows, rows + total))))
        return views[: len(images)], views[len(images) :]


def eval_transform(
    images: Tensor,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
    image_size: int = 32,
) -> Tensor:
    """Deterministically convert uint8 (B, 3, H, W) images to normalised float32 (B, 3, S, S).

    Images that are not already S×S are centre-cropped to a square of their
    shorter side, then resized bilinearly with antialiasing to S×S.
    """
    _check_uint8_batch(images)
    output = images.float().div_(255)
    height, width = output.shape[-2:]
    if (height, width) != (image_size, image_size):
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        output = output[:, :, top : top + side, left : left + side]
        output = F.interpolate(output, size=(image_size, image_size), mode="bilinear", antialias=True)
        output = output.clamp_(0, 1)
    return normalize(output, mean, std)
