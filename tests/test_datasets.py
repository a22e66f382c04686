"""Tests for dcl.datasets: both CIFAR-10 layouts, subsets, errors and the atomic cache."""

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcl.datasets import DataError, balanced_indices, build_cache, load_cache

# Written out of order so that the tests check sorting. Values encode (class, stem)
# in the pixels, so the order of decoded images can be read back.
CLASSES = ["cat", "ant", "bird"]
STEMS = {"train": ["10", "0", "2", "1"], "test": ["3", "0"]}


def _pixel_value(class_index: int, stem: str) -> int:
    return 60 * class_index + int(stem)


def _write_image(path: Path, value: int, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def _make_folder_root(root: Path, suffix: str = ".png") -> Path:
    for split, stems in STEMS.items():
        for cls in CLASSES:
            class_index = sorted(CLASSES).index(cls)
            for stem in stems:
                path = root / split / cls / f"{stem}{suffix}"
                _write_image(path, _pixel_value(class_index, stem))
    return root


def _sorted_stems(split: str) -> list[str]:
    return sorted(STEMS[split], key=int)


def test_folder_cache_shapes(tmp_path):
    root = _make_folder_root(tmp_path / "cifar10")

    cache = load_cache(build_cache("cifar10", root, tmp_path / "cache.npz", threads=1))

    assert cache["train_images"].shape == (12, 3, 32, 32)
    assert cache["train_images"].dtype == np.uint8
    assert cache["test_images"].shape == (6, 3, 32, 32)
    assert cache["test_images"].dtype == np.uint8


def test_folder_cache_labels_and_classes(tmp_path):
    root = _make_folder_root(tmp_path / "cifar10")

    cache = load_cache(build_cache("cifar10", root, tmp_path / "cache.npz", threads=1))

    assert cache["classes"].tolist() == ["ant", "bird", "cat"]
    assert cache["train_labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert cache["test_labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert cache["train_labels"].dtype == np.int64


def test_folder_files_numeric_order(tmp_path):
    root = _make_folder_root(tmp_path / "cifar10")

    cache = load_cache(build_cache("cifar10", root, tmp_path / "cache.npz", threads=1))

    expected = [
        _pixel_value(class_index, stem)
        for class_index in range(3)
        for stem in _sorted_stems("train")
    ]
    assert cache["train_images"][:, 0, 0, 0].tolist() == expected


def test_folder_jpeg_decodes(tmp_path):
    root = _make_folder_root(tmp_path / "cifar10", suffix=".jpg")

    cache = load_cache(build_cache("cifar10", root, tmp_path / "cache.npz", threads=1))

    expected = np.array([
        _pixel_value(class_index, stem)
        for class_index in range(3)
        for stem in _sorted_stems("train")
    ])
    decoded = cache["train_images"][:, 0, 0, 0].astype(int)
    assert cache["train_images"].shape == (12, 3, 32, 32)
    assert np.abs(decoded - expected).max() <= 2


def test_balanced_subset_first_per_class(tmp_path):
    root = _make_folder_root(tmp_path / "cifar10")

    cache = load_cache(build_cache("cifar10", root, tmp_path / "cache.npz",
                                   train_subset=6, test_subset=3, threads=1))

    expected = [_pixel_value(c, stem) for c in range(3) for stem in ("0", "1")]
    assert cache["train_images"][:, 0, 0, 0].tolist() == expected
    assert cache["train_labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert cache["test_labels"].tolist() == [0, 1, 2]


def test_balanced_indices_interleaved_labels():
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2])

    chosen = balanced_indices(labels, 6)

    assert chosen.tolist() == [0, 1, 2, 3, 4, 5]


def test_balanced_indices_none_keeps_all():
    assert balanced_indices(np.array([1, 0, 1]), None).tolist() == [0, 1, 2]


def test_balanced_indices_too_few_images():
    labels = np.array([0, 0, 0, 1])

    with pytest.raises(DataError, match="has only 1"):
        balanced_indices(labels, 4)


def test_balanced_indices_subset_below_classes():
    with pytest.raises(DataError, match="subset of 2 images"):
        balanced_indices(np.array([0, 1, 2]), 2)


def _make_official_root(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write torchvision's CIFAR-10 pickle layout: 5 train batches of 2 images, 1 test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(10, 3, 32, 32), dtype=np.uint8)
    train_labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    for i in range(5):
        batch = {"data": train[2 * i:2 * i + 2].reshape(2, -1),
                 "labels": train_labels[2 * i:2 * i + 2]}
        with open(folder / f"data_batch_{i + 1}", "wb") as handle:
            pickle.dump(batch, handle)
    test = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": test.reshape(3, -1), "labels": [0, 1, 2]}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": ["ant", "bird", "cat"]}, handle)
    return train, test


