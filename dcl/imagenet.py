"""ImageNet-style roots: WordNet-id class folders and class-list subsets (ImageNet-100).

An ImageNet root contains ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, one folder per
class named by its WordNet id (``n`` and eight digits), as ``torchvision.datasets.ImageFolder``
reads it. The validation images must already be sorted into class folders (the official
archive ships them flat; the usual ``valprep.sh`` script sorts them).

ImageNet-100 is the 100-class subset of CMC (Tian et al., 2019). :func:`link_classes`
materialises any class list as a new root whose class folders are symbolic links to the
full root's folders, so no image is copied.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from dcl.datasets import DataError

log = logging.getLogger(__name__)

WNID = re.compile(r"^n\d{8}$")
SPLITS = ("train", "val")


def read_class_list(path: Path) -> list[str]:
    """Read one WordNet id per line (blank lines and ``#`` comments ignored), in file order.

    Raises:
        DataError: the file is missing or empty, a line is not a WordNet id, or an id repeats.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class list {path} not found: pass a file with one WordNet id per line")
    ids = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    ids = [wnid for wnid in ids if wnid]
    if not ids:
        raise DataError(f"class list {path} contains no WordNet ids")
    bad = [wnid for wnid in ids if not WNID.match(wnid)]
    if bad:
        raise DataError(f"class list {path} has lines that are not WordNet ids (n + 8 digits): "
                        f"{bad[:5]}")
    repeated = sorted({wnid for wnid in ids if ids.count(wnid) > 1})
    if repeated:
        raise DataError(f"class list {path} repeats {repeated}: list every class once")
    return ids


def expected_layout(root: Path) -> str:
    return (f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG, one folder per class "
            "named by its WordNet id (e.g. n01440764), validation images sorted into class folders")


def check_root(root: Path) -> None:
    """Raise DataError naming the expected layout if ``root`` lacks ``train/`` or ``val/``."""
    root = Path(root)
    missing = [split for split in SPLITS if not (root / split).is_dir()]
    if missing:
        what = "does not exist" if not root.exists() else f"has no {' or '.join(missing)} folder"
        raise DataError(
            f"ImageNet root {root} {what}: expected {expected_layout(root)}. Point "
            "DCL_DATA_ROOT (or data_root in the config) at the folder that holds 'imagenet/'; "
            "ImageNet cannot be downloaded automatically (register at image-net.org).")


def missing_classes(root: Path, ids: list[str]) -> dict[str, list[str]]:
    """For each split, the ids of ``ids`` that have no class folder under ``root/split``."""
    return {split: [wnid for wnid in ids if not (Path(root) / split / wnid).is_dir()]
            for split in SPLITS}


def link_classes(class_list: Path, source: Path, out: Path) -> Path:
    """Create ``out/{train,val}/<wnid>`` as symbolic links to ``source``'s class folders.

    Only the classes of ``class_list`` are linked. The folder appears complete or not
    at all: links are made in a temporary sibling folder that is renamed at the end.

    Raises:
        DataError: the source root lacks ``train/``/``val/``, or a listed class is
            missing there; the message names every missing WordNet id and the split.
    """
    ids = read_class_list(class_list)
    source, out = Path(source).resolve(), Path(out)
    check_root(source)
    missing = {split: ids for split, ids in missing_classes(source, ids).items() if ids}
    if missing:
        listing = "; ".join(f"{split}: {', '.join(names)}" for split, names in missing.items())
        raise DataError(
            f"{len(set().union(*missing.values()))} class(es) of {class_list} are missing from "
            f"{source} ({listing}). Check that the root is the full ImageNet-1K and that "
            "its validation images are sorted into class folders.")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        (tmp / split).mkdir(parents=True)
        for wnid in ids:
            os.symlink(source / split / wnid, tmp / split / wnid, target_is_directory=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("linked %d classes of %s from %s into %s", len(ids), class_list, source, out)
    return out
