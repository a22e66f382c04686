"""Study configuration: validation against the JSON schema, defaults and derived paths.

The schema lives in ``workflow/schemas/config.schema.yaml`` so that the workflow and
the ``dcl`` command line check a config with the same rules. Defaults declared in
the schema are filled in during validation.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
DATA_ROOT_ENV = "DCL_DATA_ROOT"
# Top-level switches often given as snakemake --config key=true|false.
COMMAND_LINE_FLAGS = ("only_finished", "allow_download")
# A section often given as snakemake --config slurm='{...}', which reads nested values as
# strings (YAML's BaseLoader): their numbers and nulls are parsed back.
COMMAND_LINE_SECTIONS = ("slurm",)
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


class ConfigError(ValueError):
    """An invalid study configuration; the message names the key, the value and the fix."""


def _with_defaults(validator_class):
    """Extend a jsonschema validator so that it fills in each property's ``default``."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as handle:
        return yaml.safe_load(handle)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "<top level>"


def _validate(instance: dict, schema: dict, source: str) -> None:
    errors = sorted(_Validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_key_path(e)}: {e.message}" for e in errors]
        raise ConfigError(
            f"invalid configuration in {source}:\n" + "\n".join(lines)
            + "\nFix these values (the schema is " f"{SCHEMA_PATH.relative_to(REPO_ROOT)}) and rerun."
        )


def _parse_scalars(value: Any) -> Any:
    """Turn strings that spell an integer, a number or null back into those values."""
    if isinstance(value, dict):
        return {key: _parse_scalars(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_parse_scalars(item) for item in value]
    if not isinstance(value, str):
        return value
    if _INTEGER.fullmatch(value):
        return int(value)
    if _NUMBER.fullmatch(value):
        return float(value)
    return None if value in ("null", "~") else value


def validate_study(config: dict[str, Any], source: str = "the config") -> dict[str, Any]:
    """Validate a study config, fill in defaults and check cross-field rules; returns a copy."""
    config = copy.deepcopy(config)
    if not isinstance(config, dict):
        raise ConfigError(f"{source} must be a mapping of keys to values, got {type(config).__name__}")
    for key in COMMAND_LINE_FLAGS:
        # snakemake --config only_finished=true passes the string "true".
        if isinstance(config.get(key), str) and config[key].lower() in ("true", "false"):
            config[key] = config[key].lower() == "true"
    for key in COMMAND_LINE_SECTIONS:
        if key in config:
            config[key] = _parse_scalars(config[key])
    _validate(config, load_schema(), source)

    for name in config["grid"]["datasets"]:
        if name not in config["datasets"]:
            raise ConfigError(
                f"grid.datasets lists {name!r} in {source}, but datasets.{name} is missing: "
                f"add its settings under 'datasets:' or remove it from the grid"
            )
    for section, overrides in (("grid.per_dataset", config["grid"]["per_dataset"]),
                               ("slurm.datasets", config.get("slurm", {}).get("datasets", {}))):
        for name in overrides:
            if name not in config["datasets"]:
                raise ConfigError(f"{section} names {name!r} in {source}, which has no section "
                                  f"under 'datasets:'; choose one of {sorted(config['datasets'])}")
    for name, settings in config["datasets"].items():
        data = settings["data"]
        if bool(data["class_list"]) != bool(data["parent"]):
            raise ConfigError(
                f"datasets.{name}.data in {source} sets only one of class_list and parent: a "
                "class-list subset needs both (e.g. class_list: config/imagenet100-classes.txt, "
                "parent: imagenet)")
    _check_world_size(config, source)
    return config


GRID_AXES = ("losses", "batch_sizes", "epochs", "seeds")


def dataset_grid(config: dict[str, Any], name: str) -> dict[str, list]:
    """Return the grid axes of dataset ``name``: ``grid.per_dataset.<name>`` over the shared axes."""
    grid = config["grid"]
    override = grid.get("per_dataset", {}).get(name, {})
    return {axis: list(override.get(axis, grid[axis])) for axis in GRID_AXES}


def slurm_job(config: dict[str, Any], kind: str, name: str | None = None) -> dict[str, Any]:
    """Resources of step ``kind`` (pretrain, evaluate, prepare_data) for dataset ``name``.

    ``slurm.datasets.<name>.<kind>`` overrides the keys it gives of ``slurm.<kind>``.
    """
    slurm = config["slurm"]
    override = slurm.get("datasets", {}).get(name, {}).get(kind, {}) if name else {}
    return {**slurm[kind], **override}


def _check_world_size(config: dict[str, Any], source: str) -> None:
    """Under SLURM, every grid batch size must split evenly over the pretraining ranks."""
    if config["launcher"] != "slurm":
        return
    for name in config["grid"]["datasets"]:
        job = slurm_job(config, "pretrain", name)
        ranks = max(1, job["gpus_per_node"]) * job["nodes"]
        uneven = [batch for batch in dataset_grid(config, name)["batch_sizes"] if batch % ranks]
        if uneven:
            raise ConfigError(
                f"grid.batch_sizes {uneven} of {name} in {source} do not divide over the {ranks} "
                f"pretraining processes (gpus_per_node={job['gpus_per_node']}, nodes={job['nodes']}): "
                f"use batch sizes that are multiples of {ranks}, or fewer GPUs")


def validate_dataset_settings(settings: dict[str, Any], source: str = "--settings") -> dict:
    """Validate one dataset section (the unit a single run receives) and fill in defaults."""
    settings = copy.deepcopy(settings)
    schema = load_schema()
    subschema = {"$defs": schema["$defs"], "$ref": "#/$defs/dataset"}
    _validate(settings, subschema, source)
    return settings


def load_study(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a study YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass an existing YAML file")
    with open(path) as handle:
        try:
            config = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    return validate_study(config, source=str(path))


def data_root(config: dict[str, Any]) -> Path:
    """Return the folder with one sub-folder per dataset: config, then $DCL_DATA_ROOT, then ./data."""
    if config.get("data_root"):
        return Path(config["data_root"])
    return Path(os.environ.get(DATA_ROOT_ENV) or "data")


def tracking_uri(config: dict[str, Any]) -> str | None:
    """Return the MLflow tracking URI of a study, or None when tracking is disabled."""
    uri = config.get("tracking_uri")
    if uri == "none":
        return None
    if uri:
        return uri
    return f"sqlite:///{Path(config['output_root']).resolve() / 'mlflow.db'}"
