"""Interleaved timing of benchmark variants.

A variant is a factory that returns a :class:`Runner`. :func:`interleave` runs
the variants in turns, ``rounds`` times: each turn builds the runner, takes
``warmup`` untimed steps, times ``steps`` steps one by one and closes the
runner, so a DataLoader's worker processes live only during their own turn and
never steal cores from another variant. Other load on the machine then hits
every variant alike, and ratios of medians stay fair.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch


class Runner(Protocol):
    """One benchmark variant, ready to run."""

    def step(self) -> None:
        """Run one unit of work (a training step, one augmented batch, one loss)."""

    def close(self) -> None:
        """Release worker processes and memory."""


@dataclass
class Timing:
    """Per-step wall times of one variant, in seconds, and the images one step handles."""

    name: str
    images_per_step: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.images_per_step / self.median


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device``, so a step's time includes its kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(
    variants: dict[str, tuple[Callable[[], Runner], int]],
    rounds: int,
    warmup: int,
    steps: int,
    device: torch.device,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Timing]:
    """Time each variant ``rounds`` × ``steps`` times, the variants taking turns.

    Args:
        variants: name -> (runner factory, images per step).
        rounds: turns per variant; warmup: untimed steps per turn; steps: timed steps per turn.
        device: synchronised after every step.
        progress: called with a line after each turn.

    Returns:
        name -> :class:`Timing` with ``rounds · steps`` step times.
    """
    timings = {name: Timing(name, images) for name, (_, images) in variants.items()}
    for round_index in range(rounds):
        for name, (factory, _) in variants.items():
            runner = factory()
            try:
                for _ in range(warmup):
                    runner.step()
                synchronize(device)
                for _ in range(steps):
                    started = time.perf_counter()
                    runner.step()
                    synchronize(device)
                    timings[name].seconds.append(time.perf_counter() - started)
            finally:
                runner.close()
            progress(f"round {round_index + 1}/{rounds} {name}: median "
                     f"{timings[name].median * 1e3:.1f} ms/step")
    return timings
