"""Pretraining speed, side by side in one process: the pipeline, lightly and the compute-only bound.

Run (CPU; docs/benchmarks.md records the run time, about 5 minutes on 2 otherwise
idle cores):

    OMP_WAIT_POLICY=PASSIVE DCL_DATA_ROOT=/path/to/data python -m benchmarks.speed

``--tiny`` runs every part on tiny sizes in seconds (the test suite does).
Every part uses the same settings (config/cpu.yaml's CIFAR-10 settings, or
a JSON copy of them), thread count, batch and model, and times its variants
interleaved (see :mod:`benchmarks.timing`).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import report, variants
from benchmarks.data import load_images
from benchmarks.timing import MachineShare, Timing, interleave
from dcl.device import default_device

log = logging.getLogger("benchmarks.speed")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data", type=Path, default=Path(os.environ.get("DCL_DATA_ROOT") or "data"),
        help="data root holding cifar10/train, or a JPEG pack (default: $DCL_DATA_ROOT)")
    add("--config", type=Path, default=REPO / "config" / "cpu.yaml",
        help="study config (.yaml) or a JSON file of dataset settings (default config/cpu.yaml)")
    add("--device", default="cpu", help="cpu or cuda (default cpu)")
    add("--threads", type=int, default=2, help="intra-op threads (default 2)")
    add("--width", type=int, default=16, help="ResNet-18 width of the main comparison (default 16)")
    add("--batches", type=int, nargs="+", default=[256], help="batch sizes (default 256)")
    add("--rounds", type=int, default=2, help="turns per variant (default 2)")
    add("--warmup", type=int, default=2, help="untimed steps per turn (default 2)")
    add("--steps", type=int, default=4, help="timed steps per turn (default 4)")
    add("--full-width-steps", type=int, default=2,
        help="timed steps per variant at width 64, in one turn after one warm-up; 0 skips (default 2)")
    add("--full-width-batch", type=int, default=None, help="batch at width 64 (default: the largest batch)")
    add("--lever-batch", type=int, default=64, help="batch of the speed-lever table (default 64)")
    add("--precision", choices=["fp32", "bf16"], default="fp32", help="the pipeline's precision")
    add("--no-channels-last", action="store_true", help="the pipeline without channels-last")
    add("--compile", action="store_true", help="add torch.compile to the lever table (slow to compile)")
    add("--tiny", action="store_true", help="tiny sizes: every part in seconds, numbers meaningless")
    add("--out-md", type=Path, default=REPO / "docs" / "benchmarks.md")
    add("--out-csv", type=Path, default=REPO / "docs" / "benchmarks.csv")
    add("--gpu-csv", type=Path, default=REPO / "docs" / "benchmarks_h200.csv",
        help="GPU results to show on the page when present; none leaves the GPU section out")
    add("--notes", default=str(REPO / "benchmarks" / "notes.md"),
        help="Markdown file appended to a CPU run's page, or none (default benchmarks/notes.md)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.tiny:
        args.width, args.batches, args.rounds, args.warmup, args.steps = 8, [16], 1, 1, 2
        args.full_width_steps, args.full_width_batch, args.lever_batch = 1, 4, 8
        args.notes = "none"  # the notes discuss a full run
    return args


TINY_SETS = ("width", "batches", "rounds", "warmup", "steps", "full_width_steps",
             "full_width_batch", "lever_batch")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject sizes the benchmark cannot run, before any image is decoded."""
    if args.tiny:
        explicit = [name for name in TINY_SETS if getattr(args, name) != parser.get_default(name)]
        if explicit:
            flags = ", ".join("--" + name.replace("_", "-") for name in explicit)
            parser.error(f"--tiny sets its own sizes: drop {flags}, or drop --tiny")
    positive = {"threads": [args.threads], "width": [args.width], "batches": args.batches,
                "rounds": [args.rounds], "steps": [args.steps], "lever-batch": [args.lever_batch]}
    if args.full_width_batch is not None:
        positive["full-width-batch"] = [args.full_width_batch]
    for flag, values in positive.items():
        if any(value < 1 for value in values):
            parser.error(f"--{flag} must be at least 1, got {' '.join(map(str, values))}")
    for flag, value in (("warmup", args.warmup), ("full-width-steps", args.full_width_steps)):
        if value < 0:
            parser.error(f"--{flag} must be 0 or more, got {value}")
    if args.width < 8:
        parser.error(f"--width {args.width} is below 8: the lever table times channels-last, "
                     "which the model rejects below width 8; pass a width of 8 or more")
    if args.notes != "none" and not Path(args.notes).is_file():
        parser.error(f"--notes file {args.notes} not found: pass an existing Markdown file or none")


