"""Tests for dcl.report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from dcl.report import (
    _series_label,
    aggregate,
    load_results,
    plot_batch_size,
    render_markdown,
    top1_table,
    write_table,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOSSES = ["infonce", "dcl", "dclw"]
BATCH_SIZES = [32, 64, 128]
EPOCHS = [3]

# (loss, batch_size, epochs, seed) -> top1. InfoNCE has the full grid with two
# seeds. DCL has one seed at 128 and nothing at 64. DCLW has no runs at all.
GRID_RESULTS = {
    ("infonce", 32, 3, 0): 40.0,
    ("infonce", 32, 3, 1): 42.0,
    ("infonce", 64, 3, 0): 45.0,
    ("infonce", 64, 3, 1): 46.0,
    ("infonce", 128, 3, 0): 50.5,
    ("infonce", 128, 3, 1): 49.5,
    ("dcl", 32, 3, 0): 44.0,
    ("dcl", 32, 3, 1): 47.0,
    ("dcl", 128, 3, 0): 51.234,
}
# Runs outside the grid: another batch size, another epochs setting, another loss.
OUTSIDE_RESULTS = {
    ("infonce", 256, 3, 0): 99.0,
    ("dcl", 32, 200, 0): 99.0,
    ("simclr", 32, 3, 0): 99.0,
}


def write_result(folder: Path, loss: str, batch_size: int, epochs: int, seed: int, top1: float, dataset: str = "cifar10") -> Path:
    run = {
        "study": "cpu", "dataset": dataset, "loss": loss, "backbone": "resnet18", "width": 16,
        "batch_size": batch_size, "epochs": epochs, "seed": seed,
    }
    path = folder / f"{dataset}-{loss}-b{batch_size}-e{epochs}-s{seed}" / "linear.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": run, "top1": top1, "val_top1": top1, "best": {"lr": 0.1}}), encoding="utf-8")
    return path


def write_results(folder: Path, results: dict) -> list[Path]:
    return [write_result(folder, *key, top1) for key, top1 in results.items()]


@pytest.fixture
def table(tmp_path: Path) -> pd.DataFrame:
    paths = write_results(tmp_path, {**GRID_RESULTS, **OUTSIDE_RESULTS})
    return top1_table(load_results(paths), LOSSES, BATCH_SIZES, EPOCHS)


def row_of(table: pd.DataFrame, loss: str, epochs: int = 3) -> pd.Series:
    matches = table[(table["loss"] == loss) & (table["epochs"] == epochs)]
    assert len(matches) == 1
    return matches.iloc[0]


def no_temporary_files(folder: Path) -> bool:
    return not any(".tmp-" in path.name for path in folder.rglob("*"))


# load_results

def test_load_one_row_per_file(tmp_path: Path) -> None:
    paths = write_results(tmp_path, GRID_RESULTS)
    results = load_results(paths)
    assert len(results) == len(GRID_RESULTS)
    assert {"study", "dataset", "loss", "batch_size", "epochs", "seed", "top1", "path"} <= set(results.columns)
    assert results["path"].tolist() == [str(path) for path in paths]


def test_load_empty_has_columns() -> None:
    results = load_results([])
    assert results.empty
    assert {"loss", "batch_size", "epochs", "seed", "top1", "path"} <= set(results.columns)


def test_load_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "linear.json"
    with pytest.raises(ValueError, match="absent.*not found"):
        load_results([path])


def test_load_invalid_json_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"run": {', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json.*not readable JSON"):
        load_results([path])


def test_load_missing_run_raises(tmp_path: Path) -> None:
    path = tmp_path / "norun.json"
    path.write_text('{"top1": 40.0}', encoding="utf-8")
    with pytest.raises(ValueError, match="norun.json.*'run'"):
        load_results([path])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("top1", None, "invalid top1"),
        ("top1", "40", "invalid top1"),
        ("top1", 140.0, "invalid top1"),
        ("batch_size", "32", "invalid run.batch_size"),
        ("seed", True, "invalid run.seed"),
        ("loss", None, "invalid run.loss"),
    ],
)
def test_load_invalid_field_raises(tmp_path: Path, field: str, value: object, message: str) -> None:
    path = write_result(tmp_path, "dcl", 32, 3, 0, 40.0)
    data = json.loads(path.read_text(encoding="utf-8"))
    if field == "top1":
        data["top1"] = value
    else:
        data["run"][field] = value
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as raised:
        load_results([path])
    assert str(path) in str(raised.value)


# top1_table

def test_table_column_order(table: pd.DataFrame) -> None:
    expected = ["loss", "epochs", "32", "32_std", "32_n", "64", "64_std", "64_n", "128", "128_std", "128_n"]
    assert table.columns.tolist() == expected


def test_table_row_order(table: pd.DataFrame) -> None:
    assert table["loss"].tolist() == LOSSES
    assert table["epochs"].tolist() == [3, 3, 3]


def test_table_mean_two_seeds(table: pd.DataFrame) -> None:
    row = row_of(table, "infonce")
    assert row["32"] == pytest.approx(41.0)
    assert row["64"] == pytest.approx(45.5)
    assert row["128"] == pytest.approx(50.0)


def test_table_std_two_seeds(table: pd.DataFrame) -> None:
    # Sample std (ddof=1) of two values a, b is |a - b| / sqrt(2).
    row = row_of(table, "infonce")
    assert row["32_std"] == pytest.approx(2.0 / math.sqrt(2))
    assert row["64_std"] == pytest.approx(1.0 / math.sqrt(2))
    assert row["128_std"] == pytest.approx(1.0 / math.sqrt(2))
    assert row_of(table, "dcl")["32_std"] == pytest.approx(3.0 / math.sqrt(2))


def test_table_seed_counts(table: pd.DataFrame) -> None:
    assert row_of(table, "infonce")[["32_n", "64_n", "128_n"]].tolist() == [2, 2, 2]
    assert row_of(table, "dcl")[["32_n", "64_n", "128_n"]].tolist() == [2, 0, 1]


def test_table_single_seed(table: pd.DataFrame) -> None:
    row = row_of(table, "dcl")
    assert row["128"] == pytest.approx(51.234)
    assert math.isnan(row["128_std"])
    assert row["128_n"] == 1


def test_table_missing_cell_kept(table: pd.DataFrame) -> None:
    row = row_of(table, "dcl")
    assert math.isnan(row["64"])
    assert math.isnan(row["64_std"])
    assert row["64_n"] == 0


def test_table_missing_loss_kept(table: pd.DataFrame) -> None:
    row = row_of(table, "dclw")
    for b in BATCH_SIZES:
        assert math.isnan(row[str(b)])
        assert row[f"{b}_n"] == 0


def test_table_ignores_outside_grid(table: pd.DataFrame) -> None:
    assert "256" not in table.columns
    assert set(table["loss"]) == set(LOSSES)
    assert set(table["epochs"]) == {3}
    # Every outside run has top1 = 99, which would raise a mean above 60.
    means = table[["32", "64", "128"]].to_numpy().ravel()
    assert all(math.isnan(mean) or mean < 60 for mean in means)


def test_table_epochs_rows(tmp_path: Path) -> None:
    paths = write_results(tmp_path, {("dcl", 32, 3, 0): 40.0, ("dcl", 32, 200, 0): 60.0})
    table = top1_table(load_results(paths), ["dcl"], [32], [200, 3])
    assert table["epochs"].tolist() == [200, 3]
    assert table["32"].tolist() == [60.0, 40.0]


def test_table_empty_results() -> None:
    table = top1_table(load_results([]), ["dcl"], [32, 64], [3])
    assert len(table) == 1
    assert table[["32_n", "64_n"]].iloc[0].tolist() == [0, 0]


def test_table_duplicate_seed_raises(tmp_path: Path) -> None:
    first = write_result(tmp_path / "a", "dcl", 32, 3, 0, 40.0)
    second = write_result(tmp_path / "b", "dcl", 32, 3, 0, 41.0)
    with pytest.raises(ValueError, match="duplicate results"):
        top1_table(load_results([first, second]), ["dcl"], [32], [3])


def test_table_duplicate_axis_raises() -> None:
    with pytest.raises(ValueError, match="batch_sizes contains duplicates"):
        top1_table(load_results([]), ["dcl"], [32, 32], [3])


# write_table and render_markdown

def test_csv_round_trip(table: pd.DataFrame, tmp_path: Path) -> None:
    csv_path = tmp_path / "out" / "table.csv"
    write_table(table, csv_path)
    loaded = pd.read_csv(csv_path)
    assert loaded.columns.tolist() == table.columns.tolist()
    pd.testing.assert_frame_equal(loaded, table.round(2), check_dtype=False)


def test_csv_rounds_two_decimals(table: pd.DataFrame, tmp_path: Path) -> None:
    csv_path = tmp_path / "table.csv"
    write_table(table, csv_path)
    text = csv_path.read_text(encoding="utf-8")
    assert "51.23," in text
    assert "51.234" not in text


def test_csv_missing_is_empty(table: pd.DataFrame, tmp_path: Path) -> None:
    csv_path = tmp_path / "table.csv"
    write_table(table, csv_path)
    dclw_line = csv_path.read_text(encoding="utf-8").splitlines()[3]
    assert dclw_line == "dclw,3,,,0,,,0,,,0"


def test_markdown_missing_dash(table: pd.DataFrame, tmp_path: Path) -> None:
    md_path = tmp_path / "table.md"
    write_table(table, tmp_path / "table.csv", md_path)
    lines = md_path.read_text(encoding="utf-8").splitlines()
    assert lines[4] == "| DCLW | 3 | — | — | — |"


def test_markdown_cell_formats(table: pd.DataFrame) -> None:
    lines = render_markdown(table).splitlines()
    assert lines[0] == "| loss | epochs | batch 32 | batch 64 | batch 128 |"
    assert lines[2] == "| InfoNCE | 3 | 41.00 ± 1.41 (2) | 45.50 ± 0.71 (2) | 50.00 ± 0.71 (2) |"
    assert lines[3] == "| DCL | 3 | 45.50 ± 2.12 (2) | — | 51.23 (1) |"


def test_write_table_no_temporary_files(table: pd.DataFrame, tmp_path: Path) -> None:
    write_table(table, tmp_path / "table.csv", tmp_path / "table.md")
    assert no_temporary_files(tmp_path)


# plot_batch_size and aggregate

def test_plot_writes_png(table: pd.DataFrame, tmp_path: Path) -> None:
    png_path = tmp_path / "figures" / "batch.png"
    plot_batch_size(table, png_path, "cifar10")
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)
    assert no_temporary_files(tmp_path)


def test_plot_empty_table(tmp_path: Path) -> None:
    table = top1_table(load_results([]), ["dcl"], [32, 64], [3])
    png_path = tmp_path / "empty.png"
    plot_batch_size(table, png_path, "empty")
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)


def test_series_label_epochs() -> None:
    assert _series_label("dcl", 200, several_epochs=True) == "DCL, 200 ep"
    assert _series_label("infonce", 200, several_epochs=False) == "InfoNCE"


def test_aggregate_writes_outputs(tmp_path: Path) -> None:
    paths = write_results(tmp_path / "runs", GRID_RESULTS)
    paths.append(write_result(tmp_path / "runs", "infonce", 32, 3, 5, 99.0, dataset="stl10"))
    out = tmp_path / "report"
    table = aggregate(paths, LOSSES, BATCH_SIZES, EPOCHS, "cifar10", out / "t.csv", out / "t.png", out / "t.md")
    assert row_of(table, "infonce")["32_n"] == 2
    assert pd.read_csv(out / "t.csv").shape == (3, 11)
    assert (out / "t.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "—" in (out / "t.md").read_text(encoding="utf-8")
    assert no_temporary_files(tmp_path)
