"""Tests for dcl.evaluate: weighted kNN against a loop oracle, the linear probe, features."""

import numpy as np
import pytest
import torch

import dcl.evaluate
from dcl.augment import eval_transform
from dcl.config import validate_dataset_settings
from dcl.evaluate import extract_features, knn_classify, linear_probe, load_features
from dcl.models import ModelConfig, build_backbone

torch.set_num_threads(1)


def _knn_oracle(features: dict, k: int, temperature: float) -> float:
    """Classify each query with plain Python loops over the bank and return top-1 in percent."""
    bank = features["train_features"].double()
    bank_labels = features["train_labels"].tolist()
    classes = max(bank_labels) + 1
    correct = 0
    for query, label in zip(features["test_features"].double(), features["test_labels"].tolist()):
        sims = []
        for row, row_label in zip(bank, bank_labels):
            cosine = torch.dot(query, row) / (query.norm() * row.norm())
            sims.append((cosine.item(), row_label))
        sims.sort(key=lambda pair: pair[0], reverse=True)
        votes = [0.0] * classes
        for cosine, row_label in sims[:k]:
            votes[row_label] += np.exp(cosine / temperature)
        correct += int(np.argmax(votes) == label)
    return 100.0 * correct / len(features["test_labels"])


def _random_features(seed: int, train: int = 60, test: int = 40, dim: int = 6, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    return {
        "train_features": torch.randn(train, dim, generator=generator),
        "train_labels": torch.randint(0, classes, (train,), generator=generator),
        "test_features": torch.randn(test, dim, generator=generator),
        "test_labels": torch.randint(0, classes, (test,), generator=generator),
    }


@pytest.mark.parametrize(
    ("seed", "k", "temperature", "chunk"),
    [(0, 5, 0.1, 512), (1, 1, 0.5, 7), (2, 20, 0.07, 16), (3, 60, 1.0, 3), (4, 200, 0.1, 512)],
)
def test_knn_matches_oracle(seed, k, temperature, chunk):
    features = _random_features(seed)

    result = knn_classify(features, k=k, temperature=temperature, chunk=chunk)

    assert result["top1"] == pytest.approx(_knn_oracle(features, k, temperature))


def test_knn_caps_k_at_bank_size():
    result = knn_classify(_random_features(0), k=200)

    assert result["k"] == 60


def test_knn_weights_by_similarity():
    # Two class-0 neighbours at cosine 0.5 lose to one class-1 neighbour at cosine 0.99,
    # since exp(0.99 / 0.1) > 2·exp(0.5 / 0.1); a plain majority vote picks class 0.
    angle_far, angle_near = np.arccos(0.5), np.arccos(0.99)
    features = {
        "train_features": torch.tensor([
            [np.cos(angle_far), np.sin(angle_far)],
            [np.cos(angle_far), -np.sin(angle_far)],
            [np.cos(angle_near), np.sin(angle_near)],
        ], dtype=torch.float32),
        "train_labels": torch.tensor([0, 0, 1]),
        "test_features": torch.tensor([[3.0, 0.0]]),
        "test_labels": torch.tensor([1]),
    }

    result = knn_classify(features, k=3, temperature=0.1)

    assert result["top1"] == 100.0


def test_knn_uses_cosine_not_dot_product():
    # The class-0 vector is long but points away, and the class-1 vector is short but aligned.
    features = {
        "train_features": torch.tensor([[10.0, 10.0], [0.1, 0.0]]),
        "train_labels": torch.tensor([0, 1]),
        "test_features": torch.tensor([[1.0, 0.0]]),
        "test_labels": torch.tensor([1]),
    }

    result = knn_classify(features, k=1, temperature=0.1)

    assert result["top1"] == 100.0


def test_knn_separable_features():
    generator = torch.Generator().manual_seed(0)
    train_labels = torch.arange(50) % 5
    test_labels = torch.arange(25) % 5
    train_noise = 0.05 * torch.randn(50, 5, generator=generator)
    test_noise = 0.05 * torch.randn(25, 5, generator=generator)
    features = {
        "train_features": torch.eye(5)[train_labels] + train_noise,
        "train_labels": train_labels,
        "test_features": torch.eye(5)[test_labels] + test_noise,
        "test_labels": test_labels,
    }

    result = knn_classify(features, k=10, temperature=0.1)

    assert result["top1"] == 100.0


PROBE_SETTINGS = {"epochs": 30, "batch_size": 64, "lrs": [0.01, 0.1], "weight_decays": [0.0, 1e-3],
                  "val_fraction": 0.2}


def _blobs(seed: int, per_class: int, classes: int = 3,
           dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(100))
    labels = torch.arange(classes).repeat_interleave(per_class)
    points = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    return points, labels


@pytest.fixture(scope="module")
def blobs() -> dict[str, torch.Tensor]:
    train_x, train_y = _blobs(0, per_class=100)
    test_x, test_y = _blobs(1, per_class=50)
    return {"train_features": train_x, "train_labels": train_y,
            "test_features": test_x, "test_labels": test_y}


@pytest.fixture(scope="module")
def probe(blobs) -> dict:
    return linear_probe(blobs, PROBE_SETTINGS, seed=0)


def test_linear_probe_separable_blobs(probe):
    assert probe["top1"] > 95.0
    assert probe["val_top1"] > 95.0


def test_linear_probe_best_from_grid(probe):
    assert probe["best"]["lr"] in PROBE_SETTINGS["lrs"]
    assert probe["best"]["weight_decay"] in PROBE_SETTINGS["weight_decays"]


def test_linear_probe_search_covers_grid(probe):
    pairs = [(row["lr"], row["weight_decay"]) for row in probe["search"]]

    assert sorted(pairs) == [(0.01, 0.0), (0.01, 1e-3), (0.1, 0.0), (0.1, 1e-3)]
    assert probe["val_top1"] == max(row["val_top1"] for row in probe["search"])


def test_linear_probe_ignores_test_split(blobs, probe):
    shuffled = dict(blobs)
    permutation = torch.randperm(150, generator=torch.Generator().manual_seed(3))
    shuffled["test_labels"] = blobs["test_labels"][permutation]
    shuffled["test_features"] = -blobs["test_features"]

    other = linear_probe(shuffled, PROBE_SETTINGS, seed=0)

    assert other["search"] == probe["search"]
    assert other["best"] == probe["best"]
    assert other["val_top1"] == probe["val_top1"]
    assert other["top1"] < 95.0


def test_linear_probe_is_deterministic(blobs, probe):
    again = linear_probe(blobs, PROBE_SETTINGS, seed=0)

    assert again == probe


@pytest.fixture()
def cpu_only(monkeypatch):
    """Extract on the CPU even where CUDA is visible, so features match a CPU forward pass."""
    monkeypatch.setattr(dcl.evaluate, "default_device", lambda: torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    settings = validate_dataset_settings({
        "model": {"backbone": "resnet18", "width": 2, "cifar_stem": True},
        "augment": {}, "loss": {}, "pretrain": {"optimizer": "sgd", "base_lr": 0.1},
        "linear_eval": {}, "knn": {},
    })
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(**settings["model"]))
    # Non-trivial running statistics, so that train-mode and eval-mode outputs differ.
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(8, 3, 32, 32) * 3 + 1)
    torch.save(backbone.state_dict(), folder / "backbone.pt")

    rng = np.random.default_rng(0)
    np.savez(
        folder / "cache.npz",
        train_images=rng.integers(0, 256, size=(10, 3, 32, 32), dtype=np.uint8),
        train_labels=np.arange(10, dtype=np.int64) % 2,
        test_images=rng.integers(0, 256, size=(6, 3, 32, 32), dtype=np.uint8),
        test_labels=np.arange(6, dtype=np.int64) % 2,
        classes=np.asarray(["a", "b"]),
    )
    return settings, folder, backbone


def test_extract_features_shapes(tiny_setup, cpu_only):
    settings, folder, _ = tiny_setup

    extract_features(settings, folder / "backbone.pt", folder / "cache.npz", folder / "f.npz",
                     threads=1)
    features = load_features(folder / "f.npz")

    assert features["train_features"].shape == (10, 16)
    assert features["test_features"].shape == (6, 16)
    assert features["train_labels"].tolist() == [0, 1] * 5
    assert features["test_labels"].tolist() == [0, 1] * 3
    assert features["train_features"].dtype == torch.float32


def test_extract_features_eval_mode(tiny_setup, cpu_only):
    settings, folder, backbone = tiny_setup
    cache = np.load(folder / "cache.npz")

    extract_features(settings, folder / "backbone.pt", folder / "cache.npz", folder / "g.npz",
                     threads=1, batch_size=4)
    features = load_features(folder / "g.npz")
    backbone.eval()
    with torch.no_grad():
        expected = backbone(eval_transform(torch.from_numpy(cache["test_images"])))

    assert torch.allclose(features["test_features"], expected, atol=1e-5)
