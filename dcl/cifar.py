"""CIFAR-10 and CIFAR-100 in torchvision's official on-disk format.

- CIFAR-10: ``<root>/cifar-10-batches-py/data_batch_{1..5}``, ``test_batch`` and
  ``batches.meta`` (pickles with ``data`` (N, 3072) uint8, ``labels``, ``label_names``).
- CIFAR-100: ``<root>/cifar-100-python/train``, ``test`` and ``meta`` (pickles with
  ``data`` (N, 3072) uint8, ``fine_labels``, ``fine_label_names``). The 100 fine
  classes are the labels; the 20 coarse super-classes are not used.

Both hold 32×32 RGB images stored channel-first, row by row, so ``data`` reshapes to
(N, 3, 32, 32) directly.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfficialFormat:
    """File names and pickle keys of one CIFAR variant."""

    folder: str
    splits: dict[str, tuple[str, ...]]
    meta: str
    label_key: str
    names_key: str
    torchvision_class: str


FORMATS = {
    "cifar10": OfficialFormat(
        folder="cifar-10-batches-py",
        splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta="batches.meta", label_key="labels", names_key="label_names",
        torchvision_class="CIFAR10"),
    "cifar100": OfficialFormat(
        folder="cifar-100-python", splits={"train": ("train",), "test": ("test",)},
        meta="meta", label_key="fine_labels", names_key="fine_label_names",
        torchvision_class="CIFAR100"),
}


def marker(name: str, root: Path) -> Path:
    """The file whose presence shows that ``root`` contains ``name`` in the official format."""
    fmt = FORMATS[name]
    return root / fmt.folder / fmt.splits["test"][0]


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


def read_split(name: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read one split: uint8 images (N, 3, 32, 32), int64 labels (N,) and the class names."""
    fmt = FORMATS[name]
    folder = Path(root) / fmt.folder
    images, labels = [], []
    for file in fmt.splits[split]:
        batch = _unpickle(folder / file)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[fmt.label_key], dtype=np.int64))
    classes = list(_unpickle(folder / fmt.meta)[fmt.names_key])
    return np.concatenate(images), np.concatenate(labels), classes


def download(name: str, root: Path) -> None:
    """Let torchvision fetch both splits of ``name`` into ``root`` (only if allowed by the caller)."""
    import torchvision

    log.info("downloading %s into %s", name, root)
    dataset_class = getattr(torchvision.datasets, FORMATS[name].torchvision_class)
    for train in (True, False):
        dataset_class(str(root), train=train, download=True)
