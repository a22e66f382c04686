"""The ``dcl`` command line: one subcommand per workflow step.

    dcl prepare-data      decode a dataset once into a uint8 cache, or index its files
    dcl link-classes      link the classes of a class list from an ImageNet root (ImageNet-100)
    dcl pretrain          SimCLR pretraining with InfoNCE, DCL or DCLW
    dcl extract-features  frozen-backbone features of the train and test splits
    dcl linear-eval       linear probe top-1 (hyper-parameters chosen on held-out train data)
    dcl knn               weighted kNN top-1
    dcl aggregate         tables and figures from per-run result files
    dcl difference        one loss minus another, paired by seed, against the seed spread
    dcl difference-by-epoch  the same on the kNN monitor per epoch, beside q_B
    dcl diagnostics       q_B and training-curve figures from per-run histories
    dcl compare           the paper-vs-reproduced table from reference numbers and run results
    dcl log-summary       log a dataset's tables and figures to one MLflow run
    dcl import-runs       copy runs from per-job MLflow stores into the main store
    dcl launch            run any of these as a SLURM job through submitit, and wait

Every step that trains or evaluates takes its dataset settings either from a
study config (``--config FILE --dataset NAME``) or as inline JSON
(``--settings '{...}'``, what the workflow passes); both are validated against
the same schema.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from dcl.config import ConfigError, load_study, validate_dataset_settings
from dcl.datasets import DataError

log = logging.getLogger("dcl")

# The names of dcl.losses.LOSS_NAMES, repeated so that parsing arguments does not import torch.
LOSS_CHOICES = ("infonce", "dcl", "dclw")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.settings is not None:
        try:
            raw = json.loads(args.settings)
        except json.JSONDecodeError as error:
            near = error.doc[max(0, error.pos - 40):error.pos + 40]
            raise ConfigError(f"--settings is not valid JSON: {error}, near {near!r}") from error
        return validate_dataset_settings(raw)
    if args.config is None:
        raise ConfigError("pass the dataset settings with --settings JSON or --config FILE")
    study = load_study(args.config)
    if args.dataset not in study["datasets"]:
        raise ConfigError(f"dataset {args.dataset!r} has no section in {args.config}: "
                          f"choose one of {sorted(study['datasets'])}")
    return study["datasets"][args.dataset]


def _run_block(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    return {"study": args.study, "dataset": args.dataset, "loss": args.loss,
            "backbone": settings["model"]["backbone"], "width": settings["model"]["width"],
            "batch_size": args.batch_size, "epochs": args.epochs, "seed": args.seed}


def _tracker(args: argparse.Namespace, run_dir: Path, stage: str = "summary"):
    """Create the step's Tracker. With ``--tracking-uri per-run`` it logs to ``<run_dir>/mlflow/<stage>.db``."""
    from dcl.tracking import PER_RUN, Tracker, per_run_store, sqlite_file

    uri = None if args.tracking_uri in (None, "none") else args.tracking_uri
    artifacts = Path(args.artifact_root) if args.artifact_root else None
    if uri == PER_RUN:
        uri, artifacts = per_run_store(run_dir, stage)
    database = sqlite_file(uri) if uri else None
    if artifacts is None and database is not None:
        # Without this MLflow would write artifacts to ./mlruns of the working folder.
        artifacts = database.parent / "mlartifacts"
    return Tracker(uri, f"{args.study}/{args.dataset}", artifact_root=artifacts)


def cmd_prepare_data(args: argparse.Namespace) -> None:
    if args.source == "stream":
        from dcl.stream import build_index

        build_index(args.dataset, Path(args.data_root), Path(args.out), args.train_subset,
                    args.test_subset)
        return
    from dcl.datasets import build_cache

    build_cache(args.dataset, Path(args.data_root), Path(args.out), args.train_subset,
                args.test_subset, args.allow_download, args.threads)


def cmd_link_classes(args: argparse.Namespace) -> None:
    from dcl.imagenet import link_classes

    link_classes(Path(args.class_list), Path(args.source), Path(args.out))


def cmd_compare(args: argparse.Namespace) -> None:
    from dcl.compare import compare

    compare(Path(args.reference), [Path(p) for p in args.results], args.study, args.tolerance,
            Path(args.csv), Path(args.md))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from dcl.train import pretrain

    settings = _settings(args)
    minimum = {"batch_size": 2, "epochs": 1}
    for name, lowest in minimum.items():
        if getattr(args, name) < lowest:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be >= {lowest}, got {getattr(args, name)}")
    run_dir = Path(args.run_dir)
    pretrain(settings, _run_block(args, settings), Path(args.cache), run_dir,
             _tracker(args, run_dir, "pretrain"), args.threads)


