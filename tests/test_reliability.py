"""Reliability: exact resume after SIGKILL, atomic outputs, concurrent tracking, divergence, bad input.

docs/reliability.md lists each guarantee and the test here that proves it.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dcl.train
from dcl import checkpoint
from dcl.atomic import TEMPORARY, remove_temporaries, write_json
from dcl.cli import main
from dcl.config import validate_dataset_settings
from dcl.tracking import Tracker
from dcl.train import Pretrainer, build_model

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Subprocesses train on the CPU, where one thread gives bit-identical reruns.
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(autouse=True, scope="module")
def cpu_only():
    """Train in-process on the CPU even where CUDA is visible (deterministic kernels)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dcl.train, "default_device", lambda: torch.device("cpu"))
        yield


# -- helpers ------------------------------------------------------------------

def _images(rng: np.random.Generator, count: int) -> np.ndarray:
    """Blocky colour images with noise: enough structure that SimCLR keeps learning."""
    low = rng.integers(0, 256, (count, 3, 4, 4)).astype(np.float32)
    images = np.kron(low, np.ones((1, 1, 8, 8), dtype=np.float32))
    return np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)


def _write_cache(path: Path, train: int = 32, test: int = 16) -> Path:
    """A cache in dcl.datasets.build_cache's format with two classes."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_images=_images(rng, train), train_labels=np.arange(train) % 2,
             test_images=_images(rng, test), test_labels=np.arange(test) % 2,
             classes=np.asarray(["a", "b"]))
    return path


def _settings(width: int = 2, **pretrain) -> dict:
    raw = {
        "model": {"backbone": "resnet18", "width": width, "cifar_stem": True},
        "augment": {"crop_scale": [0.2, 1.0]},
        "loss": {"temperature": 0.1},
        "pretrain": {"optimizer": "lars", "base_lr": 0.025, "lr_scaling": "sqrt",
                     "warmup_epochs": 1, "qb_every_steps": 2, "knn_monitor_train": 16,
                     "knn_monitor_test": 16} | pretrain,
        "linear_eval": {},
        "knn": {"k": 5},
    }
    return validate_dataset_settings(raw, source="test settings")


def _pretrain_argv(run_dir: Path, cache: Path, settings: dict, epochs: int = 2,
                   tracking: str = "none", study: str = "reliability") -> list[str]:
    return ["pretrain", "--settings", json.dumps(settings), "--dataset", "cifar10",
            "--loss", "dcl", "--batch-size", "16", "--epochs", str(epochs), "--seed", "0",
            "--cache", str(cache), "--run-dir", str(run_dir), "--study", study,
            "--tracking-uri", tracking, "--threads", "1"]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path → content digest, or "folder"."""
    import hashlib

    if not root.exists():
        return {}
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def _tensors_equal(left, right) -> list[str]:
    """Paths inside two nested checkpoint structures where they differ (empty: bit-identical)."""
    if isinstance(left, torch.Tensor):
        same = isinstance(right, torch.Tensor) and left.dtype == right.dtype and torch.equal(left, right)
        return [] if same else ["<tensor>"]
    if isinstance(left, dict):
        if not isinstance(right, dict) or sorted(left, key=str) != sorted(right, key=str):
            return ["<keys>"]
        return [f"{key}.{where}" for key in left for where in _tensors_equal(left[key], right[key])]
    if isinstance(left, (list, tuple)):
        if not isinstance(right, (list, tuple)) or len(left) != len(right):
            return ["<length>"]
        return [f"{i}.{where}" for i, (a, b) in enumerate(zip(left, right))
                for where in _tensors_equal(a, b)]
    return [] if left == right else ["<value>"]


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> SimpleNamespace:
    """One finished 2-epoch run (both checkpoints kept), trained through the CLI in-process."""
    folder = tmp_path_factory.mktemp("template")
    cache = _write_cache(folder / "cache.npz")
    settings = _settings()
    assert main(_pretrain_argv(folder / "run", cache, settings)) == 0
    return SimpleNamespace(cache=cache, settings=settings, run=folder / "run")


def _copy_run(template: SimpleNamespace, destination: Path, keep: tuple[str, ...]) -> Path:
    """Copy the template's checkpoints named in ``keep`` into a fresh run folder."""
    folder = destination / "checkpoints"
    folder.mkdir(parents=True)
    for name in keep:
        shutil.copy2(template.run / "checkpoints" / name, folder / name)
    return destination


# -- 1. exact resume ------------------------------------------------------------

