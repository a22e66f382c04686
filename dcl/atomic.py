"""Atomic file output: readers see the old file or the complete new one, never a partial write.

A job killed halfway through a write must not leave a truncated file at the final
path, where a later rule or a rerun could take it for a finished output.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The temporary name atomic_path uses: .{name}.tmp-{pid}-{8 hex digits}
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-\d+-[0-9a-f]{8}$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Windows cannot open a directory for fsync.
    if os.name == "nt":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` and move it onto ``path`` on success.

    The caller writes the whole file to the yielded path, which is named
    ``.{name}.tmp-{pid}-{random}`` in the same folder so that ``os.replace`` is a
    same-filesystem rename. On normal exit the temporary file is fsynced, renamed
    onto ``path`` and the folder is fsynced. On an exception the temporary file is
    removed, ``path`` is left as it was and the exception propagates. Missing
    parent folders are created.

    Raises:
        FileNotFoundError: if the block exits normally without creating the file.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")

    try:
        yield temporary
        if not temporary.exists():
            raise FileNotFoundError(
                f"atomic write of {final} failed: the temporary file {temporary} was never created"
            )
        _fsync_file(temporary)
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

    _fsync_directory(final.parent)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically, as UTF-8 and without newline translation."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically as JSON with indent 2, keys in insertion order and a final newline."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_temporaries(folder: str | os.PathLike[str], names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` and return their paths.

    A process killed inside :func:`atomic_path` cannot remove its temporary file.
    Call this only where no other process is writing the same files, e.g. in a run
    folder before the run starts. ``names`` limits it to the temporaries of those
    final names; None removes every temporary in the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = TEMPORARY.match(path.name)
        if match and (names is None or match.group("name") in names) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
