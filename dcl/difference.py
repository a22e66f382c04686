"""Paired differences between two losses over seeds: is DCL − InfoNCE larger than the noise?

For each epochs setting and batch size, the runs of ``method`` and ``baseline`` that
share a seed form pairs; the table reports

    d_s = top1(method, seed s) − top1(baseline, seed s),   mean(d) ± std(d) over pairs,

with std over seeds (ddof = 1, NaN for one pair), each loss's own mean and std, and
``exceeds_spread``: whether |mean(d)| is larger than the seed-to-seed std of both losses.
Pairing by seed removes what the two runs of a seed share (the data order and the
initial weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dcl.atomic import write_text
from dcl.report import LOSS_DISPLAY_NAMES

logger = logging.getLogger(__name__)

COLUMNS = ["epochs", "batch_size", "pairs", "method_mean", "method_std", "baseline_mean",
           "baseline_std", "diff_mean", "diff_std", "exceeds_spread"]


def mean_and_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (ddof = 1) of ``values``; NaN where undefined."""
    mean = float(values.mean()) if len(values) else np.nan
    std = float(values.std(ddof=1)) if len(values) > 1 else np.nan
    return mean, std


def paired_difference(results: pd.DataFrame, method: str, baseline: str,
                      batch_sizes: list[int], epochs: list[int]) -> pd.DataFrame:
    """Return one row per (epochs, batch size) of ``method`` − ``baseline`` top-1, paired by seed.

    ``results`` has the columns of :func:`dcl.report.load_results` (loss, batch_size,
    epochs, seed, top1). Cells without a pair keep their row with ``pairs`` = 0 and NaN
    statistics; ``exceeds_spread`` is empty unless both losses have a std.
    """
    rows = []
    for epoch_count in epochs:
        for batch in batch_sizes:
            cell = results[(results["epochs"] == epoch_count) & (results["batch_size"] == batch)]
            ours = cell[cell["loss"] == method].set_index("seed")["top1"]
            theirs = cell[cell["loss"] == baseline].set_index("seed")["top1"]
            seeds = ours.index.intersection(theirs.index)
            method_mean, method_std = mean_and_std(ours[seeds])
            baseline_mean, baseline_std = mean_and_std(theirs[seeds])
            diff_mean, diff_std = mean_and_std(ours[seeds] - theirs[seeds])
            spread = max(method_std, baseline_std)
            exceeds = bool(abs(diff_mean) > spread) if not np.isnan(spread) else None
            rows.append([epoch_count, batch, len(seeds), method_mean, method_std, baseline_mean,
                         baseline_std, diff_mean, diff_std, exceeds])
    table = pd.DataFrame(rows, columns=COLUMNS)
    unpaired = table.loc[table["pairs"] == 0, ["epochs", "batch_size"]].values.tolist()
    if unpaired:
        logger.warning("no seed was run with both %s and %s for (epochs, batch size) %s",
                       method, baseline, unpaired)
    return table


def plus_minus(mean: float, std: float) -> str:
    """``+m.mm ± s.ss``, ``+m.mm`` without a std, ``missing`` without a mean."""
    if np.isnan(mean):
        return "missing"
    return f"{mean:+.2f}" if np.isnan(std) else f"{mean:+.2f} ± {std:.2f}"


def render_markdown(table: pd.DataFrame, method: str, baseline: str) -> str:
    """Render the table as Markdown, one row per epochs setting and batch size."""
    ours = LOSS_DISPLAY_NAMES.get(method, method)
    theirs = LOSS_DISPLAY_NAMES.get(baseline, baseline)
    lines = [f"| epochs | batch | seeds | {ours} | {theirs} | {ours} − {theirs} | exceeds seed spread |",
             "|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        exceeds = {True: "yes", False: "no"}.get(row["exceeds_spread"], "n/a")
        lines.append(
            f"| {row['epochs']} | {row['batch_size']} | {row['pairs']} | "
            f"{plus_minus(row['method_mean'], row['method_std']).lstrip('+')} | "
            f"{plus_minus(row['baseline_mean'], row['baseline_std']).lstrip('+')} | "
            f"{plus_minus(row['diff_mean'], row['diff_std'])} | {exceeds} |")
    return "\n".join(lines) + "\n"


def write_difference(table: pd.DataFrame, method: str, baseline: str, csv_path: Path,
                     md_path: Path | None = None) -> None:
    """Write the table atomically as CSV (2 decimals) and optionally as Markdown."""
    write_text(Path(csv_path), table.round(2).to_csv(index=False))
    if md_path is not None:
        write_text(Path(md_path), render_markdown(table, method, baseline))