def test_checkpoint_holds_every_state(template):
    state = checkpoint.load_latest(template.run / "checkpoints")

    expected = {"epoch", "step", "model", "optimizer", "scheduler", "sampler_rng", "augment_rng",
                "torch_rng", "cuda_rng", "python_rng", "numpy_rng", "history", "mlflow_run_id",
                "run", "settings"}
    assert expected <= set(state)
    assert state["step"] == 2 * 2
    assert any(key.startswith("projector.") for key in state["model"])


def test_restore_python_numpy_rng(template, tmp_path):
    trainer = Pretrainer(template.settings, {"study": "s", "dataset": "cifar10", "loss": "dcl",
                                             "backbone": "resnet18", "width": 2, "batch_size": 16,
                                             "epochs": 2, "seed": 0},
                         template.cache, tmp_path, Tracker(None, "x"), threads=1)
    checkpoint.save(tmp_path, 1, trainer.state() | {"epoch": 1})
    expected = (random.random(), np.random.rand())
    random.seed(99)
    np.random.seed(99)

    trainer.restore(checkpoint.load_latest(tmp_path))

    assert random.random() == expected[0]
    assert np.random.rand() == expected[1]


@pytest.mark.parametrize("generator", ["sampler_rng", "augment_rng"])
def test_resume_detects_changed_rng(template, tmp_path, generator):
    """Control for the bit-identity checks: resuming with one RNG state off changes the weights."""
    run_dir = _copy_run(template, tmp_path / "run", keep=("epoch0001.pt",))
    state = checkpoint.load_latest(run_dir / "checkpoints")
    state[generator] = torch.Generator().manual_seed(12345).get_state()
    checkpoint.save(run_dir / "checkpoints", 1, state)

    assert main(_pretrain_argv(run_dir, template.cache, template.settings)) == 0

    reference = torch.load(template.run / "backbone.pt", weights_only=True)
    resumed = torch.load(run_dir / "backbone.pt", weights_only=True)
    assert _tensors_equal(reference, resumed) != []


def _newest_epoch(folder: Path) -> int:
    epochs = [int(m.group(1)) for p in folder.glob("epoch*.pt") if (m := checkpoint.NAME.match(p.name))]
    return max(epochs, default=0)


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"pretrain exited with {proc.returncode} early:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for pretrain's log:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)


