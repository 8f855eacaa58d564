"""Benchmark suite (tracker issue 4): what DenoiseRep costs at inference and in training.

    python -m denoiserep.bench                       # full CPU run, rewrites BENCHMARKS.md
    python -m denoiserep.bench --quick --output /tmp/b.md
    bash benchmarks/gpu.sh                           # CUDA checks + sections 1, 2, 4 -> BENCHMARKS_GPU.md

Sections, one module each: ``inference`` (params, FLOPs and latency of baseline / converted /
fused / DenoiseRep⁻), ``training`` (step time, peak memory and parameter count of the denoiser
phase against plain fine-tuning), ``launch`` (§2b: the operators a step dispatches, what a GPU pays per
kernel, with an overhead-bound stand-in on the CPU, eager and compiled), ``accuracy`` (several seeds on the embedded datasets, paired
against a control, with the noise loss each DenoiseRep row reached), ``paper_recipe`` (§3b: the
authors' protocol, ``--recipe paper``, against its matched control, on a held-out test split) and
``calibration`` (its cost
next to a forward, and the noise loss it reaches next to training). ``models`` holds the
benchmarked architectures, ``settings`` the run's parameters, ``tables`` the markdown helpers.

Latency on a shared machine drifts, so every comparison is timed interleaved (A B A B …,
the order rotated each round) and reported as the median of per-round ratios, never as a
ratio of absolute times taken at different moments.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import timm
import torch
import torchvision

import denoiserep as dr

from . import accuracy, calibration, inference, launch, paper_recipe, training
from .settings import Settings, apply_threads, clock_for, settings_from_args
from .tables import table

SECTIONS = ("inference", "training", "launch", "accuracy", "paper-recipe", "calibration")
GPU_TITLE = "## GPU"
SECTION_TITLES = {"inference": "## 1. Inference cost", "training": "## 2. Training cost",
                  "launch": "## 2b. What a training step dispatches", "accuracy": "## 3. Accuracy",
                  "paper-recipe": "## 3b. The paper's recipe against its matched control",
                  "calibration": "## 4. Calibration"}


def calibration_section(settings: Settings, output: Path) -> str:
    plot = output.parent / ("" if settings.quick else "benchmarks") / "calibration_vs_training.png"
    with tempfile.TemporaryDirectory(prefix="denoiserep-calibration-") as runs:
        return calibration.run_calibration(settings.quick, output=Path(runs), plot=plot,
                                           device=torch.device(settings.device), clock=clock_for(settings))


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())


def machine_markdown(settings: Settings, argv: Sequence[str], minutes: dict[str, float], load: tuple[float, float],
                     carried: Sequence[str]) -> str:
    cpu = cpu_model()
    device = torch.cuda.get_device_name() if settings.device == "cuda" else f"CPU ({cpu})"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return table(["", ""], [
        ("device", device),
        ("CPU", f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                f"{torch.backends.cpu.get_cpu_capability()}, {ram:.0f} GiB RAM"),
        ("versions", f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
                     f"torchvision {torchvision.__version__}, denoiserep {dr.__version__}"),
        ("precision / batch", f"{settings.dtype}; inference batch {settings.infer_batch}, training batch "
                               f"{', '.join(map(str, (settings.train_batch, *settings.scaling_batches)))}"),
        ("load average (1 min) at start / end", f"{load[0]:.2f} / {load[1]:.2f} (other jobs share this machine)"),
        ("wall time per section", ", ".join(f"{k} {v:.1f} min" for k, v in minutes.items()) or "—"),
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("command", f"`python -m denoiserep.bench {' '.join(argv)}`".replace("  ", " ")),
        ("sections kept from the previous file", ", ".join(carried) or "none"),
    ])


def existing_sections(path: Path) -> dict[str, str]:
    """The numbered sections of an existing BENCHMARKS file, heading included (a title may go
    on after its number, e.g. "## 3. Accuracy (embedded datasets, 5 seeds)")."""
    if not path.exists():
        return {}
    chunks = re.split(r"(?m)^(?=## )", path.read_text(encoding="utf-8"))
    numbered = {title.split(".")[0]: name for name, title in SECTION_TITLES.items()}
    sections = {numbered[c.split(".")[0]]: c.rstrip() + "\n" for c in chunks if c.split(".")[0] in numbered}
    # The GPU section of a CPU run's file holds numbers pasted from `benchmarks/gpu.sh` (a GPU is not
    # always at hand): kept unless it only says that nothing was measured.
    gpu = next((c for c in chunks if c.startswith(GPU_TITLE + "\n")), None)
    if gpu and not gpu[len(GPU_TITLE):].lstrip().startswith("Not measured"):
        sections["gpu"] = gpu.rstrip() + "\n"
    return sections


def render(settings: Settings, argv: Sequence[str], parts: dict[str, str], minutes: dict[str, float],
           load: tuple[float, float], kept: dict[str, str]) -> str:
    """The whole file. Sections not run this time are ``kept`` verbatim from the previous file
    (so one section can be refreshed, e.g. by its owner, without discarding the others)."""
    mode = "quick mode (tiny model, few repetitions: a smoke test, not a measurement)" if settings.quick else "full run"
    carried = [name for name in SECTIONS if name not in parts and name in kept]
    out = [f"# Benchmarks\n\nGenerated by `denoiserep.bench` ({mode}); rerun to refresh. Tracker issue 4.\n",
           "## Machine and command\n", machine_markdown(settings, argv, minutes, load, carried)]
    setups = {"inference": inference.SETUP, "training": training.SETUP, "launch": launch.SETUP, "accuracy": accuracy.SETUP,
              "paper-recipe": paper_recipe.SETUP, "calibration": calibration.__doc__}
    for section in SECTIONS:
        if section in parts:
            out.append(f"{SECTION_TITLES[section]}\n\n{setups[section]}\n{parts[section]}")
        elif section in kept:
            out.append(kept[section])
        else:
            out.append(f"{SECTION_TITLES[section]}\n\nNot run (not in `--sections`).\n")
    if settings.device != "cuda" and "gpu" in kept:
        out.append(kept["gpu"])
    else:
        out.append(f"{GPU_TITLE}\n")
        out.append(gpu_markdown(settings))
    return "\n".join(out)


def gpu_markdown(settings: Settings) -> str:
    if settings.device == "cuda":
        return f"Measured on {torch.cuda.get_device_name()} (this file).\n"
    state = "a CUDA device was available but not used" if torch.cuda.is_available() else "this machine has no CUDA device"
    return (f"Not measured in this run ({state}). On a CUDA machine, `bash benchmarks/gpu.sh` runs the CUDA "
            "checks and sections 1, 2 and 4 with CUDA-event timing and bf16 autocast, and writes `BENCHMARKS_GPU.md`.\n")


# -- entry point ---------------------------------------------------------------------------


def run(settings: Settings, sections: Sequence[str] = SECTIONS, argv: Sequence[str] = (),
        kept: dict[str, str] | None = None, output: Path = Path("BENCHMARKS.md"), runs: Path | None = None) -> str:
    """Run the requested sections and return the whole BENCHMARKS markdown; ``kept`` holds
    the previous file's sections, used for those not run; ``runs``: where paper-recipe keeps its runs."""
    apply_threads(settings)
    load_start = os.getloadavg()[0]
    runners = {
        "inference": lambda: inference.markdown(inference.run(settings)),
        "training": lambda: training.markdown(training.run(settings)),
        "launch": lambda: launch.run(settings.quick),
        "accuracy": lambda: accuracy.run_accuracy(settings.quick),
        "paper-recipe": lambda: paper_recipe.run_paper_recipe(settings.quick, output=runs, dense=settings.dense),
        "calibration": lambda: calibration_section(settings, output),
    }
    parts: dict[str, str] = {}
    minutes: dict[str, float] = {}
    for section in (s for s in SECTIONS if s in sections):
        start = time.perf_counter()
        parts[section] = runners[section]()
        minutes[section] = (time.perf_counter() - start) / 60
    return render(settings, argv, parts, minutes, (load_start, os.getloadavg()[0]), kept or {})


def write_atomically(path: Path, text: str) -> None:
    """A reader never sees a half-written file: write a temp file beside it, then rename.
    The temp file is private (0600); the result gets the old file's mode, or 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
    os.chmod(tmp.name, mode)
    os.replace(tmp.name, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m denoiserep.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repetitions (< 60 s): a smoke test")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bf16"), default="float32", help="bf16 = autocast")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch for both sections (default: CPU 1 at inference, 8 in training; CUDA 32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core); 1 suffers least from other jobs")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--dense", action="store_true",
                        help="paper-recipe: also digit detection and digit segmentation (3 seeds; long on a CPU)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="paper-recipe: keep its run folders here and reuse the stages they finished "
                             "(default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    text = run(settings_from_args(args), args.sections, argv, existing_sections(args.output), args.output, args.runs)
    write_atomically(args.output, text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0

