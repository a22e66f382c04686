"""A pretraining job interrupted on a real SLURM cluster resumes and ends as if never stopped.

Two interruptions: ``scancel --signal=USR2`` (what SLURM sends before a time limit with
submitit's ``--signal``; submitit calls ``StepTask.checkpoint`` and requeues the job) and
``scontrol requeue`` (SIGTERM, which submitit ignores, then SIGKILL after KillWait).
Either way the job runs again with the same command, ``dcl pretrain`` resumes from its
newest checkpoint, and the result must equal the same step run once without SLURM:
the same history, bit-identical backbone weights, one MLflow run whose metrics have
each epoch exactly once, FINISHED.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dcl.config import validate_dataset_settings
from slurm_helpers import (  # noqa: F401 - slurm_cluster is a fixture
    job_id_in, needs_slurm, sacct, slurm_cluster, start_requeued_now, wait_until)
from workflow_helpers import REPO, data_root, needs_cifar10

pytestmark = [pytest.mark.slow, needs_cifar10, needs_slurm]

EPOCHS = 15
# One thread in the job (SLURM_CPUS_PER_TASK=1) and in the reference run: bit-identical.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONPATH": str(REPO)}
DCL = [sys.executable, "-m", "dcl"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> SimpleNamespace:
    """The dataset cache, the pretrain arguments, and one uninterrupted local run."""
    folder = tmp_path_factory.mktemp("requeue")
    study = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    settings = validate_dataset_settings(study["datasets"]["cifar10"])
    cache = folder / "cifar10.npz"
    subprocess.run([*DCL, "prepare-data", "--dataset", "cifar10", "--data-root",
                    str(data_root() / "cifar10"), "--out", str(cache), "--train-subset", "500",
                    "--test-subset", "200", "--threads", "1"], env=ENV, check=True, timeout=300,
                   capture_output=True)

    def step(run_dir: Path) -> list[str]:
        return ["pretrain", "--settings", json.dumps(settings), "--dataset", "cifar10",
                "--loss", "dcl", "--batch-size", "64", "--epochs", str(EPOCHS), "--seed", "3",
                "--cache", str(cache), "--run-dir", str(run_dir), "--study", "requeue",
                "--tracking-uri", f"sqlite:///{run_dir / 'mlflow.db'}", "--threads", "1"]

    local = folder / "local"
    subprocess.run(["nice", "-n", "10", *DCL, *step(local)], env=ENV, check=True, timeout=600,
                   capture_output=True)
    return SimpleNamespace(step=step, local=local)


def interrupt(job_id: str, how: str) -> None:
    command = {"usr2": ["scancel", "--signal=USR2", job_id],
               "requeue": ["scontrol", "requeue", job_id]}[how]
    subprocess.run(command, check=True, timeout=60, capture_output=True)


def metric_histories(run_dir: Path) -> tuple[list, dict[str, list[tuple[int, float]]]]:
    """The MLflow runs of the run folder's store, and the metric histories of its only run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("requeue/cifar10")
    runs = client.search_runs([experiment.experiment_id])
    histories = {}
    for key in runs[0].data.metrics:
        points = client.get_metric_history(runs[0].info.run_id, key)
        histories[key] = sorted((point.step, point.value) for point in points)
    return runs, histories


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


@pytest.mark.parametrize("how", ["usr2", "requeue"])
def test_interrupted_job_resumes_exactly(reference, tmp_path, how, slurm_cluster):
    run_dir = tmp_path / "run"
    job_dir = run_dir / "slurm" / "pretrain"
    launcher = subprocess.Popen(
        ["nice", "-n", "10", *DCL, "launch", "--job-dir", str(job_dir), "--cluster", "slurm",
         "--cpus-per-task", "1", "--time-min", "20", "--", *reference.step(run_dir)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job_id = wait_until(lambda: job_id_in(job_dir), "the job id")
        wait_until(lambda: (run_dir / "checkpoints" / "epoch0002.pt").is_file(),
                   "the job's second checkpoint")
        assert not (run_dir / "pretrain.json").exists(), "the job ended before the interruption"
        interrupt(job_id, how)
        start_requeued_now(job_id)
        output, _ = launcher.communicate(timeout=600)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output[-4000:]

    attempts = [row[0] for row in sacct([job_id], "State", duplicates=True)]
    assert attempts[0] in ("REQUEUED", "PREEMPTED"), attempts
    assert attempts[-1] == "COMPLETED", attempts
    assert len(attempts) == 2, attempts
    job_log = "".join(path.read_text() for path in job_dir.glob(f"{job_id}_*.err"))
    assert "resuming from" in job_log
    if how == "usr2":
        assert "requeueing 'dcl pretrain'" in job_log

    result = json.loads((run_dir / "pretrain.json").read_text())
    expected = json.loads((reference.local / "pretrain.json").read_text())
    assert without_seconds(result["history"]) == without_seconds(expected["history"])
    weights = torch.load(run_dir / "backbone.pt", weights_only=True)
    expected_weights = torch.load(reference.local / "backbone.pt", weights_only=True)
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[key], expected_weights[key]) for key in weights)

    runs, histories = metric_histories(run_dir)
    _, expected_histories = metric_histories(reference.local)
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert [step for step, _ in histories["loss"]] == list(range(1, EPOCHS + 1))
    for key in ("loss", "knn_monitor_top1", "q_b_mean"):
        assert histories[key] == expected_histories[key], key
