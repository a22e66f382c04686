"""A study run in several sittings: finished cells are never recomputed.

Only the small per-run files (``*.json``, ``*.log``) of a study are committed; its
checkpoints, weights, feature files, dataset cache and Snakemake metadata are not. A
fresh clone therefore has result files with arbitrary file times and nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from workflow_helpers import REPO, needs_cifar10, snakemake, write_config

pytestmark = [pytest.mark.slow, needs_cifar10]

WORK_RULES = {"prepare_data", "pretrain", "extract_features", "linear_eval", "knn"}


def planned_jobs(result) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run."""
    assert result.returncode == 0, result.stderr[-4000:]
    text = result.stdout + result.stderr
    stats = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", stats, re.M)}


def committed_copy(root: Path, target: Path) -> Path:
    """Copy what a study commits (per-run JSON and logs) and make every result file newer
    than the ones derived from it, the worst order a checkout can give."""
    for path in root.glob("runs/**/*"):
        if path.suffix in {".json", ".log"} and path.is_file():
            copy = target / path.relative_to(root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, copy)
    now = time.time()
    for path in target.glob("runs/**/*.json"):
        stamp = now - (1000 if path.name == "pretrain.json" else 2000)
        os.utime(path, (stamp, stamp))
    return target


@pytest.fixture
def fresh_clone(tmp_path, smoke_run):
    root, _ = smoke_run
    config = write_config(tmp_path)
    committed_copy(root, tmp_path / "out")
    return tmp_path / "out", config


def test_fresh_clone_recomputes_nothing(fresh_clone):
    _, config = fresh_clone
    jobs = planned_jobs(snakemake(config, "-n", "all"))
    assert not WORK_RULES & set(jobs), jobs
    assert jobs["aggregate_linear"] == 1


def test_edited_rule_recomputes_nothing(fresh_clone, tmp_path):
    """A changed rule (here the evaluation rules' shell commands) is not a rerun trigger."""
    _, config = fresh_clone
    edited = tmp_path / "workflow-copy"
    shutil.copytree(REPO / "workflow", edited / "workflow")
    shutil.copy(REPO / "Snakefile", edited / "Snakefile")
    rules = edited / "workflow" / "rules" / "evaluate.smk"
    rules.write_text(rules.read_text().replace("> {log:q} 2>&1", "--threads {threads} > {log:q} 2>&1"))
    jobs = planned_jobs(snakemake(config, "-s", str(edited / "Snakefile"), "-n", "all"))
    assert not WORK_RULES & set(jobs), jobs


def test_missing_cell_is_the_only_work(fresh_clone):
    root, config = fresh_clone
    cell = next(root.glob("runs/cifar10/*/dcl/bs64/ep1/seed0"))
    for name in ("pretrain.json", "linear.json", "knn.json"):
        (cell / name).unlink()
    jobs = planned_jobs(snakemake(config, "-n", "all"))
    assert {name: jobs.get(name) for name in WORK_RULES} == {
        "prepare_data": 1, "pretrain": 1, "extract_features": 1, "linear_eval": 1, "knn": 1}


def test_only_finished_partial_table(fresh_clone):
    root, config = fresh_clone
    for cell in root.glob("runs/cifar10/*/dcl/bs64/ep1/seed0"):
        shutil.rmtree(cell)
    shutil.rmtree(root / "tables", ignore_errors=True)
    result = snakemake(config, "all", "--config", "only_finished=true", "tracking_uri=none")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rule pretrain" not in result.stdout + result.stderr
    table = pd.read_csv(root / "tables" / "cifar10_top1.csv").set_index("loss")
    assert table.loc["dcl", "64_n"] == 0
    assert pd.isna(table.loc["dcl", "64"])
    assert table.loc["dcl", "32_n"] == 1
    assert table.loc["infonce", "64_n"] == 1


def test_only_finished_never_plans_work(fresh_clone):
    """Even a forced rerun of everything only redraws: a fired rerun trigger (e.g. settings
    that gained a key) must not retrain a finished cell, whose committed files the rerun
    would delete first."""
    _, config = fresh_clone
    jobs = planned_jobs(snakemake(config, "-n", "--forceall", "all", "--config",
                                  "only_finished=true", "tracking_uri=none"))
    assert not WORK_RULES & set(jobs), jobs
    assert jobs["aggregate_linear"] == 1
    assert jobs["difference_by_epoch"] == 2  # DCL and DCLW against InfoNCE


def test_only_finished_redraws_when_a_cell_arrives(fresh_clone, tmp_path):
    """A cell finished elsewhere and copied in later joins every table on the next render."""
    root, config = fresh_clone
    cell = next(root.glob("runs/cifar10/*/dcl/bs64/ep1/seed0"))
    aside = tmp_path / "aside"
    shutil.move(cell, aside)
    render = ("all", "--config", "only_finished=true", "tracking_uri=none")
    # Tables without Snakemake records, as a fresh clone has them: only file times can
    # tell that they are older than the cell.
    assert snakemake(config, *render, "--forceall", "--drop-metadata").returncode == 0
    assert pd.read_csv(root / "tables" / "cifar10_top1.csv").set_index("loss").loc["dcl", "64_n"] == 0

    shutil.copytree(aside, cell, copy_function=shutil.copy)  # new file times, as cp gives
    result = snakemake(config, *render)

    assert result.returncode == 0, result.stderr[-4000:]
    assert pd.read_csv(root / "tables" / "cifar10_top1.csv").set_index("loss").loc["dcl", "64_n"] == 1
    difference = pd.read_csv(root / "tables" / "cifar10_dcl_minus_infonce.csv").set_index("batch_size")
    assert difference.loc[64, "pairs"] == 1
    by_epoch = pd.read_csv(root / "tables" / "cifar10_dcl_minus_infonce_by_epoch.csv")
    assert by_epoch.set_index("batch_size").loc[64, "pairs"] == 1