class _Attempt:
    """One ``dcl pretrain`` subprocess whose log lines are timed as they arrive."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self.handle = open(log, "w")
        self.proc = subprocess.Popen([PYTHON, "-m", "dcl", *argv], cwd=REPO, env=CPU_ENV,
                                     stdout=self.handle, stderr=subprocess.STDOUT)
        self.seen: dict[str, float] = {}  # marker → monotonic time it was first read

    def _scan(self) -> None:
        text = self.log.read_text(errors="replace")
        now = time.monotonic()
        if re.search(r"(started|resumed) MLflow run", text):
            self.seen.setdefault("start", now)
        for epoch in re.findall(r"_s0 epoch (\d+):", text):
            self.seen.setdefault(f"epoch{epoch}", now)

    def wait_marker(self, marker: str, timeout: float = 300) -> float:
        def found() -> bool:
            self._scan()
            return marker in self.seen
        _wait_for(found, self.proc, self.log, timeout)
        return self.seen[marker]

    def close(self) -> int:
        code = self.proc.wait(timeout=300)
        self.handle.close()
        return code


@pytest.mark.slow
def test_sigkill_resume_is_exact(tmp_path):
    """SIGKILL at 10 random training steps, one at a time; each rerun resumes; the end is bit-identical."""
    from mlflow.tracking import MlflowClient

    epochs, steps_per_epoch = 6, 12
    total = epochs * steps_per_epoch
    cache = _write_cache(tmp_path / "cache.npz", train=16 * steps_per_epoch, test=16)
    settings = _settings(knn_monitor_train=16, knn_monitor_test=16)

    def argv(name: str) -> list[str]:
        store = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        return _pretrain_argv(tmp_path / name / "run", cache, settings, epochs=epochs,
                              tracking=store, study="kill")

    reference = _Attempt(argv("reference"), tmp_path / "reference.log")
    started = reference.wait_marker("start")
    assert reference.close() == 0
    epoch_seconds = (reference.wait_marker(f"epoch{epochs}") - started) / epochs

    run_dir = tmp_path / "killed" / "run"
    rng = random.Random(20221)
    targets = sorted(rng.sample(range(total), 10))
    resumed_from, first_log = [], None
    for index, target in enumerate(targets):
        resume_epoch = _newest_epoch(run_dir / "checkpoints")
        resumed_from.append(resume_epoch)
        attempt = _Attempt(argv("killed"), tmp_path / f"attempt{index}.log")
        first_log = first_log or attempt.log
        # Kill inside the epoch that contains the target step, at the target's place in it. A
        # target that earlier kills already passed becomes a random step of the resumed epoch.
        target_epoch, offset = target // steps_per_epoch, target % steps_per_epoch + rng.random()
        if target_epoch < resume_epoch:
            target_epoch, offset = resume_epoch, rng.random() * steps_per_epoch
        if target_epoch == resume_epoch:
            begun, seconds = attempt.wait_marker("start"), epoch_seconds
        else:  # time this attempt's previous epoch, which tracks the machine's current load
            begun = attempt.wait_marker(f"epoch{target_epoch}")
            before = "start" if target_epoch - 1 == resume_epoch else f"epoch{target_epoch - 1}"
            seconds = begun - attempt.seen[before]
        time.sleep(max(0.0, begun + 0.9 * seconds * offset / steps_per_epoch - time.monotonic()))
        assert attempt.proc.poll() is None, f"attempt {index} ended before its kill"
        attempt.proc.send_signal(signal.SIGKILL)
        assert attempt.close() == -signal.SIGKILL
        for path in (run_dir / "checkpoints").glob("epoch*.pt"):
            torch.load(path, map_location="cpu", weights_only=True)  # every final name is whole
        assert not (run_dir / "pretrain.json").exists()

    final = _Attempt(argv("killed"), tmp_path / "final.log")
    assert final.close() == 0, final.log.read_text()[-3000:]

    assert any(0 < epoch < epochs for epoch in resumed_from)
    expected = json.loads((tmp_path / "reference" / "run" / "pretrain.json").read_text())
    result = json.loads((run_dir / "pretrain.json").read_text())
    assert _without_seconds(result["history"]) == _without_seconds(expected["history"])
    assert result["final"] == expected["final"]
    backbone = torch.load(run_dir / "backbone.pt", weights_only=True)
    assert _tensors_equal(torch.load(tmp_path / "reference" / "run" / "backbone.pt",
                                     weights_only=True), backbone) == []
    last = f"checkpoints/epoch{epochs:04d}.pt"
    state = torch.load(run_dir / last, weights_only=True)
    state_expected = torch.load(tmp_path / "reference" / "run" / last, weights_only=True)
    for part in ("model", "optimizer", "scheduler", "sampler_rng", "augment_rng", "torch_rng"):
        assert _tensors_equal(state_expected[part], state[part]) == [], part

    torch.manual_seed(0)
    initial = build_model(settings).backbone.state_dict()
    moved = sum(((backbone[k] - initial[k]) ** 2).sum() for k in initial if initial[k].is_floating_point())
    size = sum((initial[k] ** 2).sum() for k in initial if initial[k].is_floating_point())
    assert (moved / size).sqrt() > 0.5

    leftovers = [p.name for p in run_dir.rglob("*") if TEMPORARY.match(p.name) or p.suffix == ".corrupt"]
    assert leftovers == []

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}")
    reference_client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'reference' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kill/cifar10").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id == result["mlflow_run_id"]
    assert f"started MLflow run {run.info.run_id}" in first_log.read_text()
    for key in expected["history"][0]:
        if key == "epoch":
            continue
        steps = [point.step for point in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), key
        if key == "seconds":
            continue
        values = {p.step: p.value for p in client.get_metric_history(run.info.run_id, key)}
        expected_values = {p.step: p.value for p in
                           reference_client.get_metric_history(expected["mlflow_run_id"], key)}
        assert values == expected_values, key


def test_unlogged_epochs_logged_on_resume(template, tmp_path, monkeypatch):
    """A kill between an epoch's checkpoint and its MLflow metrics: the rerun logs that epoch once."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    original = Tracker.log_metrics

    def killed_after_first(self, metrics, step):
        if step == 2:
            raise KeyboardInterrupt  # simulates a kill after epoch 2's checkpoint
        original(self, metrics, step)

    monkeypatch.setattr(Tracker, "log_metrics", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        main(_pretrain_argv(run_dir, template.cache, template.settings, tracking=store))
    monkeypatch.setattr(Tracker, "log_metrics", original)

    assert main(_pretrain_argv(run_dir, template.cache, template.settings, tracking=store)) == 0

    client = MlflowClient(tracking_uri=store)
    run = client.search_runs([client.get_experiment_by_name("reliability/cifar10").experiment_id])
    assert len(run) == 1
    assert run[0].info.status == "FINISHED"
    assert [p.step for p in client.get_metric_history(run[0].info.run_id, "loss")] == [1, 2]


def test_run_found_again_before_first_checkpoint(template, tmp_path, monkeypatch):
    """Killed after the MLflow run exists but before any checkpoint: the rerun continues that run."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"

    def killed_in_first_epoch(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Pretrainer, "train_epoch", killed_in_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            main(_pretrain_argv(run_dir, template.cache, template.settings, tracking=store))

    assert main(_pretrain_argv(run_dir, template.cache, template.settings, tracking=store)) == 0

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("reliability/cifar10").experiment_id])
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"


def test_retrained_epoch_logged_once(template, tmp_path):
    """An epoch retrained because its checkpoint was lost is not logged to MLflow a second time."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    assert main(_pretrain_argv(run_dir, template.cache, template.settings, tracking=store)) == 0
    (run_dir / "checkpoints" / "epoch0002.pt").write_bytes(b"lost")
    for name in ("pretrain.json", "backbone.pt"):
        (run_dir / name).unlink()

    assert main(_pretrain_argv(run_dir, template.cache, template.settings, tracking=store)) == 0

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("reliability/cifar10").experiment_id])
    assert len(runs) == 1
    assert [p.step for p in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2]


