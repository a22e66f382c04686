"""The batched augmentation draws its random parameters from torchvision's distributions.

Each test draws many parameter sets at once and compares them with the range or
probability that torchvision's per-image transforms specify: exact bounds for
ranges, Kolmogorov-Smirnov distances for continuous distributions and binomial
bounds for coin flips. Bounds sit at about five standard errors (KS: the
1e-6 tail), so a correct sampler fails about once in a million runs while a
sampler off by about 1 % in a probability or a quantile fails.
"""

from __future__ import annotations

import math
from itertools import permutations

import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from dcl.augment import AugmentConfig, sample_crop_boxes, sample_params

SAMPLES = 200_000
KS_LIMIT = 2.7 / math.sqrt(SAMPLES)  # one-sample KS critical value at p ~ 1e-6: 0.0060


def ks_distance(samples: torch.Tensor, cdf) -> float:
    """Largest gap between the empirical CDF of ``samples`` and ``cdf``."""
    values = samples.double().sort().values
    n = len(values)
    theory = cdf(values)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - theory
    below = theory - torch.arange(0, n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def uniform_cdf(low: float, high: float):
    return lambda x: ((x - low) / (high - low)).clamp(0, 1)


def binomial_limit(p: float, n: int = SAMPLES) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def params():
    config = AugmentConfig(crop_scale=(0.2, 1.0), jitter_strength=0.5, blur_p=0.5)
    return config, sample_params(SAMPLES, 32, 32, config, torch.Generator().manual_seed(0))


def test_crop_area_and_ratio_ranges():
    # With scale <= 0.5 and ratio in [3/4, 4/3] every first attempt fits, so the
    # area fraction is uniform on the scale range and the log ratio uniform on
    # log of the ratio range. A 4096-pixel image makes integer rounding negligible.
    config = AugmentConfig(crop_scale=(0.08, 0.5))
    side = 4096
    boxes = sample_crop_boxes(SAMPLES, side, side, config, torch.Generator().manual_seed(1)).double()
    area = boxes[:, 2] * boxes[:, 3] / side**2
    log_ratio = torch.log(boxes[:, 3] / boxes[:, 2])
    assert area.min() >= 0.08 - 1e-3
    assert area.max() <= 0.5 + 1e-3
    assert ks_distance(area, uniform_cdf(0.08, 0.5)) < KS_LIMIT
    low, high = math.log(3 / 4), math.log(4 / 3)
    assert log_ratio.min() >= low - 1e-3
    assert log_ratio.max() <= high + 1e-3
    assert ks_distance(log_ratio, uniform_cdf(low, high)) < KS_LIMIT


def test_crop_offsets_are_uniform_over_the_free_space():
    side = 4096
    boxes = sample_crop_boxes(SAMPLES, side, side, AugmentConfig(crop_scale=(0.08, 0.5)),
                              torch.Generator().manual_seed(2)).double()
    for offset, size in ((boxes[:, 0], boxes[:, 2]), (boxes[:, 1], boxes[:, 3])):
        position = (offset + 0.5) / (side - size + 1)  # uniform on (0, 1) up to 1/free-space steps
        assert offset.min() >= 0
        assert (offset + size).max() <= side
        assert ks_distance(position, uniform_cdf(0, 1)) < KS_LIMIT


def test_crop_distribution_matches_torchvision_where_crops_get_rejected():
    # Scale up to 1 rejects attempts that do not fit; compare with torchvision's own
    # sampler (two-sample KS, 12,000 draws each, critical value at p ~ 1e-6: 0.035).
    count, side = 12_000, 32
    config = AugmentConfig(crop_scale=(0.08, 1.0))
    ours = sample_crop_boxes(count, side, side, config, torch.Generator().manual_seed(3)).double()
    torch.manual_seed(4)
    image = torch.zeros(3, side, side)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                           for _ in range(count)], dtype=torch.float64)
    for column in range(4):
        a, b = ours[:, column].sort().values, theirs[:, column].sort().values
        grid = torch.cat((a, b)).unique()
        gap = (torch.searchsorted(a, grid, right=True) - torch.searchsorted(b, grid, right=True)).abs()
        assert gap.max().item() / count < 0.035, column


def test_jitter_factors_are_uniform_on_their_ranges(params):
    config, drawn = params
    strength = 0.8 * config.jitter_strength
    ranges = [(1 - strength, 1 + strength)] * 3 + [(-0.2 * config.jitter_strength, 0.2 * config.jitter_strength)]
    for column, (low, high) in enumerate(ranges):
        factors = drawn.jitter_factors[:, column]
        assert factors.min() >= low
        assert factors.max() <= high
        assert ks_distance(factors, uniform_cdf(low, high)) < KS_LIMIT, column


def test_jitter_order_is_a_uniform_permutation(params):
    _, drawn = params
    # Each row read as a base-4 number; the 24 permutations of 0..3 are 24 distinct codes.
    codes = (drawn.jitter_order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    found, counts = codes.unique(return_counts=True)
    permutation_codes = sorted(sum(d * 4**(3 - i) for i, d in enumerate(p)) for p in permutations(range(4)))
    assert found.tolist() == permutation_codes  # every row is a permutation, and each occurs
    expected = SAMPLES / 24
    chi_square = ((counts.double() - expected) ** 2 / expected).sum().item()
    assert chi_square < 70  # 23 degrees of freedom: P(chi2 > 70) ~ 1e-6


def test_coin_rates_match_their_probabilities(params):
    config, drawn = params
    coins = {"flip": config.flip_p, "jitter": config.jitter_p, "grayscale": config.grayscale_p,
             "blur": config.blur_p}
    for name, p in coins.items():
        rate = getattr(drawn, name).double().mean().item()
        assert abs(rate - p) < binomial_limit(p), (name, rate, p)
    # The coins are independent: each joint rate is the product of the two rates.
    for a, b in (("flip", "jitter"), ("jitter", "grayscale"), ("flip", "grayscale")):
        joint = (getattr(drawn, a) & getattr(drawn, b)).double().mean().item()
        p = coins[a] * coins[b]
        assert abs(joint - p) < binomial_limit(p), (a, b, joint)


def test_blur_sigma_is_uniform_on_its_range(params):
    config, drawn = params
    low, high = config.blur_sigma
    assert drawn.blur_sigma.min() >= low
    assert drawn.blur_sigma.max() <= high
    assert ks_distance(drawn.blur_sigma, uniform_cdf(low, high)) < KS_LIMIT
