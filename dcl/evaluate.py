"""Evaluation of a frozen backbone: feature extraction, linear probe and weighted kNN.

Features are extracted once per run, with the backbone in eval mode (BatchNorm
statistics frozen) and deterministic preprocessing, and reused by both
evaluations. The linear probe chooses its learning rate and weight decay on a
held-out part of the training split and touches the test split once.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dcl.atomic import atomic_path
from dcl.augment import eval_transform
from dcl.models import ModelConfig, build_backbone
from dcl.device import default_device
from dcl.sources import open_source

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(backbone: nn.Module, images: torch.Tensor, image_size: int, batch_size: int = 512) -> torch.Tensor:
    """Backbone features (float32, on the CPU) of uint8 (N, 3, H, W) images, in batches."""
    batches = (images[start:start + batch_size] for start in range(0, len(images), batch_size))
    return embed_batches(backbone, batches, image_size)


@torch.no_grad()
def embed_batches(backbone: nn.Module, batches, image_size: int) -> torch.Tensor:
    """Backbone features (float32, on the CPU) of an iterable of uint8 (B, 3, H, W) batches."""
    device = next(backbone.parameters()).device
    chunks = []
    for batch in tqdm(batches, desc="features", mininterval=10, leave=False):
        chunks.append(backbone(eval_transform(batch.to(device), image_size=image_size)).float().cpu())
    return torch.cat(chunks)


def extract_features(settings: dict, weights: Path, cache: Path, out: Path,
                     threads: int, batch_size: int = 512) -> Path:
    """Write backbone features of the train and test splits to ``out`` (.npz, float32)."""
    torch.set_num_threads(threads)
    backbone = build_backbone(ModelConfig(**settings["model"]))
    backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    backbone.to(default_device()).eval()
    source = open_source(cache, settings)
    size = settings["augment"]["image_size"]
    arrays = {}
    for split in ("train", "test"):
        batches = source.eval_batches(split, batch_size)
        arrays[f"{split}_features"] = embed_batches(backbone, batches, size).numpy()
        arrays[f"{split}_labels"] = source.labels(split)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    log.info("features of %s: train %s, test %s", weights, arrays["train_features"].shape,
             arrays["test_features"].shape)
    return out


def load_features(path: Path) -> dict[str, torch.Tensor]:
    with np.load(path) as data:
        return {key: torch.from_numpy(data[key]) for key in data.files}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def train_linear(features: torch.Tensor, labels: torch.Tensor, classes: int, lr: float,
                 weight_decay: float, epochs: int, batch_size: int, seed: int) -> nn.Linear:
    """Fit a linear classifier with SGD (momentum 0.9) and a cosine schedule on fixed features."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * max(1, -(-len(features) // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), batch_size):
            index = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(head(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head


def _standardize(fit: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = fit.mean(0), fit.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (fit, *others)]


def _stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    fit, held_out = [], []
    for label in labels.unique():
        members = torch.nonzero(labels == label).squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        count = max(1, round(fraction * len(members)))
        held_out.append(members[:count])
        fit.append(members[count:])
    return torch.cat(fit), torch.cat(held_out)


def linear_probe(features: dict[str, torch.Tensor], settings: dict, seed: int) -> dict[str, Any]:
    """Choose (lr, weight decay) on a held-out split, refit on all training features, test once."""
    train_x, train_y = features["train_features"], features["train_labels"].long()
    classes = int(train_y.max()) + 1
    fit_index, val_index = _stratified_split(train_y, settings["val_fraction"], seed)
    fit_x, val_x = _standardize(train_x[fit_index], train_x[val_index])

    grid = []
    for lr, weight_decay in itertools.product(settings["lrs"], settings["weight_decays"]):
        head = train_linear(fit_x, train_y[fit_index], classes, lr, weight_decay,
                            settings["epochs"], settings["batch_size"], seed)
        with torch.no_grad():
            accuracy = _accuracy(head(val_x), train_y[val_index])
        grid.append({"lr": lr, "weight_decay": weight_decay, "val_top1": accuracy})
        log.info("linear probe lr=%g weight_decay=%g: validation top-1 %.2f", lr, weight_decay, accuracy)
    best = max(grid, key=lambda row: row["val_top1"])

    full_x, test_x = _standardize(train_x, features["test_features"])
    head = train_linear(full_x, train_y, classes, best["lr"], best["weight_decay"],
                        settings["epochs"], settings["batch_size"], seed)
    with torch.no_grad():
        top1 = _accuracy(head(test_x), features["test_labels"].long())
    return {"top1": top1, "val_top1": best["val_top1"],
            "best": {"lr": best["lr"], "weight_decay": best["weight_decay"]}, "search": grid}


@torch.no_grad()
def knn_classify(features: dict[str, torch.Tensor], k: int = 200, temperature: float = 0.1,
                 chunk: int = 512) -> dict[str, Any]:
    """Weighted kNN top-1: cosine similarity, k neighbours, votes weighted by exp(sim/temperature)."""
    bank = nn.functional.normalize(features["train_features"], dim=1)
    bank_labels = features["train_labels"].long()
    classes = int(bank_labels.max()) + 1
    queries = nn.functional.normalize(features["test_features"], dim=1)
    labels = features["test_labels"].long()
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), chunk):
        sim, index = (queries[start:start + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), classes)
        votes.scatter_add_(1, bank_labels[index], (sim / temperature).exp())
        correct += (votes.argmax(1) == labels[start:start + chunk]).sum().item()
    return {"top1": 100.0 * correct / len(queries), "k": k, "temperature": temperature}
