"""Time and memory of ReID evaluation at MSMT17 scale on synthetic features.

A full float32 query x gallery distance matrix at MSMT17 scale
(11,659 x 82,161) is 3.8 GB, and torchreid's evaluation adds several
same-sized int64 arrays on top. ``evaluate_features`` works query-chunk by
query-chunk; this script checks that claim with numbers.

Usage::

    python benchmarks/reid_eval_scale.py                      # MSMT17 scale
    python benchmarks/reid_eval_scale.py --chunk-sizes 64 256 # compare chunks

Memory columns:
  * numpy peak: tracemalloc peak during evaluation (numpy reports its
    allocations to tracemalloc; torch's matmul buffers are not included).
  * RSS peak increase: resident-set high-water mark during evaluation minus
    RSS before it (Linux ``/proc/self/clear_refs`` reset; covers torch too).
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denoiserep.metrics.reid import evaluate_features

MIB = 1024 * 1024


@dataclass(frozen=True)
class SyntheticSplit:
    q_feats: np.ndarray
    g_feats: np.ndarray
    q_pids: np.ndarray
    g_pids: np.ndarray
    q_camids: np.ndarray
    g_camids: np.ndarray


def make_split(num_query: int, num_gallery: int, dim: int, num_ids: int, num_cams: int, seed: int) -> SyntheticSplit:
    """Identity-clustered features: a random centre per id plus Gaussian noise.

    The noise level gives a mid-range mAP, so ranks are realistic (true
    matches spread over the ranking rather than all at the top).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    g_pids = rng.integers(0, num_ids, num_gallery)
    q_pids = rng.choice(g_pids, num_query)  # every query identity is in the gallery

    def features(pids: np.ndarray) -> np.ndarray:
        feats = rng.standard_normal((len(pids), dim), dtype=np.float32)
        feats *= 2.0
        feats += centres[pids]
        return feats

    return SyntheticSplit(
        q_feats=features(q_pids),
        g_feats=features(g_pids),
        q_pids=q_pids,
        g_pids=g_pids,
        q_camids=rng.integers(0, num_cams, num_query),
        g_camids=rng.integers(0, num_cams, num_gallery),
    )


def current_rss_mib() -> float:
    return _status_field_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _status_field_kib("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_field_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def run_once(split: SyntheticSplit, metric: str, chunk_size: int) -> dict[str, float]:
    rss_before = current_rss_mib()
    peak_reset = reset_peak_rss()
    tracemalloc.start()
    start = time.perf_counter()
    metrics = evaluate_features(
        split.q_feats, split.g_feats, split.q_pids, split.g_pids, split.q_camids, split.g_camids,
        metric=metric, chunk_size=chunk_size,
    )
    seconds = time.perf_counter() - start
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = peak_rss_mib() if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "chunk": chunk_size,
        "seconds": seconds,
        "numpy_peak_mib": numpy_peak / MIB,
        "rss_increase_mib": rss_peak - rss_before,
        "rss_peak_mib": rss_peak,
        "peak_is_eval_only": peak_reset,
        "mAP": metrics.mAP,
        "rank1": float(metrics.cmc[0]),
        "valid": metrics.num_valid_queries,
        "skipped": metrics.num_skipped_queries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-query", type=int, default=11_659)
    parser.add_argument("--num-gallery", type=int, default=82_161)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--num-ids", type=int, default=3_060)
    parser.add_argument("--num-cams", type=int, default=15)
    parser.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    split = make_split(args.num_query, args.num_gallery, args.dim, args.num_ids, args.num_cams, args.seed)
    full_distmat_mib = args.num_query * args.num_gallery * 4 / MIB
    print(
        f"{args.num_query} queries x {args.num_gallery} gallery, dim {args.dim}, {args.num_ids} ids, "
        f"{args.num_cams} cameras, metric {args.metric}; a full float32 distmat would be {full_distmat_mib:,.0f} MiB\n"
    )
    print("| chunk | time (s) | numpy peak (MiB) | RSS peak increase (MiB) | RSS peak (MiB) | mAP | rank-1 | valid / skipped queries |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for chunk_size in args.chunk_sizes:
        r = run_once(split, args.metric, chunk_size)
        rss_note = "" if r["peak_is_eval_only"] else " (process lifetime maxrss)"
        print(
            f"| {r['chunk']} | {r['seconds']:.1f} | {r['numpy_peak_mib']:.0f} | {r['rss_increase_mib']:.0f}{rss_note} | "
            f"{r['rss_peak_mib']:.0f} | {r['mAP']:.4f} | {r['rank1']:.4f} | {r['valid']} / {r['skipped']} |"
        )


if __name__ == "__main__":
    main()