def test_params_logged_when_tracking_starts_late(template, tmp_path):
    """Resuming with tracking turned on after a run without it: the new MLflow run gets its params."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = _copy_run(template, tmp_path / "run", keep=("epoch0001.pt",))

    assert main(_pretrain_argv(run_dir, template.cache, template.settings, tracking=store)) == 0

    client = MlflowClient(tracking_uri=store)
    run = client.search_runs([client.get_experiment_by_name("reliability/cifar10").experiment_id])[0]
    assert run.data.params["run.batch_size"] == "16"
    assert [p.step for p in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


def test_resume_after_store_lost(template, tmp_path, caplog):
    """The tracking store was replaced: resuming still works, into a new run with every epoch."""
    from mlflow.tracking import MlflowClient

    run_dir = _copy_run(template, tmp_path / "run", keep=("epoch0001.pt",))
    state = checkpoint.load_latest(run_dir / "checkpoints")
    state["mlflow_run_id"] = "0123456789abcdef0123456789abcdef"  # a run of a store now gone
    checkpoint.save(run_dir / "checkpoints", 1, state)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    with caplog.at_level(logging.WARNING, logger="dcl.tracking"):
        code = main(_pretrain_argv(run_dir, template.cache, template.settings, tracking=store))

    assert code == 0
    assert "0123456789abcdef0123456789abcdef is not in" in caplog.text
    client = MlflowClient(tracking_uri=store)
    run = client.search_runs([client.get_experiment_by_name("reliability/cifar10").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert [p.step for p in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


# -- 2. atomic outputs ------------------------------------------------------------

_WRITER = """
import sys, time
from dcl.atomic import atomic_path
with atomic_path(sys.argv[1]) as temporary:
    with open(temporary, "w") as handle:
        handle.write('{"partial": ')
        handle.flush()
        print("writing", flush=True)
        time.sleep(120)
