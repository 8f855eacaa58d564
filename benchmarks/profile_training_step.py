"""Where one label-aug denoiser-phase step spends its time, by operator (torch.profiler).

    python benchmarks/profile_training_step.py --device cuda --batch 32 --dtype bf16

ViT-S/16 (random weights), full-rank denoisers, λ 0.5, fraction 1.0, each estimator / path of
BENCHMARKS.md §2 and plain fine-tuning: the step's wall time, the device (or CPU) time of its
operators and their number, then the top operators of the library's default. On a GPU, many small
operators per converted layer show as wall time well above the device time (launch-bound).
"""

from __future__ import annotations

import argparse
import time

import torch

from denoiserep.bench import models, training
from denoiserep.bench.settings import Settings, autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bf16"), default="float32")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    settings = Settings(device=args.device, dtype=args.dtype, train_batch=args.batch)
    cuda = args.device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    variants = [training.TRAIN_VARIANTS[i] for i in (0, 1, 2, 3)]
    print(f"{models.CLASSIFIERS[0].label}, batch {args.batch}, {args.dtype}, {args.device}\n")
    print("| phase | step wall (ms) | operator time (ms) | operators |\n|---|---|---|---|")
    default_table = ""
    for variant in variants:
        step, _ = training.build_training_step(models.CLASSIFIERS[0], variant, settings)
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 5
        with torch.profiler.profile(activities=activities) as prof, autocast(settings):
            step()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        device_time = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events)
        count = sum(e.count for e in events if e.key.startswith("aten::"))
        print(f"| {variant.label} | {wall * 1e3:.1f} | {device_time / 1e3:.1f} | {count} |")
        if variant is training.DEFAULT_FULL_LABEL_AUG:
            default_table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                         row_limit=args.top)
        del step
    print(f"\nTop operators, {training.DEFAULT_FULL_LABEL_AUG.label}:\n{default_table}")


if __name__ == "__main__":
    main()
