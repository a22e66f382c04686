"""The paper-vs-reproduced table: every reference number beside the runs with its key.

A reference CSV (``results/reference/paper.csv``) has one row per number, keyed by
``dataset, method, backbone, batch_size, epochs, metric`` and labelled by ``source``
(the paper, an earlier version of it, or an outside reproduction), with ``value`` in
percent and a free ``note``. A run matches a key when its ``run`` block has the same
dataset, loss (= method), batch size and epochs, its backbone at full width (a width
other than 64 becomes e.g. ``resnet18-w8`` and so never matches), its metric (the file
name: ``linear.json`` → ``linear_top1``, ``knn.json`` → ``knn_top1``) and the compared
study; runs of other studies are left out.

For each reference row the table gives the reproduced mean, std (ddof = 1, blank for
n = 1) and n over seeds, the difference mean − reference, and the status ``within``
(|difference| ≤ tolerance), ``outside`` or ``missing`` (no run yet). Every reference
row appears, in the reference's order, whether or not it has runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from dcl.atomic import write_text
from dcl.report import LOSS_DISPLAY_NAMES, MISSING_CELL, load_result

log = logging.getLogger(__name__)

KEY = ["dataset", "method", "backbone", "batch_size", "epochs", "metric"]
REFERENCE_COLUMNS = [*KEY, "value", "source", "note"]
METRIC_OF_FILE = {"linear.json": "linear_top1", "knn.json": "knn_top1"}
FULL_WIDTH = 64


def load_reference(path: Path) -> pd.DataFrame:
    """Read and check the reference CSV.

    Raises:
        ValueError: a column is missing, a value is blank or outside [0, 100], or a
            (key, source) pair repeats; the message names the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference file {path} not found: pass results/reference/paper.csv")
    table = pd.read_csv(path, dtype={"note": str}, keep_default_na=False, na_values={"value": [""]})
    missing = [column for column in REFERENCE_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"reference file {path} lacks the column(s) {missing}")
    table = table[REFERENCE_COLUMNS].copy()
    blank = table["value"].isna() | ~table["value"].between(0, 100)
    if blank.any():
        row = table[blank].iloc[0].to_dict()
        raise ValueError(f"reference file {path} has a blank or out-of-range value in {row}: "
                         "leave out numbers that are unknown instead of filling them")
    repeated = table.duplicated([*KEY, "source"], keep=False)
    if repeated.any():
        raise ValueError(f"reference file {path} repeats {table[repeated].iloc[0][KEY].to_dict()} "
                         "with the same source")
    table["batch_size"] = table["batch_size"].astype(int)
    table["epochs"] = table["epochs"].astype(int)
    return table


def backbone_key(backbone: str, width: int) -> str:
    """``resnet50`` at width 64, else ``resnet50-w<width>`` (never a reference backbone)."""
    return backbone if width == FULL_WIDTH else f"{backbone}-w{width}"


def load_runs(paths: Iterable[Path], study: str) -> pd.DataFrame:
    """Load run results of ``study`` as rows of KEY plus ``seed`` and ``top1``.

    Files of another study (or without one) are left out. Raises ValueError naming a
    file that is not a valid result (see :func:`dcl.report.load_results`) or whose
    name is neither ``linear.json`` nor ``knn.json``.
    """
    rows = []
    for path in map(Path, paths):
        if path.name not in METRIC_OF_FILE:
            raise ValueError(f"result file {path}: expected linear.json or knn.json")
        record = load_result(path)
        if record.get("study") != study:
            continue
        rows.append({
            "dataset": record.get("dataset"), "method": record["loss"],
            "backbone": backbone_key(record.get("backbone", "?"), int(record.get("width", 0))),
            "batch_size": record["batch_size"], "epochs": record["epochs"],
            "metric": METRIC_OF_FILE[path.name], "seed": record["seed"], "top1": record["top1"],
            "path": str(path),
        })
    return pd.DataFrame(rows, columns=[*KEY, "seed", "top1", "path"])


def compare_table(reference: pd.DataFrame, runs: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """One row per reference row: reference, mean, std, n, difference and status.

    Raises:
        ValueError: the tolerance is negative, or a seed occurs twice for one key.
    """
    if tolerance < 0 or math.isnan(tolerance):
        raise ValueError(f"tolerance must be >= 0 top-1 points, got {tolerance}")
    repeated = runs.duplicated([*KEY, "seed"], keep=False)
    if repeated.any():
        raise ValueError(f"two results for one seed: {sorted(runs.loc[repeated, 'path'])}; "
                         "remove all but one")
    stats = runs.groupby(KEY)["top1"].agg(reproduced_mean="mean", reproduced_std="std",
                                          reproduced_n="count").reset_index()
    # A left merge keeps every reference row, with NaN statistics where nothing matched.
    table = reference.rename(columns={"value": "reference"}).merge(stats, on=KEY, how="left")
    table["reproduced_n"] = table["reproduced_n"].fillna(0).astype(int)
    table["difference"] = table["reproduced_mean"] - table["reference"]
    table["status"] = "missing"
    ran = table["reproduced_n"] > 0
    within = table["difference"].abs() <= tolerance
    table.loc[ran & within, "status"] = "within"
    table.loc[ran & ~within, "status"] = "outside"
    table["tolerance"] = tolerance
    unmatched = len(runs) - int(runs.merge(reference[KEY].drop_duplicates(), on=KEY).shape[0])
    if unmatched:
        log.info("%d run result(s) match no reference key", unmatched)
    return table[[*KEY, "source", "reference", "reproduced_mean", "reproduced_std",
                  "reproduced_n", "difference", "tolerance", "status", "note"]]


def _number(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def render_markdown(table: pd.DataFrame) -> str:
    """Markdown table with "mean ± std (n)" cells; runs not yet made show "—"."""
    header = ["dataset", "method", "backbone", "batch", "epochs", "metric", "source",
              "reference", "reproduced", "difference", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        n = int(row["reproduced_n"])
        if n == 0:
            reproduced = MISSING_CELL
        elif n == 1:
            reproduced = f"{row['reproduced_mean']:.2f} (1)"
        else:
            reproduced = f"{row['reproduced_mean']:.2f} ± {row['reproduced_std']:.2f} ({n})"
        cells = [row["dataset"], LOSS_DISPLAY_NAMES.get(row["method"], row["method"]),
                 row["backbone"], str(row["batch_size"]), str(row["epochs"]), row["metric"],
                 row["source"], f"{row['reference']:.2f}", reproduced,
                 _number(row["difference"], signed=True) or MISSING_CELL, row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    tolerance = table["tolerance"].iloc[0] if len(table) else float("nan")
    return ("\n".join(lines) + f"\n\nStatus: within means |reproduced mean − reference| ≤ "
            f"{tolerance:g} top-1 points; missing means no run of this key has finished.\n")


def compare(reference_path: Path, result_paths: Iterable[Path], study: str, tolerance: float,
            csv_path: Path, md_path: Path) -> pd.DataFrame:
    """Write the paper-vs-reproduced table as CSV (2 decimals, blanks for missing) and Markdown."""
    reference = load_reference(reference_path)
    runs = load_runs(result_paths, study)
    table = compare_table(reference, runs, tolerance)
    write_text(csv_path, table.round(2).to_csv(index=False))
    write_text(md_path, render_markdown(table))
    counts = table["status"].value_counts().to_dict()
    log.info("compared %d reference cell(s) with %d run result(s) of study %s: %s",
             len(table), len(runs), study, counts)
    return table
