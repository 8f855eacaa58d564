"""What a forward costs: latency measured fairly on a shared, noisy machine (interleaved
runs, medians, per-round ratios) and FLOPs as torch's counter counts them.

Used by the benchmarks (`denoiserep.bench`) and by the pipeline's cost columns.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm


@dataclass(frozen=True)
class Timing:
    """Median and interquartile range of one callable, and of its per-round ratio to the
    baseline, with a bootstrap 95% confidence interval of that median ratio."""

    median_s: float
    iqr_s: float
    ratio: float
    ratio_iqr: float
    ratio_ci: tuple[float, float]


def cpu_clock(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_clock(fn: Callable[[], object]) -> float:
    """CUDA events time the device work, not the host's kernel launches."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    clock: Callable[[Callable[[], object]], float] = cpu_clock,
    desc: str = "timing",
) -> dict[str, list[float]]:
    """Seconds per call, one call of each callable per round.

    The order rotates every round (A B C, B C A, …) so that no callable always runs right
    after the same neighbour (caches, CPU frequency); background load then hits all of
    them alike, which is what makes per-round ratios meaningful on a shared machine.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    with tqdm(total=rounds * len(names), desc=desc, file=sys.stderr, leave=False, disable=None) as progress:
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(clock(fns[name]))
                progress.update()
    return times


def median_ci(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of the median: says whether a ratio's distance from a target is
    resolved by the measurement or lost in the machine's noise."""
    rng = np.random.default_rng(seed)
    medians = np.median(values[rng.integers(0, len(values), (resamples, len(values)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, Timing]:
    """Median/IQR per callable; the ratio is the median over rounds of ``t / t_baseline``."""
    base = np.asarray(times[baseline])
    out = {}
    for name, values in times.items():
        t = np.asarray(values)
        q1, q2, q3 = np.percentile(t, [25, 50, 75])
        r1, r2, r3 = np.percentile(t / base, [25, 50, 75])
        out[name] = Timing(float(q2), float(q3 - q1), float(r2), float(r3 - r1), median_ci(t / base))
    return out


def time_interleaved(
    fns: dict[str, Callable[[], object]], baseline: str, rounds: int, warmup: int = 1,
    clock: Callable[[Callable[[], object]], float] = cpu_clock, desc: str = "timing",
) -> dict[str, Timing]:
    return summarize(interleaved_times(fns, rounds, warmup, clock, desc), baseline)


def forward_flops(model: torch.nn.Module, *inputs) -> int:
    """FLOPs of one ``model(*inputs)`` without gradients (``torch.utils.flop_counter``:
    matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()
