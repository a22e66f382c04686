"""Helpers for tests that run the Snakemake workflow on the smoke config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def data_root() -> Path:
    return Path(os.environ.get("DCL_DATA_ROOT", REPO / "data"))


needs_cifar10 = pytest.mark.skipif(
    not (data_root() / "cifar10" / "train").is_dir(),
    reason="real CIFAR-10 not found: set DCL_DATA_ROOT to the folder holding cifar10/",
)


def write_config(folder: Path, **changes) -> Path:
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["output_root"] = str(folder / "out")
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(config: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, *args, "--configfile", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def run_smoke(folder: Path) -> tuple[Path, Path]:
    """Run ``all`` on the smoke config under ``folder``; returns (output root, config path)."""
    config = write_config(folder)
    result = snakemake(config, "all")
    assert result.returncode == 0, result.stderr[-4000:]
    return folder / "out", config
