"""Read image-classification datasets once into a uint8 cache.

CIFAR-10 is read from either layout:

- image folders: ``<root>/train/<class>/<index>.jpg`` and ``<root>/test/<class>/<index>.jpg``
  (the layout ``torchvision.datasets.ImageFolder`` reads);
- torchvision's official layout: ``<root>/cifar-10-batches-py/data_batch_{1..5}`` and
  ``test_batch``, downloaded by torchvision only when the caller allows it.

The cache is one ``.npz`` file with ``train_images``/``test_images`` of shape
(N, 3, H, W) and dtype uint8, ``train_labels``/``test_labels`` (int64) and
``classes``. Training never decodes an image again after the cache exists.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcl.atomic import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SUPPORTED = ("cifar10",)
OFFICIAL_CIFAR10 = "cifar-10-batches-py"


class DataError(RuntimeError):
    """A dataset root that is missing, has the wrong layout or contains an unreadable image."""


def expected_layout(name: str, root: Path) -> str:
    """Describe the layouts accepted for ``name`` under ``root``, for error messages."""
    return (
        f"either {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg (image folders) "
        f"or {root}/{OFFICIAL_CIFAR10}/ (torchvision's CIFAR-10 files)"
    )


def detect_layout(name: str, root: Path) -> str:
    """Return "folder" or "official" for a dataset root, or raise DataError explaining the fix."""
    if name not in SUPPORTED:
        raise DataError(f"unknown dataset {name!r}: supported datasets are {list(SUPPORTED)}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder"
    if (root / OFFICIAL_CIFAR10 / "test_batch").is_file():
        return "official"
    what = "does not exist" if not root.exists() else "has neither accepted layout"
    raise DataError(
        f"dataset root {root} for {name} {what}: expected {expected_layout(name, root)}. "
        "Point DCL_DATA_ROOT (or data_root in the config) at the folder that holds "
        f"'{name}/', or set allow_download: true to let torchvision fetch it."
    )


def balanced_indices(labels: np.ndarray, count: int | None) -> np.ndarray:
    """Pick the first ``count // classes`` indices of every class, in index order.

    ``None`` keeps every index. The choice is deterministic, so a subset is the
    same on every machine.
    """
    if count is None:
        return np.arange(len(labels))
    classes = np.unique(labels)
    per_class = count // len(classes)
    if per_class < 1:
        raise DataError(f"subset of {count} images is smaller than the {len(classes)} classes")
    chosen = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise DataError(
                f"a class-balanced subset of {count} images needs {per_class} images of "
                f"class index {label}, but the split has only {len(members)}: lower "
                "train_subset or test_subset in the config"
            )
        chosen.append(members[:per_class])
    return np.sort(np.concatenate(chosen))


def _folder_files(split_root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """List image files of an image-folder split, sorted by class then file stem."""
    classes = sorted(p.name for p in split_root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"no class folders in {split_root}: expected {split_root}/<class>/*.jpg")
    files, labels = [], []
    for label, cls in enumerate(classes):
        members = [p for p in (split_root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        members.sort(key=lambda p: (len(p.stem), p.stem))
        files.extend(members)
        labels.extend([label] * len(members))
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class "
                        f"folders of {split_root}")
    return files, np.asarray(labels, dtype=np.int64), classes


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(
            f"cannot read image {path}: {error}. Replace or delete the file and rerun."
        ) from error


def _decode_all(files: list[Path], threads: int) -> np.ndarray:
    """Decode images in parallel into an (N, 3, H, W) uint8 array; all must share one size."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        images = list(pool.map(_decode, files, chunksize=256))
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        first = images[0].shape
        odd = next(f for f, image in zip(files, images) if image.shape != first)
        raise DataError(f"image {odd} has another size than {files[0]} ({first}): resize the data")
    return np.stack(images).transpose(0, 3, 1, 2).copy()


def _read_folder_split(root: Path, split: str, subset: int | None, threads: int):
    files, labels, classes = _folder_files(root / split)
    keep = balanced_indices(labels, subset)
    log.info("decoding %d of %d images from %s", len(keep), len(files), root / split)
    images = _decode_all([files[i] for i in keep], threads)
    return images, labels[keep], classes


def _read_official_split(root: Path, split: str, subset: int | None):
    folder = root / OFFICIAL_CIFAR10
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    with open(folder / "batches.meta", "rb") as handle:
        classes = pickle.load(handle, encoding="latin1")["label_names"]
    all_labels = np.concatenate(labels)
    keep = balanced_indices(all_labels, subset)
    return np.concatenate(images)[keep], all_labels[keep], list(classes)


def build_cache(
    name: str,
    root: Path,
    out: Path,
    train_subset: int | None = None,
    test_subset: int | None = None,
    allow_download: bool = False,
    threads: int = 2,
) -> Path:
    """Decode the dataset at ``root`` into the uint8 cache ``out`` (written atomically)."""
    root = Path(root)
    if allow_download and name == "cifar10" and not root.exists():
        import torchvision

        log.info("downloading CIFAR-10 into %s", root)
        torchvision.datasets.CIFAR10(root, train=True, download=True)
        torchvision.datasets.CIFAR10(root, train=False, download=True)
    layout = detect_layout(name, root)

    splits = {}
    for split, subset in (("train", train_subset), ("test", test_subset)):
        if layout == "folder":
            splits[split] = _read_folder_split(root, split, subset, threads)
        else:
            splits[split] = _read_official_split(root, split, subset)
    if splits["train"][2] != splits["test"][2]:
        raise DataError(f"train and test class folders differ under {root}")

    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                train_images=splits["train"][0],
                train_labels=splits["train"][1],
                test_images=splits["test"][0],
                test_labels=splits["test"][1],
                classes=np.asarray(splits["train"][2]),
            )
    log.info(
        "cached %s: %d train, %d test images of shape %s in %s",
        name, len(splits["train"][1]), len(splits["test"][1]), splits["train"][0].shape[1:], out,
    )
    return out


CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classes")


def load_cache(path: Path) -> dict[str, np.ndarray]:
    """Load a cache written by :func:`build_cache` into memory.

    Raises:
        DataError: the file is missing, unreadable, or lacks an array or has a wrong
            image array; the message names the file and how to rebuild it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset cache {path} not found: run 'dcl prepare-data' first")
    rebuild = "delete it and rerun 'dcl prepare-data' (or the workflow) to rebuild it"
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"dataset cache {path} is unreadable ({error}): {rebuild}") from error
    missing = [key for key in CACHE_KEYS if key not in arrays]
    if missing:
        raise DataError(f"dataset cache {path} lacks {missing}: {rebuild}")
    for split in ("train", "test"):
        images = arrays[f"{split}_images"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(
                f"dataset cache {path} contains {split}_images of dtype {images.dtype} and shape "
                f"{images.shape}, not uint8 (N, 3, H, W): {rebuild}")
        if len(arrays[f"{split}_labels"]) != len(images):
            raise DataError(f"dataset cache {path} has {len(images)} {split} images but "
                            f"{len(arrays[f'{split}_labels'])} labels: {rebuild}")
    return arrays
