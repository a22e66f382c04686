"""Tests for dcl.difference: paired differences of two losses over seeds."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from dcl.cli import main
from dcl.difference import paired_difference, render_markdown


def _results(rows: list[tuple[str, int, int, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"loss": loss, "batch_size": batch, "epochs": 100, "seed": seed, "top1": top1}
                         for loss, batch, seed, top1 in rows])


def test_pairs_by_seed():
    results = _results([("dcl", 32, 0, 50.0), ("dcl", 32, 1, 52.0), ("dcl", 32, 2, 54.0),
                        ("infonce", 32, 0, 49.0), ("infonce", 32, 1, 50.0), ("infonce", 32, 2, 51.0)])
    row = paired_difference(results, "dcl", "infonce", [32], [100]).iloc[0]

    assert row["pairs"] == 3
    assert row["diff_mean"] == pytest.approx(2.0)
    assert row["diff_std"] == pytest.approx(1.0)  # differences 1, 2, 3
    assert row["method_std"] == pytest.approx(2.0)
    assert row["baseline_std"] == pytest.approx(1.0)
    assert row["exceeds_spread"] is not None
    assert not row["exceeds_spread"]


def test_difference_larger_than_spread():
    results = _results([("dcl", 32, 0, 55.0), ("dcl", 32, 1, 55.5),
                        ("infonce", 32, 0, 50.0), ("infonce", 32, 1, 50.4)])
    row = paired_difference(results, "dcl", "infonce", [32], [100]).iloc[0]

    assert row["diff_mean"] == pytest.approx(5.05)
    assert row["exceeds_spread"]


def test_unpaired_seed_left_out():
    results = _results([("dcl", 32, 0, 50.0), ("dcl", 32, 1, 60.0), ("infonce", 32, 0, 49.0)])
    row = paired_difference(results, "dcl", "infonce", [32], [100]).iloc[0]

    assert row["pairs"] == 1
    assert row["diff_mean"] == pytest.approx(1.0)
    assert math.isnan(row["diff_std"])
    assert row["exceeds_spread"] is None


def test_missing_cell_kept():
    results = _results([("dcl", 32, 0, 50.0), ("infonce", 32, 0, 49.0)])
    table = paired_difference(results, "dcl", "infonce", [32, 256], [100])

    assert list(table["batch_size"]) == [32, 256]
    assert table.iloc[1]["pairs"] == 0
    assert math.isnan(table.iloc[1]["diff_mean"])
    assert "| 100 | 256 | 0 | missing | missing | missing | n/a |" in render_markdown(table, "dcl", "infonce")


def test_cli_writes_table(tmp_path):
    paths = []
    for loss, seed, top1 in [("dcl", 0, 51.0), ("dcl", 1, 53.0), ("infonce", 0, 50.0), ("infonce", 1, 50.0)]:
        run = {"dataset": "cifar10", "loss": loss, "backbone": "resnet18", "width": 8,
               "batch_size": 32, "epochs": 100, "seed": seed}
        path = tmp_path / f"{loss}{seed}.json"
        path.write_text(json.dumps({"run": run, "top1": top1}))
        paths.append(str(path))

    code = main(["difference", "--dataset", "cifar10", "--method", "dcl", "--baseline", "infonce",
                 "--batch-sizes", "32", "--epochs", "100", "--csv", str(tmp_path / "d.csv"),
                 "--md", str(tmp_path / "d.md"), *paths])

    assert code == 0
    table = pd.read_csv(tmp_path / "d.csv")
    assert table.loc[0, "diff_mean"] == 2.0
    assert table.loc[0, "diff_std"] == pytest.approx(1.41, abs=0.01)
    assert "+2.00 ± 1.41" in (tmp_path / "d.md").read_text()
