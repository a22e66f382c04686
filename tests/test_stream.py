"""Tests for dcl.stream: the file index, worker decoding and crops."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcl.datasets import DataError
from dcl.stream import (FileImages, build_index, centre_crop, decode, is_index, load_index, loader,
                        random_square)
from test_imagenet import IMAGENETTE, make_root


@pytest.fixture()
def root(tmp_path):
    return make_root(tmp_path / "imagenet", IMAGENETTE[:3], per_class=4)


def test_index_lists_files_by_class(root, tmp_path):
    index = load_index(build_index("imagenet", root, tmp_path / "i.npz"))

    assert str(index["root"]) == str(root)
    assert index["classes"].tolist() == IMAGENETTE[:3]
    assert index["train_labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert index["test_files"][0] == f"val/{IMAGENETTE[0]}/{IMAGENETTE[0]}_0.JPEG"
    assert is_index(tmp_path / "i.npz")


def test_index_balanced_subset(root, tmp_path):
    index = load_index(build_index("imagenet", root, tmp_path / "i.npz", train_subset=6, test_subset=3))

    assert index["train_labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert index["test_labels"].tolist() == [0, 1, 2]


def test_index_of_official_layout_raises(tmp_path):
    from test_stl10 import write_stl10

    write_stl10(tmp_path / "stl10")

    with pytest.raises(DataError, match="data.source: memory"):
        build_index("stl10", tmp_path / "stl10", tmp_path / "i.npz")


def test_index_classes_must_match(root, tmp_path):
    (root / "val" / IMAGENETTE[2]).rename(root / "val" / "n09999999")

    with pytest.raises(DataError, match="n09999999"):
        build_index("imagenet", root, tmp_path / "i.npz")


def test_decode_jpeg_and_png(tmp_path):
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).convert("L").save(tmp_path / "b.JPEG")

    assert decode(tmp_path / "a.png").tolist() == torch.from_numpy(pixels).permute(2, 0, 1).tolist()
    assert decode(tmp_path / "b.JPEG").shape == (3, 4, 6)  # grayscale becomes RGB


def test_decode_error_names_file(tmp_path):
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")

    with pytest.raises(DataError, match="bad.JPEG"):
        decode(bad)


def test_random_square_is_a_square_of_the_image():
    image = torch.zeros(3, 10, 30, dtype=torch.uint8)
    image[:, :, 20:] = 200
    rng = np.random.default_rng(0)

    crops = [random_square(image, 10, np.random.default_rng(seed)) for seed in range(20)]

    assert all(crop.shape == (3, 10, 10) and crop.dtype == torch.uint8 for crop in crops)
    assert len({int(crop.float().mean()) for crop in crops}) > 1  # the position varies
    assert random_square(image, 5, rng).shape == (3, 5, 5)


def test_centre_crop_shape():
    image = torch.randint(0, 255, (3, 40, 60), dtype=torch.uint8)

    assert centre_crop(image, 32, 28).shape == (3, 28, 28)


def test_batches_do_not_depend_on_workers(root, tmp_path):
    index = load_index(build_index("imagenet", root, tmp_path / "i.npz"))
    images = FileImages(index["root"], index["train_files"], "pretrain", 24)
    plan = [[(i, (7, i)) for i in (3, 0, 11)], [(i, (7, i)) for i in (5, 6)]]

    serial = list(loader(images, plan, workers=0, pin=False))
    parallel = list(loader(images, plan, workers=2, pin=False))

    assert [b.shape for b in serial] == [(3, 3, 24, 24), (2, 3, 24, 24)]
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)


def test_unknown_mode_raises(root):
    with pytest.raises(ValueError, match="mode"):
        FileImages(root, np.asarray([]), "train", 8)


def test_missing_imagenet_root_shows_layout(tmp_path):
    root = tmp_path / "imagenet"

    with pytest.raises(DataError) as info:
        build_index("imagenet", root, tmp_path / "i.npz")

    message = str(info.value)
    assert f"{root}/val/<wnid>/*.JPEG" in message
    assert "does not exist" in message
    assert "allow_download" not in message  # ImageNet cannot be downloaded


def test_flat_val_folder_raises(root, tmp_path):
    for folder in list((root / "val").iterdir()):
        for image in folder.iterdir():
            image.rename(root / "val" / image.name)
        folder.rmdir()

    with pytest.raises(DataError, match="no class folders"):
        build_index("imagenet", root, tmp_path / "i.npz")
