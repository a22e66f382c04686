"""Run one ``dcl`` step as a SLURM job through submitit, and wait for it.

A Snakemake rule stays a local job that calls ``dcl launch [resources] -- <step args>``;
the launcher submits the step with submitit's ``AutoExecutor`` and blocks until the job
ends, so the workflow does not depend on how a cluster plugin reports job states.
While it waits, the launcher is one mostly idle Python process on the submitting node
that polls the job's state through ``sacct`` (submitit's default, about once a minute
for long jobs).

- Preemption and time limits: the submitted callable defines ``checkpoint()``, so when
  SLURM signals the job (submitit's USR2 handling) it is requeued with the same command.
  ``dcl pretrain`` then resumes from the newest checkpoint in its run folder.
- Restarted workflow: the job id is stored in ``<job_dir>/job_id``; a launcher that finds
  a job still pending or running there attaches to it instead of submitting a duplicate.
- A failed or cancelled job raises :class:`LaunchError` with its state and log paths.
  submitit polls ``sacct`` at least once a minute (more often in a job's first minutes),
  so a cancelled job fails its rule within about a minute.
- A job requeued after it wrote its result (``scontrol requeue`` late in the job) runs
  again; the launcher waits until SLURM no longer queues or runs it, and accepts the
  result only if the last attempt ended COMPLETED.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from dcl.atomic import write_text

log = logging.getLogger(__name__)

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
                 "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}


class LaunchError(RuntimeError):
    """A submitted step failed, was cancelled or could not be submitted."""


@dataclass
class SlurmResources:
    """Resources of one SLURM job; None leaves the cluster's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 60
    mem_gb: float | None = None
    cpus_per_task: int = 2
    gpus_per_node: int = 0
    nodes: int = 1
    tasks_per_node: int = 1
    extra: dict[str, object] = field(default_factory=dict)

    def executor_parameters(self) -> dict[str, object]:
        """Parameters for ``AutoExecutor.update_parameters`` (submitit's names)."""
        parameters: dict[str, object] = {
            "timeout_min": self.time_min, "cpus_per_task": self.cpus_per_task,
            "nodes": self.nodes, "tasks_per_node": self.tasks_per_node,
        }
        if self.gpus_per_node:
            parameters["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            parameters["mem_gb"] = self.mem_gb
        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value:
                parameters[f"slurm_{name}"] = value
        parameters.update(self.extra)
        return parameters


class StepTask(submitit.helpers.Checkpointable):
    """The callable a job runs: ``dcl <argv>`` in the job's Python process."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> None:
        from dcl.cli import main

        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            # One task per GPU: RANK, WORLD_SIZE, MASTER_ADDR/PORT for torch.distributed.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        code = main(_with_job_threads(self.argv))
        if code != 0:
            raise LaunchError(f"'dcl {' '.join(self.argv[:1])}' exited with code {code}")

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Requeue the same command; the step itself resumes from its run folder."""
        log.warning("job signalled before its end; requeueing 'dcl %s'", " ".join(self.argv[:1]))
        return submitit.helpers.DelayedSubmission(StepTask(self.argv))


def _with_job_threads(argv: list[str]) -> list[str]:
    """Replace ``--threads`` by the CPUs SLURM allocated to the task, when SLURM_CPUS_PER_TASK is set."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if not cpus or "--threads" not in argv:
        return argv
    argv = list(argv)
    argv[argv.index("--threads") + 1] = cpus
    return argv


def _attach(job_dir: Path, cluster: str | None) -> submitit.Job | None:
    """Return the job recorded in ``job_dir`` if SLURM still runs or queues it."""
    record = job_dir / "job_id"
    if cluster not in (None, "slurm") or not record.is_file():
        return None
    job = submitit.SlurmJob(folder=job_dir, job_id=record.read_text().strip())
    if job.state in ACTIVE_STATES:
        log.info("attaching to SLURM job %s (%s) instead of submitting again", job.job_id, job.state)
        return job
    return None


def launch(argv: list[str], job_dir: Path, resources: SlurmResources,
           cluster: str | None = None, name: str = "dcl") -> None:
    """Submit ``dcl <argv>`` (or attach to its running job) and wait until it ends."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    job = _attach(job_dir, cluster)
    if job is None:
        executor = submitit.AutoExecutor(folder=job_dir, cluster=cluster)
        executor.update_parameters(name=name, **resources.executor_parameters())
        job = executor.submit(StepTask(argv))
        write_text(job_dir / "job_id", f"{job.job_id}\n")
        log.info("submitted %s as job %s (logs in %s)", name, job.job_id, job_dir)
    try:
        _wait(job)
    except Exception as error:  # noqa: BLE001 - submitit raises several types for failed jobs
        state = getattr(job, "state", "UNKNOWN")
        raise LaunchError(
            f"job {job.job_id} ({name}) ended in state {state}: {error}\n"
            f"stdout: {job.paths.stdout}\nstderr: {job.paths.stderr}\n"
            "Fix the cause shown in the log and rerun the workflow; finished runs are kept."
        ) from error
    log.info("job %s (%s) finished", job.job_id, name)


def _results(job: submitit.Job) -> None:
    """Wait for the results of every task of ``job`` (one per rank of a data-parallel step)."""
    job.results()


def _wait(job: submitit.Job, poll_s: float = 2.0, max_poll_s: float = 60.0) -> None:
    """Wait for ``job``'s result; for a SLURM job, also until SLURM reports it COMPLETED.

    The result file alone is not enough: a job requeued after writing it runs again.
    Polls ``sacct`` every ``poll_s`` seconds, doubling up to ``max_poll_s``.
    """
    _results(job)
    if not isinstance(job, submitit.SlurmJob):
        return
    state = job.watcher.get_state(job.job_id, mode="force")
    unknown_left = 5  # sacct may not list a job that ended a moment ago
    while state in ACTIVE_STATES or (state == "UNKNOWN" and unknown_left > 0):
        unknown_left -= state == "UNKNOWN"
        log.info("job %s wrote its result but is %s; waiting for its last attempt", job.job_id, state)
        time.sleep(poll_s)
        poll_s = min(2 * poll_s, max_poll_s)
        state = job.watcher.get_state(job.job_id, mode="force")
    _results(job)  # the last attempt's results, or its error
    if state not in ("COMPLETED", "UNKNOWN"):
        raise LaunchError(f"SLURM reports state {state} after the job wrote its result")
