"""Figures of the NPC multiplier q_B and of pretraining curves, from ``pretrain.json`` files.

Every pretraining run records, per epoch, InfoNCE's NPC multiplier
q_B = 1 − e^{s/τ}/(e^{s/τ} + U) on its own batches (for DCL and DCLW too, where it
is what InfoNCE's q_B would be on the same embeddings): its mean, median and
10th/90th percentiles. These figures show how q_B depends on the batch size and
how it moves during training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dcl.atomic import atomic_path
from dcl.report import LOSS_DISPLAY_NAMES

log = logging.getLogger(__name__)

# The history's "loss" (a value) is renamed "train_loss" so it cannot shadow the run's
# "loss" (the loss name).
HISTORY_KEYS = ("knn_monitor_top1", "lr", "q_b_mean", "q_b_median", "q_b_p10", "q_b_p90", "pos_sim", "neg_sim")


def load_histories(paths: Iterable[Path]) -> pd.DataFrame:
    """Load one row per (run, epoch): the run's grid keys and its per-epoch history."""
    rows = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
            run, history = record["run"], record["history"]
            for entry in history:
                values = {key: entry.get(key) for key in ("epoch", *HISTORY_KEYS)}
                rows.append({**run, **values, "train_loss": entry.get("loss")})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"cannot read a pretraining history from {path} ({type(error).__name__}: "
                f"{error}): pass the pretrain.json files that 'dcl pretrain' writes, with "
                f"a 'run' block and a 'history' list") from error
    return pd.DataFrame(rows)


def _save(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=150, bbox_inches="tight")


def _legend(axes, **options) -> None:
    """Put one legend on the first panel that has labelled lines, if any."""
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(**options)
            return


def plot_npc(histories: pd.DataFrame, losses: list[str], path: Path, title: str) -> None:
    """q_B of the last epoch against batch size: median line, 10–90 % band; one panel per loss."""
    figure = Figure(figsize=(4 * len(losses), 3.4), layout="constrained")
    axes = figure.subplots(1, len(losses), sharey=True, squeeze=False)[0]
    if histories.empty:
        last = histories
    else:
        last = histories.loc[histories.groupby(["loss", "batch_size", "seed", "epochs"])["epoch"].idxmax()]
    for axis, loss in zip(axes, losses):
        runs = last[last["loss"] == loss] if not last.empty else last
        if not runs.empty:
            by_batch = runs.groupby("batch_size")[["q_b_median", "q_b_p10", "q_b_p90"]].mean()
            batch = by_batch.index.to_numpy()
            axis.fill_between(batch, by_batch["q_b_p10"], by_batch["q_b_p90"], alpha=0.25, label="10–90 %")
            axis.plot(batch, by_batch["q_b_median"], marker="o", label="median")
            axis.set_xscale("log", base=2)
            axis.set_xticks(batch, [str(b) for b in batch])
        axis.set_title(LOSS_DISPLAY_NAMES.get(loss, loss))
        axis.set_xlabel("batch size")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("NPC multiplier q_B (last epoch)")
    _legend(axes, loc="lower right")
    figure.suptitle(title)
    _save(figure, path)


CURVE_ROWS = (("train_loss", "pretraining loss"), ("q_b_median", "median q_B"),
              ("knn_monitor_top1", "kNN monitor top-1 (%)"))


def plot_curves(histories: pd.DataFrame, losses: list[str], path: Path, title: str) -> None:
    """Loss, median q_B and kNN monitor top-1 over epochs (one row each), one line per batch size.

    A row whose metric no run recorded (runs without the kNN monitor) is left out.
    """
    rows = [(key, label) for key, label in CURVE_ROWS
            if histories.empty or histories[key].notna().any()]
    figure = Figure(figsize=(4 * len(losses), 3 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(losses), sharex=True, squeeze=False)
    columns = [key for key, _ in rows]
    for column, loss in enumerate(losses):
        runs = histories[histories["loss"] == loss] if not histories.empty else histories
        if not runs.empty:
            mean = runs.groupby(["batch_size", "epoch"])[columns].mean().reset_index()
            for batch, curve in mean.groupby("batch_size"):
                for row, key in enumerate(columns):
                    points = curve.dropna(subset=[key])
                    axes[row][column].plot(points["epoch"], points[key], marker="o", label=f"batch {batch}")
        axes[0][column].set_title(LOSS_DISPLAY_NAMES.get(loss, loss))
        axes[-1][column].set_xlabel("epoch")
        axes[-1][column].xaxis.set_major_locator(MaxNLocator(integer=True))
        for row in range(len(rows)):
            axes[row][column].grid(alpha=0.3)
    for row, (_, label) in enumerate(rows):
        axes[row][0].set_ylabel(label)
    _legend(axes[0], fontsize="small")
    figure.suptitle(title)
    _save(figure, path)


def draw(pretrain_paths: Iterable[Path], losses: list[str], dataset: str,
         npc_png: Path, curves_png: Path) -> pd.DataFrame:
    """Draw both diagnostics figures of ``dataset``; returns the per-epoch histories."""
    histories = load_histories(pretrain_paths)
    plot_npc(histories, losses, npc_png, f"{dataset}: NPC multiplier q_B against batch size")
    plot_curves(histories, losses, curves_png, f"{dataset}: pretraining curves")
    log.info("drew %s and %s from %d epochs of history", npc_png, curves_png, len(histories))
    return histories
