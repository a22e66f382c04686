"""`snakemake --profile slurm` when a job is cancelled or the workflow itself is stopped.

- ``scancel`` of a running pretraining job fails its rule within a bounded time, with the
  SLURM state and the job's log paths in the message; a rerun finishes the grid and does
  not redo the run that had finished.
- Snakemake stopped while a pretraining job runs, then started again, attaches to the
  running job instead of submitting a second one.

The grids are tiny (one loss, 500 images, a width-4 ResNet-18) so each job takes seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm_helpers import (  # noqa: F401 - slurm_cluster is a fixture
    job_id_in, job_state, needs_slurm, sacct, slurm_cluster, wait_until)
from workflow_helpers import REPO, SNAKEMAKE, data_root, needs_cifar10, write_config

pytestmark = [pytest.mark.slow, needs_cifar10, needs_slurm]

EPOCHS = 15
# Seconds within which a cancelled job must fail its rule. submitit polls sacct at least
# once a minute, and more often while the launcher is young.
CANCEL_FAILS_WITHIN_S = 120
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}


def tiny_grid(folder: Path, batch_sizes: list[int]) -> tuple[Path, list[Path]]:
    """A config with one loss and ``batch_sizes``, its dataset cache already built."""
    config = write_config(folder, **{"grid.losses": ["dcl"], "grid.batch_sizes": batch_sizes,
                                     "grid.epochs": [EPOCHS], "slurm.pretrain.time_min": 20})
    out = folder / "out"
    subprocess.run([*SNAKEMAKE[:1], "-m", "dcl", "prepare-data", "--dataset", "cifar10",
                    "--data-root", str(data_root() / "cifar10"), "--out",
                    str(out / "cache" / "cifar10.npz"), "--train-subset", "500",
                    "--test-subset", "200", "--threads", "1"],
                   env=ENV, check=True, capture_output=True, timeout=300)
    runs = [out / f"runs/cifar10/resnet18-w4/dcl/bs{batch}/ep{EPOCHS}/seed0" for batch in batch_sizes]
    return config, runs


def start_snakemake(config: Path, runs: list[Path], log: Path) -> subprocess.Popen:
    """``snakemake --profile slurm`` for the runs' pretraining, one launcher at a time."""
    targets = [str(run / "pretrain.json") for run in runs]
    with log.open("w") as sink:
        return subprocess.Popen(
            ["nice", "-n", "10", "timeout", "-k", "30", "900", *SNAKEMAKE, "--profile", "slurm",
             "--cores", "1", *targets, "--configfile", str(config)],
            cwd=REPO, env=ENV, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def running_with_checkpoint(run: Path) -> str | None:
    """The job id of ``run``'s pretraining once it runs and has written a checkpoint."""
    job_id = job_id_in(run / "slurm" / "pretrain")
    if job_id is None or not (run / "checkpoints" / "epoch0001.pt").is_file():
        return None
    return job_id if job_state(job_id) == "RUNNING" else None


def alive(process: subprocess.Popen, log: Path) -> None:
    """Fail the test, showing the console, if snakemake has already exited."""
    if process.poll() is not None:
        pytest.fail(f"snakemake exited with {process.returncode}:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Kill what is left of a snakemake started by :func:`start_snakemake` (its session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def submitted_jobs(run: Path) -> set[str]:
    """Every job id submitit wrote logs for in the run's pretraining job folder."""
    return {path.name.split("_")[0] for path in (run / "slurm" / "pretrain").glob("*_log.out")}


def test_cancelled_job_fails_rule_then_rerun_finishes(tmp_path, slurm_cluster):
    config, runs = tiny_grid(tmp_path, [32, 64])
    first = start_snakemake(config, runs, tmp_path / "first.log")
    try:
        def second_running():
            alive(first, tmp_path / "first.log")
            done = [run for run in runs if (run / "pretrain.json").is_file()]
            others = [run for run in runs if run not in done]
            if len(done) == 1 and running_with_checkpoint(others[0]):
                return done[0], others[0]
            return None

        finished, cancelled = wait_until(second_running, "one finished run and one running job", 600)
        job_id = job_id_in(cancelled / "slurm" / "pretrain")
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        cancelled_at = time.monotonic()
        first.wait(timeout=CANCEL_FAILS_WITHIN_S + 60)
        failed_after = time.monotonic() - cancelled_at
    finally:
        stop(first)
    console = (tmp_path / "first.log").read_text()
    assert first.returncode != 0, console[-3000:]
    assert failed_after < CANCEL_FAILS_WITHIN_S, f"the rule failed {failed_after:.0f} s after scancel"
    rule_log = (cancelled / "pretrain.log").read_text()
    assert f"job {job_id} (pretrain) ended in state CANCELLED" in rule_log, rule_log[-3000:]
    assert f"{job_id}_0_log.err" in rule_log
    assert f"job {job_id} (pretrain) ended in state CANCELLED" in console  # show-failed-logs

    finished_mtime = (finished / "pretrain.json").stat().st_mtime_ns
    rerun = start_snakemake(config, runs, tmp_path / "rerun.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert (finished / "pretrain.json").stat().st_mtime_ns == finished_mtime
    assert len(submitted_jobs(finished)) == 1
    resumed = job_id_in(cancelled / "slurm" / "pretrain")
    assert resumed != job_id
    assert submitted_jobs(cancelled) == {job_id, resumed}
    assert sacct([resumed], "JobName", "State") == [["pretrain", "COMPLETED"]]
    assert "resuming from" in (cancelled / "slurm" / "pretrain" / f"{resumed}_0_log.err").read_text()


def test_restarted_workflow_attaches_to_running_job(tmp_path, slurm_cluster):
    config, runs = tiny_grid(tmp_path, [64])
    run = runs[0]
    first = start_snakemake(config, runs, tmp_path / "first.log")
    try:
        def job_running():
            alive(first, tmp_path / "first.log")
            return running_with_checkpoint(run)

        job_id = wait_until(job_running, "the pretraining job to run", 600)
        os.kill(first.pid, signal.SIGTERM)  # timeout forwards it to snakemake
        first.wait(timeout=120)
    finally:
        stop(first)
    assert job_state(job_id) == "RUNNING", "stopping snakemake must not stop the SLURM job"
    assert not (run / "pretrain.json").exists(), "the job ended before snakemake was stopped"

    again = start_snakemake(config, runs, tmp_path / "again.log")
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert f"attaching to SLURM job {job_id}" in (run / "pretrain.log").read_text()
    assert submitted_jobs(run) == {job_id}
    assert sacct([job_id], "JobName", "State", duplicates=True) == [["pretrain", "COMPLETED"]]
    assert (run / "pretrain.json").is_file()
