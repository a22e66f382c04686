"""The paper grid's DAG: `snakemake -n --profile slurm all` on config/config.yaml.

The dry run needs no data and no cluster. Twenty runs must list the same jobs (no
ambiguous rule, no job that depends on dictionary or set order); the README states the count.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter

import pytest

from workflow_helpers import REPO, SNAKEMAKE

RUNS = 20
EXPECTED_JOBS = 792
EXPECTED_PER_RULE = {
    "pretrain": 186, "extract_features": 186, "linear_eval": 186, "knn": 186,
    "prepare_data": 4, "link_classes": 1, "prepare_linked_data": 1,
    "aggregate_linear": 5, "aggregate_knn": 5, "diagnostics": 5, "track_summary": 5,
    "difference": 10, "difference_by_epoch": 10, "paper_vs_reproduced": 1, "all": 1,
}
RULE_LINE = re.compile(r"^(?:local)?rule (\w+):$")


def dry_run_jobs() -> list[tuple[str, str]]:
    """(rule, output line) of every job the dry run lists, sorted."""
    result = subprocess.run(
        [*SNAKEMAKE, "-n", "--profile", "slurm", "all", "--configfile", "config/config.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    assert "Ambiguous" not in text
    jobs, lines = [], text.splitlines()
    for number, line in enumerate(lines):
        match = RULE_LINE.match(line)
        if match:
            block = lines[number + 1:number + 4]
            output = next((item.strip() for item in block if item.strip().startswith("output:")), "")
            jobs.append((match.group(1), output))
    return sorted(jobs)


@pytest.mark.slow
def test_paper_dry_run_is_stable():
    first = dry_run_jobs()

    assert len(first) == EXPECTED_JOBS
    assert Counter(rule for rule, _ in first) == EXPECTED_PER_RULE
    for _ in range(RUNS - 1):
        assert dry_run_jobs() == first


@pytest.mark.slow
def test_every_table_target_exists_with_its_figure():
    targets = [f"results/tables/{name}_top1.csv" for name in
               ("cifar10", "cifar100", "stl10", "imagenet100", "imagenet")]
    result = subprocess.run([*SNAKEMAKE, "-n", "--profile", "slurm", *targets, "--configfile",
                             "config/config.yaml"], cwd=REPO, capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr

    assert result.returncode == 0, text[-4000:]
    for name in ("cifar10", "cifar100", "stl10", "imagenet100", "imagenet"):
        assert f"results/figures/{name}_batch_size.png" in text
