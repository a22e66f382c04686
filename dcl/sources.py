"""Image sources for training and evaluation: one interface over a cache and a file index.

- :class:`MemorySource` reads a uint8 cache (:func:`dcl.datasets.load_cache`) and, for
  pretraining, keeps the whole training set on the training device and gathers batches
  by index there (CIFAR, STL-10). STL-10's unlabeled images join the train split.
- :class:`StreamSource` reads a file index (:mod:`dcl.stream`) and decodes every batch in
  DataLoader workers (ImageNet-scale sets).

Both hand out uint8 (B, 3, S, S) tensors; the batched augmentation (or the evaluation
transform) finishes them. :func:`open_source` picks the class from the file's contents
and checks it against the dataset's ``data.source`` setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcl import stream
from dcl.datasets import DataError, balanced_indices, load_cache

EVAL_BATCH = 256


class MemorySource:
    """Images of a uint8 cache; pretraining batches are gathered on ``device``."""

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        self.data = load_cache(path)
        self.device = torch.device(device)
        self._pretrain: torch.Tensor | None = None

    def pretrain_images(self) -> torch.Tensor:
        """Return all pretraining images as one uint8 (N, 3, H, W) tensor on the device."""
        if self._pretrain is None:
            parts = [self.data["train_images"]]
            if "unlabeled_images" in self.data:
                parts.append(self.data["unlabeled_images"])
            images = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self._pretrain = torch.from_numpy(images).to(self.device)
        return self._pretrain

    def __len__(self) -> int:
        """Number of pretraining images (train, plus unlabeled where the cache has them)."""
        extra = self.data.get("unlabeled_images")
        return len(self.data["train_images"]) + (0 if extra is None else len(extra))

    def batches(self, indices: list[torch.Tensor], generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Yield the uint8 pretraining images of each index tensor, on the device.

        ``generator`` is not used: gathering is deterministic.
        """
        images = self.pretrain_images()
        for index in indices:
            yield images[index]

    def labels(self, split: str) -> np.ndarray:
        return self.data[f"{split}_labels"]

    def eval_batches(self, split: str, batch_size: int = EVAL_BATCH,
                     index: np.ndarray | None = None) -> Iterator[torch.Tensor]:
        """Yield uint8 CPU batches of ``split`` (all images, or those of ``index``) in order."""
        images = self.data[f"{split}_images"]
        if index is not None:
            images = images[index]
        for start in range(0, len(images), batch_size):
            yield torch.from_numpy(images[start:start + batch_size])


class StreamSource:
    """Images of a file index, decoded by ``workers`` DataLoader processes.

    Pretraining images are random min-side squares resized to ``load_size``; evaluation
    images are centre crops of ``image_size`` after resizing the shorter side to
    ``eval_resize`` (see :mod:`dcl.stream`).
    """

    def __init__(self, path: Path, settings: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.index = stream.load_index(path)
        self.root = Path(str(self.index["root"]))
        self.device = torch.device(device)
        data, size = settings["data"], settings["augment"]["image_size"]
        self.workers = data["workers"]
        self.load_size = data["load_size"] or round(size * 8 / 7)
        self.eval_resize = data["eval_resize"] or round(size * 8 / 7)
        self.image_size = size

    def __len__(self) -> int:
        return len(self.index["train_files"])

    def batches(self, indices: list[torch.Tensor], generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Decode and yield the images of each index tensor, uint8 (B, 3, load_size, load_size).

        Draws one number from ``generator`` per call; item seeds derive from it and the
        image index, so the batches do not depend on the number of workers.
        """
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        plan = [[(int(i), (base, int(i))) for i in index] for index in indices]
        images = stream.FileImages(self.root, self.index["train_files"], "pretrain", self.load_size)
        pin = self.device.type == "cuda"
        for batch in stream.loader(images, plan, self.workers, pin):
            yield batch.to(self.device, non_blocking=pin)

    def labels(self, split: str) -> np.ndarray:
        return self.index[f"{split}_labels"]

    def eval_batches(self, split: str, batch_size: int = EVAL_BATCH,
                     index: np.ndarray | None = None) -> Iterator[torch.Tensor]:
        """Yield uint8 CPU centre crops of ``split`` (all images, or those of ``index``) in order."""
        files = self.index[f"{split}_files"]
        order = np.arange(len(files)) if index is None else np.asarray(index)
        plan = [order[start:start + batch_size].tolist() for start in range(0, len(order), batch_size)]
        images = stream.FileImages(self.root, files, "eval", self.image_size, self.eval_resize)
        yield from stream.loader(images, plan, self.workers, pin=False)


def open_source(path: Path, settings: dict[str, Any], device: torch.device | str = "cpu"):
    """Open the cache or file index at ``path`` as the source ``settings['data']['source']`` names.

    Raises:
        DataError: the file is of the other kind, with the fix.
    """
    path = Path(path)
    expected = settings["data"]["source"]
    if path.is_file():
        found = "stream" if stream.is_index(path) else "memory"
        if found != expected:
            raise DataError(
                f"{path} was prepared for data.source {found}, but the settings ask for "
                f"{expected}: delete it and rerun 'dcl prepare-data' (or the workflow)")
    if expected == "stream":
        return StreamSource(path, settings, device)
    return MemorySource(path, device)


def monitor_split(source, settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Fixed class-balanced subsets of both splits for the kNN monitor (at most the split's size).

    Returns uint8 CPU ``{split}_images`` (N, 3, S, S) and int64 ``{split}_labels`` for
    ``train`` and ``test``, N = ``knn_monitor_{split}`` rounded down to a multiple of the classes.
    """
    subset = {}
    for split in ("train", "test"):
        labels = source.labels(split)
        count = min(settings[f"knn_monitor_{split}"], len(labels))
        index = balanced_indices(labels, count)
        subset[f"{split}_images"] = torch.cat(list(source.eval_batches(split, index=index)))
        subset[f"{split}_labels"] = torch.from_numpy(labels[index])
    return subset
