"""End-to-end runs of the Snakemake workflow on the smoke config and real CIFAR-10 images."""

from __future__ import annotations

import pandas as pd
import pytest

from workflow_helpers import needs_cifar10, snakemake, write_config

LOSSES = ["infonce", "dcl", "dclw"]


@pytest.mark.slow
@needs_cifar10
def test_smoke_table_has_every_cell(smoke_run):
    root, _ = smoke_run
    table = pd.read_csv(root / "tables" / "cifar10_top1.csv")
    assert list(table["loss"]) == LOSSES
    for batch in ("32", "64"):
        assert (table[f"{batch}_n"] == 1).all()
        assert table[batch].between(0, 100).all()


@pytest.mark.slow
@needs_cifar10
def test_smoke_difference_tables(smoke_run):
    root, _ = smoke_run
    for method in ("dcl", "dclw"):
        table = pd.read_csv(root / "tables" / f"cifar10_{method}_minus_infonce.csv")
        assert list(table["batch_size"]) == [32, 64]
        assert (table["pairs"] == 1).all()
        assert table["diff_std"].isna().all()
        # The smoke config monitors kNN after every epoch: one paired row per batch and epoch.
        by_epoch = pd.read_csv(root / "tables" / f"cifar10_{method}_minus_infonce_by_epoch.csv")
        assert sorted(zip(by_epoch["batch_size"], by_epoch["epoch"])) == [(32, 1), (64, 1)]
        assert by_epoch["baseline_q_b_median"].between(0, 1).all()
        assert by_epoch["knn_diff_mean"].notna().all()


@pytest.mark.slow
@needs_cifar10
def test_smoke_figures_are_png(smoke_run):
    root, _ = smoke_run
    for name in ("cifar10_batch_size.png", "cifar10_knn_batch_size.png"):
        assert (root / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@needs_cifar10
def test_smoke_features_are_temporary(smoke_run):
    root, _ = smoke_run
    assert not list(root.glob("runs/**/features.npz"))
    assert len(list(root.glob("runs/**/backbone.pt"))) == 6


@pytest.mark.slow
@needs_cifar10
def test_smoke_mlflow_holds_runs(smoke_run):
    from mlflow.tracking import MlflowClient

    root, _ = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke/cifar10")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    stages = [run.data.tags["stage"] for run in runs]
    assert sorted(stages) == sorted(["pretrain", "linear", "knn"] * 6 + ["summary"])
    assert {run.info.status for run in runs} == {"FINISHED"}

    pretrain_ids = {run.info.run_id for run in runs if run.data.tags["stage"] == "pretrain"}
    for run in runs:
        if run.data.tags["stage"] == "summary":
            continue
        if run.data.tags["stage"] == "pretrain":
            history = client.get_metric_history(run.info.run_id, "loss")
            assert [point.step for point in history] == [1]
            assert "q_b_mean" in run.data.metrics
            assert "knn_monitor_top1" in run.data.metrics
            assert run.data.tags["mlflow.source.git.commit"]
        else:
            assert run.data.tags["mlflow.parentRunId"] in pretrain_ids
            assert f"{run.data.tags['stage']}_top1" in run.data.metrics


@pytest.mark.slow
@needs_cifar10
def test_smoke_summary_run_has_artifacts(smoke_run):
    from mlflow.tracking import MlflowClient

    root, _ = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke/cifar10")
    summary = client.search_runs([experiment.experiment_id], "tags.stage = 'summary'")[0]
    names = {item.path for item in client.list_artifacts(summary.info.run_id)}
    assert {"cifar10_top1.csv", "cifar10_batch_size.png", "cifar10_npc.png"} <= names


@pytest.mark.slow
@needs_cifar10
def test_smoke_rerun_has_nothing_to_do(smoke_run):
    _, config = smoke_run
    result = snakemake(config, "-n", "all")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"grid.losses": ["infonce", "simclr"]}, "simclr"),
        ({"grid.batch_sizes": [0]}, "grid.batch_sizes.0"),
        ({"datasets.cifar10.loss.temperature": 0}, "datasets.cifar10.loss.temperature"),
        ({"datasets.cifar10.loss.sigma": -1}, "datasets.cifar10.loss.sigma"),
        ({"grid.epochs": [0]}, "grid.epochs.0"),
        ({"grid.datasets": ["mnist"]}, "mnist"),
    ],
)
def test_invalid_config_stops_workflow(tmp_path, change, expected):
    config = write_config(tmp_path, **change)
    result = snakemake(config, "-n", "all", timeout=120)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_missing_data_root_stops_before_training(tmp_path):
    config = write_config(tmp_path, data_root=str(tmp_path / "nowhere"))
    result = snakemake(config, "all", timeout=300)
    log = (tmp_path / "out" / "logs" / "prepare_data" / "cifar10.log").read_text()
    assert result.returncode != 0
    assert str(tmp_path / "nowhere" / "cifar10") in log
    assert not list((tmp_path / "out").glob("runs/**/pretrain.json"))
    assert not list((tmp_path / "out").glob("cache/*.npz"))


def test_slurm_profile_without_launcher_stops(tmp_path):
    config = write_config(tmp_path)
    result = snakemake(config, "-n", "--profile", "slurm", "all", "--config", "slurm={partition: gpu}")

    assert result.returncode != 0
    assert "Add launcher=slurm to --config" in result.stdout + result.stderr
