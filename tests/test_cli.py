"""Tests for dcl.cli: bad inputs exit with code 2, log the bad value and write nothing."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dcl.cli import LOSS_CHOICES, main
from dcl.config import REPO_ROOT
from dcl.losses import LOSS_NAMES

torch.set_num_threads(1)


@pytest.fixture()
def settings() -> dict:
    with open(REPO_ROOT / "config" / "smoke.yaml") as handle:
        return yaml.safe_load(handle)["datasets"]["cifar10"]


@pytest.fixture()
def cache(tmp_path) -> Path:
    path = tmp_path / "cache.npz"
    rng = np.random.default_rng(0)
    np.savez(path, train_images=rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8),
             train_labels=np.arange(8) % 2, test_images=rng.integers(0, 256, (4, 3, 32, 32),
                                                                       dtype=np.uint8),
             test_labels=np.arange(4) % 2, classes=np.asarray(["a", "b"]))
    return path


def _pretrain_args(run_dir: Path, settings_json: str, cache: Path, **overrides) -> list[str]:
    options = {"--loss": "dcl", "--batch-size": "4", "--epochs": "1"} | overrides
    args = ["pretrain", "--settings", settings_json, "--dataset", "cifar10",
            "--run-dir", str(run_dir), "--cache", str(cache), "--threads", "1",
            "--tracking-uri", "none"]
    for key, value in options.items():
        args += [key, value]
    return args


def _errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_loss_choices_match_losses():
    assert LOSS_CHOICES == LOSS_NAMES


def test_unknown_loss_exits_2(tmp_path, settings, cache, capsys):
    run_dir = tmp_path / "run"

    with pytest.raises(SystemExit) as info:
        main(_pretrain_args(run_dir, json.dumps(settings), cache, **{"--loss": "simclr"}))

    assert info.value.code == 2
    assert "'simclr'" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize("value", ["1", "0", "-3"])
def test_batch_size_below_two(tmp_path, settings, cache, caplog, value):
    run_dir = tmp_path / "run"

    code = main(_pretrain_args(run_dir, json.dumps(settings), cache, **{"--batch-size": value}))

    assert code == 2
    assert f"--batch-size must be >= 2, got {value}" in _errors(caplog)
    assert not run_dir.exists()


def test_epochs_zero(tmp_path, settings, cache, caplog):
    run_dir = tmp_path / "run"

    code = main(_pretrain_args(run_dir, json.dumps(settings), cache, **{"--epochs": "0"}))

    assert code == 2
    assert "--epochs must be >= 1, got 0" in _errors(caplog)
    assert not run_dir.exists()


def test_invalid_settings_json(tmp_path, cache, caplog):
    run_dir = tmp_path / "run"

    code = main(_pretrain_args(run_dir, '{"model": {"width": 4,}}', cache))

    assert code == 2
    assert "--settings is not valid JSON" in _errors(caplog)
    assert '"width": 4,}' in _errors(caplog)
    assert not run_dir.exists()


@pytest.mark.parametrize("temperature", [0, -0.5])
def test_settings_bad_temperature(tmp_path, settings, cache, caplog, temperature):
    run_dir = tmp_path / "run"
    settings["loss"]["temperature"] = temperature

    code = main(_pretrain_args(run_dir, json.dumps(settings), cache))

    assert code == 2
    assert f"loss.temperature: {temperature} " in _errors(caplog)
    assert not run_dir.exists()


def test_missing_cache_file(tmp_path, settings, caplog):
    run_dir = tmp_path / "run"
    cache = tmp_path / "absent" / "cache.npz"

    code = main(_pretrain_args(run_dir, json.dumps(settings), cache))

    assert code == 2
    assert str(cache) in _errors(caplog)
    assert not run_dir.exists()


def test_batch_larger_than_cache(tmp_path, settings, cache, caplog):
    run_dir = tmp_path / "run"

    code = main(_pretrain_args(run_dir, json.dumps(settings), cache, **{"--batch-size": "16"}))

    assert code == 2
    assert "batch size 16 is larger than the 8 training images" in _errors(caplog)
    assert not run_dir.exists()


def test_missing_config_file(tmp_path, cache, caplog):
    run_dir = tmp_path / "run"
    config = tmp_path / "absent.yaml"
    args = ["pretrain", "--config", str(config), "--dataset", "cifar10", "--run-dir", str(run_dir),
            "--cache", str(cache), "--loss", "dcl", "--batch-size", "4", "--epochs", "1",
            "--threads", "1"]

    code = main(args)

    assert code == 2
    assert str(config) in _errors(caplog)
    assert not run_dir.exists()


def test_config_without_dataset_section(tmp_path, cache, caplog):
    run_dir = tmp_path / "run"
    args = ["knn", "--config", str(REPO_ROOT / "config" / "smoke.yaml"), "--dataset", "stl10",
            "--run-dir", str(run_dir), "--threads", "1"]

    code = main(args)

    assert code == 2
    assert "'stl10'" in _errors(caplog)
    assert not run_dir.exists()


def test_knn_missing_run_folder(tmp_path, settings, caplog):
    run_dir = tmp_path / "run"
    args = ["knn", "--settings", json.dumps(settings), "--dataset", "cifar10",
            "--run-dir", str(run_dir), "--threads", "1", "--tracking-uri", "none"]

    code = main(args)

    assert code == 2
    assert str(run_dir / "pretrain.json") in _errors(caplog)
    assert not run_dir.exists()


def test_prepare_data_missing_root(tmp_path, caplog):
    root = tmp_path / "data" / "cifar10"
    out = tmp_path / "cache" / "cifar10.npz"

    code = main(["prepare-data", "--dataset", "cifar10", "--data-root", str(root),
                 "--out", str(out), "--threads", "1"])

    assert code == 2
    assert str(root) in _errors(caplog)
    assert "DCL_DATA_ROOT" in _errors(caplog)
    assert not out.parent.exists()


def test_prepare_data_unreadable_image(tmp_path, caplog):
    root = tmp_path / "cifar10"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            path = root / split / cls / "0.png"
            path.parent.mkdir(parents=True)
            Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(b"\x89PNG but not really")
    out = tmp_path / "cache" / "cifar10.npz"

    code = main(["prepare-data", "--dataset", "cifar10", "--data-root", str(root),
                 "--out", str(out), "--threads", "1"])

    assert code == 2
    assert str(bad) in _errors(caplog)
    assert not out.parent.exists()
