"""q_B and pretraining-curve figures from per-run histories."""

from __future__ import annotations

import json

import pytest

from dcl.diagnostics import draw, load_histories

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, loss, batch, seed, q_b):
    run = {"study": "t", "dataset": "cifar10", "loss": loss, "backbone": "resnet18", "width": 4,
           "batch_size": batch, "epochs": 2, "seed": seed}
    history = [
        {"epoch": epoch, "loss": 5.0 - epoch, "lr": 0.1, "q_b_mean": q_b, "q_b_median": q_b,
         "q_b_p10": q_b - 0.1, "q_b_p90": q_b + 0.05, "pos_sim": 0.5, "neg_sim": 0.0}
        for epoch in (1, 2)
    ]
    path = folder / f"{loss}_{batch}_{seed}.json"
    path.write_text(json.dumps({"run": run, "history": history}))
    return path


def test_histories_one_row_per_epoch(tmp_path):
    paths = [write_run(tmp_path, "dcl", 32, 0, 0.9), write_run(tmp_path, "dcl", 64, 0, 0.95)]
    histories = load_histories(paths)
    assert len(histories) == 4
    assert set(histories["batch_size"]) == {32, 64}
    assert set(histories["loss"]) == {"dcl"}
    assert list(histories["train_loss"]) == [4.0, 3.0, 4.0, 3.0]


def test_histories_malformed_file_named(tmp_path):
    bad = tmp_path / "pretrain.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="pretrain.json"):
        load_histories([bad])


def test_draw_writes_both_figures(tmp_path):
    paths = [write_run(tmp_path, loss, batch, 0, 0.9) for loss in ("infonce", "dcl") for batch in (32, 64)]
    npc, curves = tmp_path / "npc.png", tmp_path / "curves.png"
    draw(paths, ["infonce", "dcl", "dclw"], "cifar10", npc, curves)
    assert npc.read_bytes()[:8] == PNG
    assert curves.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.glob(".*tmp*")) == []


def test_draw_without_runs(tmp_path):
    npc, curves = tmp_path / "npc.png", tmp_path / "curves.png"
    draw([], ["dcl"], "cifar10", npc, curves)
    assert npc.read_bytes()[:8] == PNG
