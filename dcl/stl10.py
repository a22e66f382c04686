"""STL-10 in its official binary format (``stl10_binary/``, as torchvision downloads it).

Files: ``train_X.bin`` (5,000 images), ``test_X.bin`` (8,000), ``unlabeled_X.bin``
(100,000), labels ``train_y.bin``/``test_y.bin`` (one uint8 per image, 1–10) and
``class_names.txt``. Each image is 3×96×96 uint8, every channel stored column by column
(Fortran order), so a file reshapes to (N, 3, 96, 96) and then swaps its last two axes.

SimCLR's protocol pretrains on the unlabeled and train images (105,000) and evaluates
on train/test; the cache therefore carries ``unlabeled_images`` beside the labelled splits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FOLDER = "stl10_binary"
SIDE = 96


def marker(root: Path) -> Path:
    """The file whose presence shows that ``root`` contains STL-10's binary files."""
    return Path(root) / FOLDER / "test_X.bin"


def read_images(path: Path) -> np.ndarray:
    """Read an ``*_X.bin`` file into uint8 (N, 3, 96, 96), rows first."""
    raw = np.fromfile(path, dtype=np.uint8)
    per_image = 3 * SIDE * SIDE
    if raw.size % per_image:
        raise ValueError(f"{path} has {raw.size} bytes, not a multiple of {per_image} "
                         "(one 3×96×96 image): the file is truncated, download it again")
    return raw.reshape(-1, 3, SIDE, SIDE).transpose(0, 1, 3, 2).copy()


def read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``train`` or ``test``: images (N, 3, 96, 96), int64 labels 0–9 and class names."""
    folder = Path(root) / FOLDER
    images = read_images(folder / f"{split}_X.bin")
    labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != len(images):
        raise ValueError(f"{folder / f'{split}_y.bin'} has {len(labels)} labels for "
                         f"{len(images)} images in {split}_X.bin: download STL-10 again")
    names = (folder / "class_names.txt").read_text().split()
    return images, labels, names


def read_unlabeled(root: Path) -> np.ndarray:
    """Read the 100,000 unlabeled images, uint8 (N, 3, 96, 96)."""
    return read_images(Path(root) / FOLDER / "unlabeled_X.bin")


def download(root: Path) -> None:
    """Let torchvision fetch STL-10 into ``root`` (only if allowed by the caller)."""
    import torchvision

    log.info("downloading STL-10 into %s", root)
    torchvision.datasets.STL10(str(root), split="train+unlabeled", download=True)
