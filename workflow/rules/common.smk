# Config validation, the grid and the paths every rule shares.
import json
import shlex
import sys
from pathlib import Path

from dcl.config import data_root, dataset_grid, slurm_job, tracking_uri, validate_study

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
# The paper-vs-reproduced table is built for the paper study only: runs of other
# studies (CPU-scale, smoke) use other epochs and widths and never match a paper key.
COMPARE = config["study"] == "paper"
SLURM = config["launcher"] == "slurm"
# Under SLURM a rule is a local job that only waits for its submitted job.
LOCAL_THREADS = 1 if SLURM else config["threads"]


def launch_prefix(kind, dataset=None):
    """``launch [resources] --`` before a dcl step when the launcher is SLURM, else nothing.

    ``dataset``'s entry in ``slurm.datasets`` overrides the step's resources. Not a rule
    parameter (rules pass it as a string resource): switching launchers or resizing jobs
    must not rerun finished jobs.
    """
    if not SLURM:
        return ""
    slurm = config["slurm"]
    job = slurm_job(config, kind, dataset)
    words = ["launch", "--job-dir", "auto", "--time-min", str(job["time_min"]),
             "--cpus-per-task", str(job["cpus_per_task"]),
             "--gpus-per-node", str(job["gpus_per_node"]), "--nodes", str(job["nodes"])]
    if kind == "pretrain":
        # Data-parallel pretraining: one task (rank) per GPU.
        words += ["--tasks-per-node", str(max(1, job["gpus_per_node"]))]
    if job["mem_gb"]:
        words += ["--mem-gb", str(job["mem_gb"])]
    for name in ("partition", "account", "qos", "constraint"):
        if slurm[name]:
            words += [f"--{name}", shlex.quote(str(slurm[name]))]
    return " ".join(words) + " -- "


def launch(kind):
    """A rule resource: the launch prefix of step ``kind`` for the job's dataset."""
    return lambda wildcards: launch_prefix(kind, wildcards.dataset)

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
    method=r"dcl|dclw",
    baseline=r"infonce",
    batch=r"\d+",
    epochs=r"\d+",
    seed=r"\d+",


def dataset_settings(dataset):
    return config["datasets"][dataset]


def arch(dataset):
    """Path segment naming the backbone and its width, e.g. resnet18-w64."""
    model = dataset_settings(dataset)["model"]
    return f"{model['backbone']}-w{model['width']}"


def grid_of(dataset):
    """The dataset's grid axes: grid.per_dataset.<dataset> over the shared axes."""
    return dataset_grid(config, dataset)


def linked_datasets():
    """Datasets that are a class list of another dataset, linked under ROOT/data/."""
    return [name for name, settings in config["datasets"].items() if settings["data"]["class_list"]]


def settings_arg(wildcards):
    """The dataset's settings as one shell-quoted JSON argument (also a rerun trigger)."""
    return shlex.quote(json.dumps(dataset_settings(wildcards.dataset), sort_keys=True))


def run_dir(wildcards):
    return RUN.format(**wildcards)


def cache_path(wildcards):
    return f"{ROOT}/cache/{wildcards.dataset}.npz"


def cache_unless_done(*results):
    """Input function: the dataset cache, as input of a job whose ``results`` may exist.

    The cache is not committed with a study, so a fresh clone rebuilds it as soon as one
    cell is missing. Snakemake reruns every job whose input is rebuilt, unless that input
    is ancient() and exists; so a job whose results all exist does not take a missing
    cache as input, and an existing cache is ancient. Finished runs are retrained only
    when their settings change (the params rerun trigger).
    """

    def cache_input(wildcards):
        done = all(Path(run_dir(wildcards), name).exists() for name in results)
        cache = cache_path(wildcards)
        if done and not Path(cache).exists():
            return []
        return ancient(cache)

    return cache_input


def run_files(dataset, name):
    """``name`` (e.g. linear.json) of every grid run of ``dataset``."""
    grid = grid_of(dataset)
    return expand(
        RUN + "/" + name,
        dataset=dataset,
        arch=arch(dataset),
        loss=grid["losses"],
        batch=grid["batch_sizes"],
        epochs=grid["epochs"],
        seed=grid["seeds"],
    )


def grid_files(dataset, name):
    """``name`` of every grid run, or with ``only_finished`` of the runs that have it.

    ``only_finished`` renders the tables and figures of a partly finished study without
    running anything new; the missing cells stay empty in the tables. No rule makes the
    files then, so they are plain inputs: a run file newer than a table (a newly copied
    cell) or a changed set of finished runs redraws it.
    """
    files = run_files(dataset, name)
    if config["only_finished"]:
        return [path for path in files if Path(path).exists()]
    return files


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
        # DCL and DCLW minus InfoNCE, paired by seed (at the end and per monitored epoch),
        # when the grid has both losses.
        losses = grid_of(dataset)["losses"]
        if "infonce" in losses:
            targets += [f"{ROOT}/tables/{dataset}_{method}_minus_infonce{suffix}.csv"
                        for method in ("dcl", "dclw") if method in losses
                        for suffix in ("", "_by_epoch")]
        if TRACKING != "none":
            targets.append(f"{ROOT}/tables/{dataset}_mlflow_summary.json")
        if PER_RUN_STORES:
            targets.append(f"{ROOT}/tables/{dataset}_mlflow_import.json")
    if COMPARE:
        targets.append(f"{ROOT}/tables/paper_vs_reproduced.csv")
    return targets


def _command_line_args():
    """Return the parsed snakemake command line, or None when run through the API.

    Snakemake passes the targets to the workflow only after this file is parsed, so they
    are read from argv.
    """
    if "snakemake" not in Path(sys.argv[0]).parts[-2:] and Path(sys.argv[0]).name != "snakemake":
        return None
    from snakemake.cli import get_argument_parser

    try:
        args, _ = get_argument_parser().parse_known_args(sys.argv[1:])
    except (SystemExit, Exception):
        return None
    return args


def check_profile(args):
    """Stop when the slurm profile runs with launcher=local (a --config that left it out)."""
    profiles = [Path(str(profile)).name for profile in (getattr(args, "profile", None) or [])]
    if "slurm" in profiles and not SLURM:
        raise WorkflowError(
            "--profile slurm but launcher is local: a command-line --config replaces the "
            "profile's launcher=slurm, so every job would run here. Add launcher=slurm to "
            "--config (or drop --profile slurm to run locally).")


def check_targets():
    """Stop with the valid targets when a requested target is neither a rule nor a rule's file.

    Snakemake's own message names the target but not what to ask for instead.
    """
    args = _command_line_args()
    if args is None:
        return
    check_profile(args)
    requested = sorted(args.targets or ())
    rules = list(workflow.rules)
    names = {rule.name for rule in rules}
    unknown = [target for target in requested
               if target not in names and not any(rule.is_producer(target) for rule in rules)]
    if unknown:
        examples = ", ".join(all_targets()[:3])
        reason = ("only_finished=true leaves out the data, training and evaluation rules; "
                  "run without it to make run files. " if config["only_finished"] else "")
        raise WorkflowError(
            f"unknown target(s) {', '.join(map(repr, unknown))}: no rule of this workflow makes them. "
            f"{reason}Ask for a rule ({', '.join(sorted(names))}) or an output file under {ROOT}/, "
            f"e.g. {examples}; 'snakemake --list-target-rules' lists the rules."
        )
