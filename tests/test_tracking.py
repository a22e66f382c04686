"""MLflow tracking: runs, resume, parent links and concurrent writers on one sqlite store."""

from __future__ import annotations

import multiprocessing

import pytest
from mlflow.tracking import MlflowClient

from dcl.tracking import Tracker, flatten


def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_flatten_nested_settings():
    flat = flatten({"loss": {"temperature": 0.1, "sigma": 0.5}, "seed": 0})
    assert flat == {"loss.temperature": "0.1", "loss.sigma": "0.5", "seed": "0"}


def test_disabled_tracker_is_noop():
    tracker = Tracker(None, "x")
    assert tracker.start("run") is None
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    assert tracker.run_id is None


def test_run_records_params_metrics_status(tmp_path):
    tracker = Tracker(uri(tmp_path), "study/cifar10", artifact_root=tmp_path / "artifacts")
    run_id = tracker.start("dcl_run", tags={"stage": "pretrain"})
    tracker.log_params({"loss": {"temperature": 0.1}})
    for epoch in (1, 2, 3):
        tracker.log_metrics({"loss": 5.0 - epoch}, step=epoch)
    tracker.finish("FINISHED")

    client = MlflowClient(tracking_uri=uri(tmp_path))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.temperature"] == "0.1"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]


def test_resume_continues_same_run(tmp_path):
    first = Tracker(uri(tmp_path), "study/cifar10")
    run_id = first.start("dcl_run")
    first.log_metrics({"loss": 4.0}, step=1)
    first.finish("FAILED")

    second = Tracker(uri(tmp_path), "study/cifar10")
    assert second.start("dcl_run", resume_run_id=run_id) == run_id
    second.log_metrics({"loss": 3.0}, step=2)
    second.finish("FINISHED")

    client = MlflowClient(tracking_uri=uri(tmp_path))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert len(client.search_runs([client.get_experiment_by_name("study/cifar10").experiment_id])) == 1


def test_child_parent_ignores_mlflow_run_id(tmp_path, monkeypatch):
    parent = Tracker(uri(tmp_path), "study/cifar10")
    parent_id = parent.start("pretrain")
    parent.finish()
    decoy = Tracker(uri(tmp_path), "study/cifar10")
    decoy_id = decoy.start("unrelated")
    decoy.finish()
    monkeypatch.setenv("MLFLOW_RUN_ID", decoy_id)

    child = Tracker(uri(tmp_path), "study/cifar10")
    child_id = child.start("pretrain/linear", tags={"mlflow.parentRunId": parent_id})
    child.finish()

    run = MlflowClient(tracking_uri=uri(tmp_path)).get_run(child_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id


def _log_one_run(store_uri: str, index: int) -> None:
    tracker = Tracker(store_uri, "concurrent/cifar10")
    tracker.start(f"run{index}")
    for step in range(1, 6):
        tracker.log_metrics({"loss": float(index + step)}, step=step)
    tracker.finish("FINISHED")


@pytest.mark.slow
def test_concurrent_runs_on_fresh_sqlite(tmp_path):
    store = uri(tmp_path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_log_one_run, args=(store, i)) for i in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [worker.exitcode for worker in workers] == [0] * 8

    client = MlflowClient(tracking_uri=store)
    experiments = [e for e in client.search_experiments() if e.name == "concurrent/cifar10"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id], max_results=100)
    assert sorted(run.info.run_name for run in runs) == sorted(f"run{i}" for i in range(8))
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 5
        assert run.info.status == "FINISHED"
