"""Tests for dcl.train: a tiny pretraining run, determinism, resume and failure modes."""

import copy
import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dcl.train
from dcl.config import validate_dataset_settings
from dcl.models import ModelConfig, build_backbone
from dcl.tracking import Tracker
from dcl.train import DivergenceError, Pretrainer, pretrain, run_name

torch.set_num_threads(1)

IMAGES = 64


@pytest.fixture(autouse=True, scope="module")
def cpu_only():
    """Train on the CPU even where CUDA is visible.

    Bit-identical reruns need deterministic kernels, which CUDA does not promise by default.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dcl.train, "default_device", lambda: torch.device("cpu"))
        yield


def _settings(**pretrain_overrides) -> dict:
    raw = {
        "model": {"backbone": "resnet18", "width": 2, "cifar_stem": True},
        "augment": {"crop_scale": [0.2, 1.0]},
        "loss": {"temperature": 0.1},
        "pretrain": {"optimizer": "lars", "base_lr": 0.025, "lr_scaling": "sqrt",
                     "warmup_epochs": 0.5, "qb_every_steps": 2} | pretrain_overrides,
        "linear_eval": {},
        "knn": {},
    }
    return validate_dataset_settings(raw, source="test settings")


def _run(epochs: int = 2, batch_size: int = 16, loss: str = "dclw") -> dict:
    return {"study": "test", "dataset": "cifar10", "loss": loss, "backbone": "resnet18",
            "width": 2, "batch_size": batch_size, "epochs": epochs, "seed": 0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache in build_cache's format with random uint8 images."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cache") / "cifar10.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 256, size=(IMAGES, 3, 32, 32), dtype=np.uint8),
        train_labels=np.arange(IMAGES, dtype=np.int64) % 4,
        test_images=rng.integers(0, 256, size=(8, 3, 32, 32), dtype=np.uint8),
        test_labels=np.arange(8, dtype=np.int64) % 4,
        classes=np.asarray(["a", "b", "c", "d"]),
    )
    return path


def _pretrain(cache: Path, run_dir: Path, settings: dict | None = None, run: dict | None = None):
    return pretrain(settings or _settings(), run or _run(), cache, run_dir, Tracker(None, "x"),
                    threads=1)


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory) -> Path:
    """The folder of one uninterrupted 2-epoch run."""
    run_dir = tmp_path_factory.mktemp("finished")
    _pretrain(cache, run_dir)
    return run_dir


def _backbone_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "backbone.pt", map_location="cpu", weights_only=True)


def _assert_same_weights(left: dict, right: dict) -> None:
    assert sorted(left) == sorted(right)
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_pretrain_json_history(finished):
    result = json.loads((finished / "pretrain.json").read_text())

    assert len(result["history"]) == 2
    assert [entry["epoch"] for entry in result["history"]] == [1, 2]
    for entry in result["history"]:
        for key in ("loss", "lr", "q_b_mean", "q_b_p10", "q_b_median", "q_b_p90",
                    "pos_sim", "neg_sim"):
            assert math.isfinite(entry[key]), (entry["epoch"], key)


def test_knn_monitor_every_epoch(finished):
    history = json.loads((finished / "pretrain.json").read_text())["history"]

    for entry in history:
        assert 0 <= entry["knn_monitor_top1"] <= 100


def test_pretrain_json_final_loss(finished):
    result = json.loads((finished / "pretrain.json").read_text())

    assert result["final"]["loss"] == result["history"][-1]["loss"]
    assert result["lr"] == pytest.approx(0.025 * 4)
    assert result["run"] == _run()


def test_q_b_stats_ordered(finished):
    history = json.loads((finished / "pretrain.json").read_text())["history"]

    for entry in history:
        assert entry["q_b_p10"] >= 0
        assert entry["q_b_p10"] <= entry["q_b_median"]
        assert entry["q_b_median"] <= entry["q_b_p90"]
        assert entry["q_b_p90"] <= 1


def test_run_folder_contents(finished):
    names = sorted(p.name for p in finished.iterdir())
    checkpoints = sorted(p.name for p in (finished / "checkpoints").iterdir())

    assert names == ["backbone.pt", "checkpoints", "pretrain.json", "settings.json"]
    assert checkpoints == ["epoch0001.pt", "epoch0002.pt"]


def test_backbone_loads_into_fresh_model(finished):
    backbone = build_backbone(ModelConfig(**_settings()["model"]))

    backbone.load_state_dict(_backbone_state(finished), strict=True)

    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 16)


def test_pretrain_is_deterministic(cache, finished, tmp_path):
    _pretrain(cache, tmp_path / "again")

    _assert_same_weights(_backbone_state(finished), _backbone_state(tmp_path / "again"))


def test_resume_matches_uninterrupted(cache, finished, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "resumed"
    shutil.copytree(finished, run_dir)
    for name in ("pretrain.json", "backbone.pt", "checkpoints/epoch0002.pt"):
        (run_dir / name).unlink()
    epochs_trained = []
    original = Pretrainer.train_epoch

    def counting_train_epoch(self):
        epochs_trained.append(self.epoch + 1)
        return original(self)

    monkeypatch.setattr(Pretrainer, "train_epoch", counting_train_epoch)
    with caplog.at_level(logging.INFO, logger="dcl.checkpoint"):
        result = _pretrain(cache, run_dir)

    assert epochs_trained == [2]
    assert "epoch0001.pt" in caplog.text
    assert len(result["history"]) == 2
    _assert_same_weights(_backbone_state(finished), _backbone_state(run_dir))


def test_checkpoints_pruned(cache, tmp_path):
    _pretrain(cache, tmp_path, settings=_settings(checkpoints_kept=1))

    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    assert names == ["epoch0002.pt"]


def test_nan_loss_raises_divergence(cache, tmp_path, monkeypatch):
    def nan_loss(*args, **kwargs):
        return lambda z1, z2: (z1 * z2).sum() * float("nan")

    monkeypatch.setattr(dcl.train, "build_loss", nan_loss)

    with pytest.raises(DivergenceError, match=r"at epoch 1, step 0\b"):
        _pretrain(cache, tmp_path)
    assert not (tmp_path / "pretrain.json").exists()
    assert not (tmp_path / "backbone.pt").exists()


def test_huge_lr_raises_divergence(cache, tmp_path):
    settings = _settings(optimizer="sgd", base_lr=1e30, warmup_epochs=0)

    with pytest.raises(DivergenceError) as info:
        _pretrain(cache, tmp_path, settings=settings)

    assert re.search(r"step \d+", str(info.value))
    assert not (tmp_path / "pretrain.json").exists()


def test_batch_larger_than_dataset(cache, tmp_path):
    with pytest.raises(ValueError) as info:
        _pretrain(cache, tmp_path, run=_run(batch_size=128))

    assert "128" in str(info.value)
    assert str(IMAGES) in str(info.value)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_run_name_format():
    assert run_name(_run()) == "dclw_resnet18w2_1xb16_2e_cifar10_s0"


def test_checkpoint_without_new_setting_resumes():
    settings = _settings()
    older = copy.deepcopy(settings)
    del older["model"]["channels_last"]

    assert dcl.train._differences({"settings": older, "run": _run()}, settings, _run()) == []


def test_checkpoint_with_other_width_differs():
    settings = _settings()
    older = copy.deepcopy(settings)
    older["model"]["width"] = 4

    differences = dcl.train._differences({"settings": older, "run": _run()}, settings, _run())

    assert len(differences) == 1
    assert differences[0].startswith("model:")
