"""The benchmark's variants: pretraining steps, augmentation alone and the loss alone.

Every factory returns a :class:`benchmarks.timing.Runner`. Models, data and
optimisers are built once per variant and kept across turns; only DataLoader
iterators (and their worker processes) are created and shut down per turn.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dcl.augment import AugmentConfig
from dcl.losses import DCLLoss
from dcl.optim import build_optimizer
from dcl.tracking import Tracker
from dcl.train import Pretrainer, build_augment, build_model

LOADER_WORKERS = 2  # the DataLoader workers of the per-image baselines


def with_levers(settings: dict, width: int, channels_last: bool, precision: str) -> dict:
    """Return a copy of dataset ``settings`` with the model width and speed levers set."""
    settings = copy.deepcopy(settings)
    settings["model"]["width"] = width
    settings["model"]["channels_last"] = channels_last
    settings["pretrain"]["precision"] = precision
    settings["pretrain"]["knn_monitor_every"] = 0
    return settings


def build_pretrainer(settings: dict, images: np.ndarray, batch: int, threads: int,
                     folder: Path) -> Pretrainer:
    """Build the pipeline's :class:`Pretrainer` (DCL loss, one epoch) on ``images``."""
    cache = folder / f"cache_{len(images)}.npz"
    if not cache.exists():
        labels = np.zeros(len(images), dtype=np.int64)
        np.savez(cache, train_images=images, train_labels=labels, test_images=images[:16],
                 test_labels=labels[:16], classes=np.asarray(["image"]))
    run = {"dataset": "cifar10", "loss": "dcl", "backbone": settings["model"]["backbone"],
           "width": settings["model"]["width"], "batch_size": batch, "epochs": 1, "seed": 0}
    return Pretrainer(settings, run, cache, folder / "run", Tracker(None, "bench"), threads)


class OursRunner:
    """The pipeline's full step: gather a batch on the device, two views, model, loss, LARS."""

    def __init__(self, pretrainer: Pretrainer) -> None:
        self.trainer = pretrainer
        self.order = torch.randperm(len(pretrainer.source), generator=pretrainer.sampler_rng)
        self.position = 0
        self.stats: dict[str, list] = {"q_b": [], "pos_sim": [], "neg_sim": []}

    def step(self) -> None:
        trainer, size = self.trainer, self.trainer.batch_size
        if self.position + size > len(self.order):
            self.position = 0
        index = self.order[self.position : self.position + size].to(trainer.device)
        self.position += size
        # q_B statistics are off here; their cost is measured on their own (overhead_seconds).
        trainer._step(trainer.source.pretrain_images()[index], self.position // size, self.stats, record_qb=False)

    def close(self) -> None:
        pass


class ComputeRunner:
    """The compute-only bound: model, loss and LARS step on fixed, pre-augmented views.

    ``per_view`` runs one forward per view, as lightly's example does, so batch
    norm sees each view's B images instead of all 2B (the pipeline's choice).
    """

    def __init__(self, pretrainer: Pretrainer, per_view: bool = False) -> None:
        self.trainer, self.per_view = pretrainer, per_view
        batch = pretrainer.source.pretrain_images()[: pretrainer.batch_size]
        self.views = torch.cat(pretrainer.augment.two_views(batch, pretrainer.augment_rng))

    def step(self) -> None:
        trainer = self.trainer
        bf16 = trainer.settings["pretrain"]["precision"] == "bf16"
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=bf16):
            if self.per_view:
                z = torch.cat([trainer.model(view) for view in self.views.chunk(2)])
            else:
                z = trainer.model(self.views)
        loss = trainer.loss_fn(*z.float().chunk(2))
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    def close(self) -> None:
        pass


class HWCImages(Dataset):
    """Images held in memory as uint8 (N, H, W, 3), returned as PIL images through ``transform``.

    This is what ``torchvision.datasets.CIFAR10`` does per item.
    """

    def __init__(self, images: np.ndarray, transform: Any) -> None:
        self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.images[index])), 0


class LoaderRunner:
    """Batches from a DataLoader with 2 workers, optionally fed to a lightly-style step."""

    def __init__(self, dataset: Dataset, batch: int, train_step: Any = None) -> None:
        self.dataset, self.batch, self.train_step = dataset, batch, train_step
        self.iterator = None

    def _next(self) -> Any:
        if self.iterator is None:
            loader = DataLoader(self.dataset, batch_size=self.batch, shuffle=True, drop_last=True,
                                num_workers=LOADER_WORKERS)
            self.iterator = iter(loader)
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = None
            return self._next()

    def step(self) -> None:
        views, _ = self._next()
        if self.train_step is not None:
            self.train_step(views)

    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in getattr(self.iterator, "_workers", [])]

    def close(self) -> None:
        # Dropping the iterator shuts its worker processes down.
        self.iterator = None


def lightly_transform(augment: AugmentConfig) -> Any:
    """lightly's SimCLRTransform with the pipeline's augmentation settings."""
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(
        input_size=augment.image_size, cj_prob=augment.jitter_p,
        cj_strength=augment.jitter_strength, min_scale=augment.crop_scale[0],
        random_gray_scale=augment.grayscale_p, gaussian_blur=augment.blur_p,
        hf_prob=augment.flip_p, normalize={"mean": list(augment.mean), "std": list(augment.std)},
    )


