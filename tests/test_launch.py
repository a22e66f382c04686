"""The submitit launcher: local and debug executors, and a real SLURM cluster when one runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dcl.cli import main
from dcl.launch import LaunchError, SlurmResources, StepTask, _wait, _with_job_threads, launch
from slurm_helpers import needs_slurm, sacct, slurm_cluster  # noqa: F401 - slurm_cluster is a fixture


def write_result(folder, loss, batch, top1):
    run = {"study": "t", "dataset": "cifar10", "loss": loss, "backbone": "resnet18", "width": 2,
           "batch_size": batch, "epochs": 1, "seed": 0}
    path = folder / f"{loss}_{batch}.json"
    path.write_text(json.dumps({"run": run, "top1": top1}))
    return path


def aggregate_args(tmp_path):
    results = [write_result(tmp_path, loss, 32, 50.0) for loss in ("infonce", "dcl")]
    return ["aggregate", "--dataset", "cifar10", "--losses", "infonce", "dcl",
            "--batch-sizes", "32", "--epochs", "1", "--csv", str(tmp_path / "t.csv"),
            "--png", str(tmp_path / "t.png"), *map(str, results)]


def test_resources_map_to_submitit_names():
    resources = SlurmResources(partition="gpu", account="lab", qos="high", constraint="h100",
                               time_min=120, mem_gb=64, cpus_per_task=8, gpus_per_node=4,
                               nodes=2, tasks_per_node=4)
    parameters = resources.executor_parameters()
    assert parameters["slurm_partition"] == "gpu"
    assert parameters["slurm_account"] == "lab"
    assert parameters["slurm_qos"] == "high"
    assert parameters["slurm_constraint"] == "h100"
    assert parameters["gpus_per_node"] == 4
    assert parameters["tasks_per_node"] == 4
    assert parameters["timeout_min"] == 120


def test_defaults_leave_cluster_choices():
    parameters = SlurmResources().executor_parameters()
    assert not any(key.startswith("slurm_") for key in parameters)
    assert "gpus_per_node" not in parameters


def test_threads_follow_slurm_cpus(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert _with_job_threads(["pretrain", "--threads", "2"]) == ["pretrain", "--threads", "6"]


def test_checkpoint_requeues_same_command():
    task = StepTask(["pretrain", "--seed", "1"])
    delayed = task.checkpoint()
    assert delayed.function.argv == ["pretrain", "--seed", "1"]


def test_debug_executor_runs_step(tmp_path):
    launch(aggregate_args(tmp_path), tmp_path / "job", SlurmResources(), cluster="debug")
    assert (tmp_path / "t.csv").is_file()


def test_failed_step_raises_with_logs(tmp_path):
    argv = ["aggregate", "--dataset", "cifar10", "--losses", "dcl", "--batch-sizes", "32",
            "--epochs", "1", "--csv", str(tmp_path / "t.csv"), "--png", str(tmp_path / "t.png"),
            str(tmp_path / "missing.json")]
    with pytest.raises(LaunchError, match="state"):
        launch(argv, tmp_path / "job", SlurmResources(), cluster="debug")


def test_launch_cli_needs_step(tmp_path):
    assert main(["launch", "--job-dir", str(tmp_path / "job"), "--cluster", "debug"]) == 2


@pytest.mark.slow
def test_local_executor_subprocess(tmp_path):
    code = main(["launch", "--job-dir", str(tmp_path / "job"), "--cluster", "local", "--",
                 *aggregate_args(tmp_path)])
    assert code == 0
    assert (tmp_path / "t.png").is_file()


@pytest.mark.slow
@needs_slurm
def test_slurm_job_visible_in_sacct(tmp_path, slurm_cluster):
    job_dir = tmp_path / "job"
    code = subprocess.run(
        [sys.executable, "-m", "dcl", "launch", "--job-dir", str(job_dir), "--cluster", "slurm",
         "--cpus-per-task", "1", "--time-min", "5", "--", *aggregate_args(tmp_path)],
        capture_output=True, text=True, timeout=300,
    ).returncode
    job_id = (job_dir / "job_id").read_text().strip()
    assert code == 0
    assert sacct([job_id], "State") == [["COMPLETED"]]
    assert (tmp_path / "t.csv").is_file()


def fake_slurm_job(tmp_path, monkeypatch, states):
    """A SlurmJob whose task results exist and whose sacct states are ``states``, in order."""
    import submitit

    job = submitit.SlurmJob(folder=tmp_path, job_id="123")
    calls = {"result": 0}
    monkeypatch.setattr(job, "results", lambda: calls.__setitem__("result", calls["result"] + 1))
    sequence = iter(states)
    monkeypatch.setattr(job.watcher, "get_state", lambda job_id, mode="standard": next(sequence))
    return job, calls


def test_wait_outlasts_requeue_after_result(tmp_path, monkeypatch):
    job, calls = fake_slurm_job(tmp_path, monkeypatch, ["REQUEUED", "PENDING", "RUNNING", "COMPLETED"])
    _wait(job, poll_s=0)
    assert calls["result"] == 2  # read again after the last attempt ended


def test_wait_rejects_result_of_cancelled_attempt(tmp_path, monkeypatch):
    job, _ = fake_slurm_job(tmp_path, monkeypatch, ["RUNNING", "CANCELLED by 0"])
    with pytest.raises(LaunchError, match="CANCELLED"):
        _wait(job, poll_s=0)
