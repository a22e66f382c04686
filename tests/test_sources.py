"""Tests for dcl.sources: one interface over a uint8 cache and a streamed file index."""

import numpy as np
import pytest
import torch

from dcl.datasets import DataError, build_cache
from dcl.sources import MemorySource, StreamSource, monitor_split, open_source
from dcl.stream import build_index
from test_imagenet import IMAGENETTE, make_root


def _settings(source: str, size: int = 32) -> dict:
    return {"data": {"source": source, "workers": 0, "load_size": None, "eval_resize": None},
            "augment": {"image_size": size},
            "pretrain": {"knn_monitor_train": 6, "knn_monitor_test": 3}}


@pytest.fixture()
def root(tmp_path):
    return make_root(tmp_path / "imagenet", IMAGENETTE[:3], per_class=4, size=32)


def test_memory_and_stream_agree_on_labels(root, tmp_path):
    memory = open_source(build_cache("imagenet", root, tmp_path / "c.npz", threads=1), _settings("memory"))
    streamed = open_source(build_index("imagenet", root, tmp_path / "i.npz"), _settings("stream"))

    assert isinstance(memory, MemorySource) and isinstance(streamed, StreamSource)
    assert len(memory) == len(streamed) == 12
    for split in ("train", "test"):
        assert memory.labels(split).tolist() == streamed.labels(split).tolist()


def test_stream_batches_have_load_size(root, tmp_path):
    settings = _settings("stream", size=28)
    source = open_source(build_index("imagenet", root, tmp_path / "i.npz"), settings)

    batches = list(source.batches([torch.tensor([0, 5]), torch.tensor([11])], torch.Generator().manual_seed(0)))

    assert [tuple(b.shape) for b in batches] == [(2, 3, 32, 32), (1, 3, 32, 32)]  # 8/7 of 28
    assert all(b.dtype == torch.uint8 for b in batches)


def test_stream_batches_follow_the_generator(root, tmp_path):
    source = open_source(build_index("imagenet", root, tmp_path / "i.npz"), _settings("stream"))
    indices = [torch.tensor([0, 1, 2, 3])]

    first = next(source.batches(indices, torch.Generator().manual_seed(1)))
    again = next(source.batches(indices, torch.Generator().manual_seed(1)))

    assert torch.equal(first, again)


def test_eval_crops_have_image_size(root, tmp_path):
    source = open_source(build_index("imagenet", root, tmp_path / "i.npz"), _settings("stream", 24))

    batches = list(source.eval_batches("test", batch_size=2))

    assert sum(len(b) for b in batches) == 12
    assert batches[0].shape[1:] == (3, 24, 24)


def test_memory_batches_gather_by_index(tmp_path, root):
    source = open_source(build_cache("imagenet", root, tmp_path / "c.npz", threads=1), _settings("memory"))
    (batch,) = source.batches([torch.tensor([4, 0])], torch.Generator())

    assert torch.equal(batch[1], torch.from_numpy(source.data["train_images"][0]))


def test_monitor_split_is_balanced(root, tmp_path):
    source = open_source(build_index("imagenet", root, tmp_path / "i.npz"), _settings("stream"))

    subset = monitor_split(source, _settings("stream")["pretrain"])

    assert subset["train_images"].shape == (6, 3, 32, 32)
    assert np.bincount(subset["train_labels"].numpy()).tolist() == [2, 2, 2]
    assert subset["test_labels"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(("prepared", "asked"), [("memory", "stream"), ("stream", "memory")])
def test_source_mismatch_names_fix(root, tmp_path, prepared, asked):
    path = (build_cache("imagenet", root, tmp_path / "c.npz", threads=1) if prepared == "memory"
            else build_index("imagenet", root, tmp_path / "c.npz"))

    with pytest.raises(DataError, match=f"prepared for data.source {prepared}"):
        open_source(path, _settings(asked))


def _stream_settings(workers: int) -> dict:
    from dcl.config import validate_dataset_settings

    return validate_dataset_settings({
        "data": {"source": "stream", "workers": workers, "load_size": 28},
        "model": {"backbone": "resnet18", "width": 2, "cifar_stem": True},
        "augment": {"image_size": 24, "blur_p": 0.5},
        "loss": {},
        "pretrain": {"optimizer": "lars", "base_lr": 0.025, "warmup_epochs": 0.5,
                     "knn_monitor_train": 12, "knn_monitor_test": 12},
        "linear_eval": {}, "knn": {},
    })


def _stream_pretrain(index, run_dir, workers: int = 0):
    import dcl.train
    from dcl.tracking import Tracker

    run = {"study": "test", "dataset": "imagenet", "loss": "dcl", "backbone": "resnet18",
           "width": 2, "batch_size": 8, "epochs": 2, "seed": 0}
    dcl.train.pretrain(_stream_settings(workers), run, index, run_dir, Tracker(None, "x"), threads=1)
    return torch.load(run_dir / "backbone.pt", weights_only=True)


@pytest.fixture()
def cpu_training(monkeypatch):
    import dcl.train

    monkeypatch.setattr(dcl.train, "default_device", lambda: torch.device("cpu"))


def test_stream_pretraining_resumes_identically(root, tmp_path, cpu_training):
    index = build_index("imagenet", root, tmp_path / "i.npz")
    whole = _stream_pretrain(index, tmp_path / "whole")
    for name in ("pretrain.json", "backbone.pt", "checkpoints/epoch0002.pt"):
        (tmp_path / "whole" / name).unlink()

    resumed = _stream_pretrain(index, tmp_path / "whole")

    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_stream_pretraining_ignores_worker_count(root, tmp_path, cpu_training):
    index = build_index("imagenet", root, tmp_path / "i.npz")

    serial = _stream_pretrain(index, tmp_path / "serial", workers=0)
    parallel = _stream_pretrain(index, tmp_path / "parallel", workers=2)

    for key in serial:
        assert torch.equal(serial[key], parallel[key]), key
