"""Tests for dcl.cifar: CIFAR-100 (and CIFAR-10) in torchvision's official pickles, written here."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from dcl import cifar
from dcl.datasets import DataError, build_cache, load_cache

FINE_NAMES = [f"class{i:03d}" for i in range(100)]


def write_cifar100(root: Path, per_class: dict[str, int], seed: int = 0) -> dict[str, tuple]:
    """Write cifar-100-python/{train,test,meta} as torchvision's download leaves them.

    Returns the images (N, 3, 32, 32) and fine labels written for each split.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for split, count in per_class.items():
        labels = np.repeat(np.arange(100), count)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
        batch = {"filenames": [f"{i}.png" for i in range(len(labels))],
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "data": images.reshape(len(labels), -1)}
        with open(folder / split, "wb") as handle:
            pickle.dump(batch, handle)
        written[split] = (images, labels)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": FINE_NAMES,
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, handle)
    return written


@pytest.fixture()
def cifar100_root(tmp_path):
    root = tmp_path / "cifar100"
    return root, write_cifar100(root, {"train": 3, "test": 1})


def test_cifar100_cache_fine_labels(cifar100_root, tmp_path):
    root, written = cifar100_root

    cache = load_cache(build_cache("cifar100", root, tmp_path / "c.npz"))

    assert np.array_equal(cache["train_images"], written["train"][0])
    assert cache["train_labels"].tolist() == written["train"][1].tolist()
    assert np.array_equal(cache["test_images"], written["test"][0])
    assert cache["classes"].tolist() == FINE_NAMES
    assert cache["train_images"].shape == (300, 3, 32, 32)


def test_cifar100_balanced_subset(cifar100_root, tmp_path):
    root, _ = cifar100_root

    cache = load_cache(build_cache("cifar100", root, tmp_path / "c.npz", train_subset=200))

    assert np.bincount(cache["train_labels"]).tolist() == [2] * 100


def test_cifar100_pixels_are_rows_first(tmp_path):
    root = tmp_path / "cifar100"
    write_cifar100(root, {"train": 1, "test": 1})
    batch = pickle.loads((root / "cifar-100-python" / "train").read_bytes())
    # The official layout: 1024 red values row by row, then green, then blue.
    first = np.asarray(batch["data"][0], dtype=np.uint8)

    images, _, _ = cifar.read_split("cifar100", root, "train")

    assert images[0, 0, 0, :].tolist() == first[:32].tolist()
    assert images[0, 1, 0, 0] == first[1024]


def test_cifar100_missing_root_shows_layout(tmp_path):
    root = tmp_path / "cifar100"

    with pytest.raises(DataError) as info:
        build_cache("cifar100", root, tmp_path / "c.npz")

    message = str(info.value)
    assert str(root) in message
    assert "cifar-100-python" in message
    assert "allow_download" in message


def test_no_download_unless_allowed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cifar, "download", lambda name, root: calls.append(name))

    with pytest.raises(DataError):
        build_cache("cifar100", tmp_path / "cifar100", tmp_path / "c.npz", allow_download=False)
    assert calls == []


def test_download_when_allowed_and_missing(tmp_path, monkeypatch):
    root = tmp_path / "cifar100"
    monkeypatch.setattr(cifar, "download",
                        lambda name, where: write_cifar100(where, {"train": 1, "test": 1}))

    cache = load_cache(build_cache("cifar100", root, tmp_path / "c.npz", allow_download=True))

    assert len(cache["train_labels"]) == 100


def test_cifar100_image_folders(tmp_path):
    from test_datasets import CLASSES, _make_folder_root

    root = _make_folder_root(tmp_path / "cifar100")

    cache = load_cache(build_cache("cifar100", root, tmp_path / "c.npz", threads=1))

    assert cache["classes"].tolist() == sorted(CLASSES)