"""


@pytest.mark.parametrize("previous", [True, False], ids=["previous-file", "no-file"])
def test_kill_during_write(tmp_path, previous):
    target = tmp_path / "result.json"
    if previous:
        write_json(target, {"good": True})
    writer = subprocess.Popen([PYTHON, "-c", _WRITER, str(target)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"

    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)

    if previous:
        assert json.loads(target.read_text()) == {"good": True}
    else:
        assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert remove_temporaries(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir() if p != target] == []


def test_remove_temporaries_by_name(tmp_path):
    for name in (".backbone.pt.tmp-12-0123abcd", ".linear.json.tmp-13-89abcdef", "notes.tmp-1-00000000"):
        (tmp_path / name).write_text("x")

    removed = remove_temporaries(tmp_path, ("backbone.pt",))

    assert [p.name for p in removed] == [".backbone.pt.tmp-12-0123abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".linear.json.tmp-13-89abcdef",
                                                          "notes.tmp-1-00000000"]


def test_corrupt_checkpoint_set_aside(template, tmp_path, caplog):
    run_dir = _copy_run(template, tmp_path / "run", keep=("epoch0001.pt", "epoch0002.pt"))
    newest = run_dir / "checkpoints" / "epoch0002.pt"
    newest.write_bytes(newest.read_bytes()[:5000])

    with caplog.at_level(logging.INFO):
        code = main(_pretrain_argv(run_dir, template.cache, template.settings))

    assert code == 0
    assert str(newest) in _errors(caplog)
    assert (run_dir / "checkpoints" / "epoch0002.pt.corrupt").is_file()
    assert _tensors_equal(torch.load(template.run / "backbone.pt", weights_only=True),
                          torch.load(run_dir / "backbone.pt", weights_only=True)) == []


# Calls that write a file, by the name of their module or object (None: any object).
WRITERS = {"save": "torch", "savez": "np", "savez_compressed": "np", "savefig": None,
           "write_text": None, "write_bytes": None}


def _unguarded_writes(tree: ast.AST) -> list[int]:
    """Return the lines that write a file outside a ``with atomic_path(...) as name`` block.

    Lock files, which hold no result, are exempt.
    """
    found = []

    def visit(node: ast.AST, guarded: set[str]) -> None:
        if isinstance(node, ast.With):
            inner = set(guarded)
            for item in node.items:
                call = item.context_expr
                if not (isinstance(call, ast.Call) and isinstance(item.optional_vars, ast.Name)):
                    continue
                function = getattr(call.func, "id", None)
                opens_temporary = (function == "open" and call.args
                                   and getattr(call.args[0], "id", None) in guarded)
                if function == "atomic_path" or opens_temporary:
                    inner.add(item.optional_vars.id)
            for child in node.body:
                visit(child, inner)
            for item in node.items:
                visit(item.context_expr, guarded)
            return
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            target = None
            if name == "open" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and any(c in str(node.args[1].value) for c in "wax"):
                target = node.args[0]
            elif name in WRITERS and isinstance(node.func, ast.Attribute) and \
                    WRITERS[name] in (None, getattr(node.func.value, "id", None)):
                if name in ("write_text", "write_bytes"):
                    target = node.func.value
                elif node.args:
                    target = node.args[1] if name == "save" and len(node.args) > 1 else node.args[0]
            if target is not None and ".lock" in ast.unparse(target):
                target = None
            if target is not None and not (isinstance(target, ast.Name) and target.id in guarded):
                found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, set())
    return found


def test_file_writes_are_atomic():
    unguarded = {}
    for path in sorted((REPO / "dcl").glob("*.py")):
        lines = _unguarded_writes(ast.parse(path.read_text()))
        if lines:
            unguarded[path.name] = lines
    assert unguarded == {}


def test_write_check_catches_plain_write():
    tree = ast.parse("import torch\ntorch.save(state, path)\nwith atomic_path(p) as tmp:\n"
                     "    torch.save(state, tmp)\n")

    assert _unguarded_writes(tree) == [2]


# -- 3. concurrent tracking -------------------------------------------------------

_TRACKING_WORKER = """
import logging, os, sys, time
logging.basicConfig(level=logging.WARNING)
import mlflow.tracking  # loaded before the start signal, so that every worker starts at once
from dcl.tracking import Tracker
uri, go, index, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
tracker = Tracker(uri, "concurrent/cifar10")
tracker.start(f"run{index}", tags={"stage": "pretrain"})
tracker.log_params({"index": index})
for step in range(1, steps + 1):
    tracker.log_metrics({"loss": index + step / 8, "lr": step / 64, "q_b_mean": 1 / step}, step=step)
