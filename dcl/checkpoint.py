"""Epoch checkpoints: atomic writes, newest-valid lookup with corruption handling, pruning."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from dcl.atomic import atomic_path

log = logging.getLogger(__name__)

NAME = re.compile(r"^epoch(\d{4,})\.pt$")


def checkpoint_path(folder: Path, epoch: int) -> Path:
    return Path(folder) / f"epoch{epoch:04d}.pt"


def save(folder: Path, epoch: int, state: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint of ``epoch`` (temporary file, then rename)."""
    path = checkpoint_path(folder, epoch)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _by_epoch(folder: Path) -> list[tuple[int, Path]]:
    if not Path(folder).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def load_latest(folder: Path) -> dict[str, Any] | None:
    """Load the newest checkpoint that reads back; unreadable ones are renamed ``*.corrupt``.

    Checkpoints are loaded with ``weights_only=True``: they hold only tensors,
    numbers, strings and containers, so no pickled code runs on load.
    """
    for epoch, path in reversed(_by_epoch(folder)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
            aside = path.with_suffix(".pt.corrupt")
            log.error("checkpoint %s is unreadable (%s); moved to %s", path, error, aside)
            path.rename(aside)
            continue
        if state.get("epoch") != epoch:
            raise RuntimeError(f"checkpoint {path} records epoch {state.get('epoch')}, not {epoch}")
        log.info("resuming from %s", path)
        return state
    return None


def prune(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for _, path in _by_epoch(folder)[:-keep]:
        path.unlink(missing_ok=True)
