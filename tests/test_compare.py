"""Tests for dcl.compare: reference cells against reproduced runs, and the committed table."""

import json
from pathlib import Path

import pandas as pd
import pytest

from dcl.compare import KEY, compare, compare_table, load_reference, load_runs, render_markdown
from dcl.config import REPO_ROOT

REFERENCE = REPO_ROOT / "results" / "reference" / "paper.csv"
COMMITTED = REPO_ROOT / "results" / "tables" / "paper_vs_reproduced.csv"
HEADER = "dataset,method,backbone,batch_size,epochs,metric,value,source,note\n"


def write_reference(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(row + "\n" for row in rows))
    return path


def write_run(folder: Path, top1: float, seed: int, study: str = "paper", loss: str = "dcl",
              width: int = 64, batch: int = 256, epochs: int = 200, stage: str = "linear") -> Path:
    run = {"study": study, "dataset": "imagenet", "loss": loss, "backbone": "resnet50",
           "width": width, "batch_size": batch, "epochs": epochs, "seed": seed}
    path = folder / f"{study}-{loss}-w{width}-bs{batch}-ep{epochs}-s{seed}" / f"{stage}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run": run, "top1": top1}))
    return path


@pytest.fixture()
def reference(tmp_path):
    return write_reference(tmp_path / "ref.csv", [
        "imagenet,dcl,resnet50,256,200,linear_top1,68.2,paper,",
        "imagenet,infonce,resnet50,256,200,linear_top1,61.8,paper,derived",
        "imagenet,dcl,resnet50,256,100,linear_top1,64.6,paper,",
    ])


def _row(table: pd.DataFrame, method: str, epochs: int) -> pd.Series:
    return table[(table["method"] == method) & (table["epochs"] == epochs)].iloc[0]


def test_matching_runs_within_tolerance(reference, tmp_path):
    runs = [write_run(tmp_path, 67.5, 0), write_run(tmp_path, 68.5, 1)]

    table = compare_table(load_reference(reference), load_runs(runs, "paper"), tolerance=1.0)
    row = _row(table, "dcl", 200)

    assert row["reproduced_mean"] == pytest.approx(68.0)
    assert row["reproduced_std"] == pytest.approx(0.7071068)  # ddof = 1
    assert row["reproduced_n"] == 2
    assert row["difference"] == pytest.approx(-0.2)
    assert row["status"] == "within"


def test_single_seed_outside_tolerance(reference, tmp_path):
    runs = [write_run(tmp_path, 60.0, 0, epochs=100)]

    table = compare_table(load_reference(reference), load_runs(runs, "paper"), tolerance=1.0)
    row = _row(table, "dcl", 100)

    assert row["status"] == "outside"
    assert row["difference"] == pytest.approx(-4.6)
    assert row["reproduced_n"] == 1
    assert pd.isna(row["reproduced_std"])


def test_tolerance_decides(reference, tmp_path):
    runs = [write_run(tmp_path, 66.2, 0)]

    loose = compare_table(load_reference(reference), load_runs(runs, "paper"), tolerance=2.5)
    strict = compare_table(load_reference(reference), load_runs(runs, "paper"), tolerance=0.5)

    assert _row(loose, "dcl", 200)["status"] == "within"
    assert _row(strict, "dcl", 200)["status"] == "outside"


def test_unmatched_runs_leave_cells_missing(reference, tmp_path):
    runs = [
        write_run(tmp_path, 70.0, 0, batch=512),            # no reference at batch 512
        write_run(tmp_path, 70.0, 0, study="cpu"),          # another study
        write_run(tmp_path, 70.0, 1, width=8),              # a narrow backbone
        write_run(tmp_path, 70.0, 2, stage="knn"),          # another metric
    ]

    table = compare_table(load_reference(reference), load_runs(runs, "paper"), tolerance=1.0)

    assert len(table) == 3
    assert (table["status"] == "missing").all()
    assert (table["reproduced_n"] == 0).all()
    assert table["reproduced_mean"].isna().all()


def test_every_reference_row_kept_in_order(reference, tmp_path):
    table = compare_table(load_reference(reference), load_runs([], "paper"), tolerance=1.0)

    assert table[["method", "epochs"]].values.tolist() == [["dcl", 200], ["infonce", 200], ["dcl", 100]]
    assert table["note"].tolist() == ["", "derived", ""]


def test_duplicate_seed_raises(reference, tmp_path):
    runs = [write_run(tmp_path / "a", 68.0, 0), write_run(tmp_path / "b", 68.0, 0)]

    with pytest.raises(ValueError, match="two results for one seed"):
        compare_table(load_reference(reference), load_runs(runs, "paper"), tolerance=1.0)


@pytest.mark.parametrize(("row", "message"), [
    ("imagenet,dcl,resnet50,256,200,linear_top1,,paper,", "blank or out-of-range"),
    ("imagenet,dcl,resnet50,256,200,linear_top1,168,paper,", "blank or out-of-range"),
])
def test_bad_reference_value_raises(tmp_path, row, message):
    with pytest.raises(ValueError, match=message):
        load_reference(write_reference(tmp_path / "ref.csv", [row]))


def test_repeated_reference_key_raises(tmp_path):
    row = "imagenet,dcl,resnet50,256,200,linear_top1,68.2,paper,"
    with pytest.raises(ValueError, match="repeats"):
        load_reference(write_reference(tmp_path / "ref.csv", [row, row]))


def test_markdown_cells(reference, tmp_path):
    runs = [write_run(tmp_path, 67.5, 0), write_run(tmp_path, 68.5, 1), write_run(tmp_path, 60.0, 0, epochs=100)]
    table = compare_table(load_reference(reference), load_runs(runs, "paper"), tolerance=1.0)

    text = render_markdown(table)

    assert "| 68.00 ± 0.71 (2) | -0.20 | within |" in text
    assert "| 60.00 (1) | -4.60 | outside |" in text
    assert "| — | — | missing |" in text


def test_compare_writes_csv_with_blanks(reference, tmp_path):
    compare(reference, [write_run(tmp_path, 68.0, 0)], "paper", 1.0, tmp_path / "t.csv", tmp_path / "t.md")

    written = pd.read_csv(tmp_path / "t.csv")
    assert len(written) == 3
    assert written["reproduced_std"].isna().all()
    assert written["reproduced_n"].tolist() == [1, 0, 0]


def test_shipped_reference_is_valid():
    reference = load_reference(REFERENCE)

    assert set(reference["source"]) >= {"paper"}
    outside = reference[reference["source"] != "paper"]
    assert outside["source"].str.startswith(("outside:", "paper (earlier")).all()
    paper = reference[reference["source"] == "paper"].set_index(["method", "epochs"])["value"]
    assert paper[("dcl", 200)] == 68.2
    assert paper[("infonce", 200)] == 61.8


def test_committed_table_lists_every_reference_cell():
    reference = load_reference(REFERENCE)
    committed = pd.read_csv(COMMITTED, keep_default_na=False, na_values={
        "reproduced_mean": [""], "reproduced_std": [""], "difference": [""]})

    assert committed[[*KEY, "source"]].values.tolist() == reference[[*KEY, "source"]].values.tolist()
    assert committed["reference"].tolist() == reference["value"].tolist()
    missing = committed["reproduced_n"] == 0
    assert (committed.loc[missing, "status"] == "missing").all()
    assert committed.loc[missing, "reproduced_mean"].isna().all()
