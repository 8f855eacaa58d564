"""What a benchmark run depends on (device, precision, batches, rounds) and how it times."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..timing import cpu_clock, cuda_clock

DENOISE_MINUS_SWEEP = (1, 10, 50, 100)


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on; the defaults per device are chosen in `settings_from_args`."""

    device: str = "cpu"
    dtype: str = "float32"
    quick: bool = False
    infer_batch: int = 1
    train_batch: int = 8
    # Further training batches, timed for plain fine-tuning and the full-rank fraction-1.0 label-aug
    # rows only: what forming W′ costs is batch-independent, so the ratios depend on the batch.
    scaling_batches: tuple[int, ...] = (32,)
    precise_rounds: int = 30  # baseline vs fused vs DenoiseRep⁻ at the matched step count
    dense_precise_rounds: int = 10  # the same for detection / segmentation (long calls)
    sweep_rounds: int = 5  # baseline vs unfused vs the DenoiseRep⁻ step sweep
    dense_sweep_rounds: int = 3
    train_rounds: int = 4
    warmup: int = 2
    train_warmup: int = 0  # the FLOP-counted step before the timed ones is the warm-up
    step_sweep: tuple[int, ...] = DENOISE_MINUS_SWEEP
    profile_training: bool = True
    threads: int | None = None  # torch CPU threads; None keeps torch's default
    dense: bool = False  # paper-recipe: the detection and segmentation demos too


def apply_threads(settings: Settings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """CPU: batch 1 at inference, 8 and 32 in training (8: the reference measurement's batch);
    CUDA: 32 at inference, 8 and 32 in training, more rounds, since calls are short. ``--batch``
    sets one batch for everything."""
    if args.device == "cuda":
        batch = args.batch or 32
        base = Settings(device="cuda", infer_batch=batch, train_batch=args.batch or 8, precise_rounds=50,
                        dense_precise_rounds=30, sweep_rounds=10, dense_sweep_rounds=5, train_rounds=10, warmup=5)
    else:
        base = Settings(infer_batch=args.batch or 1, train_batch=args.batch or 8)
    if args.batch:
        base = replace(base, scaling_batches=())
    if args.quick:
        base = replace(base, infer_batch=args.batch or 1, train_batch=args.batch or 2, scaling_batches=(), precise_rounds=3,
                       dense_precise_rounds=2, sweep_rounds=2, dense_sweep_rounds=1, train_rounds=2, warmup=1,
                       step_sweep=(1, 10), profile_training=False)
    return replace(base, dtype=args.dtype, quick=args.quick, threads=args.threads, dense=getattr(args, "dense", False))


def autocast(settings: Settings) -> contextlib.AbstractContextManager:
    """bf16 runs under autocast (weights stay float32, as a user would deploy them)."""
    if settings.dtype == "bf16":
        return torch.autocast(settings.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def clock_for(settings: Settings) -> Callable[[Callable[[], object]], float]:
    return cuda_clock if settings.device == "cuda" else cpu_clock
