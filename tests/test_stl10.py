"""Tests for dcl.stl10: the official binary files, written here in STL-10's column-major order."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dcl import stl10
from dcl.datasets import DataError, build_cache, load_cache
from dcl.sources import MemorySource

NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _write_images(path: Path, images: np.ndarray) -> None:
    # STL-10 stores each channel column by column: (N, 3, W, H) in C order.
    images.transpose(0, 1, 3, 2).tofile(path)


def write_stl10(root: Path, train: int = 20, test: int = 10, unlabeled: int = 7, seed: int = 0) -> dict:
    """Write stl10_binary/ with the given image counts; returns the (N, 3, H, W) arrays."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    arrays = {}
    for split, count in (("train", train), ("test", test), ("unlabeled", unlabeled)):
        images = rng.integers(0, 256, size=(count, 3, 96, 96), dtype=np.uint8)
        _write_images(folder / f"{split}_X.bin", images)
        arrays[f"{split}_images"] = images
        if split != "unlabeled":
            labels = np.arange(count) % 10
            (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
            arrays[f"{split}_labels"] = labels
    (folder / "class_names.txt").write_text("\n".join(NAMES) + "\n")
    return arrays


def test_read_images_orientation(tmp_path):
    image = np.zeros((1, 3, 96, 96), dtype=np.uint8)
    image[0, 0, 0, 5] = 255  # first row, sixth column of the red channel
    _write_images(tmp_path / "x.bin", image)

    decoded = stl10.read_images(tmp_path / "x.bin")

    assert decoded.shape == (1, 3, 96, 96)
    assert decoded[0, 0, 0, 5] == 255
    assert decoded.sum() == 255


def test_cache_holds_labelled_and_unlabeled(tmp_path):
    written = write_stl10(tmp_path / "stl10")

    cache = load_cache(build_cache("stl10", tmp_path / "stl10", tmp_path / "s.npz"))

    for key in ("train_images", "test_images", "unlabeled_images"):
        assert np.array_equal(cache[key], written[key]), key
    assert cache["train_labels"].tolist() == written["train_labels"].tolist()
    assert cache["train_labels"].min() == 0 and cache["train_labels"].max() == 9
    assert cache["classes"].tolist() == NAMES


def test_pretraining_uses_train_and_unlabeled(tmp_path):
    written = write_stl10(tmp_path / "stl10", train=20, unlabeled=7)
    source = MemorySource(build_cache("stl10", tmp_path / "stl10", tmp_path / "s.npz"))

    assert len(source) == 27
    (batch,) = source.batches([torch.tensor([0, 20, 26])], torch.Generator())

    assert np.array_equal(batch[0].numpy(), written["train_images"][0])
    assert np.array_equal(batch[1].numpy(), written["unlabeled_images"][0])
    assert np.array_equal(batch[2].numpy(), written["unlabeled_images"][6])


def test_evaluation_uses_labelled_splits_only(tmp_path):
    write_stl10(tmp_path / "stl10", train=20, test=10, unlabeled=7)
    source = MemorySource(build_cache("stl10", tmp_path / "stl10", tmp_path / "s.npz"))

    assert sum(len(b) for b in source.eval_batches("train", 8)) == 20
    assert len(source.labels("test")) == 10


def test_truncated_file_raises(tmp_path):
    write_stl10(tmp_path / "stl10")
    path = tmp_path / "stl10" / "stl10_binary" / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-5])

    with pytest.raises(ValueError, match="truncated"):
        build_cache("stl10", tmp_path / "stl10", tmp_path / "s.npz")


def test_missing_root_shows_layout(tmp_path):
    with pytest.raises(DataError) as info:
        build_cache("stl10", tmp_path / "stl10", tmp_path / "s.npz")

    assert "stl10_binary" in str(info.value)
    assert "unlabeled_X.bin" in str(info.value)
