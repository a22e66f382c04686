"""Read image-classification datasets once into a uint8 cache or a file index.

Datasets and the layouts read under a dataset's root:

- ``cifar10``, ``cifar100``: image folders (``train/<class>/<index>.jpg``,
  ``test/<class>/<index>.jpg``) or torchvision's official pickles (:mod:`dcl.cifar`);
- ``stl10``: the official binary files ``stl10_binary/`` (:mod:`dcl.stl10`);
- ``imagenet``, ``imagenet100``: image folders ``train/<wnid>/``, ``val/<wnid>/``
  (:mod:`dcl.imagenet`); ImageNet-100 is a class-list subset linked from ImageNet-1K.

Two outputs, chosen by the dataset's ``data.source`` setting:

- ``memory``: one ``.npz`` cache with ``train_images``/``test_images`` of shape
  (N, 3, H, W) and dtype uint8, ``train_labels``/``test_labels`` (int64), ``classes``
  and, for STL-10, ``unlabeled_images``. Training never decodes an image again.
- ``stream``: one ``.npz`` index (:mod:`dcl.stream`) of the image files; training
  decodes them in DataLoader workers. Used for ImageNet-scale sets.
"""

from __future__ import annotations

import logging
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcl import cifar, stl10
from dcl.atomic import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SUPPORTED = ("cifar10", "cifar100", "stl10", "imagenet", "imagenet100")
FOLDER_ONLY = ("imagenet", "imagenet100")
DOWNLOADABLE = ("cifar10", "cifar100", "stl10")
TEST_SPLIT_NAMES = ("test", "val")


class DataError(RuntimeError):
    """A dataset root that is missing, has the wrong layout or contains an unreadable image."""


def expected_layout(name: str, root: Path) -> str:
    """Describe the layouts accepted for ``name`` under ``root``, for error messages."""
    if name in FOLDER_ONLY:
        from dcl.imagenet import expected_layout as imagenet_layout

        return imagenet_layout(root)
    if name == "stl10":
        return (f"{root}/stl10_binary/ with train_X.bin, train_y.bin, test_X.bin, test_y.bin, "
                "unlabeled_X.bin and class_names.txt (torchvision's STL-10 files)")
    return (
        f"either {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg (image folders) "
        f"or {root}/{cifar.FORMATS[name].folder}/ (torchvision's {name} files)"
    )


def eval_split_folder(root: Path) -> str | None:
    """Return the folder of the evaluation split under an image-folder root (``test`` or ``val``)."""
    return next((name for name in TEST_SPLIT_NAMES if (Path(root) / name).is_dir()), None)


def _official_marker(name: str, root: Path) -> Path | None:
    """Return the file whose presence shows an official (non-folder) layout of ``name``, or None."""
    if name == "stl10":
        return stl10.marker(root)
    if name in cifar.FORMATS:
        return cifar.marker(name, root)
    return None


def detect_layout(name: str, root: Path) -> str:
    """Return "folder" or "official" for a dataset root, or raise DataError explaining the fix."""
    if name not in SUPPORTED:
        raise DataError(f"unknown dataset {name!r}: supported datasets are {list(SUPPORTED)}")
    if name != "stl10" and (root / "train").is_dir() and eval_split_folder(root):
        return "folder"
    marker = _official_marker(name, root)
    if marker is not None and marker.is_file():
        return "official"
    what = "does not exist" if not root.exists() else "has neither accepted layout"
    if root.exists() and name in ("stl10", *FOLDER_ONLY):
        what = "lacks the expected files"
    fix = "" if name not in DOWNLOADABLE else ", or set allow_download: true to let torchvision fetch it"
    raise DataError(
        f"dataset root {root} for {name} {what}: expected {expected_layout(name, root)}. "
        "Point DCL_DATA_ROOT (or data_root in the config) at the folder that holds "
        f"'{name}/'{fix}."
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


def folder_files(split_root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
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
    if split == "test":
        split = eval_split_folder(root) or "test"
    files, labels, classes = folder_files(root / split)
    keep = balanced_indices(labels, subset)
    log.info("decoding %d of %d images from %s", len(keep), len(files), root / split)
    images = _decode_all([files[i] for i in keep], threads)
    return images, labels[keep], classes


def _read_official_split(name: str, root: Path, split: str, subset: int | None):
    if name == "stl10":
        images, labels, classes = stl10.read_split(root, split)
    else:
        images, labels, classes = cifar.read_split(name, root, split)
    keep = balanced_indices(labels, subset)
    return images[keep], labels[keep], list(classes)


def fetch_if_allowed(name: str, root: Path, allow_download: bool) -> None:
    """Download ``name`` with torchvision when allowed and its root has no accepted layout yet."""
    if not allow_download or name not in DOWNLOADABLE:
        return
    marker = _official_marker(name, root)
    folder = (root / "train").is_dir() and eval_split_folder(root) and name != "stl10"
    if folder or marker.is_file():
        return
    if name == "stl10":
        stl10.download(root)
    else:
        cifar.download(name, root)


def build_cache(
    name: str,
    root: Path,
    out: Path,
    train_subset: int | None = None,
    test_subset: int | None = None,
    allow_download: bool = False,
    threads: int = 2,
) -> Path:
    """Decode the dataset at ``root`` into the uint8 cache ``out`` (written atomically).

    STL-10's cache also holds its 100,000 ``unlabeled_images``, which pretraining uses
    together with the labelled train split; the subsets apply to the labelled splits only.
    """
    root = Path(root)
    fetch_if_allowed(name, root, allow_download)
    layout = detect_layout(name, root)

    splits = {}
    for split, subset in (("train", train_subset), ("test", test_subset)):
        if layout == "folder":
            splits[split] = _read_folder_split(root, split, subset, threads)
        else:
            splits[split] = _read_official_split(name, root, split, subset)
    if splits["train"][2] != splits["test"][2]:
        raise DataError(f"train and test class folders differ under {root}")
    extra = {}
    if name == "stl10":
        extra["unlabeled_images"] = stl10.read_unlabeled(root)

    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                train_images=splits["train"][0],
                train_labels=splits["train"][1],
                test_images=splits["test"][0],
                test_labels=splits["test"][1],
                classes=np.asarray(splits["train"][2]),
                **extra,
            )
    log.info(
        "cached %s: %d train, %d test%s images of shape %s in %s",
        name, len(splits["train"][1]), len(splits["test"][1]),
        f", {len(extra['unlabeled_images'])} unlabeled" if extra else "",
        splits["train"][0].shape[1:], out,
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
    for split in ("train", "test", "unlabeled")[:3 if "unlabeled_images" in arrays else 2]:
        images = arrays[f"{split}_images"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(
                f"dataset cache {path} contains {split}_images of dtype {images.dtype} and shape "
                f"{images.shape}, not uint8 (N, 3, H, W): {rebuild}")
        if split != "unlabeled" and len(arrays[f"{split}_labels"]) != len(images):
            raise DataError(f"dataset cache {path} has {len(images)} {split} images but "
                            f"{len(arrays[f'{split}_labels'])} labels: {rebuild}")
    return arrays
