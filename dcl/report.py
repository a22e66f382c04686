"""Aggregate per-run top-1 results into the batch-size table and figure.

Each input is a run's ``linear.json`` or ``knn.json``: a ``run`` block with the run's
settings and ``top1``, the test accuracy in percent. The table has one row per
(loss, epochs) and, for each batch size, the mean, sample std and count over seeds.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from dcl.atomic import atomic_path, write_text

logger = logging.getLogger(__name__)

LOSS_DISPLAY_NAMES = {"infonce": "InfoNCE", "dcl": "DCL", "dclw": "DCLW"}
# Run keys that identify a cell and a seed in the table, with their expected JSON types.
REQUIRED_RUN_KEYS = {"loss": str, "batch_size": int, "epochs": int, "seed": int}
GRID_KEYS = ["loss", "epochs", "batch_size"]
MISSING_CELL = "—"
LINE_STYLES = ["-", "--", ":", "-."]


def load_result(path: Path) -> dict:
    """Read one result file into a flat record, raising ValueError naming the file on any defect."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"result file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"result file {path} is not readable JSON: {error}") from error

    if not isinstance(data, dict) or not isinstance(data.get("run"), dict):
        raise ValueError(f"result file {path} has no 'run' object")
    run = data["run"]
    for key, expected_type in REQUIRED_RUN_KEYS.items():
        value = run.get(key)
        # bool is a subclass of int, but true/false is never a valid batch size or seed.
        if not isinstance(value, expected_type) or isinstance(value, bool):
            raise ValueError(
                f"result file {path} has invalid run.{key}: {value!r} (expected {expected_type.__name__})"
            )

    top1 = data.get("top1")
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not 0.0 <= top1 <= 100.0:
        raise ValueError(f"result file {path} has invalid top1: {top1!r} (expected a percentage in [0, 100])")

    return {**run, "top1": float(top1), "path": str(path)}


def load_results(paths: Iterable[Path]) -> pd.DataFrame:
    """Load result files into a frame with one row per file.

    Columns are the keys of each file's ``run`` block, ``top1`` and ``path``.

    Raises:
        ValueError: if a file is missing, is not valid JSON, or lacks a valid ``run``
            block (loss, batch_size, epochs, seed) or ``top1``. The message names the file.
    """
    records = [load_result(Path(path)) for path in paths]
    if not records:
        return pd.DataFrame(columns=[*REQUIRED_RUN_KEYS, "top1", "path"])
    return pd.DataFrame.from_records(records)


def _check_grid_axis(name: str, values: Sequence) -> None:
    if len(values) == 0:
        raise ValueError(f"{name} is empty: the table needs at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} contains duplicates: {list(values)}")


def _select_grid_rows(results: pd.DataFrame, losses: list[str], batch_sizes: list[int], epochs: list[int]) -> pd.DataFrame:
    """Return the rows inside the grid, raising ValueError if a seed appears twice in one cell."""
    inside = (
        results["loss"].isin(losses)
        & results["batch_size"].isin(batch_sizes)
        & results["epochs"].isin(epochs)
    )
    if not inside.all():
        logger.info("ignoring %d result(s) outside the table grid", int((~inside).sum()))
    selected = results[inside]

    duplicated = selected.duplicated(subset=[*GRID_KEYS, "seed"], keep=False)
    if duplicated.any():
        first = selected[duplicated].iloc[0]
        files = sorted(selected.loc[duplicated, "path"]) if "path" in selected.columns else []
        raise ValueError(
            f"duplicate results for loss={first['loss']}, epochs={first['epochs']}, "
            f"batch_size={first['batch_size']}, seed={first['seed']}; remove all but one of {files}"
        )
    return selected


def top1_table(results: pd.DataFrame, losses: list[str], batch_sizes: list[int], epochs: list[int]) -> pd.DataFrame:
    """Build the top-1 table: mean, std (ddof=1) and seed count per (loss, epochs) and batch size.

    Rows follow ``losses`` then ``epochs`` in the given order. Columns are ``loss``,
    ``epochs`` and, for each batch size b, ``"b"`` (mean), ``"b_std"`` and ``"b_n"``.
    Cells without runs are kept with NaN mean and std and n = 0. The std is NaN when
    n = 1. Results outside the grid are ignored. Values are not rounded.

    Raises:
        ValueError: if an axis is empty or repeats a value, or a seed occurs twice in a cell.
    """
    _check_grid_axis("losses", losses)
    _check_grid_axis("batch_sizes", batch_sizes)
    _check_grid_axis("epochs", epochs)
    selected = _select_grid_rows(results, losses, batch_sizes, epochs)

    stats = selected.groupby(GRID_KEYS)["top1"].agg(["mean", "std", "count"])
    # Reindexing on the full product keeps the cells that have no runs at all.
    grid = pd.MultiIndex.from_product([losses, epochs, batch_sizes], names=GRID_KEYS)
    stats = stats.reindex(grid)

    missing = stats.index[stats["count"].isna()]
    if len(missing):
        logger.warning("%d table cell(s) have no results: %s", len(missing), list(missing))

    rows = []
    for loss in losses:
        for epoch_count in epochs:
            row: dict[str, object] = {"loss": loss, "epochs": epoch_count}
            for batch_size in batch_sizes:
                cell = stats.loc[(loss, epoch_count, batch_size)]
                count = 0 if pd.isna(cell["count"]) else int(cell["count"])
                row[str(batch_size)] = float(cell["mean"])
                row[f"{batch_size}_std"] = float(cell["std"])
                row[f"{batch_size}_n"] = count
            rows.append(row)
    return pd.DataFrame(rows)


