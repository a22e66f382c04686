"""SimCLR pretraining with an InfoNCE, DCL or DCLW loss, on a uint8 dataset cache.

One call of :func:`pretrain` trains one run of the grid: it augments whole
batches on the training device, checkpoints after every epoch and resumes from
the newest valid checkpoint of its run folder, records per-epoch history
(loss, lr and NPC multiplier q_B statistics) and tracks the run in MLflow.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dcl import checkpoint, dist
from dcl.atomic import atomic_path, remove_temporaries, write_json, write_text
from dcl.augment import AugmentConfig, SimCLRAugment
from dcl.config import validate_dataset_settings
from dcl.device import default_device
from dcl.evaluate import embed, knn_classify
from dcl.losses import build_loss, npc_multiplier
from dcl.models import ModelConfig, SimCLRModel
from dcl.optim import build_optimizer, scaled_lr, warmup_cosine
from dcl.sources import monitor_split, open_source
from dcl.sync_bn import convert_sync_batchnorm
from dcl.tracking import Tracker

log = logging.getLogger(__name__)

# Settings a checkpoint must share with the run that resumes from it: everything that
# changes the trained weights or the recorded history. Evaluation settings and
# pretrain.checkpoints_kept may change between attempts.
COMPARED_SETTINGS = ("train_subset", "model", "augment", "loss", "pretrain")
COMPARED_RUN = ("dataset", "loss", "backbone", "width", "batch_size", "epochs", "seed")
OUTPUTS = ("backbone.pt", "settings.json", "pretrain.json")


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
        # Training does not use these generators yet. They are seeded and checkpointed so
        # that any future use resumes exactly.
        random.seed(run["seed"])
        np.random.seed(run["seed"])
        self.settings, self.run, self.run_dir = settings, run, Path(run_dir)
        # Data-parallel ranks (WORLD_SIZE > 1) split each global batch; rank 0 writes files and tracks.
        dist.check_batch(run["batch_size"], dist.env_world_size())
        self.device = dist.init_from_env() if dist.env_world_size() > 1 else default_device()
        self.tracker = tracker if dist.is_main() else Tracker(None, tracker.experiment)
        self.shard = dist.shard(run["batch_size"])
        # Uint8 batches come from the dataset's source (dcl.sources): gathered from a cache
        # on the training device, or decoded from disk by DataLoader workers.
        self.source = open_source(cache, settings, self.device)
        self.monitor = monitor_split(self.source, settings["pretrain"])
        self.batch_size = run["batch_size"]
        self.steps_per_epoch = len(self.source) // self.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch size {self.batch_size} is larger than the {len(self.source)} training "
                "images: lower the batch size or enlarge train_subset")

        opt = settings["pretrain"]
        self.model = build_model(settings).to(self.device)
        self.network = self.model
        if dist.is_distributed():
            # SimCLR's global BN: batch statistics over all ranks, as in one process.
            self.model = convert_sync_batchnorm(self.model, self.device)
            self.network = torch.nn.parallel.DistributedDataParallel(self.model)
        self.augment = build_augment(settings)
        self.loss_fn = build_loss(
            run["loss"], temperature=settings["loss"]["temperature"], sigma=settings["loss"]["sigma"],
            detach_weight=settings["loss"]["dclw_detach_weight"],
            weight_min=settings["loss"]["dclw_weight_min"], gather_distributed=dist.is_distributed())
        self.lr = scaled_lr(opt["base_lr"], self.batch_size, opt["lr_scaling"])
        self.last_lr = self.lr
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
        """Return everything a resumed run needs to continue bit-identically (tensors and plain values)."""
        return {
            "epoch": self.epoch, "step": self.epoch * self.steps_per_epoch,
            "model": self.model.state_dict(),  # backbone and projector
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler_rng": self.sampler_rng.get_state(), "augment_rng": self.augment_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(), "numpy_rng": _numpy_rng_state(),
            "history": self.history, "elapsed": self.elapsed,
            "mlflow_run_id": self.tracker.run_id or "",
            "run": self.run, "settings": self.settings,
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
        cuda_rng = state.get("cuda_rng") or []
        if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        if "python_rng" in state:  # absent from checkpoints of earlier versions
            random.setstate(_as_tuples(state["python_rng"]))
        if "numpy_rng" in state:
            _set_numpy_rng_state(state["numpy_rng"])
        self.history = list(state["history"])
        self.elapsed = float(state["elapsed"])

    def resume_from(self, state: dict[str, Any], path: Path) -> None:
        """:meth:`restore` a checkpoint after checking that it belongs to this run.

        Raises:
            checkpoint.CheckpointError: naming ``path``, what differs and the fix.
        """
        start_over = (f"Rerun with the settings it was written with, or delete {path.parent} "
                      "to start this run over.")
        differences = _differences(state, self.settings, self.run)
        if differences:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} was written with other settings ({'; '.join(differences)}). "
                + start_over)
        try:
            self.restore(state)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} does not fit this run ({type(error).__name__}: "
                f"{str(error)[:300]}). " + start_over) from error

    # -- training ----------------------------------------------------------
    def _step(self, batch: torch.Tensor, global_step: int, stats: dict, record_qb: bool) -> float:
        view1, view2 = self.augment.two_views(batch, self.augment_rng, self.shard, self.batch_size)
        bf16 = self.settings["pretrain"]["precision"] == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            z = self.network(torch.cat((view1, view2)))
        z1, z2 = z.float().chunk(2)
        loss = self.loss_fn(z1, z2)
        # The mean over ranks, so that every rank stops at the same step.
        value = dist.mean_over_ranks(loss.item())
        if not math.isfinite(value):
            raise DivergenceError(
                f"loss is {value} at epoch {self.epoch + 1}, step {global_step}: the run "
                f"stopped; the last good checkpoint is in {self.run_dir / 'checkpoints'}. "
                "Lower the learning rate or raise the temperature and rerun.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if record_qb:
            self._record_similarity(dist.gather_detached(z1), dist.gather_detached(z2), stats)
        return value

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
            # The rate of the epoch's last step: after the final scheduler step it is 0.
            "lr": self.last_lr,
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
        order = torch.randperm(len(self.source), generator=self.sampler_rng)
        every = self.settings["pretrain"]["qb_every_steps"]
        losses, stats = [], {"q_b": [], "pos_sim": [], "neg_sim": []}
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{self.run['epochs']}",
                   mininterval=10, leave=False)
        # Each rank fetches only its slice of every global batch (all of it in one process).
        indices = [order[step * self.batch_size:(step + 1) * self.batch_size][self.shard]
                   for step in range(self.steps_per_epoch)]
        for step, batch in zip(bar, self.source.batches(indices, self.sampler_rng)):
            global_step = self.epoch * self.steps_per_epoch + step
            losses.append(self._step(batch, global_step, stats, step % every == 0))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        self.epoch += 1
        summary = self._epoch_summary(losses, stats, time.perf_counter() - started)
        every = self.settings["pretrain"]["knn_monitor_every"]
        if every and (self.epoch % every == 0 or self.epoch == self.run["epochs"]):
            # Rank 0 alone embeds the monitor subset, so each image counts once.
            if dist.is_main():
                summary["knn_monitor_top1"] = self.knn_monitor()
            dist.barrier()
        self.elapsed += time.perf_counter() - started
        return summary

    def fit(self) -> dict[str, Any]:
        """Train to the configured number of epochs, resuming if a checkpoint exists.

        A rerun after a kill continues the same MLflow run. It reads which epochs
        MLflow has recorded, logs the checkpointed epochs that are missing and skips the rest.
        """
        folder = self.run_dir / "checkpoints"
        if dist.is_main():
            checkpoint.prepare_folder(folder)
            remove_temporaries(self.run_dir, OUTPUTS)
        dist.barrier()
        state = checkpoint.load_latest(folder)
        if state is not None:
            self.resume_from(state, checkpoint.checkpoint_path(folder, state["epoch"]))
        self.tracker.start(run_name(self.run), tags=_tags(self.run),
                           resume_run_id=(state or {}).get("mlflow_run_id") or None,
                           token=_run_token(folder) if self.tracker.enabled else None)
        try:
            if state is None or self.tracker.created:
                self.tracker.log_params({"run": self.run, "settings": self.settings, "lr": self.lr})
            logged = self.tracker.logged_steps("loss")
            missing = [summary for summary in self.history if summary["epoch"] not in logged]
            if self.tracker.enabled and missing:
                for summary in missing:
                    self.tracker.log_metrics(_metrics(summary), step=summary["epoch"])
                log.info("logged the metrics of epoch(s) %s, which an earlier attempt checkpointed "
                         "but did not log", ", ".join(str(s["epoch"]) for s in missing))
            while self.epoch < self.run["epochs"]:
                summary = self.train_epoch()
                self.history.append(summary)
                if dist.is_main():
                    checkpoint.save(folder, self.epoch, self.state())
                    checkpoint.prune(folder, self.settings["pretrain"]["checkpoints_kept"])
                # An epoch retrained after its checkpoint was lost may already be in MLflow.
                self._log_epoch(summary, send=summary["epoch"] not in logged)
            return self.finish()
        except BaseException:
            self.tracker.finish("FAILED")
            raise

    def _log_epoch(self, summary: dict[str, float], send: bool) -> None:
        """Log one epoch's metrics, and send them to MLflow in one batch (step = epoch) if ``send``."""
        metrics = _metrics(summary)
        if send:
            self.tracker.log_metrics(metrics, step=summary["epoch"])
        if not dist.is_main():
            return
        log.info("%s epoch %d: %s", run_name(self.run), summary["epoch"],
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def finish(self) -> dict[str, Any]:
        """Write the backbone weights, ``settings.json`` and, last, ``pretrain.json`` (rank 0 only)."""
        result = {
            "run": self.run, "settings": self.settings, "lr": self.lr, "history": self.history,
            "final": {"loss": self.history[-1]["loss"]} if self.history else {},
            "wall_seconds": self.elapsed, "mlflow_run_id": self.tracker.run_id,
            "world_size": dist.world_size(),
        }
        if not dist.is_main():
            return result
        with atomic_path(self.run_dir / "backbone.pt") as tmp:
            torch.save(self.model.backbone.state_dict(), tmp)
        write_json(self.run_dir / "settings.json", {"run": self.run, "settings": self.settings})
        self.tracker.log_artifact(self.run_dir / "settings.json")
        self.tracker.finish("FINISHED")
        write_json(self.run_dir / "pretrain.json", result)
        return result


def _metrics(summary: dict[str, float]) -> dict[str, float]:
    """Return an epoch summary without its epoch number, which is the metrics' step."""
    return {key: value for key, value in summary.items() if key != "epoch"}


def _numpy_rng_state() -> dict[str, Any]:
    """Return NumPy's global RNG state as tensors and numbers, which weights-only loading accepts."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    return {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], state["key"].numpy().astype(np.uint32), state["position"],
                         state["has_gauss"], state["gauss"]))


def _as_tuples(value: Any) -> Any:
    """Convert a saved Python RNG state back into the nested tuples random.setstate expects."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value


def _differences(state: dict[str, Any], settings: dict, run: dict) -> list[str]:
    """List the settings that differ between a checkpoint and the run resuming from it."""
    found = []
    for source, current, keys in ((_with_defaults(state.get("settings")), settings, COMPARED_SETTINGS),
                                  (state.get("run"), run, COMPARED_RUN)):
        if source is None:  # checkpoints of earlier versions did not record them
            continue
        for key in keys:
            old, new = source.get(key), current.get(key)
            if key == "pretrain" and isinstance(old, dict) and isinstance(new, dict):
                old = {k: v for k, v in old.items() if k != "checkpoints_kept"}
                new = {k: v for k, v in new.items() if k != "checkpoints_kept"}
            if old != new:
                found.append(f"{key}: {old!r} in the checkpoint, {new!r} now")
    return found


def _with_defaults(settings: dict | None) -> dict | None:
    """Fill in the defaults of settings added since a checkpoint was written.

    A new setting whose default keeps the old behaviour (e.g. ``model.channels_last``)
    must not stop older checkpoints from resuming. Settings that no longer validate are
    compared as they are.
    """
    if settings is None:
        return None
    try:
        return validate_dataset_settings(settings, source="the checkpoint's settings")
    except ValueError:
        return settings


def _run_token(folder: Path) -> str:
    """Return the random token that names this run folder's MLflow run, creating it if needed.

    The token is kept in ``folder/mlflow_token`` and is on disk before the MLflow run
    is created, so a process killed before its first checkpoint finds the same run again.
    """
    path = Path(folder) / "mlflow_token"
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_hex(16)
    write_text(path, token + "\n")
    return token


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in run.items()} | {"stage": "pretrain"}


def pretrain(settings: dict, run: dict, cache: Path, run_dir: Path, tracker: Tracker,
             threads: int) -> dict[str, Any]:
    """Train one grid run; writes ``backbone.pt``, ``settings.json`` and, last, ``pretrain.json``.

    Under ``WORLD_SIZE`` > 1 every rank calls this; rank 0 writes the files.
    """
    try:
        return Pretrainer(settings, run, cache, run_dir, tracker, threads).fit()
    finally:
        dist.shutdown()
