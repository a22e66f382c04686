"""The speed benchmark: its timing loop, its data pack, and a tiny run of every part."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from benchmarks.data import folder_images, pack, packed_images
from benchmarks.report import others_line
from benchmarks.speed import parse_args
from benchmarks.timing import MachineShare, interleave
from dcl.config import load_study
from workflow_helpers import REPO, data_root, needs_cifar10


class Recorder:
    """A runner that logs its life into a shared list."""

    def __init__(self, name: str, events: list) -> None:
        self.name, self.events = name, events
        events.append((name, "open"))

    def step(self) -> None:
        self.events.append((self.name, "step"))

    def close(self) -> None:
        self.events.append((self.name, "close"))


def test_interleave_times_timed_steps():
    events: list = []
    variants = {name: (lambda n=name: Recorder(n, events), 8) for name in ("a", "b")}
    timings = interleave(variants, rounds=2, warmup=1, steps=3, device=torch.device("cpu"))
    turn = lambda n: [(n, "open")] + [(n, "step")] * 4 + [(n, "close")]  # noqa: E731
    assert events == turn("a") + turn("b") + turn("a") + turn("b")
    assert {name: len(t.seconds) for name, t in timings.items()} == {"a": 6, "b": 6}
    assert timings["a"].images_per_second == pytest.approx(8 / timings["a"].median)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_machine_share_counts_other_processes():
    share = MachineShare()
    # A process not yet waited for is "other": its CPU time is not in os.times() yet.
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 1.0: pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and share.others()[0] < 0.8:
        time.sleep(0.1)
    seconds, fraction = share.others()
    busy.wait()
    assert seconds >= 0.8
    assert 0 < fraction <= 1


def test_others_line_idle_and_shared():
    assert others_line(None) == "not measured (no /proc/stat)"
    assert others_line((3.0, 0.01)).endswith("the cores were otherwise idle")
    assert others_line((300.0, 0.4)) == "300 CPU s, 40.0% of all cores' time: other jobs shared the cores"


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--width", "32"], "--tiny sets its own sizes: drop --width"),
    (["--batches", "0"], "--batches must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--warmup", "-1"], "--warmup must be 0 or more, got -1"),
    (["--width", "4"], "--width 4 is below 8"),
    (["--notes", "/nonexistent/notes.md"], "--notes file /nonexistent/notes.md not found"),
])
def test_bad_arguments_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        parse_args(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@needs_cifar10
def test_pack_matches_folder_pixels(tmp_path):
    path = pack(data_root(), tmp_path / "pack.npz", 30)
    np.testing.assert_array_equal(packed_images(path), folder_images(data_root(), 30))
    assert packed_images(path, 10).shape == (10, 3, 32, 32)
    with pytest.raises(ValueError, match="contains 30 images"):
        packed_images(path, 31)


@pytest.mark.slow
@needs_cifar10
def test_tiny_run_writes_page(tmp_path):
    # The GPU script's path: a JPEG pack and a JSON copy of the settings.
    images = pack(data_root(), tmp_path / "pack.npz", 200)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(load_study(REPO / "config" / "cpu.yaml")["datasets"]["cifar10"]))
    out_md, out_csv = tmp_path / "speed.md", tmp_path / "speed.csv"
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "benchmarks.speed", "--tiny", "--data", str(images),
               "--config", str(settings), "--out-md", str(out_md), "--out-csv", str(out_csv),
               "--gpu-csv", str(tmp_path / "absent.csv")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    found = {(row["part"], row["variant"], row["width"]) for row in rows}
    for width in ("8", "64"):
        for variant in ("compute-only bound", "ours: full step", "lightly 1.6 baseline"):
            assert ("pretrain", variant, width) in found
    assert ("pretrain", "compute-only, one forward per view", "8") in found
    assert {variant for part, variant, _ in found if part == "levers"} == {
        "fp32 NCHW", "fp32 channels-last", "bf16 autocast NCHW", "bf16 autocast channels-last"}
    assert {variant for part, variant, _ in found if part == "augment"} == {
        "ours: batched on the device", "torchvision per-image, 2 workers"}
    assert {variant for part, variant, _ in found if part == "loss"} == {
        "ours DCLLoss, 2N=16", "lightly DCLLoss, 2N=16", "ours DCLLoss, 2N=32", "lightly DCLLoss, 2N=32"}
    assert {variant for part, variant, _ in found if part == "overhead"} == {"qb", "tracking"}
    assert all(float(row["median_ms"]) > 0 for row in rows)

    page = out_md.read_text()
    for heading in ("## Targets", "## Pretraining step", "## Speed levers", "## Augmentation alone",
                    "## Loss alone", "## Where our step's time goes",
                    "## Where the augmentation's time goes", "- Other processes during the run: ",
                    "## Diagnostics and tracking overhead", "## GPU (one H200)"):
        assert heading in page
    assert "GPU numbers are not measured yet" in page
    assert "tiny mode" in page
    assert "**Tiny mode:" in page
    assert "## Reading these numbers" not in page  # the notes discuss a full run
    # Our loss and lightly's agree on the same inputs (the page prints the differences).
    differences = [float(line.split("|")[5]) for line in page.splitlines()
                   if line.startswith(("| dcl |", "| dclw |"))]
    assert len(differences) == 4
    assert max(differences) < 1e-5