def cmd_extract_features(args: argparse.Namespace) -> None:
    from dcl.evaluate import extract_features

    run_dir = Path(args.run_dir)
    extract_features(_settings(args), run_dir / "backbone.pt", Path(args.cache),
                     run_dir / "features.npz", args.threads)


def _evaluate(args: argparse.Namespace, stage: str) -> None:
    import torch

    from dcl.atomic import write_json
    from dcl.evaluate import knn_classify, linear_probe, load_features
    from dcl.train import run_name

    torch.set_num_threads(args.threads)
    settings = _settings(args)
    run_dir = Path(args.run_dir)
    pretrained = json.loads((run_dir / "pretrain.json").read_text())
    features = load_features(run_dir / "features.npz")
    seed = pretrained["run"]["seed"]
    if stage == "linear":
        result = linear_probe(features, settings["linear_eval"], seed)
        params = settings["linear_eval"]
    else:
        result = knn_classify(features, settings["knn"]["k"], settings["knn"]["temperature"])
        params = settings["knn"]

    tracker = _tracker(args, run_dir, stage)
    parent = pretrained.get("mlflow_run_id")
    tags = {key: str(value) for key, value in pretrained["run"].items()} | {"stage": stage}
    if parent:
        tags["mlflow.parentRunId"] = parent
    tracker.start(f"{run_name(pretrained['run'])}/{stage}", tags=tags)
    tracker.log_params(params)
    if (run_dir / "settings.json").is_file():
        tracker.log_artifact(run_dir / "settings.json")
    tracker.log_metrics({f"{stage}_top1": result["top1"]}, step=0)
    tracker.finish("FINISHED")

    out = {"run": pretrained["run"], **result, "mlflow_run_id": tracker.run_id}
    write_json(run_dir / f"{stage}.json", out)
    log.info("%s %s top-1: %.2f", run_name(pretrained["run"]), stage, result["top1"])


def cmd_aggregate(args: argparse.Namespace) -> None:
    from dcl.report import aggregate

    aggregate([Path(p) for p in args.results], args.losses, args.batch_sizes, args.epochs,
              args.dataset, Path(args.csv), Path(args.png), Path(args.md) if args.md else None,
              ylabel=args.ylabel)


def _check_pair(args: argparse.Namespace) -> None:
    if args.method == args.baseline:
        raise ValueError(f"--method and --baseline are both {args.method!r}: compare two "
                         f"different losses, e.g. --method dcl --baseline infonce")


def cmd_difference(args: argparse.Namespace) -> None:
    from dcl.difference import paired_difference, write_difference
    from dcl.report import load_results

    _check_pair(args)
    results = load_results([Path(p) for p in args.results])
    if "dataset" in results.columns:
        results = results[results["dataset"].isna() | (results["dataset"] == args.dataset)]
    table = paired_difference(results, args.method, args.baseline, args.batch_sizes, args.epochs)
    write_difference(table, args.method, args.baseline, Path(args.csv), Path(args.md) if args.md else None)


def cmd_diagnostics(args: argparse.Namespace) -> None:
    from dcl.diagnostics import draw

    draw([Path(p) for p in args.results], args.losses, args.dataset, Path(args.npc_png),
         Path(args.curves_png))


def cmd_difference_by_epoch(args: argparse.Namespace) -> None:
    from dcl.diagnostics import load_histories
    from dcl.trajectory import gap_by_epoch, write_gap

    _check_pair(args)
    histories = load_histories([Path(p) for p in args.results])
    if "dataset" in histories.columns:
        found = sorted(set(histories["dataset"].dropna()))
        histories = histories[histories["dataset"].isna() | (histories["dataset"] == args.dataset)]
        if histories.empty:
            log.warning("no run of dataset %r among the %d files (their datasets: %s)",
                        args.dataset, len(args.results), ", ".join(found) or "none")
    table = gap_by_epoch(histories, args.method, args.baseline, args.batch_sizes, args.epochs)
    write_gap(table, args.method, args.baseline, Path(args.csv), Path(args.md) if args.md else None)


def cmd_log_summary(args: argparse.Namespace) -> None:
    from dcl.atomic import write_json

    tracker = _tracker(args, Path(args.out).parent)
    tracker.start(f"{args.study}_{args.dataset}_summary",
                  tags={"stage": "summary", "study": args.study, "dataset": args.dataset})
    for path in args.files:
        tracker.log_artifact(Path(path))
    tracker.finish("FINISHED")
    write_json(Path(args.out), {"mlflow_run_id": tracker.run_id, "artifacts": args.files})


def cmd_import_runs(args: argparse.Namespace) -> None:
    from dcl.atomic import write_json
    from dcl.track_import import import_runs, stores

    if args.tracking_uri in (None, "none", "per-run"):
        raise ConfigError(f"--tracking-uri must name the main store (a sqlite:/// or http:// URI), "
                          f"got {args.tracking_uri!r}")
    found = stores([Path(run) for run in args.runs])
    artifacts = Path(args.artifact_root) if args.artifact_root else None
    report = import_runs(found, args.tracking_uri, artifacts)
    write_json(Path(args.out), {"stores": [str(path) for path in found], **report})


