"""Importing runs from per-job MLflow stores into the main store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dcl.cli import main
from dcl.track_import import SOURCE_TAG, import_runs, stores
from dcl.tracking import Tracker, per_run_store

EXPERIMENT = "study/cifar10"
EPOCHS = 5


def log_run(run_dir: Path, stage: str, parent: str | None = None, finish: bool = True) -> str:
    """Log one run to the run folder's ``stage`` store, as a job with tracking_store: per_run does."""
    uri, artifacts = per_run_store(run_dir, stage)
    tracker = Tracker(uri, EXPERIMENT, artifact_root=artifacts)
    tags = {"stage": stage, **({"mlflow.parentRunId": parent} if parent else {})}
    run_id = tracker.start(f"{run_dir.name}/{stage}", tags=tags, token=f"{run_dir.name}-{stage}")
    tracker.log_params({"run": {"seed": 3}, "lr": 0.5})
    for step in range(1, EPOCHS + 1):
        tracker.log_metrics({"loss": 10.0 / step, "top1": float(step)}, step=step)
    settings = run_dir / "settings.json"
    settings.write_text(json.dumps({"stage": stage}))
    tracker.log_artifact(settings)
    if finish:
        tracker.finish("FINISHED")
    return run_id


def main_runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.fixture
def logged(tmp_path):
    run_dir = tmp_path / "runs" / "dcl_bs32"
    run_dir.mkdir(parents=True)
    pretrain_id = log_run(run_dir, "pretrain")
    linear_id = log_run(run_dir, "linear", parent=pretrain_id)
    return run_dir, pretrain_id, linear_id, f"sqlite:///{tmp_path / 'main' / 'mlflow.db'}"


def test_stores_list_pretraining_first(logged):
    run_dir, *_ = logged
    assert [path.name for path in stores([run_dir])] == ["pretrain.db", "linear.db"]


def test_imported_run_has_every_metric_step(logged, tmp_path):
    run_dir, pretrain_id, linear_id, main_uri = logged
    report = import_runs(stores([run_dir]), main_uri, tmp_path / "main" / "artifacts")
    assert sorted(report["imported"]) == sorted([pretrain_id, linear_id])

    client = MlflowClient(tracking_uri=main_uri)
    copy = client.get_run(report["runs"][pretrain_id])
    assert copy.info.status == "FINISHED"
    assert copy.info.run_name == "dcl_bs32/pretrain"
    assert copy.data.params == {"run.seed": "3", "lr": "0.5"}
    assert copy.data.tags[SOURCE_TAG] == pretrain_id
    assert copy.data.tags["dcl.run_token"] == "dcl_bs32-pretrain"
    history = client.get_metric_history(copy.info.run_id, "loss")
    assert sorted((p.step, p.value) for p in history) == [(s, 10.0 / s) for s in range(1, EPOCHS + 1)]
    assert [a.path for a in client.list_artifacts(copy.info.run_id)] == ["settings.json"]

    evaluation = client.get_run(report["runs"][linear_id])
    assert evaluation.data.tags["mlflow.parentRunId"] == copy.info.run_id


def test_importing_twice_does_not_duplicate(logged, tmp_path):
    run_dir, pretrain_id, linear_id, main_uri = logged
    first = import_runs(stores([run_dir]), main_uri, None)
    second = import_runs(stores([run_dir]), main_uri, None)
    assert second["imported"] == []
    assert sorted(second["skipped"]) == sorted([pretrain_id, linear_id])
    assert second["runs"] == first["runs"]
    runs = main_runs(main_uri)
    assert len(runs) == 2
    history = MlflowClient(tracking_uri=main_uri).get_metric_history(first["runs"][pretrain_id], "top1")
    assert len(history) == EPOCHS


def test_unfinished_run_imported_once_it_ends(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_id = log_run(run_dir, "pretrain", finish=False)
    main_uri = f"sqlite:///{tmp_path / 'main.db'}"
    assert import_runs(stores([run_dir]), main_uri, None)["unfinished"] == [run_id]
    assert main_runs(main_uri) == []
    uri, _ = per_run_store(run_dir, "pretrain")
    MlflowClient(tracking_uri=uri).set_terminated(run_id, "FINISHED")
    assert import_runs(stores([run_dir]), main_uri, None)["imported"] == [run_id]


def test_partial_copy_replaced(logged):
    run_dir, pretrain_id, _, main_uri = logged
    first = import_runs(stores([run_dir]), main_uri, None)
    client = MlflowClient(tracking_uri=main_uri)
    client.update_run(first["runs"][pretrain_id], status="RUNNING")  # as if killed midway
    again = import_runs(stores([run_dir]), main_uri, None)
    assert again["imported"] == [pretrain_id]
    assert len(main_runs(main_uri)) == 2
    assert client.get_run(first["runs"][pretrain_id]).info.lifecycle_stage == "deleted"


def test_cli_writes_report(logged, tmp_path):
    run_dir, pretrain_id, _, main_uri = logged
    out = tmp_path / "import.json"
    assert main(["import-runs", "--tracking-uri", main_uri, "--out", str(out), str(run_dir)]) == 0
    report = json.loads(out.read_text())
    assert pretrain_id in report["imported"]
    assert len(report["stores"]) == 2


def test_cli_needs_main_store(tmp_path):
    out = tmp_path / "import.json"
    assert main(["import-runs", "--tracking-uri", "per-run", "--out", str(out), str(tmp_path)]) == 2
    assert not out.exists()
