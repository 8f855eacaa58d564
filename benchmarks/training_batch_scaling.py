"""How the denoiser phase's step-time ratio to plain fine-tuning depends on the batch (ViT-S, CPU).

Forming W′ = c3 W − c1 W A and back-propagating through it costs the same whatever the batch,
while everything else grows with it; so the ratio falls as the batch grows.

    python benchmarks/training_batch_scaling.py --batches 8 32

Prints one markdown table (interleaved timing and FLOP counts of `denoiserep.bench.training`).
"""

from __future__ import annotations

import argparse

from denoiserep.bench import models, tables, training
from denoiserep.bench.settings import Settings
from denoiserep.timing import time_interleaved

VARIANTS = [v for v in training.TRAIN_VARIANTS if v.denoiser is None or (v.denoiser == "full" and v.lam == 0.5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    spec, plain = models.CLASSIFIERS[0], VARIANTS[0].label
    rows = []
    for batch in args.batches:
        settings = Settings(train_batch=batch)
        steps = {v.label: training.build_training_step(spec, v, settings)[0] for v in VARIANTS}
        flops = {label: training.count_step_flops(step) for label, step in steps.items()}  # also the warm-up
        timings = time_interleaved(steps, plain, rounds=args.rounds, warmup=0, desc=f"batch {batch}")
        for label, timing in timings.items():
            rows.append((batch, label, f"{flops[label] / flops[plain]:.2f}", f"{timing.median_s:.2f}",
                         f"{timing.ratio:.2f}", tables.ci_text(timing.ratio_ci)))
        del steps
    print(f"{spec.label}, AdamW step, {args.rounds} interleaved rounds\n")
    print(tables.table(["batch", "phase", "FLOPs ratio", "step median (s)", "step ratio to plain", "ratio 95% CI"], rows))


if __name__ == "__main__":
    main()