tracker.finish("FINISHED")
"""

WORKERS, STEPS = 8, 10


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(params=["sqlite", "server"])
def tracking_store(request, tmp_path):
    """A fresh sqlite store, or a fresh MLflow server on 127.0.0.1 over its own sqlite file."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mlflow.db'}"
        return
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "MLflow server did not answer within 180 s"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_concurrent_runs_recorded(tracking_store, tmp_path):
    from mlflow.tracking import MlflowClient

    go = tmp_path / "go"
    workers = [subprocess.Popen([PYTHON, "-c", _TRACKING_WORKER, tracking_store, str(go), str(i),
                                 str(STEPS)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(WORKERS)]
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [worker.communicate(timeout=300) for worker in workers]

    assert [worker.returncode for worker in workers] == [0] * WORKERS
    logs = "\n".join(stderr for _, stderr in outputs)
    assert "database is locked" not in logs
    client = MlflowClient(tracking_uri=tracking_store)
    experiments = [e for e in client.search_experiments() if e.name == "concurrent/cifar10"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id], max_results=100)
    assert sorted(run.info.run_name for run in runs) == sorted(f"run{i}" for i in range(WORKERS))
    for run in runs:
        index = int(run.info.run_name.removeprefix("run"))
        assert run.info.status == "FINISHED"
        for key, value in (("loss", lambda s: index + s / 8), ("lr", lambda s: s / 64),
                           ("q_b_mean", lambda s: 1 / s)):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted((p.step, p.value) for p in history) == \
                [(s, value(s)) for s in range(1, STEPS + 1)], (run.info.run_name, key)


# -- 4. divergence ----------------------------------------------------------------

def test_divergence_marks_run_failed(template, tmp_path, monkeypatch, caplog):
    """NaN at the first step of epoch 2: exit 3, step named, epoch 1 kept, MLflow run FAILED."""
    from mlflow.tracking import MlflowClient

    real_build_loss = dcl.train.build_loss
    calls = []

    def nan_from_third_step(*args, **kwargs):
        loss = real_build_loss(*args, **kwargs)

        def compute(z1, z2):
            calls.append(1)
            value = loss(z1, z2)
            return value * float("nan") if len(calls) > 2 else value
        return compute

    monkeypatch.setattr(dcl.train, "build_loss", nan_from_third_step)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"

    code = main(_pretrain_argv(run_dir, template.cache, template.settings, tracking=store))

    assert code == 3
    assert "epoch 2, step 2:" in _errors(caplog)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["epoch0001.pt"]
    assert checkpoint.load_latest(run_dir / "checkpoints")["epoch"] == 1
    assert not (run_dir / "pretrain.json").exists()
    assert not (run_dir / "backbone.pt").exists()
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("reliability/cifar10").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
    assert [p.step for p in client.get_metric_history(runs[0].info.run_id, "loss")] == [1]


# -- 5. bad input, one table ----------------------------------------------------------

@dataclass
class Case:
    """One failure: the command, what its message must name, and the advice it must give."""

    argv: list[str]
    names: list[str]
    advice: str
    runner: str = "cli"  # "cli" in-process, "user" as an unprivileged user, "snakemake"
    fault: Callable[[pytest.MonkeyPatch], None] | None = None
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def unprivileged() -> list[str]:
    """A command prefix that runs as a user created here, who cannot write root's folders.

    The interpreter may sit under /root (mode 0700), so the user keeps only the
    capability to read and search folders: writes follow the user's own permissions.
    """
    if os.geteuid() != 0:
        yield []
        return
    if shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("useradd and setpriv are needed to test as an unprivileged user")
    name = f"dcltest{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        ids = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True)
        uid = int(ids.stdout)
        gid = int(subprocess.run(["id", "-g", name], check=True, capture_output=True, text=True).stdout)
        yield ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture()
def where(template):
    """Create a world-readable scratch folder whose output root contains one unrelated file."""
    base = Path(tempfile.mkdtemp(prefix="dcl-bad-input-"))
    base.chmod(0o755)
    out = base / "out"
    out.mkdir()
    (out / "notes.txt").write_text("unrelated\n")
    cache = shutil.copy(template.cache, base / "cache.npz")
    Path(cache).chmod(0o644)
    try:
        yield SimpleNamespace(base=base, out=out, cache=Path(cache), template=template,
                              run=out / "runs" / "r")
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir():
                path.chmod(stat.S_IRWXU)
        shutil.rmtree(base)


def _study(where, change: dict) -> Path:
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["output_root"] = str(where.out)
    config["data_root"] = str(where.base / "data")
    for dotted, value in change.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = where.base / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _with_config(where, change: dict) -> list[str]:
    return ["pretrain", "--config", str(_study(where, change)), "--dataset", "cifar10",
            "--run-dir", str(where.run), "--cache", str(where.cache), "--loss", "dcl",
            "--batch-size", "16", "--epochs", "2", "--threads", "1", "--tracking-uri", "none"]


def _image_folders(root: Path, broken: str | None = None) -> Path:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            path = root / split / cls / "0.png"
            path.parent.mkdir(parents=True)
            Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
    if broken:
        (root / broken).write_bytes(b"\x89PNG but not an image")
    return root


def _prepare(where, root: Path) -> list[str]:
    return ["prepare-data", "--dataset", "cifar10", "--data-root", str(root),
            "--out", str(where.out / "cache" / "cifar10.npz"), "--threads", "1"]


def case_config_type(where):
    return Case(_with_config(where, {"datasets.cifar10.model.width": "four"}),
                names=["datasets.cifar10.model.width", "'four' is not of type 'integer'",
                       str(where.base / "study.yaml")], advice="Fix these values")


def case_config_range(where):
    return Case(_with_config(where, {"datasets.cifar10.pretrain.checkpoints_kept": 0}),
                names=["datasets.cifar10.pretrain.checkpoints_kept", "0 is less than the minimum of 1"],
                advice="Fix these values")


def case_config_unknown_name(where):
    return Case(_with_config(where, {"datasets.cifar10.pretrain.learning_rate": 0.1}),
                names=["datasets.cifar10.pretrain", "'learning_rate' was unexpected"],
                advice="Fix these values")


def case_data_root_missing(where):
    root = where.base / "nowhere" / "cifar10"
    return Case(_prepare(where, root), names=[str(root), "does not exist"],
                advice="Point DCL_DATA_ROOT")


def case_data_root_malformed(where):
    root = where.base / "data" / "cifar10"
    (root / "train" / "a").mkdir(parents=True)  # no test/ split
    return Case(_prepare(where, root), names=[str(root), "has neither accepted layout"],
                advice="Point DCL_DATA_ROOT")


def case_corrupt_image(where):
    root = _image_folders(where.base / "data" / "cifar10", broken="train/b/1.png")
    return Case(_prepare(where, root), names=[str(root / "train" / "b" / "1.png")],
                advice="Replace or delete the file")


def case_corrupt_cache(where):
    where.cache.write_bytes(where.cache.read_bytes()[:3000])
    return Case(_pretrain_argv(where.run, where.cache, where.template.settings),
                names=[str(where.cache), "unreadable"], advice="rerun 'dcl prepare-data'")


def case_incompatible_checkpoint(where):
    _copy_run(where.template, where.run, keep=("epoch0001.pt",))
    return Case(_pretrain_argv(where.run, where.cache, _settings(width=4)),
                names=[str(where.run / "checkpoints" / "epoch0001.pt"), "'width': 2",
                       "'width': 4"], advice="to start this run over")


def case_unwritable_output(where):
    if os.geteuid() != 0:
        where.out.chmod(0o555)
    return Case(_pretrain_argv(where.run, where.cache, where.template.settings),
                names=[str(where.out / "runs"), "Permission denied"],
                advice=f"Make {where.out} writable for this user", runner="user")


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    def save(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"PK\x03\x04 half a checkpoint")  # a partial write, then a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(torch, "save", save)


def case_checkpoint_write_fails(where):
    _copy_run(where.template, where.run, keep=("epoch0001.pt",))
    return Case(_pretrain_argv(where.run, where.cache, where.template.settings),
                names=[str(where.run / "checkpoints" / "epoch0002.pt"), "No space left on device"],
                advice="Free disk space", fault=_no_space)


def case_batch_world_size(where):
    config = _study(where, {"tracking_uri": "none", "launcher": "slurm",
                            "slurm.pretrain.gpus_per_node": 3})
    return Case(["all", "--configfile", str(config), "--cores", "1"],
                names=["grid.batch_sizes [32, 64] of cifar10", "gpus_per_node=3"],
                advice="multiples of 3", runner="snakemake")


def case_unknown_target(where):
    config = _study(where, {"tracking_uri": "none"})
    return Case(["no_such_target", "--configfile", str(config), "--cores", "1"],
                names=["no_such_target"], advice="Ask for a rule", runner="snakemake")


CASES = [
    case_config_type, case_config_range, case_config_unknown_name,
    case_batch_world_size,
    case_data_root_missing, case_data_root_malformed, case_corrupt_image, case_corrupt_cache,
    case_incompatible_checkpoint, case_unwritable_output, case_checkpoint_write_fails,
    case_unknown_target,
]


@pytest.mark.parametrize("build", CASES, ids=lambda build: build.__name__.removeprefix("case_")
                         if callable(build) else None)
def test_bad_input(build, where, unprivileged, monkeypatch, caplog, capsys):
    case = build(where)
    before = _snapshot(where.out)

    if case.runner == "cli":
        if case.fault:
            case.fault(monkeypatch)
        try:
            code = main(case.argv)
        except SystemExit as exit_:
            code = exit_.code
        monkeypatch.undo()
        message = _errors(caplog) + capsys.readouterr().err
    else:
        command = ([*unprivileged, PYTHON, "-m", "dcl", *case.argv] if case.runner == "user"
                   else [PYTHON, "-m", "snakemake", *case.argv])
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                                env=CPU_ENV | {"HOME": str(where.base)})
        code, message = result.returncode, result.stdout + result.stderr

    assert code != 0
    for name in case.names:
        assert name in message
    assert case.advice in message
    assert _snapshot(where.out) == before


