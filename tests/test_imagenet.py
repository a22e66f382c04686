"""Tests for dcl.imagenet: the shipped ImageNet-100 list, class-list links and their errors."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcl.config import REPO_ROOT
from dcl.datasets import DataError
from dcl.imagenet import WNID, check_root, link_classes, read_class_list

SHIPPED = REPO_ROOT / "config" / "imagenet100-classes.txt"
IMAGENETTE = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
              "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]


def make_root(root: Path, ids: list[str], per_class: int = 2, size: int = 40) -> Path:
    """An ImageNet-style root: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG."""
    for split in ("train", "val"):
        for label, wnid in enumerate(ids):
            for index in range(per_class):
                path = root / split / wnid / f"{wnid}_{index}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.full((size, size + 8, 3), 20 * label + index, dtype=np.uint8)
                Image.fromarray(pixels).save(path, quality=95)
    return root


def write_list(path: Path, ids: list[str]) -> Path:
    path.write_text("\n".join(ids) + "\n")
    return path


def test_shipped_list_has_100_distinct_wordnet_ids():
    ids = read_class_list(SHIPPED)

    assert len(ids) == 100
    assert len(set(ids)) == 100
    assert all(WNID.match(wnid) for wnid in ids)


def test_shipped_list_excludes_imagenette():
    assert not set(read_class_list(SHIPPED)) & set(IMAGENETTE)


def test_missing_class_is_named(tmp_path):
    root = make_root(tmp_path / "imagenet", IMAGENETTE[:3])
    listed = write_list(tmp_path / "classes.txt", [*IMAGENETTE[:3], "n09999999"])

    with pytest.raises(DataError) as info:
        link_classes(listed, root, tmp_path / "subset")

    assert "n09999999" in str(info.value)
    assert IMAGENETTE[0] not in str(info.value)
    assert not (tmp_path / "subset").exists()


def test_shipped_list_against_other_root_names_missing(tmp_path):
    root = make_root(tmp_path / "imagenet", IMAGENETTE[:2], per_class=1)

    with pytest.raises(DataError) as info:
        link_classes(SHIPPED, root, tmp_path / "imagenet100")

    assert "100 class(es)" in str(info.value)
    assert read_class_list(SHIPPED)[0] in str(info.value)


def test_links_not_copies(tmp_path):
    root = make_root(tmp_path / "imagenet", IMAGENETTE[:4])
    listed = write_list(tmp_path / "classes.txt", [IMAGENETTE[3], IMAGENETTE[1]])

    out = link_classes(listed, root, tmp_path / "subset")

    for split in ("train", "val"):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted([IMAGENETTE[3], IMAGENETTE[1]])
        link = out / split / IMAGENETTE[1]
        assert link.is_symlink()
        assert Path(os.readlink(link)) == (root / split / IMAGENETTE[1]).resolve()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_relinking_replaces_the_folder(tmp_path):
    root = make_root(tmp_path / "imagenet", IMAGENETTE[:3])
    out = tmp_path / "subset"
    link_classes(write_list(tmp_path / "a.txt", IMAGENETTE[:3]), root, out)

    link_classes(write_list(tmp_path / "b.txt", IMAGENETTE[:1]), root, out)

    assert [p.name for p in (out / "train").iterdir()] == [IMAGENETTE[0]]
    assert len(list((root / "train").iterdir())) == 3  # the source is untouched


@pytest.mark.parametrize(("lines", "message"), [
    (["n01440764", "n01440764"], "repeats"),
    (["n0144"], "not WordNet ids"),
    ([], "no WordNet ids"),
])
def test_bad_class_list_raises(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        read_class_list(write_list(tmp_path / "c.txt", lines))


def test_comments_and_blank_lines_ignored(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# header\nn01440764\n\nn02102040  # English springer\n")

    assert read_class_list(path) == ["n01440764", "n02102040"]


def test_root_without_val_shows_layout(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)

    with pytest.raises(DataError) as info:
        check_root(tmp_path / "imagenet")

    assert "val" in str(info.value)
    assert "WordNet id" in str(info.value)