def cmd_launch(args: argparse.Namespace) -> None:
    from dcl.launch import SlurmResources, launch

    step = args.step[1:] if args.step[:1] == ["--"] else args.step
    if not step:
        raise ConfigError("dcl launch needs the step to run after '--', e.g. -- pretrain ...")
    resources = SlurmResources(
        partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, time_min=args.time_min, mem_gb=args.mem_gb,
        cpus_per_task=args.cpus_per_task, gpus_per_node=args.gpus_per_node,
        nodes=args.nodes, tasks_per_node=args.tasks_per_node)
    launch(step, _job_dir(args.job_dir, step), resources, cluster=args.cluster,
           name=args.name or step[0])


def _job_dir(requested: str, step: list[str]) -> Path:
    """Resolve the job folder, where "auto" means beside the step's outputs: <run-dir>/slurm/<step>."""
    if requested != "auto":
        return Path(requested)
    for flag in ("--run-dir", "--out"):
        if flag in step and step.index(flag) + 1 < len(step):
            value = Path(step[step.index(flag) + 1])
            base = value if flag == "--run-dir" else value.parent
            suffix = "" if flag == "--run-dir" else f"-{value.stem}"
            return base / "slurm" / f"{step[0]}{suffix}"
    raise ConfigError(f"--job-dir auto needs --run-dir or --out in the step: {' '.join(step)}")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--settings", help="dataset settings as inline JSON (as the workflow passes)")
    source.add_argument("--config", help="study YAML file; its section for --dataset is used")
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. cifar10")
    parser.add_argument("--run-dir", required=True, help="the run's folder")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", default="adhoc", help="study name (MLflow experiment prefix)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI, e.g. sqlite:///results/cpu/mlflow.db; 'none' "
                        "disables; 'per-run' logs to <run-dir>/mlflow/<step>.db")
    parser.add_argument("--artifact-root", default=None, help="folder for MLflow artifacts")


