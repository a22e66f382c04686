"""The gap between two losses over training, beside the baseline's NPC multiplier q_B.

DCL's argument is that InfoNCE's q_B = 1 − e^{s/τ}/(e^{s/τ} + U) shrinks the
gradient of anchors whose positive is already close, and that it shrinks more at
small batch sizes. If that coupling is what costs InfoNCE accuracy, the DCL − InfoNCE
gap should open as InfoNCE's q_B falls. This table lines the two up: for each epochs
setting, batch size and epoch at which the kNN monitor ran,

    d_s(e) = knn(method, seed s, epoch e) − knn(baseline, seed s, epoch e),

as mean(d) ± std(d) over the seeds run with both losses (ddof = 1), next to the
baseline's median q_B at epoch e (mean over the same seeds) and the method's.

The kNN monitor scores a small fixed subset (``pretrain.knn_monitor_test`` images), so
one epoch's difference carries a few points of sampling noise. Read trends, not rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from dcl.atomic import write_text
from dcl.difference import mean_and_std, plus_minus
from dcl.report import LOSS_DISPLAY_NAMES

logger = logging.getLogger(__name__)

COLUMNS = ["epochs", "batch_size", "epoch", "pairs", "baseline_q_b_median", "method_q_b_median",
           "baseline_knn", "method_knn", "knn_diff_mean", "knn_diff_std"]


def _monitored(histories: pd.DataFrame, loss: str) -> pd.DataFrame:
    runs = histories[(histories["loss"] == loss) & histories["knn_monitor_top1"].notna()]
    return runs.set_index(["epochs", "batch_size", "epoch", "seed"])


def gap_by_epoch(histories: pd.DataFrame, method: str, baseline: str) -> pd.DataFrame:
    """Return one row per (epochs, batch size, monitored epoch) with both losses, paired by seed.

    ``histories`` has the columns of :func:`dcl.diagnostics.load_histories`. Epochs
    without a kNN monitor value in a pair of runs are left out. A grid without any pair
    gives an empty table with the columns above.
    """
    if histories.empty or "knn_monitor_top1" not in histories:
        return pd.DataFrame(columns=COLUMNS)
    ours, theirs = _monitored(histories, method), _monitored(histories, baseline)
    common = ours.index.intersection(theirs.index)
    if common.empty:
        logger.warning("no seed has kNN monitor values for both %s and %s", method, baseline)
        return pd.DataFrame(columns=COLUMNS)
    ours, theirs = ours.loc[common], theirs.loc[common]
    rows = []
    for key, seeds in pd.Series(0, index=common).groupby(level=[0, 1, 2]):
        index = seeds.index
        diff_mean, diff_std = mean_and_std(ours.loc[index, "knn_monitor_top1"]
                                           - theirs.loc[index, "knn_monitor_top1"])
        rows.append([*key, len(index),
                     float(theirs.loc[index, "q_b_median"].mean()),
                     float(ours.loc[index, "q_b_median"].mean()),
                     float(theirs.loc[index, "knn_monitor_top1"].mean()),
                     float(ours.loc[index, "knn_monitor_top1"].mean()),
                     diff_mean, diff_std])
    return pd.DataFrame(rows, columns=COLUMNS)


def render_markdown(table: pd.DataFrame, method: str, baseline: str) -> str:
    """Render the table as Markdown, one row per epochs setting, batch size and epoch."""
    ours = LOSS_DISPLAY_NAMES.get(method, method)
    theirs = LOSS_DISPLAY_NAMES.get(baseline, baseline)
    lines = [f"| epochs | batch | epoch | seeds | {theirs} median q_B | {ours} median q_B | "
             f"{theirs} kNN | {ours} kNN | {ours} − {theirs} kNN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        lines.append(
            f"| {row['epochs']:.0f} | {row['batch_size']:.0f} | {row['epoch']:.0f} | {row['pairs']:.0f} | "
            f"{row['baseline_q_b_median']:.2f} | {row['method_q_b_median']:.2f} | "
            f"{row['baseline_knn']:.2f} | {row['method_knn']:.2f} | "
            f"{plus_minus(row['knn_diff_mean'], row['knn_diff_std'])} |")
    if table.empty:
        lines.append("| no epoch has kNN monitor values of both losses for the same seed |"
                     + " |" * 8)
    return "\n".join(lines) + "\n"


def write_gap(table: pd.DataFrame, method: str, baseline: str, csv_path: Path,
              md_path: Path | None = None) -> None:
    """Write the table atomically as CSV (q_B to 3 decimals, accuracies to 2) and Markdown."""
    rounded = table.round({"baseline_q_b_median": 3, "method_q_b_median": 3, "baseline_knn": 2,
                           "method_knn": 2, "knn_diff_mean": 2, "knn_diff_std": 2})
    write_text(Path(csv_path), rounded.to_csv(index=False))
    if md_path is not None:
        write_text(Path(md_path), render_markdown(table, method, baseline))
    if not table.empty:
        logger.info("wrote %d epochs of %s − %s to %s", len(table), method, baseline, csv_path)

