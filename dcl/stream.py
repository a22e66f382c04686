"""Stream images from disk: a file index and DataLoader workers that decode and crop.

For ImageNet-scale sets a full uint8 cache does not fit in memory (ImageNet-1K at
224 px is about 190 GB). ``prepare-data`` then writes a file index instead, an
``.npz`` with:

- ``kind``: ``"file-index"``; ``root``: the absolute dataset root;
- ``train_files``/``test_files``: paths relative to ``root``, sorted by class then stem;
- ``train_labels``/``test_labels`` (int64) and ``classes`` (the class folder names).

Training reads it through :class:`FileImages`, a map-style dataset whose workers decode
each file with ``torchvision.io.decode_jpeg`` (``decode_image`` for other formats) and
return uint8 (3, S, S) images that the batched augmentation on the device finishes:

- ``pretrain`` mode: a square crop of side min(H, W) at a random position along the
  longer side, resized (bilinear, antialiased) to S = ``load_size``. Both SimCLR views
  are then cropped from that square by the random resized crop on the device;
- ``eval`` mode: the shorter side resized to ``eval_resize`` and a centre crop of S =
  ``image_size`` (the usual 256 → 224 evaluation crop).

Each pretraining item carries its own seed, so a batch is the same whatever the number
of workers.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF

from dcl.atomic import atomic_path
from dcl.datasets import DataError, folder_files, balanced_indices, detect_layout, eval_split_folder

log = logging.getLogger(__name__)

INDEX_KIND = "file-index"
INDEX_KEYS = ("kind", "root", "train_files", "train_labels", "test_files", "test_labels", "classes")
JPEG_MAGIC = b"\xff\xd8"


def build_index(name: str, root: Path, out: Path, train_subset: int | None = None,
                test_subset: int | None = None) -> Path:
    """Index the image folders of ``root`` (class-balanced subsets if given) into ``out``.

    Raises:
        DataError: the root has no image-folder layout (``train/`` and ``test/`` or
            ``val/``), or the two splits have different class folders.
    """
    root = Path(os.path.abspath(root))
    if detect_layout(name, root) != "folder":
        raise DataError(f"data.source stream reads image folders, but {root} contains {name} in "
                        "its official binary format: set data.source: memory for this dataset")
    arrays: dict[str, np.ndarray] = {}
    classes = {}
    for split, folder, subset in (("train", "train", train_subset),
                                  ("test", eval_split_folder(root), test_subset)):
        files, labels, classes[split] = folder_files(root / folder)
        keep = balanced_indices(labels, subset)
        arrays[f"{split}_files"] = np.asarray([str(files[i].relative_to(root)) for i in keep])
        arrays[f"{split}_labels"] = labels[keep]
    if classes["train"] != classes["test"]:
        only = sorted(set(classes["train"]) ^ set(classes["test"]))
        raise DataError(f"train and test class folders differ under {root}: {only[:10]}")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, kind=np.asarray(INDEX_KIND), root=np.asarray(str(root)),
                     classes=np.asarray(classes["train"]), **arrays)
    log.info("indexed %s: %d train and %d test files of %d classes under %s into %s", name,
             len(arrays["train_files"]), len(arrays["test_files"]), len(classes["train"]), root, out)
    return out


def is_index(path: Path) -> bool:
    """True if ``path`` is a file index written by :func:`build_index`.

    An unreadable file is not an index; the cache loader then reports it with the fix.
    """
    try:
        with np.load(path) as data:
            return "kind" in data.files and str(data["kind"]) == INDEX_KIND
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def load_index(path: Path) -> dict[str, np.ndarray]:
    """Read a file index; raises DataError naming the file if it lacks a key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file index {path} not found: run 'dcl prepare-data' first")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    missing = [key for key in INDEX_KEYS if key not in arrays]
    if missing:
        raise DataError(f"file index {path} lacks {missing}: delete it and rerun 'dcl prepare-data'")
    return arrays


def decode(path: Path) -> torch.Tensor:
    """Decode an image file into uint8 RGB (3, H, W); DataError names a file that fails."""
    try:
        data = read_file(str(path))
        if bytes(data[:2].tolist()) == JPEG_MAGIC:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as error:
        raise DataError(f"cannot decode image {path}: {error}. Replace or delete the file and "
                        "rerun 'dcl prepare-data'.") from error


def random_square(image: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Crop a min(H, W) square at a random position and resize it to (3, size, size) uint8."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    square = image[:, top:top + side, left:left + side]
    return TF.resize(square, [size, size], antialias=True)


def centre_crop(image: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """Resize the shorter side to ``resize``, then centre-crop (3, size, size) uint8."""
    image = TF.resize(image, [resize], antialias=True)
    return TF.center_crop(image, [size, size])


class FileImages(torch.utils.data.Dataset):
    """Map-style dataset over indexed files returning uint8 (3, S, S) tensors.

    In ``pretrain`` mode an item is an ``(index, seed)`` pair and the seed fixes the
    random square; in ``eval`` mode an item is an index.
    """

    def __init__(self, root: Path, files: np.ndarray, mode: str, size: int,
                 resize: int | None = None) -> None:
        if mode not in ("pretrain", "eval"):
            raise ValueError(f"mode must be 'pretrain' or 'eval', got {mode!r}")
        self.root, self.files, self.mode, self.size = Path(str(root)), files, mode, size
        self.resize = resize or size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item) -> torch.Tensor:
        if self.mode == "pretrain":
            index, seed = item
            image = decode(self.root / str(self.files[index]))
            return random_square(image, self.size, np.random.default_rng(seed))
        return centre_crop(decode(self.root / str(self.files[item])), self.resize, self.size)


def loader(dataset: FileImages, batches: list, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    """Build a DataLoader that yields uint8 (B, 3, S, S) batches in the order of ``batches``."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=torch.stack,
        pin_memory=pin, persistent_workers=False, prefetch_factor=4 if workers else None)
