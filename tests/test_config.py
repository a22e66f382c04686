"""Tests for dcl.config: shipped configs, defaults, and errors that name the key and value."""

import copy
from pathlib import Path

import pytest
import yaml

from dcl.config import (
    REPO_ROOT,
    ConfigError,
    data_root,
    dataset_grid,
    load_study,
    slurm_job,
    tracking_uri,
    validate_dataset_settings,
    validate_study,
)

CONFIGS = ["config/cpu.yaml", "config/cpu-long.yaml", "config/smoke.yaml", "config/config.yaml"]


@pytest.fixture()
def smoke() -> dict:
    with open(REPO_ROOT / "config" / "smoke.yaml") as handle:
        return yaml.safe_load(handle)


def _minimal() -> dict:
    return {
        "study": "minimal",
        "output_root": "out",
        "grid": {"datasets": ["cifar10"], "losses": ["dcl"], "batch_sizes": [32],
                 "epochs": [1], "seeds": [0]},
        "datasets": {"cifar10": {
            "model": {"backbone": "resnet18"}, "augment": {}, "loss": {},
            "pretrain": {"optimizer": "lars", "base_lr": 0.3}, "linear_eval": {}, "knn": {},
        }},
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_validates(name):
    config = load_study(REPO_ROOT / name)

    expected = (["cifar10", "cifar100", "stl10", "imagenet100", "imagenet"]
                if name == "config/config.yaml" else ["cifar10"])
    assert config["grid"]["datasets"] == expected
    assert set(expected) <= set(config["datasets"])


def test_paper_grid_per_dataset():
    config = load_study(REPO_ROOT / "config" / "config.yaml")

    imagenet = dataset_grid(config, "imagenet")
    assert imagenet["batch_sizes"] == [32, 64, 128, 256, 512, 1024]
    assert imagenet["epochs"] == [100, 200]
    assert dataset_grid(config, "cifar100")["batch_sizes"] == [32, 64, 128, 256, 512]
    assert dataset_grid(config, "cifar100")["seeds"] == [0, 1, 2]
    assert config["datasets"]["imagenet"]["model"]["backbone"] == "resnet50"
    assert config["datasets"]["imagenet"]["augment"]["blur_p"] == 0.5
    assert config["datasets"]["imagenet100"]["data"]["class_list"] == "config/imagenet100-classes.txt"
    assert config["datasets"]["stl10"]["augment"]["image_size"] == 96


def test_slurm_override_per_dataset():
    config = load_study(REPO_ROOT / "config" / "config.yaml")

    assert slurm_job(config, "pretrain", "imagenet")["gpus_per_node"] == 8
    assert slurm_job(config, "pretrain", "imagenet")["nodes"] == 1  # not overridden
    assert slurm_job(config, "pretrain", "cifar10") == config["slurm"]["pretrain"]


@pytest.mark.parametrize("section", ["per_dataset", "slurm"])
def test_override_of_unknown_dataset_raises(section):
    config = _minimal()
    if section == "per_dataset":
        config["grid"]["per_dataset"] = {"stl10": {"seeds": [0]}}
    else:
        config["slurm"] = {"datasets": {"stl10": {"pretrain": {"gpus_per_node": 2}}}}

    with pytest.raises(ConfigError, match="'stl10'"):
        validate_study(config)


def test_class_list_without_parent_raises():
    config = _minimal()
    config["datasets"]["cifar10"]["data"] = {"class_list": "config/imagenet100-classes.txt"}

    with pytest.raises(ConfigError, match="datasets.cifar10.data"):
        validate_study(config)


def test_defaults_filled():
    config = validate_study(_minimal())
    dataset = config["datasets"]["cifar10"]

    assert config["threads"] == 2
    assert config["data_root"] is None
    assert config["allow_download"] is False
    assert dataset["model"]["width"] == 64
    assert dataset["model"]["cifar_stem"] is False
    assert dataset["loss"]["temperature"] == 0.1
    assert dataset["pretrain"]["lr_scaling"] == "linear"
    assert dataset["augment"]["crop_scale"] == [0.08, 1.0]
    assert dataset["knn"]["k"] == 200
    assert dataset["train_subset"] is None


@pytest.mark.parametrize("given, expected", [("true", True), ("False", False), (True, True)])
def test_command_line_flag_strings(given, expected):
    config = validate_study({**_minimal(), "only_finished": given})

    assert config["only_finished"] is expected


def test_command_line_slurm_strings_parsed():
    config = _minimal()
    config["slurm"] = {"partition": "gpu", "qos": "null",
                       "pretrain": {"gpus_per_node": "4", "time_min": "720", "mem_gb": "12.5"}}

    validated = validate_study(config)

    assert validated["slurm"]["pretrain"]["gpus_per_node"] == 4
    assert validated["slurm"]["pretrain"]["mem_gb"] == 12.5
    assert validated["slurm"]["qos"] is None
    assert validated["slurm"]["partition"] == "gpu"


def test_command_line_flag_other_string_is_rejected():
    with pytest.raises(ConfigError, match="only_finished"):
        validate_study({**_minimal(), "only_finished": "yes please"})


def test_validate_returns_copy():
    original = _minimal()
    before = copy.deepcopy(original)

    validate_study(original)

    assert original == before


def test_dataset_settings_defaults():
    settings = validate_dataset_settings(_minimal()["datasets"]["cifar10"])

    assert settings["pretrain"]["warmup_epochs"] == 10
    assert settings["linear_eval"]["val_fraction"] == 0.1


def _set(config: dict, path: str, value) -> None:
    keys = path.split(".")
    target = config
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value


# (key to change, new value, key path in the message, bad value as the message shows it)
BAD_VALUES = [
    ("grid.losses", ["infonce", "simclr"], "grid.losses.1", "'simclr'"),
    ("grid.datasets", ["mnist"], "grid.datasets.0", "'mnist'"),
    ("grid.batch_sizes", [0], "grid.batch_sizes.0", "0"),
    ("grid.batch_sizes", [32, -1], "grid.batch_sizes.1", "-1"),
    ("grid.batch_sizes", ["32"], "grid.batch_sizes.0", "'32'"),
    ("grid.epochs", [0], "grid.epochs.0", "0"),
    ("grid.seeds", [-2], "grid.seeds.0", "-2"),
    ("datasets.cifar10.loss.temperature", 0, "datasets.cifar10.loss.temperature", "0"),
    ("datasets.cifar10.loss.temperature", -0.1, "datasets.cifar10.loss.temperature", "-0.1"),
    ("datasets.cifar10.loss.sigma", 0, "datasets.cifar10.loss.sigma", "0"),
    ("datasets.cifar10.model.backbone", "vit", "datasets.cifar10.model.backbone", "'vit'"),
    ("datasets.cifar10.pretrain.base_lr", "0.1", "datasets.cifar10.pretrain.base_lr", "'0.1'"),
    ("thread", 2, "<top level>", "'thread'"),
    ("datasets.cifar10.trainsubset", 100, "datasets.cifar10", "'trainsubset'"),
    ("datasets.cifar10.pretrain.base_lrr", 0.1, "datasets.cifar10.pretrain", "'base_lrr'"),
]


@pytest.mark.parametrize(("key", "value", "path", "shown"), BAD_VALUES,
                         ids=[f"{case[0]}={case[1]!r}" for case in BAD_VALUES])
def test_bad_value_names_key(smoke, key, value, path, shown):
    _set(smoke, key, value)

    with pytest.raises(ConfigError) as info:
        validate_study(smoke, source="smoke.yaml")

    lines = [line.strip() for line in str(info.value).splitlines()]
    matching = [line for line in lines if line.startswith(f"{path}: ")]
    assert matching, str(info.value)
    assert shown in matching[0].split(": ", 1)[1]


def test_error_names_source(smoke):
    smoke["grid"]["epochs"] = [0]

    with pytest.raises(ConfigError, match="in smoke.yaml"):
        validate_study(smoke, source="smoke.yaml")


def test_grid_dataset_without_section(smoke):
    smoke["datasets"] = {"other": smoke["datasets"]["cifar10"]}

    with pytest.raises(ConfigError) as info:
        validate_study(smoke)

    assert "grid.datasets" in str(info.value)
    assert "'cifar10'" in str(info.value)
    assert "datasets.cifar10 is missing" in str(info.value)


def test_missing_datasets_key(smoke):
    del smoke["datasets"]

    with pytest.raises(ConfigError, match="'datasets' is a required property"):
        validate_study(smoke)


def test_dataset_settings_bad_temperature():
    settings = _minimal()["datasets"]["cifar10"]
    settings["loss"]["temperature"] = -1

    with pytest.raises(ConfigError, match=r"loss\.temperature: -1 "):
        validate_dataset_settings(settings)


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError) as info:
        load_study(path)

    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("study: [unclosed\ngrid: {\n")

    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_study(path)


def test_empty_yaml(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")

    with pytest.raises(ConfigError, match="must be a mapping"):
        load_study(path)


def test_data_root_precedence(monkeypatch):
    monkeypatch.setenv("DCL_DATA_ROOT", "/env/data")

    assert data_root({"data_root": "/cfg/data"}) == Path("/cfg/data")
    assert data_root({"data_root": None}) == Path("/env/data")
    monkeypatch.delenv("DCL_DATA_ROOT")
    assert data_root({"data_root": None}) == Path("data")


def test_tracking_uri_values(tmp_path):
    assert tracking_uri({"tracking_uri": "none", "output_root": "x"}) is None
    assert tracking_uri({"tracking_uri": "http://127.0.0.1:5000", "output_root": "x"}) == (
        "http://127.0.0.1:5000")
    default = tracking_uri({"tracking_uri": None, "output_root": str(tmp_path)})
    assert default == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
