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

import numpy as np
import pandas as pd

from dcl.atomic import write_text
from dcl.difference import mean_and_std, plus_minus
from dcl.report import LOSS_DISPLAY_NAMES

logger = logging.getLogger(__name__)

COLUMNS = ["epochs", "batch_size", "epoch", "pairs", "baseline_q_b_median", "method_q_b_median",
           "baseline_knn", "method_knn", "knn_diff_mean", "knn_diff_std"]
DECIMALS = {"baseline_q_b_median": 3, "method_q_b_median": 3, "baseline_knn": 2, "method_knn": 2,
            "knn_diff_mean": 2, "knn_diff_std": 2}
KEYS = ["epochs", "batch_size", "epoch", "seed"]


def _monitored(histories: pd.DataFrame, loss: str) -> pd.DataFrame:
    """Index the loss's monitored epochs by KEYS, and raise ValueError if two runs share a cell."""
    runs = histories[(histories["loss"] == loss) & histories["knn_monitor_top1"].notna()]
    twice = runs[runs.duplicated(KEYS, keep=False)]
    if not twice.empty:
        first = twice.iloc[0]
        raise ValueError(
            f"two {loss} runs of batch {first['batch_size']}, {first['epochs']} epochs, seed "
            f"{first['seed']} (another backbone or width, or one file passed twice): pass "
            f"one pretrain.json per grid cell")
    return runs.set_index(KEYS)


def _row(key: tuple, ours: pd.DataFrame, theirs: pd.DataFrame) -> list:
    diff_mean, diff_std = mean_and_std(ours["knn_monitor_top1"] - theirs["knn_monitor_top1"])
    return [*key, len(ours), theirs["q_b_median"].mean(), ours["q_b_median"].mean(),
            theirs["knn_monitor_top1"].mean(), ours["knn_monitor_top1"].mean(), diff_mean, diff_std]


def gap_by_epoch(histories: pd.DataFrame, method: str, baseline: str,
                 batch_sizes: list[int], epochs: list[int]) -> pd.DataFrame:
    """Return one row per (epochs, batch size, monitored epoch) with both losses, paired by seed.

    ``histories`` has the columns of :func:`dcl.diagnostics.load_histories`. Epochs
    without a kNN monitor value in a pair of runs are left out. A grid cell (epochs,
    batch size) without any pair keeps one row with ``pairs`` = 0 and no epoch.
    """
    monitored = not histories.empty and "knn_monitor_top1" in histories
    if monitored:
        ours, theirs = _monitored(histories, method), _monitored(histories, baseline)
        common = ours.index.intersection(theirs.index)
    rows = []
    for epoch_count in epochs:
        for batch in batch_sizes:
            cell = (common[(common.get_level_values(0) == epoch_count)
                           & (common.get_level_values(1) == batch)] if monitored else [])
            if len(cell) == 0:
                rows.append([epoch_count, batch, pd.NA, 0] + [np.nan] * 6)
                continue
            for key, seeds in pd.Series(0, index=cell).groupby(level=[0, 1, 2]):
                rows.append(_row(key, ours.loc[seeds.index], theirs.loc[seeds.index]))
    table = pd.DataFrame(rows, columns=COLUMNS).astype({"epoch": "Int64"})
    unpaired = table.loc[table["pairs"] == 0, ["epochs", "batch_size"]].values.tolist()
    if unpaired:
        logger.warning("no seed has kNN monitor values of both %s and %s for (epochs, batch size) %s",
                       method, baseline, unpaired)
    return table


def _number(value: float, decimals: int) -> str:
    return "missing" if pd.isna(value) else f"{value:.{decimals}f}"


def render_markdown(table: pd.DataFrame, method: str, baseline: str) -> str:
    """Render the table (rounded as in the CSV) as Markdown, one row per CSV row."""
    ours = LOSS_DISPLAY_NAMES.get(method, method)
    theirs = LOSS_DISPLAY_NAMES.get(baseline, baseline)
    lines = [f"| epochs | batch | epoch | seeds | {theirs} median q_B | {ours} median q_B* | "
             f"{theirs} kNN | {ours} kNN | {ours} − {theirs} kNN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table.round(DECIMALS).to_dict("records"):
        epoch = "missing" if pd.isna(row["epoch"]) else row["epoch"]
        values = [_number(row[name], DECIMALS[name]) for name in COLUMNS[4:8]]
        lines.append(f"| {row['epochs']} | {row['batch_size']} | {epoch} | {row['pairs']} | "
                     + " | ".join(values)
                     + f" | {plus_minus(row['knn_diff_mean'], row['knn_diff_std'])} |")
    lines += ["", f"\\* For {ours}, the q_B that InfoNCE would have on {ours}'s embeddings. kNN: "
              "the pretraining kNN monitor on a fixed test subset, not the final evaluation."]
    return "\n".join(lines) + "\n"


def write_gap(table: pd.DataFrame, method: str, baseline: str, csv_path: Path,
              md_path: Path | None = None) -> None:
    """Write the table atomically as CSV (q_B to 3 decimals, accuracies to 2) and Markdown."""
    write_text(Path(csv_path), table.round(DECIMALS).to_csv(index=False))
    if md_path is not None:
        write_text(Path(md_path), render_markdown(table, method, baseline))
    logger.info("wrote %d rows of %s − %s to %s", len(table), method, baseline, csv_path)
