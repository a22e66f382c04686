"""Write the benchmark's results: a Markdown page and a CSV of every timed variant."""

from __future__ import annotations

import csv
import io
import platform
import sys
from pathlib import Path

import torch
import torchvision

from dcl.atomic import write_text

IDLE_SHARE = 0.05  # other processes' share of the cores below which a run counts as idle
CSV_FIELDS = ("part", "variant", "width", "batch", "device", "threads", "median_ms",
              "images_per_s", "cpu_ms_per_step", "timed_steps")


def machine(device: str) -> str:
    """CPU model and its bf16 support, or the GPU's name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model, flags = platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{model}, {len(__import__('os').sched_getaffinity(0))} cores, bf16 instructions: " + (
        ", ".join(bf16) if bf16 else "none (no avx512_bf16, no amx_bf16)")


def rows(results: dict) -> list[dict]:
    """Return one CSV row per timed variant, and one per overhead measurement."""
    args = results["args"]
    base = {"device": args.device, "threads": args.threads}
    out = []

    def add(part, timings, width="", batch=""):
        for t in timings.values():
            out.append(base | {"part": part, "variant": t.name, "width": width, "batch": batch,
                               "median_ms": f"{t.median * 1e3:.3f}",
                               "images_per_s": f"{t.images_per_second:.1f}",
                               "cpu_ms_per_step": f"{t.cpu_median * 1e3:.3f}",
                               "timed_steps": len(t.seconds)})

    for (width, batch), part in results["pretrain"].items():
        add("pretrain", part["timings"], width, batch)
    add("levers", results["levers"], args.width, args.lever_batch)
    add("augment", results["augment"], "", max(args.batches))
    add("loss", results["loss"])
    for name, seconds in results["overhead"].items():
        if seconds is not None:
            out.append(base | {"part": "overhead", "variant": name, "width": args.width,
                               "batch": max(args.batches), "median_ms": f"{seconds * 1e3:.3f}",
                               "images_per_s": "", "cpu_ms_per_step": "", "timed_steps": ""})
    return out


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def pretrain_section(width: int, batch: int, timings: dict) -> str:
    bound = timings["compute-only bound"].images_per_second
    lightly = timings.get("lightly 1.6 baseline")
    body = []
    for t in timings.values():
        body.append([t.name, f"{t.median * 1e3:.0f}", f"{t.images_per_second:.0f}",
                     _ratio(t.images_per_second, bound),
                     _ratio(t.images_per_second, lightly.images_per_second) if lightly else "n/a",
                     f"{t.cpu_median:.2f}",
                     _ratio(lightly.cpu_median, t.cpu_median) if lightly else "n/a"])
    header = ["variant", "ms/step", "images/s", "vs bound", "vs lightly", "CPU s/step",
              "vs lightly, CPU time"]
    return f"\n### ResNet-18 width {width}, batch {batch}\n\n" + _table(header, body)


def targets(results: dict) -> list[list[str]]:
    """Return each speed target, its measured ratio and whether it is met."""
    args, out = results["args"], []

    def check(name, ratio, goal):
        out.append([name, f"{ratio:.2f}x", f">= {goal}x", "met" if ratio >= goal else "missed"])

    main = results["pretrain"][(args.width, max(args.batches))]["timings"]
    ours = main["ours: full step"].images_per_second
    if "lightly 1.6 baseline" in main:
        lightly = main["lightly 1.6 baseline"]
        check(f"ours / lightly, width {args.width}", ours / lightly.images_per_second, 2)
        check(f"ours / lightly in CPU time per step, width {args.width}",
              lightly.cpu_median / main["ours: full step"].cpu_median, 2)
    check(f"ours / compute-only bound, width {args.width}",
          ours / main["compute-only bound"].images_per_second, 0.9)
    check(f"ours / compute-only bound in CPU time per step, width {args.width}",
          main["compute-only bound"].cpu_median / main["ours: full step"].cpu_median, 0.9)
    full = next((part for (width, _), part in results["pretrain"].items()
                 if width == 64 and width != args.width), None)
    if full and "lightly 1.6 baseline" in full["timings"]:
        t = full["timings"]
        check("ours / lightly, full width",
              t["ours: full step"].images_per_second / t["lightly 1.6 baseline"].images_per_second, 1.5)
        check("ours / lightly in CPU time per step, full width",
              t["lightly 1.6 baseline"].cpu_median / t["ours: full step"].cpu_median, 1.5)
    aug = list(results["augment"].values())
    check("augmentation: ours / torchvision", aug[0].images_per_second / aug[1].images_per_second, 5)
    check("augmentation: ours / torchvision in CPU time", aug[1].cpu_median / aug[0].cpu_median, 5)
    loss = results["loss"]
    for name, t in loss.items():
        if name.startswith("ours"):
            theirs = loss.get(name.replace("ours", "lightly"))
            if theirs:
                size = name.split(", ")[1]
                check(f"loss speed: lightly time / ours ({size})", theirs.median / t.median, 1)
                check(f"loss speed in CPU time: lightly / ours ({size})", theirs.cpu_median / t.cpu_median, 1)
    return out


def _simple(timings: dict, per: str) -> str:
    body = [[t.name, f"{t.median * 1e3:.2f}", f"{t.images_per_second:.0f}", f"{t.cpu_median * 1e3:.1f}"]
            for t in timings.values()]
    return _table(["variant", "ms", f"{per}/s", "CPU ms"], body)


def overhead_section(results: dict) -> str:
    args, overhead = results["args"], results["overhead"]
    every = results["settings"]["pretrain"]["qb_every_steps"]
    main = results["pretrain"][(args.width, max(args.batches))]["timings"]["ours: full step"].median
    body = [["q_B diagnostics (one call)", f"{overhead['qb'] * 1e3:.2f}",
             f"{overhead['qb'] / (every * main):.2%} (every {every} steps)"]]
    if overhead["tracking"] is None:
        body.append(["MLflow metrics batch", "not measured: mlflow is not installed", ""])
    else:
        per_epoch = 50_000 // max(args.batches)
        body.append(["MLflow metrics batch (one log_batch of 9 metrics)", f"{overhead['tracking'] * 1e3:.2f}",
                     f"{overhead['tracking'] / main:.2%} if sent every step; "
                     f"{overhead['tracking'] / (per_epoch * main):.3%} once per epoch ({per_epoch} steps)"])
    return _table(["what", "ms", "share of our step"], body)


def agreement_section(agreement: dict) -> str:
    if not agreement:
        return "lightly is not installed: agreement not checked.\n"
    body = []
    for size, losses in agreement.items():
        for name, a in losses.items():
            body.append([name, str(size), f"{a['value_ours']:.6f}", f"{a['value_lightly']:.6f}",
                         f"{a['value_diff']:.1e}", f"{a['grad_diff']:.1e}"])
    return _table(["loss", "2N", "ours", "lightly", "value difference", "largest gradient difference"], body)


def gpu_section(path: Path) -> str:
    if not path.exists():
        return ("GPU numbers are not measured yet. `benchmarks/run_h200.sh` runs the GPU variant "
                "(CIFAR-10, full-width ResNet-18, batch 256 and 512, every part above) on one GPU "
                f"within a 280 s cap and writes `{path.name}`; this page shows it once it exists. "
                "It has run on a CPU in tiny mode only.\n")
    with open(path, newline="") as handle:
        data = list(csv.DictReader(handle))
    body = [[r["part"], r["variant"], r["width"], r["batch"], r["median_ms"], r["images_per_s"]] for r in data]
    return f"From `{path.name}`:\n\n" + _table(["part", "variant", "width", "batch", "ms", "images/s"], body)


def others_line(others: tuple[float, float] | None) -> str:
    """Describe the CPU time other processes took during the run (see ``MachineShare``)."""
    if others is None:
        return "not measured (no /proc/stat)"
    seconds, share = others
    verdict = "the cores were otherwise idle" if share < IDLE_SHARE else "other jobs shared the cores"
    return f"{seconds:.0f} CPU s, {share:.1%} of all cores' time: {verdict}"


def page(results: dict, gpu_csv: Path) -> str:
    args = results["args"]
    (before, after) = results["load"]
    command = " ".join(["python -m benchmarks.speed", *sys.argv[1:]])
    parts = [
        "# Pretraining speed: the pipeline, lightly and the compute-only bound\n\n",
        "**Tiny mode: sizes too small for the numbers to mean anything; this page only shows "
        "that every part runs.**\n\n" if args.tiny else "",
        "Written by `benchmarks/speed.py`. Every number in the tables comes from one run of it, "
        "all variants timed in turns in one process with the same settings, model, batch and "
        "thread count. The notes at the end quote a few separate measurements, each with its "
        "command. "
        "Times are medians of per-step wall times after warm-up; images/s counts source images "
        "(each gives two views). CPU s/step is the CPU time of the process and its DataLoader "
        "workers per step (median over turns). It does not depend on how other jobs share the "
        "cores, so on a loaded machine it is the fairer cost; on an idle one, wall time is what a "
        "user waits.\n\n",
        f"- Command: `OMP_WAIT_POLICY=PASSIVE {command}`" + (" (tiny mode: numbers meaningless)" if args.tiny else "") + "\n",
        f"- Machine: {machine(args.device)}; device {args.device}, {args.threads} threads\n",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, lightly {results['lightly'] or 'not installed'}\n",
        f"- Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in after)}\n",
        f"- Other processes during the run: {others_line(results.get('others'))}\n",
        f"- Run time: {results['seconds']:.0f} s\n\n",
        "## Targets\n\n", _table(["target", "measured", "goal", ""], targets(results)),
        "\n## Pretraining step\n\n",
        "Bound: model, loss and LARS step on fixed pre-augmented views. Ours: the pipeline's "
        "`Pretrainer._step` (gather on the device, batched augmentation of two views, model, DCL "
        "loss, LARS), q_B statistics off (costed below). Both use "
        + ("the NCHW layout. " if args.no_channels_last else
           "`model.channels_last: true` (off in the shipped configs; \"compute-only, fp32 NCHW\" "
           "is the bound without it). ") +
        "lightly: `SimCLRTransform` in a DataLoader with 2 workers, one forward per view, "
        "lightly's `DCLLoss`, the same model and LARS in float32 and the default memory layout, "
        "as lightly's SimCLR example writes it.\n",
    ]
    for (width, batch), part in results["pretrain"].items():
        parts.append(pretrain_section(width, batch, part["timings"]))
    parts += [
        f"\n## Speed levers (compute-only step, width {args.width}, batch {args.lever_batch})\n\n",
        _simple(results["levers"], "images"),
        f"\n## Augmentation alone (batch {max(args.batches)}, two views per image)\n\n",
        _simple(results["augment"], "images"),
        "\n## Loss alone (forward and backward, d = 128)\n\n", _simple(results["loss"], "embeddings"),
        "\nAgreement on the same inputs (temperature and sigma of the config; lightly never "
        "clamps the DCLW weight, and neither does the pipeline by default):\n\n",
        agreement_section(results["agreement"]),
        f"\n## Where our step's time goes (width {args.width}, batch {max(args.batches)})\n\n",
        "Operators by self time in `torch.profiler` over our full step (after the timed parts):\n\n",
        _table(["operator", "share of self time"], [[f"`{name}`", f"{share:.1%}"] for name, share in results["profile"]]),
        f"\n## Where the augmentation's time goes (batch {max(args.batches)}, two views)\n\n",
        "Operators by self time in `torch.profiler` over the batched augmentation alone:\n\n",
        _table(["operator", "share of self time"],
               [[f"`{name}`", f"{share:.1%}"] for name, share in results.get("augment_profile", [])]),
        "\n## Diagnostics and tracking overhead\n\n", overhead_section(results),
    ]
    if str(gpu_csv) != "none":
        parts += ["\n## GPU (one H200)\n\n", gpu_section(gpu_csv)]
    # The notes discuss a CPU run, and speed.parse_args has checked that the file exists.
    if args.notes != "none" and args.device == "cpu":
        parts += ["\n", Path(args.notes).read_text()]
    return "".join(parts)


def write(results: dict, out_md: Path, out_csv: Path, gpu_csv: Path) -> None:
    """Write the page and the CSV, each atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows(results))
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    write_text(Path(out_csv), buffer.getvalue())
    write_text(Path(out_md), page(results, gpu_csv))
