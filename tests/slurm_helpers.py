"""Helpers for tests that submit to a real SLURM cluster (slurm/local-cluster.sh start).

Tests that need a cluster carry ``needs_slurm``: they are skipped, with the reason shown by
``pytest -ra``, when no cluster responds, unless DCL_REQUIRE_SLURM=1 (as in CI), where the
``slurm_cluster`` fixture fails them instead.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REQUIRED = os.environ.get("DCL_REQUIRE_SLURM") == "1"
NO_CLUSTER = "no SLURM cluster responds to sinfo (start one with slurm/local-cluster.sh start)"
# Seconds to wait for a job to reach a state; the test machine has 2 cores and may be busy.
WAIT_S = 240


@functools.lru_cache(maxsize=1)
def slurm_idle() -> bool:
    """Return whether ``sinfo`` runs and lists a node that can take jobs."""
    if shutil.which("sinfo") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return states.returncode == 0 and any(s in states.stdout for s in ("idle", "mix", "alloc"))


needs_slurm = pytest.mark.skipif(
    not slurm_idle() and not REQUIRED,
    reason=f"{NO_CLUSTER}; DCL_REQUIRE_SLURM=1 turns this skip into a failure",
)


@pytest.fixture
def slurm_cluster() -> None:
    """Fail the test when DCL_REQUIRE_SLURM=1 and no cluster responds."""
    if not slurm_idle():
        pytest.fail(f"DCL_REQUIRE_SLURM=1 but {NO_CLUSTER}")


def sacct(job_ids: list[str], *fields: str, duplicates: bool = False) -> list[list[str]]:
    """Rows of ``sacct -X -P`` for ``job_ids`` (all attempts of requeued jobs with ``duplicates``)."""
    command = ["sacct", "-n", "-X", "-P", "-o", ",".join(fields), "-j", ",".join(job_ids)]
    if duplicates:
        command.append("-D")
    output = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split("|") for line in output.splitlines() if line]


def job_state(job_id: str) -> str:
    """The state ``squeue`` reports for a job still known to the controller, else sacct's."""
    queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                           text=True, timeout=30)
    if queue.returncode == 0 and queue.stdout.strip():
        return queue.stdout.split()[0]
    rows = sacct([job_id], "State")
    return rows[-1][0].split()[0] if rows else "UNKNOWN"


def start_requeued_now(job_id: str) -> None:
    """Wait until a requeued job is pending again, then make it eligible at once.

    SLURM holds a requeued batch job for about two minutes (its begin time moves); tests
    move the begin time back to now instead of waiting.
    """
    wait_until(lambda: job_state(job_id) == "PENDING", f"job {job_id} to be pending again")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True,
                   capture_output=True, timeout=30)


def wait_until(check, what: str, timeout: float = WAIT_S, interval: float = 0.5):
    """Poll ``check()`` until it returns a true value, which is returned; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def job_id_in(job_dir: Path) -> str | None:
    """The job id ``dcl launch`` recorded in ``job_dir``, or None before submission."""
    record = job_dir / "job_id"
    return record.read_text().strip() if record.is_file() else None
