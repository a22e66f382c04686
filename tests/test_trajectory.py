"""Tests for dcl.trajectory: the kNN-monitor gap of two losses per epoch, beside q_B."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from dcl.cli import main
from dcl.trajectory import gap_by_epoch, render_markdown, write_gap


def _history(loss: str, batch: int, seed: int, knn: dict[int, float], q_b: float) -> list[dict]:
    """Rows of one run; epochs 1..max, kNN monitor only at the keys of ``knn``."""
    return [{"loss": loss, "batch_size": batch, "epochs": 10, "seed": seed, "epoch": epoch,
             "q_b_median": q_b, "knn_monitor_top1": knn.get(epoch)}
            for epoch in range(1, max(knn) + 1)]


def _histories(*runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for run in runs for row in run])


def test_pairs_by_seed_and_epoch():
    histories = _histories(
        _history("dcl", 32, 0, {5: 41.0, 10: 50.0}, 0.3), _history("dcl", 32, 1, {5: 42.0, 10: 53.0}, 0.5),
        _history("infonce", 32, 0, {5: 40.0, 10: 48.0}, 0.2), _history("infonce", 32, 1, {5: 41.0, 10: 49.0}, 0.4))
    table = gap_by_epoch(histories, "dcl", "infonce", [32], [10])

    assert list(table["epoch"]) == [5, 10]
    last = table.iloc[1]
    assert last["pairs"] == 2
    assert last["knn_diff_mean"] == pytest.approx(3.0)  # differences 2 and 4
    assert last["knn_diff_std"] == pytest.approx(math.sqrt(2))
    assert last["baseline_q_b_median"] == pytest.approx(0.3)
    assert last["method_q_b_median"] == pytest.approx(0.4)
    assert table.iloc[0]["knn_diff_mean"] == pytest.approx(1.0)


def test_unpaired_epochs_left_out():
    histories = _histories(
        _history("dcl", 32, 0, {5: 41.0, 10: 50.0}, 0.3), _history("dcl", 32, 1, {5: 60.0}, 0.3),
        _history("infonce", 32, 0, {5: 40.0, 10: 48.0}, 0.2), _history("dcl", 256, 0, {5: 1.0}, 0.9))
    table = gap_by_epoch(histories, "dcl", "infonce", [32], [10])

    assert list(zip(table["batch_size"], table["epoch"], table["pairs"])) == [(32, 5, 1), (32, 10, 1)]
    assert math.isnan(table["knn_diff_std"].iloc[0])
    assert "| 10 | 32 | 10 | 1 | 0.200 | 0.300 | 48.00 | 50.00 | +2.00 |" in render_markdown(table, "dcl", "infonce")


def test_cell_without_pair_shown_missing():
    histories = _histories(_history("dcl", 32, 0, {5: 41.0}, 0.3), _history("infonce", 32, 0, {5: 40.0}, 0.2),
                           _history("dcl", 256, 0, {5: 41.0}, 0.3))
    table = gap_by_epoch(histories, "dcl", "infonce", [32, 256], [10])

    assert list(table["pairs"]) == [1, 0]
    assert pd.isna(table.iloc[1]["epoch"])
    assert ("| 10 | 256 | missing | 0 | missing | missing | missing | missing | missing |"
            in render_markdown(table, "dcl", "infonce"))


def test_two_runs_of_one_cell_rejected():
    run = _history("dcl", 32, 0, {5: 41.0}, 0.3)
    histories = _histories(run, run, _history("infonce", 32, 0, {5: 40.0}, 0.2))
    with pytest.raises(ValueError, match="two dcl runs of batch 32, 10 epochs, seed 0"):
        gap_by_epoch(histories, "dcl", "infonce", [32], [10])


def test_markdown_rounds_like_csv(tmp_path):
    histories = _histories(_history("dcl", 32, 0, {5: 41.0}, 0.6555), _history("infonce", 32, 0, {5: 40.0}, 0.6545))
    table = gap_by_epoch(histories, "dcl", "infonce", [32], [10])

    write_gap(table, "dcl", "infonce", tmp_path / "g.csv", tmp_path / "g.md")

    csv = pd.read_csv(tmp_path / "g.csv").iloc[0]
    assert f"| {csv['baseline_q_b_median']:.3f} | {csv['method_q_b_median']:.3f} |" in (tmp_path / "g.md").read_text()


def _write_runs(folder, runs) -> list[str]:
    paths = []
    for loss, seed, knn in runs:
        run = {"dataset": "cifar10", "loss": loss, "backbone": "resnet18", "width": 8,
               "batch_size": 32, "epochs": 2, "seed": seed}
        history = [{"epoch": 1, "loss": 3.0, "q_b_median": 0.9},
                   {"epoch": 2, "loss": 2.0, "q_b_median": 0.7, "knn_monitor_top1": knn}]
        path = folder / f"{loss}{seed}.json"
        path.write_text(json.dumps({"run": run, "history": history}))
        paths.append(str(path))
    return paths


def _cli(tmp_path, *extra: str) -> int:
    return main(["difference-by-epoch", "--dataset", "cifar10", "--batch-sizes", "32", "--epochs", "2",
                 "--csv", str(tmp_path / "g.csv"), "--md", str(tmp_path / "g.md"), *extra])


def test_cli_writes_tables(tmp_path):
    paths = _write_runs(tmp_path, [("dcl", 0, 51.0), ("dcl", 1, 53.0), ("infonce", 0, 50.0), ("infonce", 1, 50.0)])

    assert _cli(tmp_path, "--method", "dcl", "--baseline", "infonce", *paths) == 0
    table = pd.read_csv(tmp_path / "g.csv")
    assert table.to_dict("records") == [{
        "epochs": 2, "batch_size": 32, "epoch": 2, "pairs": 2, "baseline_q_b_median": 0.7,
        "method_q_b_median": 0.7, "baseline_knn": 50.0, "method_knn": 52.0,
        "knn_diff_mean": 2.0, "knn_diff_std": 1.41}]
    assert "+2.00 ± 1.41" in (tmp_path / "g.md").read_text()


@pytest.mark.parametrize("content", ["[1, 2]", '{"run": {}, "history": {"epoch": 1}}', '{"top1": 50.0}'])
def test_cli_wrong_file_named_with_fix(tmp_path, caplog, content):
    bad = tmp_path / "linear.json"
    bad.write_text(content)

    assert _cli(tmp_path, "--method", "dcl", "--baseline", "infonce", str(bad)) == 2
    assert "linear.json" in caplog.text
    assert "pass the pretrain.json files" in caplog.text
    assert not (tmp_path / "g.csv").exists()


def test_cli_same_loss_twice_rejected(tmp_path, caplog):
    paths = _write_runs(tmp_path, [("infonce", 0, 50.0)])

    assert _cli(tmp_path, "--method", "infonce", "--baseline", "infonce", *paths) == 2
    assert "both 'infonce'" in caplog.text


def test_cli_other_dataset_warns(tmp_path, caplog):
    paths = _write_runs(tmp_path, [("dcl", 0, 51.0), ("infonce", 0, 50.0)])

    assert main(["difference-by-epoch", "--dataset", "cifar100", "--method", "dcl", "--baseline", "infonce",
                 "--batch-sizes", "32", "--epochs", "2", "--csv", str(tmp_path / "g.csv"), *paths]) == 0
    assert "no run of dataset 'cifar100' among the 2 files (their datasets: cifar10)" in caplog.text
    assert pd.read_csv(tmp_path / "g.csv")["pairs"].tolist() == [0]