def load_settings(path: Path) -> dict:
    """Dataset settings of CIFAR-10 from a study config, or from a JSON file of them."""
    if path.suffix == ".json":
        import json

        return json.loads(path.read_text())
    from dcl.config import load_study

    return load_study(path)["datasets"]["cifar10"]


def lightly_version() -> str | None:
    try:
        import lightly
    except ImportError:
        return None
    return lightly.__version__


def pretrain_part(args, settings, images, width, batch, warmup, steps, rounds, folder,
                  plain_bound: bool = True) -> dict:
    """Compute-only bound (and, if ``plain_bound``, without levers), our step and lightly's step."""
    device = torch.device(args.device)
    fast = variants.with_levers(settings, width, not args.no_channels_last, args.precision)
    plain = variants.with_levers(settings, width, False, "fp32")
    make = lambda s: variants.build_pretrainer(s, images, batch, args.threads, folder)  # noqa: E731
    fast_trainer = make(fast)
    plain_trainer = make(plain) if plain_bound else None
    table = {"compute-only bound": (lambda: variants.ComputeRunner(fast_trainer), batch)}
    if plain_bound:
        table["compute-only, one forward per view"] = (
            lambda: variants.ComputeRunner(fast_trainer, per_view=True), batch)
        table["compute-only, fp32 NCHW"] = (lambda: variants.ComputeRunner(plain_trainer), batch)
    table["ours: full step"] = (lambda: variants.OursRunner(fast_trainer), batch)
    if args.lightly:
        dataset = variants.HWCImages(images, variants.lightly_transform(fast_trainer.augment.config))
        step = variants.lightly_step(plain, device)
        table["lightly 1.6 baseline"] = (lambda: variants.LoaderRunner(dataset, batch, step), batch)
    timings = interleave(table, rounds, warmup, steps, device, log.info)
    return {"trainer": fast_trainer, "timings": timings}


