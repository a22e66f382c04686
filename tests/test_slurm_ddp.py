"""A 2-task SLURM job (gloo on the CPU, global BatchNorm) trains as one process would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcl.tracking import Tracker
from dcl.train import pretrain
from test_dist import _pretrain_run, _pretrain_settings
from slurm_helpers import needs_slurm, slurm_cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, needs_slurm]


@pytest.fixture
def images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "cifar10.npz"
    np.savez(path, train_images=rng.integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8),
             train_labels=np.arange(64) % 4,
             test_images=rng.integers(0, 256, size=(16, 3, 32, 32), dtype=np.uint8),
             test_labels=np.arange(16) % 4, classes=np.asarray(["a", "b", "c", "d"]))
    return path


def test_two_task_job_matches_one_process(tmp_path, images, slurm_cluster):
    pretrain(_pretrain_settings(), _pretrain_run(), images, tmp_path / "single", Tracker(None, "test"), 1)

    run = _pretrain_run()
    step = ["pretrain", "--settings", json.dumps(_pretrain_settings()), "--dataset", "cifar10",
            "--loss", run["loss"], "--batch-size", str(run["batch_size"]), "--epochs", str(run["epochs"]),
            "--seed", "0", "--cache", str(images), "--run-dir", str(tmp_path / "slurm"),
            "--study", "test", "--tracking-uri", "none", "--threads", "1"]
    launch = [sys.executable, "-m", "dcl", "launch", "--job-dir", str(tmp_path / "job"), "--cluster", "slurm",
              "--cpus-per-task", "1", "--tasks-per-node", "2", "--time-min", "15", "--", *step]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    outcome = json.loads((tmp_path / "slurm" / "pretrain.json").read_text())
    assert outcome["world_size"] == 2
    single = torch.load(tmp_path / "single" / "backbone.pt")
    parallel = torch.load(tmp_path / "slurm" / "backbone.pt")
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-3, atol=1e-4, msg=key)