# -- 2, continued: a Snakemake job killed mid-way -----------------------------------------

def _pretrain_pids(run_dir: Path) -> list[int]:
    """Processes of ``dcl pretrain`` writing ``run_dir`` (started by this test's Snakemake)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pretrain" in argv and str(run_dir).encode() in argv:
            found.append(int(entry.name))
    return found


def _job_counts(text: str) -> dict[str, int]:
    """The rule → count table of a Snakemake dry run."""
    table = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}
    counts.pop("total", None)
    return counts


@pytest.mark.slow
def test_killed_job_redone_alone(tmp_path):
    from workflow_helpers import write_config

    _image_folders(tmp_path / "data" / "cifar10")
    for split, count in (("train", 24), ("test", 8)):
        for cls in ("a", "b"):
            for index in range(1, count):
                rng = np.random.default_rng(index)
                Image.fromarray(_images(rng, 1)[0].transpose(1, 2, 0)).save(
                    tmp_path / "data" / "cifar10" / split / cls / f"{index}.png")
    config = write_config(
        tmp_path, data_root=str(tmp_path / "data"), tracking_uri="none", threads=1,
        **{"grid.losses": ["dcl"], "grid.batch_sizes": [16], "grid.epochs": [8],
           "datasets.cifar10.train_subset": None, "datasets.cifar10.test_subset": None,
           "datasets.cifar10.pretrain.knn_monitor_train": 16,
           "datasets.cifar10.pretrain.knn_monitor_test": 16,
           "datasets.cifar10.linear_eval.epochs": 1, "datasets.cifar10.knn.k": 5})
    root = tmp_path / "out"
    run_dir = root / "runs" / "cifar10" / "resnet18-w4" / "dcl" / "bs16" / "ep8" / "seed0"
    target = str(run_dir / "linear.json")
    command = [PYTHON, "-m", "snakemake", target, "--configfile", str(config), "--cores", "1"]

    workflow = subprocess.Popen(command, cwd=REPO, env=CPU_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "epoch0001.pt").exists():
        assert workflow.poll() is None, workflow.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    pids = _pretrain_pids(run_dir)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    first = workflow.communicate(timeout=300)[0]

    assert workflow.returncode != 0
    assert not (run_dir / "pretrain.json").exists()
    assert not (run_dir / "backbone.pt").exists()
    cache_time = (root / "cache" / "cifar10.npz").stat().st_mtime_ns
    plan = subprocess.run([*command, "-n"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert _job_counts(plan.stdout + plan.stderr) == {"pretrain": 1, "extract_features": 1,
                                                     "linear_eval": 1}, first[-3000:]

    rerun = subprocess.run(command, cwd=REPO, env=CPU_ENV, capture_output=True, text=True,
                           timeout=600)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (root / "cache" / "cifar10.npz").stat().st_mtime_ns == cache_time
    assert "resuming from" in (run_dir / "pretrain.log").read_text()
    assert json.loads((run_dir / "linear.json").read_text())["top1"] >= 0


# -- 6. safe defaults --------------------------------------------------------------------

def test_torch_load_weights_only():
    unsafe = []
    for path in sorted((REPO / "dcl").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"):
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                if flags.get("weights_only") is not True:
                    unsafe.append(f"{path.name}:{node.lineno}")
    assert unsafe == []


def test_documented_servers_bind_loopback():
    commands = []
    for path in [REPO / "README.md", REPO / "Makefile", REPO / "Snakefile",
                 *(REPO / "workflow").rglob("*.smk"), *(REPO / "dcl").glob("*.py")]:
        for line in path.read_text().splitlines():
            if re.search(r"mlflow (ui|server)\b", line):
                commands.append((path.name, line))
    assert commands
    assert [c for c in commands if "--host 127.0.0.1" not in c[1]] == []


def test_no_secrets_tracked(template, tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    secret = f"secret-{secrets.token_hex(8)}"
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "DCL_TEST_TOKEN"):
        monkeypatch.setenv(name, secret)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"

    with caplog.at_level(logging.DEBUG):
        code = main(_pretrain_argv(run_dir, template.cache, template.settings, epochs=1,
                                   tracking=store))

    assert code == 0
    client = MlflowClient(tracking_uri=store)
    run = client.search_runs([client.get_experiment_by_name("reliability/cifar10").experiment_id])[0]
    assert secret not in json.dumps(run.data.params)
    assert secret not in json.dumps(run.data.tags)
    assert secret not in caplog.text
    assert secret not in (run_dir / "pretrain.json").read_text()
    assert secret not in (run_dir / "settings.json").read_text()
    assert {key.split(".")[0] for key in run.data.params} == {"run", "settings", "lr"}
