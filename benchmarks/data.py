"""Benchmark images: a class-balanced subset of CIFAR-10 as uint8 (N, 3, H, W).

Two sources give such arrays:

- an image-folder root (``<root>/cifar10/train/<class>/<i>.jpg``), decoded with
  the pipeline's own reader;
- a pack: one ``.npz`` with the JPEG files' bytes, small enough to copy to a
  machine without the data folder (``python -m benchmarks.data pack``). 20,000
  CIFAR-10 JPEGs take about 18 MB.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from dcl.datasets import _read_folder_split, balanced_indices, folder_files
from dcl.atomic import atomic_path


def folder_images(root: Path, count: int, threads: int = 2) -> np.ndarray:
    """Decode ``count`` class-balanced training images of ``root``/cifar10: uint8 (N, 3, H, W)."""
    images, _, _ = _read_folder_split(Path(root) / "cifar10", "train", count, threads)
    return images


def pack(root: Path, out: Path, count: int) -> Path:
    """Write the bytes of ``count`` class-balanced CIFAR-10 training JPEGs of ``root`` to ``out``.

    The ``.npz`` holds ``data`` (all files concatenated, uint8) and ``offsets``
    (int64, N + 1 boundaries into ``data``).
    """
    files, labels, _ = folder_files(Path(root) / "cifar10" / "train")
    chosen = [files[i] for i in balanced_indices(labels, count)]
    blobs = [path.read_bytes() for path in chosen]
    offsets = np.cumsum([0] + [len(blob) for blob in blobs]).astype(np.int64)
    with atomic_path(Path(out)) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, data=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets)
    return Path(out)


def packed_images(path: Path, count: int | None = None) -> np.ndarray:
    """Decode the first ``count`` (default all) images of a pack: uint8 (N, 3, H, W)."""
    with np.load(path) as stored:
        data, offsets = stored["data"], stored["offsets"]
    total = len(offsets) - 1
    if count is not None and count > total:
        raise ValueError(f"the pack {path} contains {total} images, fewer than the {count} requested: "
                         "pack more with python -m benchmarks.data pack --count")
    decoded = []
    for start, end in zip(offsets[: (count or total)], offsets[1 : (count or total) + 1]):
        with Image.open(io.BytesIO(data[start:end].tobytes())) as image:
            decoded.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return np.stack(decoded).transpose(0, 3, 1, 2).copy()


def load_images(source: Path, count: int) -> np.ndarray:
    """Return ``count`` images from a pack (a ``.npz`` file) or a data root (a folder)."""
    source = Path(source)
    if source.is_file():
        return packed_images(source, count)
    if (source / "cifar10" / "train").is_dir():
        return folder_images(source, count)
    raise ValueError(f"no benchmark images at {source}: give a data root that contains "
                     "cifar10/train/<class>/*.jpg, or a pack written by python -m benchmarks.data pack")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pack CIFAR-10 JPEG bytes for a benchmark elsewhere.")
    parser.add_argument("command", choices=["pack"])
    parser.add_argument("--data-root", type=Path, required=True, help="folder that contains cifar10/train")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    parser.add_argument("--count", type=int, default=20000, help="images to pack (default 20000)")
    args = parser.parse_args(argv)
    out = pack(args.data_root, args.out, args.count)
    print(f"wrote {args.count} JPEGs to {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