def table_batch_sizes(table: pd.DataFrame) -> list[int]:
    """Return the batch sizes of a ``top1_table`` frame, in column order."""
    return [int(column) for column in table.columns if str(column).isdigit()]


def _format_cell(mean: float, std: float, count: int) -> str:
    if count == 0 or math.isnan(mean):
        return MISSING_CELL
    if count == 1 or math.isnan(std):
        return f"{mean:.2f} ({count})"
    return f"{mean:.2f} ± {std:.2f} ({count})"


def render_markdown(table: pd.DataFrame) -> str:
    """Render a ``top1_table`` frame as a Markdown table with "mean ± std (n)" cells.

    A cell with one seed shows "mean (1)", and a cell without runs shows "—".
    """
    batch_sizes = table_batch_sizes(table)
    header = ["loss", "epochs", *(f"batch {b}" for b in batch_sizes)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [LOSS_DISPLAY_NAMES.get(row["loss"], str(row["loss"])), str(row["epochs"])]
        for b in batch_sizes:
            cells.append(_format_cell(float(row[str(b)]), float(row[f"{b}_std"]), int(row[f"{b}_n"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, csv_path: Path, md_path: Path | None = None) -> None:
    """Write the table atomically as CSV (means and std rounded to 2 decimals, NaN as empty) and optionally Markdown."""
    write_text(csv_path, table.round(2).to_csv(index=False))
    if md_path is not None:
        write_text(md_path, render_markdown(table))


def _series_label(loss: str, epoch_count: int, several_epochs: bool) -> str:
    name = LOSS_DISPLAY_NAMES.get(loss, loss)
    return f"{name}, {epoch_count} ep" if several_epochs else name


def plot_batch_size(table: pd.DataFrame, png_path: Path, title: str, ylabel: str = "linear top-1 (%)") -> None:
    """Plot mean top-1 against batch size, one line per (loss, epochs) row, and save it atomically.

    The x axis is log2 with the batch sizes as ticks. Error bars show the std over
    seeds and are drawn only where n > 1. Cells without runs are skipped, and rows
    without any are left out. The image format follows the suffix of ``png_path``
    (PNG if it has none), at 150 dpi.
    """
    batch_sizes = table_batch_sizes(table)
    several_epochs = table["epochs"].nunique() > 1
    # Each loss gets one color and each epochs setting one line style.
    loss_colors = {loss: f"C{index}" for index, loss in enumerate(table["loss"].unique())}
    epoch_styles = {epochs: LINE_STYLES[index % len(LINE_STYLES)] for index, epochs in enumerate(table["epochs"].unique())}
    # A bare Figure, not pyplot, so that no global figure state or GUI backend is involved.
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()

    for _, row in table.iterrows():
        present = [b for b in batch_sizes if row[f"{b}_n"] > 0]
        if not present:
            continue
        label = _series_label(row["loss"], row["epochs"], several_epochs)
        means = [row[str(b)] for b in present]
        color = loss_colors[row["loss"]]
        axes.plot(present, means, marker="o", color=color, linestyle=epoch_styles[row["epochs"]], label=label)
        with_error = [b for b in present if row[f"{b}_n"] > 1]
        if with_error:
            axes.errorbar(
                with_error,
                [row[str(b)] for b in with_error],
                yerr=[row[f"{b}_std"] for b in with_error],
                fmt="none",
                ecolor=color,
                capsize=3,
            )

    axes.set_xscale("log", base=2)
    axes.set_xticks(batch_sizes, labels=[str(b) for b in batch_sizes])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("batch size")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    else:
        logger.warning("no results to plot in %s", png_path)

    image_format = Path(png_path).suffix.lstrip(".").lower() or "png"
    with atomic_path(png_path) as temporary:
        figure.savefig(temporary, format=image_format, dpi=150, bbox_inches="tight")


def aggregate(
    result_paths: Iterable[Path],
    losses: list[str],
    batch_sizes: list[int],
    epochs: list[int],
    dataset: str,
    csv_path: Path,
    png_path: Path,
    md_path: Path | None = None,
    ylabel: str = "linear top-1 (%)",
) -> pd.DataFrame:
    """Load the results of ``dataset``, write the table (CSV, optional Markdown) and the figure, and return the table.

    Results whose ``run.dataset`` differs from ``dataset`` are ignored. Files without
    a ``dataset`` key are kept.
    """
    results = load_results(result_paths)
    if "dataset" in results.columns:
        other = results["dataset"].notna() & (results["dataset"] != dataset)
        if other.any():
            logger.info("ignoring %d result(s) from datasets other than %s", int(other.sum()), dataset)
        results = results[~other]

    table = top1_table(results, losses, batch_sizes, epochs)
    write_table(table, csv_path, md_path)
    plot_batch_size(table, png_path, title=f"{dataset}: top-1 against batch size", ylabel=ylabel)
    logger.info("aggregated %d result(s) for %s into %s and %s", len(results), dataset, csv_path, png_path)
    return table
