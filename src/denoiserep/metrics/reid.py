"""Person re-identification evaluation: CMC / mAP and k-reciprocal re-ranking.

Protocol (Market-1501 / torchreid / fast-reid convention): for every query the
gallery samples that share BOTH its identity and its camera are "junk" and are
removed before ranking (re-finding the same person in the same camera is not
re-identification). The remaining same-identity samples are the true matches.
A query without any true match is skipped and counted, not scored as zero.

Ranking is stable: gallery samples at exactly the same distance keep their
gallery order, i.e. ties are broken by gallery index. torchreid calls
``np.argsort`` and gets this order in practice; here it is guaranteed.

Scale: the work is chunked over queries and only the *relevant* gallery
entries of each query (true matches and junk, a few dozen) are ranked, by
binary search into the sorted distance row. No full ``argsort`` and, with
:func:`evaluate_features`, no full query x gallery distance matrix is ever
built, so MSMT17 (11,659 x 82,161) runs in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

METRICS = ("cosine", "euclidean")
DEFAULT_CHUNK_SIZE = 128


@dataclass(frozen=True)
class ReidMetrics:
    """Result of a ReID evaluation.

    ``cmc[k]`` is the fraction of valid queries whose first true match is
    within the top ``k + 1`` results; it always has ``max_rank`` entries. When
    fewer gallery samples than ``max_rank`` survive junk removal the curve is
    simply flat at its last value (every rank past the gallery end adds no
    new match), which is the same as padding with the last value.
    """

    cmc: np.ndarray
    mAP: float
    num_valid_queries: int
    num_skipped_queries: int


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def evaluate(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """CMC curve and mAP from a query x gallery distance matrix (torchreid API)."""
    metrics = evaluate_detailed(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    return metrics.cmc, metrics.mAP


def evaluate_detailed(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ReidMetrics:
    """Like :func:`evaluate` but also reports how many queries were skipped."""
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (queries x gallery), got shape {distmat.shape}")
    ids = _validate_ids(
        distmat.shape[0], distmat.shape[1], q_pids, g_pids, q_camids, g_camids, "distmat rows", "distmat columns"
    )
    _check_positive(max_rank, "max_rank")
    _check_positive(chunk_size, "chunk_size")

    def chunks() -> Iterator[tuple[slice, np.ndarray]]:
        for rows in _row_slices(distmat.shape[0], chunk_size):
            yield rows, distmat[rows]

    return _evaluate_chunks(chunks(), *ids, max_rank)


def evaluate_features(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    metric: str = "cosine",
    normalize: bool = True,
    max_rank: int = 50,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ReidMetrics:
    """Evaluate from features, computing distances ``chunk_size`` queries at a time.

    Peak extra memory is O(chunk_size x num_gallery) plus one (normalised)
    copy of the gallery features, instead of the O(num_query x num_gallery)
    a full distance matrix needs (3.8 GB in float32 for MSMT17). Distances
    are computed on the device of the given tensors (numpy input: CPU) and
    ranked on the CPU. Metrics are as in :func:`compute_distance`.
    """
    q = _as_feature_tensor(q_feats, "query")
    g = _as_feature_tensor(g_feats, "gallery")
    _check_feature_dims(q, g)
    ids = _validate_ids(
        q.shape[0], g.shape[0], q_pids, g_pids, q_camids, g_camids, "query features", "gallery features"
    )
    _check_metric(metric)
    _check_positive(max_rank, "max_rank")
    _check_positive(chunk_size, "chunk_size")
    if normalize:
        q, g = _l2_normalize(q), _l2_normalize(g)
    return _evaluate_chunks(_distance_blocks(q, g, metric, chunk_size), *ids, max_rank)


def compute_distance(
    q: np.ndarray | torch.Tensor,
    g: np.ndarray | torch.Tensor,
    metric: str = "cosine",
    normalize: bool = True,
) -> np.ndarray:
    """Full query x gallery distance matrix (float32 numpy).

    ``"cosine"`` is ``1 - q . g`` (the cosine distance once features are
    normalised); ``"euclidean"`` is the *squared* Euclidean distance, as in
    torchreid and fast-reid (same ranking, cheaper, and what their
    re-ranking expects). ``normalize`` L2-normalises features first.
    """
    q_t = _as_feature_tensor(q, "query")
    g_t = _as_feature_tensor(g, "gallery")
    _check_feature_dims(q_t, g_t)
    _check_metric(metric)
    if normalize:
        q_t, g_t = _l2_normalize(q_t), _l2_normalize(g_t)
    return _distance_block(q_t, g_t, _gallery_squared_norms(g_t, metric)).cpu().numpy()


def re_ranking(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017); returns a new q x g distance.

    Two images are likely the same person when each is among the other's
    nearest neighbours (k-reciprocal). Every image gets a soft neighbour set
    (the k-reciprocal set, expanded by its neighbours' half-size sets), and
    the final distance blends the Jaccard distance of those sets with the
    original distance: ``(1 - lambda) * jaccard + lambda * original``.

    As in the reference implementation the inputs are squared and each row is
    divided by its maximum, so the output of ``lambda_value=1`` is that
    rescaled original distance. Memory is O((q + g)^2): meant for
    Market/Duke-sized test sets, not MSMT17.
    """
    q_g_dist = np.asarray(q_g_dist, dtype=np.float32)
    num_query = q_g_dist.shape[0]
    _check_rerank_shapes(q_g_dist, np.asarray(q_q_dist), np.asarray(g_g_dist))
    for name, value in (("k1", k1), ("k2", k2)):
        _check_positive(value, name)
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")

    original = _joint_rescaled_distance(q_g_dist, np.asarray(q_q_dist), np.asarray(g_g_dist))
    initial_rank = np.argsort(original, axis=1, kind="stable")
    weights = _k_reciprocal_weights(original, initial_rank, k1)
    if k2 > 1:
        weights = _local_query_expansion(weights, initial_rank, k2)
    jaccard = _jaccard_distance(weights, num_query)
    return (1.0 - lambda_value) * jaccard + lambda_value * original[:num_query, num_query:]