def lever_part(args, settings, images, folder) -> dict[str, Timing]:
    """The compute-only step under each speed lever, at the lever batch."""
    options = {"fp32 NCHW": (False, "fp32"), "fp32 channels-last": (True, "fp32"),
               "bf16 autocast NCHW": (False, "bf16"), "bf16 autocast channels-last": (True, "bf16")}
    table = {}
    for name, (channels_last, precision) in options.items():
        trainer = variants.build_pretrainer(
            variants.with_levers(settings, args.width, channels_last, precision),
            images, args.lever_batch, args.threads, folder)
        table[name] = (lambda t=trainer: variants.ComputeRunner(t), args.lever_batch)
    if args.compile:
        trainer = variants.build_pretrainer(
            variants.with_levers(settings, args.width, True, "fp32"), images, args.lever_batch,
            args.threads, folder)
        trainer.model = torch.compile(trainer.model)
        table["fp32 channels-last + torch.compile"] = (lambda: variants.ComputeRunner(trainer),
                                                       args.lever_batch)
    return interleave(table, 1, 1, max(2, args.steps // 2), torch.device(args.device), log.info)


def augment_part(args, settings, images, batch) -> dict[str, Timing]:
    device = torch.device(args.device)
    dataset = variants.HWCImages(images, variants.torchvision_transform(
        variants.build_augment(settings).config))
    table = {
        "ours: batched on the device": (lambda: variants.AugmentRunner(settings, images, batch, device),
                                        batch),
        "torchvision per-image, 2 workers": (lambda: variants.LoaderRunner(dataset, batch), batch),
    }
    return interleave(table, args.rounds, args.warmup + 2, 2 * args.steps, device, log.info)


def loss_part(args, settings) -> tuple[dict[str, Timing], dict]:
    device = torch.device(args.device)
    temperature, sigma = settings["loss"]["temperature"], settings["loss"]["sigma"]
    sizes = (8, 16) if args.tiny else (256, 512)
    table, agreement = {}, {}
    for n in sizes:
        z1, z2 = variants.loss_inputs(n, 128, device)
        ours = variants.DCLLoss(temperature)
        table[f"ours DCLLoss, 2N={2 * n}"] = (
            lambda fn=ours, a=z1, b=z2: variants.LossRunner(fn, a, b), 2 * n)
        if args.lightly:
            from lightly.loss import DCLLoss as LightlyDCLLoss

            theirs = LightlyDCLLoss(temperature=temperature)
            table[f"lightly DCLLoss, 2N={2 * n}"] = (
                lambda fn=theirs, a=z1, b=z2: variants.LossRunner(fn, a, b), 2 * n)
            agreement[2 * n] = variants.loss_agreement(n, 128, temperature, sigma, device)
    timings = interleave(table, args.rounds, 3, 4 if args.tiny else 20, device, log.info)
    return timings, agreement


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    args.lightly = lightly_version() is not None
    if not args.lightly:
        log.warning("lightly is not installed: its baseline and loss comparison are skipped "
                    "(pip install -e '.[bench]')")
    if torch.device(args.device).type != default_device().type:
        raise SystemExit(f"--device {args.device} differs from the device the pipeline trains on "
                         f"({default_device()}): pass --device {default_device().type}")
    torch.set_num_threads(args.threads)
    started, load_before, share = time.perf_counter(), os.getloadavg(), MachineShare()
    settings = load_settings(args.config)
    batch_max = max(args.batches)
    # Enough images that no DataLoader turn runs out of batches (augment_part takes the most).
    count = max(batch_max * (args.warmup + 2 * args.steps + 3), 4 * args.lever_batch)
    images = load_images(args.data, count)
    results = {"args": args, "settings": settings, "pretrain": {}, "lightly": lightly_version()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for batch in args.batches:
            results["pretrain"][(args.width, batch)] = pretrain_part(
                args, settings, images, args.width, batch, args.warmup, args.steps, args.rounds, folder)
        if args.full_width_steps:
            batch = args.full_width_batch or batch_max
            results["pretrain"][(64, batch)] = pretrain_part(
                args, settings, images, 64, batch, 1, args.full_width_steps, 1, folder, plain_bound=False)
        results["levers"] = lever_part(args, settings, images, folder)
        results["augment"] = augment_part(args, settings, images, batch_max)
        results["loss"], results["agreement"] = loss_part(args, settings)
        main_part = results["pretrain"][(args.width, batch_max)]
        ours = variants.OursRunner(main_part["trainer"])
        results["profile"] = variants.profile_ops(ours, 1 if args.tiny else 2, torch.device(args.device))
        augment = variants.AugmentRunner(settings, images, batch_max, torch.device(args.device))
        results["augment_profile"] = variants.profile_ops(augment, 2 if args.tiny else 20,
                                                          torch.device(args.device))
        results["overhead"] = variants.overhead_seconds(main_part["trainer"], 5 if args.tiny else 15)
    results["load"] = (load_before, os.getloadavg())
    results["others"] = share.others()
    results["seconds"] = time.perf_counter() - started
    report.write(results, args.out_md, args.out_csv, args.gpu_csv)
    log.info("wrote %s and %s in %.0f s", args.out_md, args.out_csv, results["seconds"])


if __name__ == "__main__":
    main()
