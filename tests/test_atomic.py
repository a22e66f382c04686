"""Tests for dcl.atomic."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from dcl.atomic import atomic_path, write_json, write_text


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_write_text_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    write_text(target, "hello\n")
    assert target.read_text(encoding="utf-8") == "hello\n"
    assert _leftovers(target.parent) == []


def test_write_json_format(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json(target, {"z": 1, "a": [1, 2]})
    text = target.read_text(encoding="utf-8")
    assert text == '{\n  "z": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    assert json.loads(text) == {"z": 1, "a": [1, 2]}


def test_write_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "new"


def test_temporary_name_and_folder(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path
        assert temporary.name.startswith(".out.txt.tmp-")
        temporary.write_text("x", encoding="utf-8")
    assert target.read_text(encoding="utf-8") == "x"


def test_exception_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as temporary:
            temporary.write_text("partial", encoding="utf-8")
            raise RuntimeError("boom")
    assert target.read_text(encoding="utf-8") == "old"
    assert _leftovers(tmp_path) == []


def test_exception_creates_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("partial", encoding="utf-8")
            raise RuntimeError("boom")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_unwritten_temporary_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(FileNotFoundError, match="never created"):
        with atomic_path(target):
            pass
    assert not target.exists()


def test_concurrent_writers_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    # Large enough that a non-atomic write would be observed half-done.
    contents = [str(i) * 200_000 for i in range(4)]
    write_text(target, contents[0])
    stop = threading.Event()
    observed: list[str] = []

    def write_repeatedly(text: str) -> None:
        for _ in range(10):
            write_text(target, text)

    def read_repeatedly() -> None:
        while not stop.is_set():
            observed.append(target.read_text(encoding="utf-8"))

    reader = threading.Thread(target=read_repeatedly)
    writers = [threading.Thread(target=write_repeatedly, args=(text,)) for text in contents]
    reader.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    reader.join()

    assert observed
    assert all(text in contents for text in observed)
    assert target.read_text(encoding="utf-8") in contents
    assert _leftovers(tmp_path) == []