def test_official_layout_loads(tmp_path):
    train, test = _make_official_root(tmp_path / "cifar10")

    cache = load_cache(build_cache("cifar10", tmp_path / "cifar10", tmp_path / "cache.npz"))

    assert np.array_equal(cache["train_images"], train)
    assert np.array_equal(cache["test_images"], test)
    assert cache["train_labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert cache["classes"].tolist() == ["ant", "bird", "cat"]


def test_official_matches_folder_layout(tmp_path):
    train, test = _make_official_root(tmp_path / "official")
    folder_root = tmp_path / "folder"
    labels = {"train": [0, 0, 0, 1, 1, 1, 2, 2, 2, 2], "test": [0, 1, 2]}
    for split, images in (("train", train), ("test", test)):
        for index, (image, label) in enumerate(zip(images, labels[split])):
            path = folder_root / split / ["ant", "bird", "cat"][label] / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(path)

    official = load_cache(build_cache("cifar10", tmp_path / "official", tmp_path / "a.npz",
                                      train_subset=6))
    folder = load_cache(build_cache("cifar10", folder_root, tmp_path / "b.npz",
                                    train_subset=6, threads=1))

    assert sorted(official) == sorted(folder)
    for key in official:
        assert np.array_equal(official[key], folder[key]), key


def test_missing_root_names_path(tmp_path):
    root = tmp_path / "nowhere" / "cifar10"

    with pytest.raises(DataError) as info:
        build_cache("cifar10", root, tmp_path / "cache.npz")

    assert str(root) in str(info.value)
    assert "DCL_DATA_ROOT" in str(info.value)
    assert "does not exist" in str(info.value)


def test_wrong_layout_raises(tmp_path):
    root = tmp_path / "cifar10"
    _write_image(root / "train" / "cat" / "0.png", 1)

    with pytest.raises(DataError, match="neither accepted layout"):
        build_cache("cifar10", root, tmp_path / "cache.npz")


def test_unknown_dataset_raises(tmp_path):
    root = _make_folder_root(tmp_path / "data")

    with pytest.raises(DataError, match="'mnist'"):
        build_cache("mnist", root, tmp_path / "cache.npz")


def test_empty_split_raises(tmp_path):
    root = tmp_path / "cifar10"
    _write_image(root / "train" / "cat" / "0.png", 1)
    (root / "test").mkdir()

    with pytest.raises(DataError, match="no class folders"):
        build_cache("cifar10", root, tmp_path / "cache.npz", threads=1)


def test_no_image_files_raises(tmp_path):
    root = tmp_path / "cifar10"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "cat" / "0.tif").write_bytes(b"unsupported suffix")

    with pytest.raises(DataError, match="no image files"):
        build_cache("cifar10", root, tmp_path / "cache.npz", threads=1)


def test_corrupt_image_names_file(tmp_path):
    root = _make_folder_root(tmp_path / "cifar10")
    bad = root / "train" / "bird" / "7.png"
    bad.write_bytes(b"these bytes are not an image")
    out = tmp_path / "out" / "cache.npz"

    with pytest.raises(DataError) as info:
        build_cache("cifar10", root, out, threads=1)

    assert str(bad) in str(info.value)
    assert not out.exists()


def test_mixed_sizes_raise(tmp_path):
    root = _make_folder_root(tmp_path / "cifar10")
    odd = root / "test" / "cat" / "5.png"
    _write_image(odd, 0, size=16)

    with pytest.raises(DataError, match=re.escape(str(odd))):
        build_cache("cifar10", root, tmp_path / "cache.npz", threads=1)


def test_class_mismatch_raises(tmp_path):
    root = _make_folder_root(tmp_path / "cifar10")
    _write_image(root / "test" / "dog" / "0.png", 0)

    with pytest.raises(DataError, match="class folders differ"):
        build_cache("cifar10", root, tmp_path / "cache.npz", threads=1)


def test_cache_written_atomically(tmp_path):
    root = _make_folder_root(tmp_path / "cifar10")
    out_dir = tmp_path / "out"

    build_cache("cifar10", root, out_dir / "cache.npz", threads=1)

    assert sorted(p.name for p in out_dir.iterdir()) == ["cache.npz"]


def test_load_cache_missing_file(tmp_path):
    with pytest.raises(DataError, match="prepare-data"):
        load_cache(tmp_path / "absent.npz")


def _real_cifar10_root() -> Path | None:
    candidates = [Path("/work/shared/data/cifar10")]
    if os.environ.get("DCL_DATA_ROOT"):
        candidates.insert(0, Path(os.environ["DCL_DATA_ROOT"]) / "cifar10")
    return next((p for p in candidates if p.is_dir()), None)


def test_real_cifar10_subset(tmp_path):
    root = _real_cifar10_root()
    if root is None:
        pytest.skip("no real CIFAR-10 at $DCL_DATA_ROOT/cifar10 or /work/shared/data/cifar10")

    cache = load_cache(build_cache("cifar10", root, tmp_path / "cache.npz",
                                   train_subset=100, test_subset=100, threads=1))

    assert cache["train_images"].shape == (100, 3, 32, 32)
    assert cache["test_images"].shape == (100, 3, 32, 32)
    assert len(cache["classes"]) == 10
    assert np.bincount(cache["train_labels"]).tolist() == [10] * 10
    assert np.bincount(cache["test_labels"]).tolist() == [10] * 10
