"""Latency measured fairly on a shared, noisy machine: interleaved runs, medians, ratios."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_latency(
    candidates: dict[str, Callable[[], object]], *, repeats: int = 20, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Time every candidate once per round (A B C A B C …) and report per-candidate medians.

    Interleaving spreads the machine's background load evenly across candidates, so the
    ratios between medians are meaningful even when absolute times drift. Returns
    ``{name: {"median_ms", "q1_ms", "q3_ms"}}``.
    """
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in candidates.values():
                fn()
        for _ in range(repeats):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, values in samples.items():
        q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        out[name] = {"median_ms": statistics.median(values), "q1_ms": q1, "q3_ms": q3}
    return out