def lightly_step(settings: dict, device: torch.device) -> Any:
    """A training step as lightly's SimCLR example writes it, with its ``DCLLoss``.

    The same backbone and projector and the same LARS optimiser as the
    pipeline, in float32 and the default memory layout; one forward per view.
    """
    from lightly.loss import DCLLoss as LightlyDCLLoss

    plain = copy.deepcopy(settings)
    plain["model"]["channels_last"] = False
    model = build_model(plain).to(device).train()
    opt = settings["pretrain"]
    optimizer = build_optimizer(model, opt["optimizer"], opt["base_lr"], opt["momentum"],
                                opt["weight_decay"], opt["lars_eta"])
    criterion = LightlyDCLLoss(temperature=settings["loss"]["temperature"])

    def train_step(views: list[torch.Tensor]) -> None:
        x0, x1 = (view.to(device) for view in views)
        loss = criterion(model(x0), model(x1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    return train_step


def torchvision_transform(augment: AugmentConfig) -> Any:
    """torchvision's per-image SimCLR transforms, two views per image (PIL in, tensors out)."""
    from torchvision import transforms as T

    strength = augment.jitter_strength
    view = T.Compose([
        T.RandomResizedCrop(augment.image_size, scale=augment.crop_scale, ratio=augment.crop_ratio),
        T.RandomHorizontalFlip(augment.flip_p),
        T.RandomApply([T.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)],
                      p=augment.jitter_p),
        T.RandomGrayscale(augment.grayscale_p),
        T.ToTensor(),
        T.Normalize(augment.mean, augment.std),
    ])
    return lambda image: [view(image), view(image)]


class AugmentRunner:
    """The pipeline's batched augmentation alone: gather B images on the device, two views."""

    def __init__(self, settings: dict, images: np.ndarray, batch: int, device: torch.device) -> None:
        self.augment = build_augment(settings)
        self.images = torch.from_numpy(images).to(device)
        self.batch, self.device = batch, device
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> None:
        index = torch.randint(len(self.images), (self.batch,), generator=self.generator)
        self.augment.two_views(self.images[index.to(self.device)], self.generator)

    def close(self) -> None:
        pass


class LossRunner:
    """Forward and backward of one loss on fixed (N, d) embeddings."""

    def __init__(self, loss_fn: Any, z1: torch.Tensor, z2: torch.Tensor) -> None:
        self.loss_fn, self.z1, self.z2 = loss_fn, z1, z2

    def step(self) -> None:
        self.z1.grad = self.z2.grad = None
        self.loss_fn(self.z1, self.z2).backward()

    def close(self) -> None:
        pass


def loss_inputs(n: int, dim: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Two correlated (N, d) float32 embeddings that require grad, as two views give."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dim, generator=generator)
    z1 = (base + 0.5 * torch.randn(n, dim, generator=generator)).to(device).requires_grad_()
    z2 = (base + 0.5 * torch.randn(n, dim, generator=generator)).to(device).requires_grad_()
    return z1, z2


def loss_agreement(n: int, dim: int, temperature: float, sigma: float, device: torch.device) -> dict:
    """Largest |ours - lightly| of DCL and DCLW values and gradients on the same inputs."""
    from lightly.loss import DCLLoss as LightlyDCL, DCLWLoss as LightlyDCLW

    from dcl.losses import DCLWLoss

    pairs = {"dcl": (DCLLoss(temperature), LightlyDCL(temperature=temperature)),
             "dclw": (DCLWLoss(temperature, sigma), LightlyDCLW(temperature=temperature, sigma=sigma))}
    result = {}
    for name, (ours, theirs) in pairs.items():
        values, grads = [], []
        for fn in (ours, theirs):
            z1, z2 = loss_inputs(n, dim, device, seed=1)
            value = fn(z1, z2)
            value.backward()
            values.append(value.item())
            grads.append(torch.cat((z1.grad, z2.grad)))
        result[name] = {"value_ours": values[0], "value_lightly": values[1],
                        "value_diff": abs(values[0] - values[1]),
                        "grad_diff": (grads[0] - grads[1]).abs().max().item()}
    return result


def overhead_seconds(pretrainer: Pretrainer, repeats: int) -> dict[str, float | None]:
    """Median seconds of one q_B diagnostics call and of one batched MLflow metrics call.

    The tracking call is None when MLflow is not installed.
    """
    import statistics
    import time

    z1, z2 = loss_inputs(pretrainer.batch_size, pretrainer.settings["model"]["projector_dim"],
                         pretrainer.device)
    z1, z2 = z1.detach(), z2.detach()
    stats: dict[str, list] = {"q_b": [], "pos_sim": [], "neg_sim": []}
    qb = []
    for _ in range(repeats):
        started = time.perf_counter()
        pretrainer._record_similarity(z1, z2, stats)
        qb.append(time.perf_counter() - started)
    result: dict[str, float | None] = {"qb": statistics.median(qb), "tracking": None}
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return result
    with tempfile.TemporaryDirectory() as folder:
        tracker = Tracker(f"sqlite:///{folder}/mlflow.db", "bench", Path(folder) / "artifacts")
        tracker.start("bench")
        metrics = {key: 0.5 for key in ("loss", "lr", "q_b_mean", "q_b_p10", "q_b_median",
                                         "q_b_p90", "pos_sim", "neg_sim", "seconds")}
        logged = []
        for step in range(repeats):
            started = time.perf_counter()
            tracker.log_metrics(metrics, step=step)
            logged.append(time.perf_counter() - started)
        tracker.finish("FINISHED")
    result["tracking"] = statistics.median(logged)
    return result


def profile_ops(runner: Any, steps: int, device: torch.device, top: int = 8) -> list[tuple[str, float]]:
    """Profile ``steps`` steps of ``runner``: the ``top`` operators by self time, as (name, share)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            runner.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [event for event in profiler.key_averages() if getattr(event, key, 0) > 0]
    total = sum(getattr(event, key) for event in events)
    events.sort(key=lambda event: getattr(event, key), reverse=True)
    return [(event.key, getattr(event, key) / total) for event in events[:top]]
