"""SimCLR pretraining with an InfoNCE, DCL or DCLW loss, on a uint8 dataset cache.

One call of :func:`pretrain` trains one run of the grid: it augments whole
batches on the training device, checkpoints after every epoch and resumes from
the newest valid checkpoint of its run folder, records per-epoch history
(loss, lr and NPC multiplier q_B statistics) and tracks the run in MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dcl import checkpoint
from dcl.atomic import atomic_path, write_json
from dcl.augment import AugmentConfig, SimCLRAugment
from dcl.datasets import balanced_indices, load_cache
from dcl.device import default_device
from dcl.evaluate import embed, knn_classify
from dcl.losses import build_loss, npc_multiplier
from dcl.models import ModelConfig, SimCLRModel
from dcl.optim import build_optimizer, scaled_lr, warmup_cosine
from dcl.tracking import Tracker

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite."""


def run_name(run: dict[str, Any]) -> str:
    """Human-facing run name, e.g. ``dcl_resnet18w16_1xb256_200e_cifar10_s0``."""
    return (f"{run['loss']}_{run['backbone']}w{run['width']}_1xb{run['batch_size']}"
            f"_{run['epochs']}e_{run['dataset']}_s{run['seed']}")


def build_augment(settings: dict[str, Any]) -> SimCLRAugment:
    aug = settings["augment"]
    return SimCLRAugment(AugmentConfig(
        image_size=aug["image_size"], crop_scale=tuple(aug["crop_scale"]),
        jitter_strength=aug["jitter_strength"], jitter_p=aug["jitter_p"],
        grayscale_p=aug["grayscale_p"], flip_p=aug["flip_p"], blur_p=aug["blur_p"],
    ))


def build_model(settings: dict[str, Any]) -> SimCLRModel:
    return SimCLRModel(ModelConfig(**settings["model"]))


