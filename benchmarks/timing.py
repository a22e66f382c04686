"""Interleaved timing of benchmark variants.

A variant is a factory that returns a :class:`Runner`. :func:`interleave` runs
the variants in turns, ``rounds`` times. Each turn builds the runner, takes
``warmup`` untimed steps, times ``steps`` steps one by one and closes the
runner. A DataLoader's worker processes therefore live only during their own
turn and never take cores from another variant. Other load on the machine then hits
every variant alike, and ratios of medians stay fair. CPU seconds per step, the
DataLoader workers' included, are recorded too: on a shared machine a variant
with more processes gets a larger share of the cores, which wall time hides.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch


class Runner(Protocol):
    """One benchmark variant, ready to run."""

    def step(self) -> None:
        """Run one unit of work (a training step, one augmented batch, one loss)."""

    def close(self) -> None:
        """Release worker processes and memory."""

    # Optional: worker_pids() -> list[int], the ids of live helper processes (DataLoader
    # workers), whose CPU time counts towards the variant's.


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """Return the user + system CPU seconds used so far by this process and ``pids``.

    Reads ``/proc/<pid>/stat`` (Linux); a process that has exited counts as 0.
    """
    total = time.process_time()
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return total


@dataclass
class Timing:
    """Per-step wall times of one variant, in seconds, and the images one step handles."""

    name: str
    images_per_step: int
    seconds: list[float] = field(default_factory=list)
    cpu_per_step: list[float] = field(default_factory=list)  # one mean per turn

    @property
    def cpu_median(self) -> float:
        """Median over turns of CPU seconds per step, helper processes included."""
        return statistics.median(self.cpu_per_step)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.images_per_step / self.median


class MachineShare:
    """CPU time that processes other than this one and its children used during a run.

    Reads the machine's busy time from ``/proc/stat`` and subtracts this process's and
    its reaped children's (DataLoader workers) CPU time, so a benchmark page can report
    whether the cores were free. On systems without ``/proc/stat`` it reports None.
    """

    def __init__(self) -> None:
        self.started = (time.perf_counter(), _machine_busy_seconds(), _own_seconds())

    def others(self) -> tuple[float, float] | None:
        """Return (CPU seconds of other processes, their share of all cores' time), or None."""
        wall_started, busy_started, own_started = self.started
        busy = _machine_busy_seconds()
        if busy is None or busy_started is None:
            return None
        seconds = max(0.0, (busy - busy_started) - (_own_seconds() - own_started))
        capacity = (time.perf_counter() - wall_started) * (os.cpu_count() or 1)
        # Tick accounting and the wall clock are read at slightly different times.
        return seconds, min(1.0, seconds / capacity)


def _machine_busy_seconds() -> float | None:
    """Return the non-idle CPU seconds of all cores since boot, from the first line of ``/proc/stat``."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def _own_seconds() -> float:
    """Return the CPU seconds of this process and of its children that have been waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


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
                cpu_started = cpu_seconds(getattr(runner, "worker_pids", list)())
                for _ in range(steps):
                    started = time.perf_counter()
                    runner.step()
                    synchronize(device)
                    timings[name].seconds.append(time.perf_counter() - started)
                # Workers prefetch ahead, so in steady state their CPU time over the timed
                # steps is that of as many batches, shifted by the queue's depth.
                cpu_used = cpu_seconds(getattr(runner, "worker_pids", list)()) - cpu_started
                timings[name].cpu_per_step.append(cpu_used / steps)
            finally:
                runner.close()
            progress(f"round {round_index + 1}/{rounds} {name}: median "
                     f"{timings[name].median * 1e3:.1f} ms/step")
    return timings
