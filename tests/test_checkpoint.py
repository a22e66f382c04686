"""Tests for dcl.checkpoint: round trip, newest-valid lookup, corruption handling, pruning."""

import logging
from pathlib import Path

import pytest
import torch

from dcl import checkpoint

torch.set_num_threads(1)


class Payload:
    """An arbitrary class: weights-only loading must not unpickle it."""

    def __init__(self, value: int) -> None:
        self.value = value


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "weights": torch.full((3,), float(epoch)), "history": [{"loss": 1.5}]}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_save_load_round_trip(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1))

    state = checkpoint.load_latest(tmp_path)

    assert state["epoch"] == 1
    assert torch.equal(state["weights"], torch.full((3,), 1.0))
    assert state["history"] == [{"loss": 1.5}]


def test_save_path_name(tmp_path):
    path = checkpoint.save(tmp_path, 7, _state(7))

    assert path == tmp_path / "epoch0007.pt"
    assert _names(tmp_path) == ["epoch0007.pt"]


def test_load_latest_empty_folder(tmp_path):
    assert checkpoint.load_latest(tmp_path) is None
    assert checkpoint.load_latest(tmp_path / "missing") is None


def test_load_latest_picks_newest(tmp_path):
    for epoch in (1, 3, 2):
        checkpoint.save(tmp_path, epoch, _state(epoch))

    state = checkpoint.load_latest(tmp_path)

    assert state["epoch"] == 3


def test_load_latest_orders_numerically(tmp_path):
    checkpoint.save(tmp_path, 999, _state(999))
    checkpoint.save(tmp_path, 10000, _state(10000))

    state = checkpoint.load_latest(tmp_path)

    assert state["epoch"] == 10000


def test_truncated_checkpoint_set_aside(tmp_path, caplog):
    checkpoint.save(tmp_path, 1, _state(1))
    newest = checkpoint.save(tmp_path, 2, _state(2))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.ERROR, logger="dcl.checkpoint"):
        state = checkpoint.load_latest(tmp_path)

    assert state["epoch"] == 1
    assert _names(tmp_path) == ["epoch0001.pt", "epoch0002.pt.corrupt"]
    assert str(newest) in caplog.text


def test_arbitrary_object_rejected(tmp_path, caplog):
    checkpoint.save(tmp_path, 1, _state(1))
    torch.save({"epoch": 2, "payload": Payload(5)}, tmp_path / "epoch0002.pt")

    with caplog.at_level(logging.ERROR, logger="dcl.checkpoint"):
        state = checkpoint.load_latest(tmp_path)

    assert state["epoch"] == 1
    assert (tmp_path / "epoch0002.pt.corrupt").is_file()
    assert "epoch0002.pt" in caplog.text


def test_all_corrupt_returns_none(tmp_path):
    (tmp_path / "epoch0001.pt").write_bytes(b"not a checkpoint")

    assert checkpoint.load_latest(tmp_path) is None
    assert _names(tmp_path) == ["epoch0001.pt.corrupt"]


def test_other_files_ignored(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1))
    (tmp_path / "epoch0002.pt.corrupt").write_bytes(b"old")
    (tmp_path / "notes.pt").write_bytes(b"other")

    state = checkpoint.load_latest(tmp_path)

    assert state["epoch"] == 1


def test_save_leaves_no_temporary_files(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1))
    checkpoint.save(tmp_path, 1, _state(1))

    assert _names(tmp_path) == ["epoch0001.pt"]


def test_prune_keeps_newest(tmp_path):
    for epoch in range(1, 6):
        checkpoint.save(tmp_path, epoch, _state(epoch))

    checkpoint.prune(tmp_path, keep=2)

    assert _names(tmp_path) == ["epoch0004.pt", "epoch0005.pt"]


def test_prune_fewer_than_keep(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1))

    checkpoint.prune(tmp_path, keep=3)

    assert _names(tmp_path) == ["epoch0001.pt"]


def test_mismatched_epoch_raises(tmp_path):
    torch.save(_state(3), tmp_path / "epoch0002.pt")

    with pytest.raises(RuntimeError, match="records epoch 3, not 2"):
        checkpoint.load_latest(tmp_path)
