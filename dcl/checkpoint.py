"""Epoch checkpoints: atomic writes, newest-valid lookup with corruption handling, pruning."""

from __future__ import annotations

import errno
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from dcl.atomic import atomic_path, remove_temporaries

log = logging.getLogger(__name__)

NAME = re.compile(r"^epoch(\d{4,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be written, or a checkpoint that does not fit its run."""


def _write_advice(folder: Path, error: BaseException) -> str:
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"Free disk space under {folder} and rerun; the run resumes from its newest "
                "checkpoint.")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        return (f"Make {existing} writable for this user, or choose another output root "
                "(--run-dir, output_root in the config), and rerun.")
    return f"Check that {folder} is writable and has free space, and rerun."


def prepare_folder(folder: Path) -> None:
    """Create ``folder``, check that it is writable and remove files of killed writers.

    Called before training, so that an unwritable output root fails at once
    rather than after the first epoch.

    Raises:
        CheckpointError: naming the folder and the fix, when it cannot be written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoints to {folder}: {error}. {_write_advice(folder, error)}"
        ) from error
    remove_temporaries(folder)


def checkpoint_path(folder: Path, epoch: int) -> Path:
    return Path(folder) / f"epoch{epoch:04d}.pt"


def save(folder: Path, epoch: int, state: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint of ``epoch`` (temporary file, then rename)."""
    path = checkpoint_path(folder, epoch)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as error:  # torch reports some failed writes as RuntimeError
        raise CheckpointError(
            f"cannot write checkpoint {path}: {error}. {_write_advice(Path(folder), error)}"
        ) from error
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
            log.error("checkpoint %s is unreadable (%s): moved it to %s and trying the previous one",
                      path, error, aside)
            path.rename(aside)
            continue
        if state.get("epoch") != epoch:
            raise CheckpointError(
                f"checkpoint {path} records epoch {state.get('epoch')}, not {epoch}: it was "
                f"renamed or copied from another run. Move it out of {path.parent} and rerun.")
        log.info("resuming from %s", path)
        return state
    return None


def prune(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for _, path in _by_epoch(folder)[:-keep]:
        path.unlink(missing_ok=True)