def _add_pair(parser: argparse.ArgumentParser, results_help: str) -> None:
    """Add the arguments of a paired comparison of two losses over a grid."""
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--method", required=True, choices=LOSS_CHOICES)
    parser.add_argument("--baseline", required=True, choices=LOSS_CHOICES)
    parser.add_argument("--batch-sizes", nargs="+", type=int, required=True)
    parser.add_argument("--epochs", nargs="+", type=int, required=True)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--md", default=None)
    parser.add_argument("results", nargs="*", help=results_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prepare-data", help="decode a dataset into a uint8 cache")
    prep.add_argument("--dataset", required=True)
    prep.add_argument("--data-root", required=True, help="the dataset's folder, e.g. data/cifar10")
    prep.add_argument("--out", required=True, help="cache file to write (.npz)")
    prep.add_argument("--train-subset", type=int, default=None, help="class-balanced train images")
    prep.add_argument("--test-subset", type=int, default=None, help="class-balanced test images")
    prep.add_argument("--allow-download", action="store_true", help="let torchvision download")
    prep.add_argument("--threads", type=int, default=2)
    prep.add_argument("--source", choices=["memory", "stream"], default="memory",
                      help="memory: uint8 cache of decoded images; stream: index of the image files")
    prep.set_defaults(func=cmd_prepare_data)

    links = commands.add_parser("link-classes", help="link a class list's folders from an ImageNet root")
    links.add_argument("--class-list", required=True, help="file with one WordNet id per line")
    links.add_argument("--source", required=True, help="ImageNet-1K root with train/ and val/")
    links.add_argument("--out", required=True, help="folder to create (train/<wnid> and val/<wnid> links)")
    links.set_defaults(func=cmd_link_classes)

    pre = commands.add_parser("pretrain", help="SimCLR pretraining of one grid run")
    _add_settings(pre)
    _add_tracking(pre)
    pre.add_argument("--loss", required=True, choices=LOSS_CHOICES)
    pre.add_argument("--batch-size", type=int, required=True, help="images per step (N)")
    pre.add_argument("--epochs", type=int, required=True)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--cache", required=True, help="dataset cache from prepare-data")
    pre.set_defaults(func=cmd_pretrain)

    feats = commands.add_parser("extract-features", help="features of a pretrained backbone")
    _add_settings(feats)
    feats.add_argument("--cache", required=True)
    feats.set_defaults(func=cmd_extract_features)

    for stage, help_text in (("linear", "linear probe top-1"), ("knn", "weighted kNN top-1")):
        sub = commands.add_parser("linear-eval" if stage == "linear" else "knn", help=help_text)
        _add_settings(sub)
        _add_tracking(sub)
        sub.set_defaults(func=lambda args, stage=stage: _evaluate(args, stage))

    agg = commands.add_parser("aggregate", help="table and figure of one dataset")
    agg.add_argument("--dataset", required=True)
    agg.add_argument("--losses", nargs="+", required=True)
    agg.add_argument("--batch-sizes", nargs="+", type=int, required=True)
    agg.add_argument("--epochs", nargs="+", type=int, required=True)
    agg.add_argument("--csv", required=True)
    agg.add_argument("--png", required=True)
    agg.add_argument("--md", default=None)
    agg.add_argument("--ylabel", default="linear top-1 (%)", help="y-axis label of the figure")
    agg.add_argument("results", nargs="*", help="linear.json files of the runs")
    agg.set_defaults(func=cmd_aggregate)

    diff = commands.add_parser("difference", help="one loss minus another, paired by seed")
    _add_pair(diff, "linear.json files of the runs")
    diff.set_defaults(func=cmd_difference)

    by_epoch = commands.add_parser("difference-by-epoch",
                                   help="kNN-monitor gap of two losses over epochs, beside q_B")
    _add_pair(by_epoch, "pretrain.json files of the runs")
    by_epoch.set_defaults(func=cmd_difference_by_epoch)

    diag = commands.add_parser("diagnostics", help="q_B and pretraining-curve figures")
    diag.add_argument("--dataset", required=True)
    diag.add_argument("--losses", nargs="+", required=True)
    diag.add_argument("--npc-png", required=True, help="q_B against batch size, one panel per loss")
    diag.add_argument("--curves-png", required=True, help="loss and q_B over epochs")
    diag.add_argument("results", nargs="*", help="pretrain.json files of the runs")
    diag.set_defaults(func=cmd_diagnostics)

    cmp = commands.add_parser("compare", help="paper-vs-reproduced table")
    cmp.add_argument("--reference", required=True, help="reference CSV (results/reference/paper.csv)")
    cmp.add_argument("--study", required=True, help="only runs of this study are compared")
    cmp.add_argument("--tolerance", type=float, default=1.0, help="top-1 points (default 1.0)")
    cmp.add_argument("--csv", required=True)
    cmp.add_argument("--md", required=True)
    cmp.add_argument("results", nargs="*", help="linear.json and knn.json files of the runs")
    cmp.set_defaults(func=cmd_compare)

    summary = commands.add_parser("log-summary", help="log tables and figures to a summary MLflow run")
    summary.add_argument("--dataset", required=True)
    _add_tracking(summary)
    summary.add_argument("--out", required=True, help="JSON file recording the summary run id")
    summary.add_argument("files", nargs="+", help="tables and figures to log as artifacts")
    summary.set_defaults(func=cmd_log_summary)

    imports = commands.add_parser("import-runs", help="copy per-job MLflow stores into the main store")
    _add_tracking(imports)
    imports.add_argument("--out", required=True, help="JSON file listing what was imported")
    imports.add_argument("runs", nargs="+", help="run folders holding mlflow/<stage>.db stores")
    imports.set_defaults(func=cmd_import_runs)

    job = commands.add_parser("launch", help="run a step as a SLURM job through submitit and wait")
    job.add_argument("--job-dir", required=True,
                     help="folder for the job's logs and id; 'auto': <run-dir>/slurm/<step>")
    job.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None,
                     help="submitit executor (default: slurm when sbatch is found, else local)")
    job.add_argument("--name", default=None, help="job name (default: the step)")
    job.add_argument("--partition", default=None)
    job.add_argument("--account", default=None)
    job.add_argument("--qos", default=None)
    job.add_argument("--constraint", default=None)
    job.add_argument("--time-min", type=int, default=60, help="time limit in minutes")
    job.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB")
    job.add_argument("--cpus-per-task", type=int, default=2)
    job.add_argument("--gpus-per-node", type=int, default=0)
    job.add_argument("--nodes", type=int, default=1)
    job.add_argument("--tasks-per-node", type=int, default=1)
    job.add_argument("step", nargs=argparse.REMAINDER, help="-- then the dcl step and its arguments")
    job.set_defaults(func=cmd_launch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        return 2
    except OSError as error:
        log.error("%s: check that the path exists, is writable and its disk is not full, "
                  "then rerun", error)
        return 2
    except Exception as error:  # noqa: BLE001 - report any other failure with its type
        # Imported here: these modules load torch, which the light commands never need.
        from dcl.checkpoint import CheckpointError
        from dcl.train import DivergenceError

        if isinstance(error, CheckpointError):
            log.error("%s", error)
            return 2
        if isinstance(error, DivergenceError):
            log.error("%s", error)
            return 3
        if type(error).__name__ == "LaunchError":
            log.error("%s", error)
            return 4
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
