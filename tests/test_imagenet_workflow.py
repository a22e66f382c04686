"""The ImageNet code path end to end: Imagenette (64 px) used as the ImageNet-1K root.

Folder layout with WordNet ids, a class list linked into an ImageNet-100-style subset,
the streaming source, a ResNet-50 with the ImageNet stem, blur in the augmentations,
then features, linear probe, kNN and the tables, all through the Snakemake workflow.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from test_imagenet import IMAGENETTE
from workflow_helpers import REPO, data_root, snakemake

LISTED = [IMAGENETTE[7], IMAGENETTE[2], IMAGENETTE[5], IMAGENETTE[0]]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (data_root() / "imagenette-64" / "val").is_dir(),
                       reason="Imagenette not found: set DCL_DATA_ROOT to the folder holding imagenette-64/"),
]


def _imagenet_settings(smoke: dict) -> dict:
    settings = copy.deepcopy(smoke)
    settings["model"].update(backbone="resnet50", width=4, cifar_stem=False)
    settings["augment"].update(image_size=56, crop_scale=[0.08, 1.0], jitter_strength=1.0, blur_p=0.5)
    settings["data"] = {"source": "stream", "workers": 1, "load_size": 64, "eval_resize": 64}
    settings["pretrain"].update(knn_monitor_train=100, knn_monitor_test=50)
    settings.update(train_subset=200, test_subset=100)
    return settings


def write_imagenet_config(folder):
    """A study of two datasets: the full root (``imagenet``) and a 4-class list of it."""
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    (folder / "data").mkdir()
    os.symlink(data_root() / "imagenette-64", folder / "data" / "imagenet")
    (folder / "classes.txt").write_text("\n".join(LISTED) + "\n")
    imagenet = _imagenet_settings(config["datasets"]["cifar10"])
    subset = copy.deepcopy(imagenet)
    subset["data"].update(class_list=str(folder / "classes.txt"), parent="imagenet")
    subset.update(train_subset=120, test_subset=40)
    config.update(output_root=str(folder / "out"), data_root=str(folder / "data"), tracking_uri="none")
    config["grid"].update(datasets=["imagenet", "imagenet100"], losses=["dcl"], batch_sizes=[32])
    config["datasets"] = {"imagenet": imagenet, "imagenet100": subset}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenet")
    config = write_imagenet_config(folder)
    result = snakemake(config, "all", timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return folder / "out"


def test_tables_have_the_run(imagenet_run):
    for dataset in ("imagenet", "imagenet100"):
        table = pd.read_csv(imagenet_run / "tables" / f"{dataset}_top1.csv")
        assert table["32_n"].tolist() == [1]
        assert 0 <= table["32"].iloc[0] <= 100
        assert (imagenet_run / "figures" / f"{dataset}_batch_size.png").is_file()


def test_class_list_is_linked_not_copied(imagenet_run):
    linked = imagenet_run / "data" / "imagenet100"
    for split in ("train", "val"):
        folders = sorted((linked / split).iterdir())
        assert [f.name for f in folders] == sorted(LISTED)
        assert all(f.is_symlink() for f in folders)


def test_index_holds_wordnet_classes(imagenet_run):
    with np.load(imagenet_run / "cache" / "imagenet100.npz") as index:
        assert index["classes"].tolist() == sorted(LISTED)
        assert np.bincount(index["train_labels"]).tolist() == [30] * 4
        assert str(index["kind"]) == "file-index"
    with np.load(imagenet_run / "cache" / "imagenet.npz") as index:
        assert index["classes"].tolist() == IMAGENETTE


def test_resnet50_with_imagenet_stem_and_blur(imagenet_run):
    run = imagenet_run / "runs" / "imagenet" / "resnet50-w4" / "dcl" / "bs32" / "ep1" / "seed0"
    weights = torch.load(run / "backbone.pt", weights_only=True)
    settings = yaml.safe_load((run / "settings.json").read_text())["settings"]

    assert weights["conv1.weight"].shape == (4, 3, 7, 7)           # 7×7 stride-2 stem
    assert weights["layer4.2.conv3.weight"].shape[0] == 4 * 8 * 4  # Bottleneck expansion 4
    assert settings["augment"]["blur_p"] == 0.5
    assert settings["data"]["source"] == "stream"
