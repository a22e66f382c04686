"""The smoke workflow through `snakemake --profile slurm` on a real SLURM cluster."""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest

from test_launch import slurm_idle
from workflow_helpers import needs_cifar10, snakemake, write_config

pytestmark = [
    pytest.mark.slow,
    needs_cifar10,
    pytest.mark.skipif(not slurm_idle(), reason="no SLURM cluster answers sinfo (start one with slurm/local-cluster.sh start)"),
]


def test_slurm_profile_matches_local_table(tmp_path, smoke_run):
    local_root, _ = smoke_run
    config = write_config(tmp_path)
    result = snakemake(config, "--profile", "slurm", "all", timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]

    root = tmp_path / "out"
    job_ids = [path.read_text().strip() for path in root.glob("runs/**/slurm/*/job_id")]
    accounting = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,JobName,State", "-j", ",".join(job_ids)],
        capture_output=True, text=True, timeout=60,
    ).stdout.splitlines()
    names = [line.split("|")[1] for line in accounting]
    assert names.count("pretrain") == 6
    assert names.count("linear-eval") == 6
    assert names.count("knn") == 6
    assert all(line.endswith("|COMPLETED") for line in accounting)

    table = pd.read_csv(root / "tables" / "cifar10_top1.csv")
    local = pd.read_csv(local_root / "tables" / "cifar10_top1.csv")
    pd.testing.assert_frame_equal(table, local)