# ----------------------------------------------------------------------------
# Chunked CMC / AP
# ----------------------------------------------------------------------------


def _evaluate_chunks(
    chunks: Iterator[tuple[slice, np.ndarray]],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int,
) -> ReidMetrics:
    """Aggregate per-query first-match rank and AP over query chunks."""
    num_query = len(q_pids)
    first_rank = np.full(num_query, -1, dtype=np.int64)
    average_precision = np.zeros(num_query, dtype=np.float64)
    for rows, dist in chunks:
        dist = _as_rankable(dist)
        first_rank[rows], average_precision[rows] = _score_chunk(dist, q_pids[rows], g_pids, q_camids[rows], g_camids)

    valid = first_rank >= 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            f"no query has a valid match: all {num_query} queries only match gallery samples "
            "of the same identity in the same camera, which the protocol discards"
        )
    first_match_histogram = np.bincount(np.minimum(first_rank[valid], max_rank), minlength=max_rank + 1)
    cmc = np.cumsum(first_match_histogram[:max_rank]) / num_valid
    return ReidMetrics(
        cmc=cmc.astype(np.float32),
        mAP=float(average_precision[valid].mean()),
        num_valid_queries=num_valid,
        num_skipped_queries=num_query - num_valid,
    )


def _score_chunk(
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """First true-match rank (-1 if none) and AP for each query row of ``dist``.

    Only true matches and junk entries matter for CMC/AP: a true match's rank
    after junk removal is its stable rank among all gallery samples minus the
    number of junk samples ranked before it.
    """
    num_rows = dist.shape[0]
    same_pid = q_pids[:, None] == g_pids[None, :]
    same_cam = q_camids[:, None] == g_camids[None, :]
    is_match = same_pid & ~same_cam
    rows, cols = np.nonzero(same_pid)  # true matches and junk, row-major
    ranks = _stable_ranks(dist, rows, cols)

    # Walk each row's relevant entries in rank order.
    order = np.lexsort((ranks, rows))
    rows, ranks, matched = rows[order], ranks[order], is_match[rows[order], cols[order]]
    junk_so_far = _running_count_within_rows(~matched, rows)
    matches_so_far = _running_count_within_rows(matched, rows)
    # At a true match the inclusive junk count is exactly the junk ranked before it.
    rows, kept_rank, nth_match = rows[matched], (ranks - junk_so_far)[matched], matches_so_far[matched]

    precision = nth_match / (kept_rank + 1.0)
    num_matches = np.bincount(rows, minlength=num_rows)
    average_precision = np.bincount(rows, weights=precision, minlength=num_rows) / np.maximum(num_matches, 1)
    first_rank = np.full(num_rows, -1, dtype=np.int64)
    first_rank[rows[nth_match == 1]] = kept_rank[nth_match == 1]
    return first_rank, average_precision


def _stable_ranks(dist: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """0-based position of ``dist[rows[i], cols[i]]`` in a stable sort of its row.

    Position = (#entries strictly closer) + (#entries at the same distance
    with a smaller gallery index), found by binary search in the sorted row;
    only the rare exact ties are counted directly.
    """
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    sorted_dist = torch.from_numpy(np.sort(dist, axis=1))
    padded, slot = _pad_by_row(dist[rows, cols], rows, dist.shape[0])
    values = torch.from_numpy(padded)
    closer = torch.searchsorted(sorted_dist, values, side="left").numpy()[rows, slot]
    not_further = torch.searchsorted(sorted_dist, values, side="right").numpy()[rows, slot]
    ranks = closer.astype(np.int64)
    for i in np.flatnonzero(not_further - closer > 1):
        row, col = rows[i], cols[i]
        ranks[i] += int(np.count_nonzero(dist[row, :col] == dist[row, col]))
    return ranks


def _pad_by_row(values: np.ndarray, rows: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Scatter row-major sorted ``values`` into a (num_rows x max_per_row) array.

    Returns the padded array and each value's column slot, so results computed
    on the padded array can be gathered back with ``[rows, slot]``.
    """
    counts = np.bincount(rows, minlength=num_rows)
    slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    padded = np.zeros((num_rows, int(counts.max())), dtype=values.dtype)
    padded[rows, slot] = values
    return padded, slot


def _running_count_within_rows(flags: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Inclusive cumulative count of ``flags``, restarting at each new row.

    ``rows`` must be sorted (entries grouped by row).
    """
    total = np.cumsum(flags, dtype=np.int64)
    row_start = np.searchsorted(rows, rows, side="left")
    return total - total[row_start] + flags[row_start]


# ----------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------


def _distance_blocks(
    q: torch.Tensor, g: torch.Tensor, metric: str, chunk_size: int
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (query rows, CPU numpy distances to the whole gallery) chunk by chunk."""
    g_squared_norms = _gallery_squared_norms(g, metric)
    for rows in _row_slices(q.shape[0], chunk_size):
        yield rows, _distance_block(q[rows], g, g_squared_norms).cpu().numpy()


def _gallery_squared_norms(g: torch.Tensor, metric: str) -> torch.Tensor | None:
    """Per-gallery |g|^2, computed once and reused by every euclidean block."""
    return g.pow(2).sum(dim=1) if metric == "euclidean" else None


def _distance_block(q: torch.Tensor, g: torch.Tensor, g_squared_norms: torch.Tensor | None) -> torch.Tensor:
    """``1 - q.g`` (cosine) or ``|q|^2 + |g|^2 - 2 q.g`` (squared euclidean), in place."""
    similarity = q @ g.T
    if g_squared_norms is None:
        return similarity.neg_().add_(1.0)
    q_squared_norms = q.pow(2).sum(dim=1, keepdim=True)
    return similarity.mul_(-2.0).add_(q_squared_norms).add_(g_squared_norms).clamp_(min=0.0)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, p=2, dim=1)


def _row_slices(num_rows: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


# ----------------------------------------------------------------------------
# Re-ranking steps
# ----------------------------------------------------------------------------


def _joint_rescaled_distance(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray) -> np.ndarray:
    """(q+g) x (q+g) squared distance with every row divided by its maximum."""
    joint = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32) ** 2
    row_max = joint.max(axis=1, keepdims=True)
    return joint / np.where(row_max > 0, row_max, 1.0)


def _k_reciprocal_neighbours(initial_rank: np.ndarray, index: int, k: int) -> np.ndarray:
    """Images among the k nearest of ``index`` that also have ``index`` among theirs."""
    forward = initial_rank[index, : k + 1]
    backward = initial_rank[forward, : k + 1]
    return forward[(backward == index).any(axis=1)]


def _expanded_neighbours(initial_rank: np.ndarray, index: int, k1: int) -> np.ndarray:
    """k-reciprocal set, grown by neighbours' half-size sets that mostly overlap it.

    Hard positives are often missing from the k-reciprocal set; a candidate's
    own k1/2-reciprocal set is added when more than 2/3 of it is already in
    the set, which recovers them without pulling in whole negative clusters.
    """
    core = _k_reciprocal_neighbours(initial_rank, index, k1)
    half_k = int(np.around(k1 / 2.0))
    expanded = [core]
    for candidate in core:
        candidate_set = _k_reciprocal_neighbours(initial_rank, candidate, half_k)
        if len(np.intersect1d(candidate_set, core)) > 2.0 / 3.0 * len(candidate_set):
            expanded.append(candidate_set)
    return np.unique(np.concatenate(expanded))


def _k_reciprocal_weights(original: np.ndarray, initial_rank: np.ndarray, k1: int) -> np.ndarray:
    """Row i: Gaussian-kernel weights over i's expanded neighbour set, summing to 1."""
    weights = np.zeros_like(original, dtype=np.float32)
    for i in range(original.shape[0]):
        neighbours = _expanded_neighbours(initial_rank, i, k1)
        kernel = np.exp(-original[i, neighbours])
        weights[i, neighbours] = kernel / kernel.sum()
    return weights


def _local_query_expansion(weights: np.ndarray, initial_rank: np.ndarray, k2: int) -> np.ndarray:
    """Average each row with its k2 - 1 nearest neighbours' rows (smooths the sets)."""
    expanded = np.empty_like(weights)
    for i in range(weights.shape[0]):
        expanded[i] = weights[initial_rank[i, :k2]].mean(axis=0)
    return expanded


def _jaccard_distance(weights: np.ndarray, num_query: int) -> np.ndarray:
    """1 - |A & B| / |A | B| between query rows and gallery rows (fuzzy sets).

    Rows are probability vectors, so the union mass is ``2 - intersection``.
    Only the query's non-zero columns can contribute to the intersection.
    """
    gallery = weights[num_query:]
    jaccard = np.empty((num_query, gallery.shape[0]), dtype=np.float32)
    for i in range(num_query):
        support = np.flatnonzero(weights[i])
        intersection = np.minimum(weights[i, support][None, :], gallery[:, support]).sum(axis=1)
        jaccard[i] = 1.0 - intersection / (2.0 - intersection)
    return jaccard


# ----------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------


def _validate_ids(
    num_query: int,
    num_gallery: int,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    query_source: str,
    gallery_source: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Check id arrays against the query/gallery sizes; return them as 1-D int64."""
    if num_gallery == 0:
        raise ValueError("gallery is empty: need at least one gallery sample to rank against")
    if num_query == 0:
        raise ValueError("query set is empty: need at least one query to evaluate")
    arrays = {"q_pids": q_pids, "g_pids": g_pids, "q_camids": q_camids, "g_camids": g_camids}
    arrays = {name: np.asarray(values).reshape(-1).astype(np.int64) for name, values in arrays.items()}
    for name, expected, source in (
        ("q_pids", num_query, query_source),
        ("q_camids", num_query, query_source),
        ("g_pids", num_gallery, gallery_source),
        ("g_camids", num_gallery, gallery_source),
    ):
        if len(arrays[name]) != expected:
            raise ValueError(
                f"length mismatch: {name} has {len(arrays[name])} entries but there are {expected} {source}"
            )
    shared = np.intersect1d(arrays["q_pids"], arrays["g_pids"])
    if shared.size == 0:
        raise ValueError(
            "none of the query identities appear in the gallery "
            f"(query pids {_preview(arrays['q_pids'])}, gallery pids {_preview(arrays['g_pids'])}); "
            "are query and gallery from the same dataset?"
        )
    return arrays["q_pids"], arrays["g_pids"], arrays["q_camids"], arrays["g_camids"]


def _preview(pids: np.ndarray, limit: int = 5) -> str:
    unique = np.unique(pids)
    shown = ", ".join(str(p) for p in unique[:limit])
    return f"[{shown}{', ...' if unique.size > limit else ''}] ({unique.size} unique)"


def _as_feature_tensor(feats: np.ndarray | torch.Tensor, role: str) -> torch.Tensor:
    """2-D float32 tensor without NaN, on its original device (zero-copy for float32 numpy)."""
    tensor = torch.as_tensor(feats).detach()
    if tensor.ndim != 2:
        raise ValueError(f"{role} features must be 2-D (num_samples x dim), got shape {tuple(tensor.shape)}")
    tensor = tensor.float()
    num_nan = int(torch.isnan(tensor).sum())
    if num_nan:
        raise ValueError(f"{role} features contain NaN ({num_nan} values); the model output is broken")
    return tensor


def _check_feature_dims(q: torch.Tensor, g: torch.Tensor) -> None:
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"feature dim mismatch: query features have dim {q.shape[1]} "
            f"but gallery features have dim {g.shape[1]}"
        )


def _as_rankable(dist: np.ndarray) -> np.ndarray:
    """Contiguous float32/float64 distances without NaN.

    float32 stays float32 (the MSMT17-scale path); anything else becomes
    float64 so that casting can never create ties that change the ranking.
    """
    dtype = np.float32 if dist.dtype == np.float32 else np.float64
    dist = np.ascontiguousarray(dist, dtype=dtype)
    if np.isnan(dist).any():
        raise ValueError("distances contain NaN; cannot rank the gallery")
    return dist


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def _check_positive(value: int, name: str) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_rerank_shapes(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray) -> None:
    num_query, num_gallery = q_g.shape
    if q_q.shape != (num_query, num_query) or g_g.shape != (num_gallery, num_gallery):
        raise ValueError(
            f"re-ranking needs q_q_dist ({num_query}, {num_query}) and g_g_dist ({num_gallery}, {num_gallery}) "
            f"to match q_g_dist {q_g.shape}; got {q_q.shape} and {g_g.shape}"
        )
