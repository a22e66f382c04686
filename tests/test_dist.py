"""Data-parallel training on 2 CPU processes (gloo) against one process on the whole batch.

Each test starts its ranks with the environment ``torchrun`` or submitit exports
(RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT) and joins through
:func:`dcl.dist.init_from_env`, as a SLURM task does.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dcl import dist
from dcl.losses import build_loss
from dcl.models import ModelConfig, SimCLRModel
from dcl.optim import build_optimizer
from dcl.sync_bn import GlobalBatchNorm, convert_sync_batchnorm

WORLD = 2
LOSSES = [("infonce", True), ("dcl", True), ("dclw", True), ("dclw", False)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, port: int, target, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_from_env()
    try:
        target(rank, *args)
    finally:
        dist.shutdown()


def run_ranks(target, *args) -> None:
    """Run ``target(rank, *args)`` in WORLD processes that form one gloo process group."""
    mp.start_processes(_rank_main, args=(_free_port(), target, args), nprocs=WORLD,
                       start_method="spawn", join=True)


# -- the loss with gathered negatives --------------------------------------

def _embeddings(batch: int = 8, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    z1 = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)


def _loss_rank(rank: int, name: str, detach: bool, out: Path) -> None:
    z1, z2 = _embeddings()
    part = dist.shard(len(z1))
    z1 = z1[part].clone().requires_grad_()
    z2 = z2[part].clone().requires_grad_()
    loss = build_loss(name, 0.1, detach_weight=detach, gather_distributed=True)(z1, z2)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad1": z1.grad, "grad2": z2.grad}, out / f"rank{rank}.pt")


@pytest.mark.parametrize("name, detach", LOSSES)
def test_gathered_loss_matches_one_process(tmp_path, name, detach):
    z1, z2 = _embeddings()
    z1.requires_grad_()
    z2.requires_grad_()
    single = build_loss(name, 0.1, detach_weight=detach)(z1, z2)
    single.backward()

    run_ranks(_loss_rank, name, detach, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # Each rank's loss is the mean over its own anchors, and DDP averages gradients over ranks.
    mean = sum(r["loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean, single.detach(), rtol=0, atol=1e-12)
    grad1 = torch.cat([r["grad1"] for r in ranks]) / WORLD
    grad2 = torch.cat([r["grad2"] for r in ranks]) / WORLD
    torch.testing.assert_close(grad1, z1.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad2, z2.grad, rtol=0, atol=1e-12)


# -- DDP training steps with global BatchNorm ------------------------------

STEPS = 3
BATCH = 8


def _model() -> SimCLRModel:
    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", width=2, cifar_stem=True, projector_dim=16)
    return SimCLRModel(config).double()


def _views(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    shape = (BATCH, 3, 16, 16)
    return (torch.randn(shape, generator=generator, dtype=torch.float64),
            torch.randn(shape, generator=generator, dtype=torch.float64))


def _train(model, network, loss_fn, part: slice) -> list[float]:
    optimizer = build_optimizer(model, "lars", lr=2.0, momentum=0.9, weight_decay=1e-4, lars_eta=0.02)
    losses = []
    for step in range(STEPS):
        view1, view2 = _views(step)
        z1, z2 = network(torch.cat((view1[part], view2[part]))).chunk(2)
        loss = loss_fn(z1, z2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(dist.mean_over_ranks(loss.item()))
    return losses


def _train_rank(rank: int, name: str, out: Path) -> None:
    model = convert_sync_batchnorm(_model(), torch.device("cpu"))
    network = torch.nn.parallel.DistributedDataParallel(model)
    losses = _train(model, network, build_loss(name, 0.1, gather_distributed=True), dist.shard(BATCH))
    if rank == 0:
        torch.save({"losses": losses, "state": model.state_dict()}, out / "ddp.pt")


@pytest.mark.parametrize("name", ["infonce", "dclw"])
def test_ddp_steps_match_one_process(tmp_path, name):
    start = _model().state_dict()
    model = _model()
    losses = _train(model, model, build_loss(name, 0.1), slice(None))

    run_ranks(_train_rank, name, tmp_path)
    ddp = torch.load(tmp_path / "ddp.pt")

    assert ddp["losses"] == pytest.approx(losses, abs=1e-10)
    moved = max((model.state_dict()[k].double() - start[k].double()).abs().max().item() for k in start)
    assert moved > 1e-2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=0, atol=1e-9, msg=key)


def test_global_batchnorm_keeps_state_dict():
    model = _model()
    converted = convert_sync_batchnorm(_model(), torch.device("cpu"))

    assert any(isinstance(m, GlobalBatchNorm) for m in converted.modules())
    assert converted.state_dict().keys() == model.state_dict().keys()


def test_global_batchnorm_alone_is_batchnorm():
    inputs = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    plain = torch.nn.BatchNorm2d(4)
    converted = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), torch.device("cpu"))

    torch.testing.assert_close(converted(inputs), plain(inputs))


def test_two_views_part_matches_whole_batch():
    from dcl.augment import SimCLRAugment

    augment = SimCLRAugment()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    whole = augment.two_views(images, torch.Generator().manual_seed(5))
    parts = [augment.two_views(images[part], torch.Generator().manual_seed(5), part, 8)
             for part in (slice(0, 4), slice(4, 8))]

    for view in (0, 1):
        torch.testing.assert_close(torch.cat([p[view] for p in parts]), whole[view], rtol=0, atol=1e-5)


def test_two_views_rejects_wrong_part():
    from dcl.augment import SimCLRAugment

    images = torch.zeros((3, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match="part"):
        SimCLRAugment().two_views(images, torch.Generator(), slice(0, 4), 8)


def test_shard_rejects_uneven_batch(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 3)

    with pytest.raises(ValueError, match="batch size 32 does not divide over 3"):
        dist.shard(32)


def test_missing_rendezvous_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)

    with pytest.raises(ValueError, match="RANK, MASTER_ADDR"):
        dist.init_from_env()


# -- a whole pretraining run -----------------------------------------------

def _pretrain_settings() -> dict:
    from dcl.config import validate_dataset_settings

    return validate_dataset_settings({
        "model": {"backbone": "resnet18", "width": 2, "cifar_stem": True},
        "augment": {"crop_scale": [0.2, 1.0]}, "loss": {"temperature": 0.1},
        "pretrain": {"optimizer": "lars", "base_lr": 0.3, "warmup_epochs": 0.5, "qb_every_steps": 1,
                     "knn_monitor_every": 1, "knn_monitor_train": 32, "knn_monitor_test": 16},
        "linear_eval": {}, "knn": {"k": 5},
    })


def _pretrain_run(batch: int = 16) -> dict:
    return {"study": "test", "dataset": "cifar10", "loss": "dclw", "backbone": "resnet18",
            "width": 2, "batch_size": batch, "epochs": 2, "seed": 0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cache") / "cifar10.npz"
    np.savez(path, train_images=rng.integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8),
             train_labels=np.arange(64) % 4,
             test_images=rng.integers(0, 256, size=(16, 3, 32, 32), dtype=np.uint8),
             test_labels=np.arange(16) % 4, classes=np.asarray(["a", "b", "c", "d"]))
    return path


def _pretrain_rank(rank: int, cache: Path, run_dir: Path, batch: int) -> None:
    from dcl.tracking import Tracker
    from dcl.train import pretrain

    pretrain(_pretrain_settings(), _pretrain_run(batch), cache, run_dir, Tracker(None, "test"), 1)


def test_two_rank_pretraining_matches_one_process(tmp_path, cache):
    import json

    from dcl.tracking import Tracker
    from dcl.train import pretrain

    pretrain(_pretrain_settings(), _pretrain_run(), cache, tmp_path / "one", Tracker(None, "test"), 1)
    run_ranks(_pretrain_rank, cache, tmp_path / "two", 16)

    single = torch.load(tmp_path / "one" / "backbone.pt")
    parallel = torch.load(tmp_path / "two" / "backbone.pt")
    start = SimCLRModel(ModelConfig(backbone="resnet18", width=2, cifar_stem=True)).backbone.state_dict()
    assert max((single[k].float() - start[k].float()).abs().max().item() for k in single) > 1e-2
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-3, atol=1e-4, msg=key)
    history_one = json.loads((tmp_path / "one" / "pretrain.json").read_text())["history"]
    history_two = json.loads((tmp_path / "two" / "pretrain.json").read_text())
    assert history_two["world_size"] == WORLD
    for mine, theirs in zip(history_two["history"], history_one, strict=True):
        for metric in ("loss", "q_b_mean", "pos_sim", "knn_monitor_top1"):
            assert mine[metric] == pytest.approx(theirs[metric], rel=1e-3, abs=1e-4), metric


def test_two_rank_pretraining_rejects_uneven_batch(tmp_path, cache):
    with pytest.raises(Exception, match="batch size 15 does not divide over 2 processes"):
        run_ranks(_pretrain_rank, cache, tmp_path / "run", 15)
    assert not (tmp_path / "run" / "pretrain.json").exists()
