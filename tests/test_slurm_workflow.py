"""The smoke workflow through `snakemake --profile slurm` on a real SLURM cluster.

Every pretraining and evaluation step is a SLURM job visible in ``sacct``, and the table
equals the one of the local run (same seeds and threads). The jobs log to per-job MLflow
stores (``tracking_store: per_run``), which the workflow then imports into the main store.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from slurm_helpers import needs_slurm, sacct, slurm_cluster  # noqa: F401 - slurm_cluster is a fixture
from workflow_helpers import needs_cifar10, snakemake, write_config

pytestmark = [pytest.mark.slow, needs_cifar10, needs_slurm]


def test_slurm_profile_matches_local_table(tmp_path, smoke_run, slurm_cluster):
    local_root, _ = smoke_run
    config = write_config(tmp_path, tracking_store="per_run")
    result = snakemake(config, "--profile", "slurm", "all", timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]

    root = tmp_path / "out"
    job_ids = [path.read_text().strip() for path in root.glob("runs/**/slurm/*/job_id")]
    accounting = sacct(job_ids, "JobID", "JobName", "State")
    names = [name for _, name, _ in accounting]
    assert names.count("pretrain") == 6
    assert names.count("extract-features") == 6
    assert names.count("linear-eval") == 6
    assert names.count("knn") == 6
    assert all(state == "COMPLETED" for _, _, state in accounting)

    table = pd.read_csv(root / "tables" / "cifar10_top1.csv")
    local = pd.read_csv(local_root / "tables" / "cifar10_top1.csv")
    pd.testing.assert_frame_equal(table, local)

    imported = json.loads((root / "tables" / "cifar10_mlflow_import.json").read_text())
    assert len(imported["stores"]) == 18
    assert len(imported["imported"]) == 18
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke/cifar10").experiment_id])
    stages = [run.data.tags["stage"] for run in runs]
    assert sorted(stages) == sorted(["pretrain"] * 6 + ["linear"] * 6 + ["knn"] * 6 + ["summary"])
    pretrain_ids = {run.info.run_id for run in runs if run.data.tags["stage"] == "pretrain"}
    for run in runs:
        assert run.info.status == "FINISHED"
        if run.data.tags["stage"] in ("linear", "knn"):
            assert run.data.tags["mlflow.parentRunId"] in pretrain_ids
        if run.data.tags["stage"] == "pretrain":
            steps = [point.step for point in client.get_metric_history(run.info.run_id, "loss")]
            assert steps == [1]
