"""MLflow tracking for pretraining and evaluation runs.

One experiment per study and dataset (``<study>/<dataset>``). Pretraining runs
are parents; their evaluation runs carry the ``mlflow.parentRunId`` tag, so the
MLflow UI nests them. Metrics are sent in batches with ``log_batch``.

Several jobs may start at once against one sqlite store, so creating the
experiment and the first writes are retried with back-off instead of failing
on "database is locked" or on a race to create the same experiment.

Where compute nodes cannot reach a tracking server, each job can instead log to its
own store in its run folder (:func:`per_run_store`, the CLI's ``--tracking-uri per-run``);
``dcl.track_import`` copies those runs into the main store.
"""

from __future__ import annotations

import fcntl
import logging
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIES = 8
TOKEN_TAG = "dcl.run_token"
PER_RUN = "per-run"  # --tracking-uri value: log to the job's own store in its run folder


def retry(action: Callable[[], T], what: str) -> T:
    """Run ``action``, retrying transient store errors with jittered exponential back-off."""
    for attempt in range(RETRIES):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - MLflow wraps sqlite errors in several types
            if attempt == RETRIES - 1:
                raise
            delay = 0.2 * 2**attempt * (1 + random.random())
            log.warning("MLflow %s failed (%s); retry %d in %.1f s", what, error, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def sqlite_file(uri: str) -> Path | None:
    """Return the database path of a ``sqlite:///`` URI, or None for any other URI."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


def open_client(uri: str):
    """Create an MlflowClient and make sure its store's schema exists.

    MLflow creates or migrates a sqlite schema on first use; two processes doing
    that at once on a fresh file fail ("Online migration expected to match one
    row"). An exclusive lock on ``<db>.lock`` serialises that first use.
    """
    from mlflow.tracking import MlflowClient

    database = sqlite_file(uri)
    if database is None:
        return MlflowClient(tracking_uri=uri)
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            retry(lambda: client.search_experiments(max_results=1), "open sqlite store")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def experiment_id(client, name: str, artifact_root: Path | None = None) -> str:
    """Return the id of experiment ``name``, creating it (artifacts under ``artifact_root``) if missing."""
    def get_or_create() -> str:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = artifact_root.resolve().as_uri() if artifact_root else None
        return client.create_experiment(name, artifact_location=location)

    return retry(get_or_create, f"get-or-create experiment {name!r}")


def per_run_store(run_dir: Path, stage: str) -> tuple[str, Path]:
    """The tracking URI and artifact folder of one job's own store: ``<run_dir>/mlflow/<stage>.db``.

    With ``tracking_store: per_run`` every job writes its own sqlite file, so no two
    processes (or nodes) write one file. ``dcl import-runs`` copies the finished runs
    into the study's main store.
    """
    folder = Path(run_dir).resolve() / "mlflow"
    return f"sqlite:///{folder / f'{stage}.db'}", folder / "artifacts"


def git_commit() -> str | None:
    """Return the commit of the checkout this package runs from, or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested settings into MLflow params: {"loss": {"temperature": 0.1}} → {"loss.temperature": "0.1"}."""
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class Tracker:
    """A handle on one MLflow run; every method is a no-op when ``uri`` is None.

    Args:
        uri: tracking URI (``sqlite:///…`` or ``http://127.0.0.1:5000``), or None.
        experiment: experiment name, created on first use.
        artifact_root: folder for the experiment's artifacts when it is created.
    """

    def __init__(self, uri: str | None, experiment: str, artifact_root: Path | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.run_id: str | None = None
        self.created = False  # whether start() created the run rather than reopening one
        self._client = None
        if uri is not None:
            self._client = open_client(uri)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _experiment_id(self) -> str:
        return experiment_id(self._client, self.experiment, self.artifact_root)

    def _find_run(self, token: str) -> str | None:
        """Return the id of the run tagged ``dcl.run_token = token`` in this experiment, or None."""
        experiment_id = self._experiment_id()
        runs = retry(lambda: self._client.search_runs(
            [experiment_id], filter_string=f"tags.`{TOKEN_TAG}` = '{token}'", max_results=1),
            "find run by token")
        return runs[0].info.run_id if runs else None

    def _exists(self, run_id: str) -> bool:
        """Return whether ``run_id`` is an active run of this store (False if missing or deleted)."""
        from mlflow.exceptions import MlflowException

        def look_up() -> bool:
            try:
                return self._client.get_run(run_id).info.lifecycle_stage == "active"
            except MlflowException as error:
                if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return False
                raise

        return retry(look_up, f"look up run {run_id}")

    def start(self, run_name: str, tags: dict[str, str] | None = None,
              resume_run_id: str | None = None, token: str | None = None) -> str | None:
        """Start a run, or reopen one (status set back to RUNNING).

        The run reopened is ``resume_run_id`` if the store still has it, else the run
        tagged with ``token``.
        A new run is tagged with ``token``: a caller that keeps the token on disk
        before calling finds its run again after being killed, even when it was
        killed before it could record the run id.
        """
        if not self.enabled:
            return None
        if resume_run_id and not self._exists(resume_run_id):
            log.warning("MLflow run %s is not in %s (store replaced, or run deleted); starting a "
                        "new run for %s", resume_run_id, self.uri, run_name)
            resume_run_id = None
        if not resume_run_id and token:
            resume_run_id = self._find_run(token)
        if resume_run_id:
            retry(lambda: self._client.update_run(resume_run_id, status="RUNNING"), "resume run")
            self.run_id, self.created = resume_run_id, False
            log.info("resumed MLflow run %s (%s)", resume_run_id, run_name)
            return self.run_id
        experiment_id = self._experiment_id()
        tags = dict(tags or {})
        if token:
            tags[TOKEN_TAG] = token
        commit = git_commit()
        if commit:
            tags.setdefault("mlflow.source.git.commit", commit)
        run = retry(
            lambda: self._client.create_run(experiment_id, run_name=run_name, tags=tags),
            "create run",
        )
        self.run_id, self.created = run.info.run_id, True
        log.info("started MLflow run %s (%s) in experiment %r", self.run_id, run_name, self.experiment)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(key, value[:6000]) for key, value in flatten(params).items()]
        for start in range(0, len(items), 100):
            chunk = items[start:start + 100]
            retry(lambda: self._client.log_batch(self.run_id, params=chunk), "log params")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        retry(lambda: self._client.log_batch(self.run_id, metrics=items), "log metrics")

    def logged_steps(self, key: str) -> set[int]:
        """Return the steps at which metric ``key`` is recorded in this run (empty when disabled)."""
        if not self.enabled or not self.run_id:
            return set()
        history = retry(lambda: self._client.get_metric_history(self.run_id, key),
                         f"read history of {key!r}")
        return {point.step for point in history}

    def log_artifact(self, path: Path) -> None:
        if self.enabled:
            retry(lambda: self._client.log_artifact(self.run_id, str(path)), "log artifact")

    def finish(self, status: str = "FINISHED") -> None:
        """Set the run's final status: FINISHED, FAILED or KILLED."""
        if self.enabled and self.run_id:
            retry(lambda: self._client.set_terminated(self.run_id, status=status), "end run")
            log.info("MLflow run %s ended %s", self.run_id, status)