class Pretrainer:
    """State of one pretraining run; :meth:`fit` trains it to the end."""

    def __init__(self, settings: dict, run: dict, cache: Path, run_dir: Path,
                 tracker: Tracker, threads: int) -> None:
        torch.set_num_threads(threads)
        torch.manual_seed(run["seed"])
        self.settings, self.run, self.run_dir, self.tracker = settings, run, Path(run_dir), tracker
        self.device = default_device()
        # The uint8 training set lives on the training device; batches are gathered there.
        data = load_cache(cache)
        self.images = torch.from_numpy(data["train_images"]).to(self.device)
        self.monitor = _monitor_split(data, settings["pretrain"])
        self.batch_size = run["batch_size"]
        self.steps_per_epoch = len(self.images) // self.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch size {self.batch_size} is larger than the {len(self.images)} training "
                "images: lower the batch size or enlarge train_subset")

        opt = settings["pretrain"]
        self.model = build_model(settings).to(self.device)
        self.augment = build_augment(settings)
        self.loss_fn = build_loss(
            run["loss"], temperature=settings["loss"]["temperature"], sigma=settings["loss"]["sigma"],
            detach_weight=settings["loss"]["dclw_detach_weight"],
            weight_min=settings["loss"]["dclw_weight_min"])
        self.lr = scaled_lr(opt["base_lr"], self.batch_size, opt["lr_scaling"])
        self.optimizer = build_optimizer(self.model, opt["optimizer"], self.lr, opt["momentum"],
                                         opt["weight_decay"], opt["lars_eta"])
        total = self.steps_per_epoch * run["epochs"]
        warmup = min(total, round(opt["warmup_epochs"] * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total, warmup))
        self.sampler_rng = torch.Generator().manual_seed(run["seed"])
        self.augment_rng = torch.Generator().manual_seed(run["seed"] + 1_000_003)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.elapsed = 0.0

    # -- checkpoints -------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler_rng": self.sampler_rng.get_state(), "augment_rng": self.augment_rng.get_state(),
            "torch_rng": torch.get_rng_state(), "history": self.history,
            "elapsed": self.elapsed, "mlflow_run_id": self.tracker.run_id or "",
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint written by :meth:`state` (tensors mapped to the training device)."""
        self.epoch = state["epoch"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler_rng.set_state(state["sampler_rng"])
        self.augment_rng.set_state(state["augment_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])
        self.elapsed = float(state["elapsed"])

    # -- training ----------------------------------------------------------
    def _step(self, batch: torch.Tensor, global_step: int, stats: dict, record_qb: bool) -> float:
        view1, view2 = self.augment.two_views(batch, self.augment_rng)
        bf16 = self.settings["pretrain"]["precision"] == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            z = self.model(torch.cat((view1, view2)))
        z1, z2 = z.float().chunk(2)
        loss = self.loss_fn(z1, z2)
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"loss is {loss.item()} at epoch {self.epoch + 1}, step {global_step}: the run "
                f"stopped; the last good checkpoint is in {self.run_dir / 'checkpoints'}. "
                "Lower the learning rate or raise the temperature and rerun.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if record_qb:
            self._record_similarity(z1.detach(), z2.detach(), stats)
        return loss.item()

    def _record_similarity(self, z1: torch.Tensor, z2: torch.Tensor, stats: dict) -> None:
        stats["q_b"].append(npc_multiplier(z1, z2, self.settings["loss"]["temperature"]))
        n1, n2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
        stats["pos_sim"].append((n1 * n2).sum(1).mean().item())
        sim = n1 @ n2.T
        off_diagonal = ~torch.eye(len(n1), dtype=torch.bool, device=sim.device)
        stats["neg_sim"].append(sim[off_diagonal].mean().item())

    def _epoch_summary(self, losses: list[float], stats: dict, seconds: float) -> dict[str, float]:
        q_b = torch.cat(stats["q_b"]).cpu() if stats["q_b"] else torch.full((1,), math.nan)
        quantiles = torch.quantile(q_b, torch.tensor([0.1, 0.5, 0.9]))
        return {
            "epoch": self.epoch, "loss": sum(losses) / len(losses),
            "lr": self.optimizer.param_groups[0]["lr"],
            "q_b_mean": q_b.mean().item(), "q_b_p10": quantiles[0].item(),
            "q_b_median": quantiles[1].item(), "q_b_p90": quantiles[2].item(),
            "pos_sim": sum(stats["pos_sim"]) / max(1, len(stats["pos_sim"])),
            "neg_sim": sum(stats["neg_sim"]) / max(1, len(stats["neg_sim"])),
            "seconds": seconds,
        }

    def knn_monitor(self) -> float:
        """Weighted kNN top-1 of the current backbone on the fixed monitor subset."""
        knn = self.settings["knn"]
        size = self.settings["augment"]["image_size"]
        self.model.eval()
        features = {
            "train_features": embed(self.model.backbone, self.monitor["train_images"], size),
            "train_labels": self.monitor["train_labels"],
            "test_features": embed(self.model.backbone, self.monitor["test_images"], size),
            "test_labels": self.monitor["test_labels"],
        }
        self.model.train()
        return knn_classify(features, knn["k"], knn["temperature"])["top1"]

    def train_epoch(self) -> dict[str, float]:
        started = time.perf_counter()
        self.model.train()
        order = torch.randperm(len(self.images), generator=self.sampler_rng)
        every = self.settings["pretrain"]["qb_every_steps"]
        losses, stats = [], {"q_b": [], "pos_sim": [], "neg_sim": []}
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{self.run['epochs']}",
                   mininterval=10, leave=False)
        for step in bar:
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            global_step = self.epoch * self.steps_per_epoch + step
            losses.append(self._step(self.images[index], global_step, stats, step % every == 0))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        self.epoch += 1
        summary = self._epoch_summary(losses, stats, time.perf_counter() - started)
        every = self.settings["pretrain"]["knn_monitor_every"]
        if every and (self.epoch % every == 0 or self.epoch == self.run["epochs"]):
            summary["knn_monitor_top1"] = self.knn_monitor()
        self.elapsed += time.perf_counter() - started
        return summary

    def fit(self) -> dict[str, Any]:
        """Train to the configured number of epochs, resuming if a checkpoint exists."""
        folder = self.run_dir / "checkpoints"
        state = checkpoint.load_latest(folder)
        if state is not None:
            self.restore(state)
        self.tracker.start(run_name(self.run), tags=_tags(self.run),
                           resume_run_id=(state or {}).get("mlflow_run_id") or None)
        if state is None:
            self.tracker.log_params({"run": self.run, "settings": self.settings, "lr": self.lr})
        try:
            while self.epoch < self.run["epochs"]:
                summary = self.train_epoch()
                self.history.append(summary)
                checkpoint.save(folder, self.epoch, self.state())
                checkpoint.prune(folder, self.settings["pretrain"]["checkpoints_kept"])
                metrics = {k: v for k, v in summary.items() if k != "epoch"}
                self.tracker.log_metrics(metrics, step=self.epoch)
                log.info("%s epoch %d: %s", run_name(self.run), self.epoch,
                         ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        return self.finish()

    def finish(self) -> dict[str, Any]:
        with atomic_path(self.run_dir / "backbone.pt") as tmp:
            torch.save(self.model.backbone.state_dict(), tmp)
        result = {
            "run": self.run, "settings": self.settings, "lr": self.lr, "history": self.history,
            "final": {"loss": self.history[-1]["loss"]} if self.history else {},
            "wall_seconds": self.elapsed, "mlflow_run_id": self.tracker.run_id,
        }
        write_json(self.run_dir / "settings.json", {"run": self.run, "settings": self.settings})
        self.tracker.log_artifact(self.run_dir / "settings.json")
        self.tracker.finish("FINISHED")
        write_json(self.run_dir / "pretrain.json", result)
        return result


def _monitor_split(data: dict, settings: dict) -> dict[str, torch.Tensor]:
    """Fixed class-balanced subsets of both splits for the kNN monitor (at most the split's size)."""
    subset = {}
    for split in ("train", "test"):
        labels = data[f"{split}_labels"]
        count = min(settings[f"knn_monitor_{split}"], len(labels))
        index = balanced_indices(labels, count)
        subset[f"{split}_images"] = torch.from_numpy(data[f"{split}_images"][index])
        subset[f"{split}_labels"] = torch.from_numpy(labels[index])
    return subset


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in run.items()} | {"stage": "pretrain"}


def pretrain(settings: dict, run: dict, cache: Path, run_dir: Path, tracker: Tracker,
             threads: int) -> dict[str, Any]:
    """Train one grid run; writes ``backbone.pt``, ``settings.json`` and, last, ``pretrain.json``."""
    return Pretrainer(settings, run, cache, run_dir, tracker, threads).fit()
