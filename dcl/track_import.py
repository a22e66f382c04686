"""Copy finished MLflow runs from per-job stores into a study's main store.

With ``tracking_store: per_run`` each job logs to its own sqlite file,
``<run>/mlflow/<stage>.db`` (stage: pretrain, linear or knn), with artifacts in
``<run>/mlflow/artifacts``. One process writes each file, so no sqlite file is shared
between nodes. The workflow's ``import_runs`` rule then copies every finished run into
the main store (``tracking_uri``):

- the run name, start and end time, and status (FINISHED, FAILED or KILLED);
- every tag, plus ``dcl.imported_from`` (the source run id); ``mlflow.parentRunId``
  is pointed at the imported parent, so evaluation runs stay nested under their
  pretraining run;
- every param, and every point of every metric (step, timestamp, value);
- the artifacts.

Importing is idempotent: a source run whose copy exists and has ended is skipped. A copy
left RUNNING by an import that was killed midway is deleted and made again. Runs still
RUNNING in their own store (a job in progress or killed) are skipped with a warning and
imported by a later call.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from dcl.tracking import experiment_id, open_client, retry

log = logging.getLogger(__name__)

SOURCE_TAG = "dcl.imported_from"
PARENT_TAG = "mlflow.parentRunId"
ENDED = ("FINISHED", "FAILED", "KILLED")
STAGE_ORDER = ("pretrain", "linear", "knn")  # parents first
METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def stores(run_dirs: list[Path]) -> list[Path]:
    """List the per-job stores (``mlflow/*.db``) of ``run_dirs``, pretraining stores first."""
    def order(path: Path) -> tuple[int, str]:
        rank = STAGE_ORDER.index(path.stem) if path.stem in STAGE_ORDER else len(STAGE_ORDER)
        return rank, str(path)

    return sorted((db for run in run_dirs for db in Path(run).glob("mlflow/*.db")), key=order)


def import_runs(store_files: list[Path], target_uri: str, artifact_root: Path | None) -> dict[str, Any]:
    """Import every ended run of ``store_files`` into ``target_uri``; returns what was done.

    Returns:
        ``{"imported": [source ids], "skipped": [source ids already there],
        "unfinished": [source ids still RUNNING], "runs": {source id: target id}}``.
    """
    target = open_client(target_uri)
    report: dict[str, Any] = {"imported": [], "skipped": [], "unfinished": [], "runs": {}}
    parents: dict[str, str] = {}  # target id -> source parent id
    for store in store_files:
        source_uri = f"sqlite:///{Path(store).resolve()}"
        source = open_client(source_uri)
        for experiment in source.search_experiments():
            for run in source.search_runs([experiment.experiment_id]):
                _import_one(source, run, experiment.name, target, artifact_root, report, parents)
    for target_id, source_parent in parents.items():
        if source_parent in report["runs"]:
            retry(lambda: target.set_tag(target_id, PARENT_TAG, report["runs"][source_parent]),
                  "link parent run")
        else:
            log.warning("parent run %s of imported run %s was not imported; the run is not nested",
                        source_parent, target_id)
    log.info("imported %d run(s), %d already imported, %d not finished",
             len(report["imported"]), len(report["skipped"]), len(report["unfinished"]))
    return report


def _import_one(source, run, experiment: str, target, artifact_root: Path | None,
                report: dict[str, Any], parents: dict[str, str]) -> None:
    """Copy one source run unless it is unfinished or already imported."""
    source_id = run.info.run_id
    if run.info.status not in ENDED:
        log.warning("run %s (%s) is %s in its store; not imported yet", source_id,
                    run.info.run_name, run.info.status)
        report["unfinished"].append(source_id)
        return
    target_experiment = experiment_id(target, experiment, artifact_root)
    existing = _copy_of(target, target_experiment, source_id)
    if existing is not None and existing.info.status in ENDED:
        report["skipped"].append(source_id)
        report["runs"][source_id] = existing.info.run_id
    else:
        if existing is not None:
            log.warning("removing %s, a copy of %s left unfinished by an earlier import",
                        existing.info.run_id, source_id)
            retry(lambda: target.delete_run(existing.info.run_id), "delete partial copy")
        report["runs"][source_id] = _copy(source, run, target, target_experiment)
        report["imported"].append(source_id)
    if PARENT_TAG in run.data.tags:
        parents[report["runs"][source_id]] = run.data.tags[PARENT_TAG]


def _copy_of(target, experiment: str, source_id: str):
    """The active run of ``experiment`` tagged as a copy of ``source_id``, or None."""
    found = retry(lambda: target.search_runs(
        [experiment], filter_string=f"tags.`{SOURCE_TAG}` = '{source_id}'", max_results=1),
        "find imported copy")
    return found[0] if found else None


def _copy(source, run, target, experiment: str) -> str:
    """Create the copy of ``run`` in ``target``; it stays RUNNING until everything is in."""
    from mlflow.entities import Metric, Param

    tags = {key: value for key, value in run.data.tags.items()
            if key not in (PARENT_TAG, "mlflow.runName")}
    tags[SOURCE_TAG] = run.info.run_id
    copy = retry(lambda: target.create_run(experiment, start_time=run.info.start_time, tags=tags,
                                           run_name=run.info.run_name), "create imported run")
    copy_id = copy.info.run_id
    params = [Param(key, value) for key, value in run.data.params.items()]
    for start in range(0, len(params), 100):
        chunk = params[start:start + 100]
        retry(lambda: target.log_batch(copy_id, params=chunk), "import params")
    points = [Metric(point.key, point.value, point.timestamp, point.step)
              for key in run.data.metrics for point in source.get_metric_history(run.info.run_id, key)]
    for start in range(0, len(points), METRICS_PER_BATCH):
        chunk = points[start:start + METRICS_PER_BATCH]
        retry(lambda: target.log_batch(copy_id, metrics=chunk), "import metrics")
    _copy_artifacts(source, run.info.run_id, target, copy_id)
    retry(lambda: target.set_terminated(copy_id, status=run.info.status, end_time=run.info.end_time),
          "end imported run")
    log.info("imported run %s (%s) as %s", run.info.run_id, run.info.run_name, copy_id)
    return copy_id


def _copy_artifacts(source, source_id: str, target, target_id: str) -> None:
    if not source.list_artifacts(source_id):
        return
    with tempfile.TemporaryDirectory() as folder:
        local = source.download_artifacts(source_id, "", folder)
        retry(lambda: target.log_artifacts(target_id, local), "import artifacts")
