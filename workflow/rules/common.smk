# Config validation, the grid and the paths every rule shares.
import json
import shlex
import sys
from pathlib import Path

from dcl.config import data_root, tracking_uri, validate_study

_validated = validate_study(config, source=", ".join(map(str, workflow.configfiles)) or "config")
config.clear()
config.update(_validated)

ROOT = config["output_root"].rstrip("/")
GRID = config["grid"]
DCL = f"{shlex.quote(sys.executable)} -m dcl"
TRACKING = tracking_uri(config) or "none"
# Where pretrain and evaluation jobs log: the main store, or with tracking_store: per_run
# each job's own <run>/mlflow/<step>.db, which rule import_runs copies into TRACKING.
PER_RUN_STORES = config["tracking_store"] == "per_run" and TRACKING != "none"
JOB_TRACKING = "per-run" if PER_RUN_STORES else TRACKING
DATA_ROOT = shlex.quote(str(data_root(config)))
ARTIFACTS = f"{ROOT}/mlartifacts"
SLURM = config["launcher"] == "slurm"
# Under SLURM a rule is a local job that only waits for its submitted job.
LOCAL_THREADS = 1 if SLURM else config["threads"]


def launch_prefix(kind):
    """``launch [resources] --`` before a dcl step when the launcher is SLURM, else nothing.

    Not a rule parameter: switching launchers must not rerun finished jobs.
    """
    if not SLURM:
        return ""
    slurm = config["slurm"]
    job = slurm[kind]
    words = ["launch", "--job-dir", "auto", "--time-min", str(job["time_min"]),
             "--cpus-per-task", str(job["cpus_per_task"]),
             "--gpus-per-node", str(job["gpus_per_node"]), "--nodes", str(job["nodes"])]
    if job["mem_gb"]:
        words += ["--mem-gb", str(job["mem_gb"])]
    for name in ("partition", "account", "qos", "constraint"):
        if slurm[name]:
            words += [f"--{name}", shlex.quote(str(slurm[name]))]
    return " ".join(words) + " -- "


LAUNCH_PREPARE = launch_prefix("prepare_data")
LAUNCH_PRETRAIN = launch_prefix("pretrain")
LAUNCH_EVALUATE = launch_prefix("evaluate")

# One run folder per grid cell; every segment is a key=value-free literal, so no
# wildcard can be split two ways.
RUN = (
    ROOT
    + "/runs/{dataset}/{arch}/{loss}/bs{batch}/ep{epochs}/seed{seed}"
)


wildcard_constraints:
    dataset=r"[a-z0-9]+",
    arch=r"resnet\d+-w\d+",
    loss=r"infonce|dcl|dclw",
    batch=r"\d+",
    epochs=r"\d+",
    seed=r"\d+",


def dataset_settings(dataset):
    return config["datasets"][dataset]


def arch(dataset):
    """Path segment naming the backbone and its width, e.g. resnet18-w64."""
    model = dataset_settings(dataset)["model"]
    return f"{model['backbone']}-w{model['width']}"


def settings_arg(wildcards):
    """The dataset's settings as one shell-quoted JSON argument (also a rerun trigger)."""
    return shlex.quote(json.dumps(dataset_settings(wildcards.dataset), sort_keys=True))


def run_dir(wildcards):
    return RUN.format(**wildcards)


def run_files(dataset, name):
    """``name`` (e.g. linear.json) of every grid run of ``dataset``."""
    return expand(
        RUN + "/" + name,
        dataset=dataset,
        arch=arch(dataset),
        loss=GRID["losses"],
        batch=GRID["batch_sizes"],
        epochs=GRID["epochs"],
        seed=GRID["seeds"],
    )


def all_targets():
    targets = []
    for dataset in GRID["datasets"]:
        targets += [
            f"{ROOT}/tables/{dataset}_top1.csv",
            f"{ROOT}/tables/{dataset}_knn_top1.csv",
            f"{ROOT}/figures/{dataset}_batch_size.png",
            f"{ROOT}/figures/{dataset}_npc.png",
            f"{ROOT}/figures/{dataset}_curves.png",
        ]
        if TRACKING != "none":
            targets.append(f"{ROOT}/tables/{dataset}_mlflow_summary.json")
        if PER_RUN_STORES:
            targets.append(f"{ROOT}/tables/{dataset}_mlflow_import.json")
    return targets
