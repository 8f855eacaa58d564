"""Specification of ReID evaluation: CMC / mAP protocol, scale path, re-ranking, errors."""

from __future__ import annotations

import numpy as np
import pytest

from denoiserep.metrics.reid import (
    ReidMetrics,
    compute_distance,
    evaluate,
    evaluate_detailed,
    evaluate_features,
    re_ranking,
)


def brute_force_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """The protocol written out query by query (torchreid's loop, stable sort)."""
    all_cmc, all_ap = [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        hits = (g_pids[order] == q_pids[i])[~junk].astype(int)
        if not hits.any():
            continue
        cmc = np.minimum(hits.cumsum(), 1)
        cmc = np.concatenate([cmc, np.full(max(0, max_rank - len(cmc)), cmc[-1])])[:max_rank]
        precision_at_k = hits.cumsum() / np.arange(1, len(hits) + 1)
        all_cmc.append(cmc)
        all_ap.append((precision_at_k * hits).sum() / hits.sum())
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), len(all_ap)


def random_problem(seed: int, integer_distances: bool):
    rng = np.random.default_rng(seed)
    num_query, num_gallery = int(rng.integers(5, 30)), int(rng.integers(20, 120))
    q_pids, g_pids = rng.integers(0, 8, num_query), rng.integers(0, 8, num_gallery)
    q_camids, g_camids = rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)
    if integer_distances:  # many exact ties
        distmat = rng.integers(0, 4, (num_query, num_gallery)).astype(np.float64)
    else:
        distmat = rng.random((num_query, num_gallery)).astype(np.float32)
    return distmat, q_pids, g_pids, q_camids, g_camids


def clustered_features(seed: int, num_ids: int = 12, per_id: int = 5, dim: int = 16, noise: float = 0.8):
    """Query/gallery features with identity structure (one query per id)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim))
    g_pids = np.repeat(np.arange(num_ids), per_id)
    q_pids = np.arange(num_ids)
    g_feats = (centres[g_pids] + noise * rng.standard_normal((len(g_pids), dim))).astype(np.float32)
    q_feats = (centres[q_pids] + noise * rng.standard_normal((num_ids, dim))).astype(np.float32)
    q_camids = np.zeros(num_ids, dtype=int)
    g_camids = rng.integers(1, 4, len(g_pids))  # no junk: every gallery match is a valid match
    return q_feats, g_feats, q_pids, g_pids, q_camids, g_camids


# ----------------------------------------------------------------------------
# The protocol on hand-computed cases
# ----------------------------------------------------------------------------


def test_same_identity_same_camera_gallery_samples_are_removed_before_ranking():
    # Query: pid 1, camera 0. Gallery sorted by distance: the same-camera shot
    # of pid 1 (junk), pid 2, pid 1 in camera 1, pid 3.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4]])
    cmc, mAP = evaluate(distmat, np.array([1]), np.array([1, 2, 1, 3]), np.array([0]), np.array([0, 1, 1, 1]), max_rank=3)
    # Without the junk entry the true match is second: rank-1 miss, AP = 1/2.
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0])
    assert mAP == pytest.approx(0.5)


def test_average_precision_averages_precision_at_each_true_match():
    # Ranked gallery: match, miss, match -> AP = (1/1 + 2/3) / 2
    distmat = np.array([[0.1, 0.2, 0.3]])
    metrics = evaluate_detailed(distmat, np.array([7]), np.array([7, 8, 7]), np.array([0]), np.array([1, 1, 2]), max_rank=3)
    assert metrics.mAP == pytest.approx((1 + 2 / 3) / 2)
    np.testing.assert_allclose(metrics.cmc, [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    ("g_pids", "expected_rank1", "expected_ap"),
    [
        ([2, 1], 0.0, 0.5),  # the non-match comes first in gallery order and wins the tie
        ([1, 2], 1.0, 1.0),  # the match comes first in gallery order and wins the tie
    ],
)
def test_ties_are_broken_by_gallery_order(g_pids, expected_rank1, expected_ap):
    distmat = np.array([[0.5, 0.5]])
    metrics = evaluate_detailed(distmat, np.array([1]), np.array(g_pids), np.array([0]), np.array([1, 1]), max_rank=2)
    assert metrics.cmc[0] == expected_rank1
    assert metrics.mAP == pytest.approx(expected_ap)


def test_query_without_valid_match_is_skipped_and_counted():
    # Query 0 (pid 1) has a match in another camera; query 1 (pid 2) only has
    # a same-camera shot of itself, so it cannot be scored.
    distmat = np.array([[0.2, 0.1], [0.3, 0.1]])
    metrics = evaluate_detailed(
        distmat, np.array([1, 2]), np.array([1, 2]), np.array([0, 0]), np.array([1, 0]), max_rank=2
    )
    assert (metrics.num_valid_queries, metrics.num_skipped_queries) == (1, 1)
    # Only query 0 counts: its match is ranked 2nd (pid 2 is closer).
    np.testing.assert_allclose(metrics.cmc, [0.0, 1.0])
    assert metrics.mAP == pytest.approx(0.5)


def test_distractors_are_ordinary_negatives():
    # Market-1501 keeps pid-0 distractors in the gallery; they only push matches down.
    distmat = np.array([[0.1, 0.2]])
    cmc, mAP = evaluate(distmat, np.array([5]), np.array([0, 5]), np.array([0]), np.array([1, 1]), max_rank=2)
    np.testing.assert_allclose(cmc, [0.0, 1.0])
    assert mAP == pytest.approx(0.5)


def test_cmc_has_max_rank_entries_even_when_gallery_is_smaller():
    distmat = np.array([[0.3, 0.1, 0.2]])
    cmc, _ = evaluate(distmat, np.array([1]), np.array([2, 3, 1]), np.array([0]), np.array([1, 1, 1]), max_rank=6)
    # Match at rank 2; past the 3-image gallery the curve stays at its last value.
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1, 1])


def test_evaluate_returns_cmc_and_map_of_evaluate_detailed():
    problem = random_problem(0, integer_distances=False)
    cmc, mAP = evaluate(*problem, max_rank=10)
    detailed = evaluate_detailed(*problem, max_rank=10)
    assert isinstance(detailed, ReidMetrics)
    np.testing.assert_array_equal(cmc, detailed.cmc)
    assert mAP == detailed.mAP
    assert 0.0 <= mAP <= 1.0 and cmc.shape == (10,)


# ----------------------------------------------------------------------------
# Agreement with the per-query reference, and scale path consistency
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("integer_distances", [False, True], ids=["continuous", "many-ties"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_per_query_reference(seed, integer_distances):
    problem = random_problem(seed, integer_distances)
    expected_cmc, expected_map, expected_valid = brute_force_reference(*problem, max_rank=20)
    metrics = evaluate_detailed(*problem, max_rank=20, chunk_size=4)
    np.testing.assert_allclose(metrics.cmc, expected_cmc, atol=1e-6)
    assert metrics.mAP == pytest.approx(expected_map)
    assert metrics.num_valid_queries == expected_valid
    assert metrics.num_valid_queries + metrics.num_skipped_queries == len(problem[1])


@pytest.mark.parametrize(("metric", "normalize"), [("cosine", True), ("euclidean", True), ("euclidean", False)])
def test_evaluate_features_equals_evaluate_on_the_full_distmat(metric, normalize):
    q_feats, g_feats, q_pids, g_pids, q_camids, g_camids = clustered_features(seed=1, noise=1.5)
    distmat = compute_distance(q_feats, g_feats, metric=metric, normalize=normalize)
    from_distmat = evaluate_detailed(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10)
    from_features = evaluate_features(
        q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, metric=metric, normalize=normalize, max_rank=10, chunk_size=5
    )
    np.testing.assert_allclose(from_features.cmc, from_distmat.cmc)
    assert from_features.mAP == pytest.approx(from_distmat.mAP)


def test_result_does_not_depend_on_chunk_size():
    q_feats, g_feats, q_pids, g_pids, q_camids, g_camids = clustered_features(seed=2, noise=1.5)
    results = [
        evaluate_features(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, max_rank=8, chunk_size=chunk)
        for chunk in (1, 3, 7, 1000)
    ]
    for other in results[1:]:
        np.testing.assert_array_equal(other.cmc, results[0].cmc)
        assert other.mAP == pytest.approx(results[0].mAP, abs=1e-12)


def test_compute_distance_metrics():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((5, 6)).astype(np.float32)
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(compute_distance(q, g, "cosine", normalize=True), 1 - qn @ gn.T, atol=1e-5)
    # "euclidean" is the squared distance (torchreid / fast-reid convention).
    squared = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(compute_distance(q, g, "euclidean", normalize=False), squared, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# k-reciprocal re-ranking
# ----------------------------------------------------------------------------


def pairwise(q_feats, g_feats):
    return (
        compute_distance(q_feats, g_feats, "euclidean"),
        compute_distance(q_feats, q_feats, "euclidean"),
        compute_distance(g_feats, g_feats, "euclidean"),
    )


def test_re_ranking_returns_finite_query_by_gallery_distances():
    q_feats, g_feats, *_ = clustered_features(seed=3)
    reranked = re_ranking(*pairwise(q_feats, g_feats), k1=6, k2=3)
    assert reranked.shape == (len(q_feats), len(g_feats))
    assert np.isfinite(reranked).all()
    assert reranked.min() >= 0.0


def test_re_ranking_with_lambda_one_keeps_the_original_ranking():
    q_feats, g_feats, *_ = clustered_features(seed=4)
    q_g, q_q, g_g = pairwise(q_feats, g_feats)
    reranked = re_ranking(q_g, q_q, g_g, k1=6, k2=3, lambda_value=1.0)
    np.testing.assert_array_equal(np.argsort(reranked, axis=1, kind="stable"), np.argsort(q_g, axis=1, kind="stable"))


def test_re_ranking_improves_map_when_identities_form_clusters():
    # Several gallery images per identity: neighbours-of-neighbours evidence
    # recovers matches that the raw distance ranks too low.
    q_feats, g_feats, q_pids, g_pids, q_camids, g_camids = clustered_features(seed=9, num_ids=20, per_id=6, noise=1.2)
    q_g, q_q, g_g = pairwise(q_feats, g_feats)
    before = evaluate_detailed(q_g, q_pids, g_pids, q_camids, g_camids, max_rank=5).mAP
    after = evaluate_detailed(re_ranking(q_g, q_q, g_g, k1=6, k2=3), q_pids, g_pids, q_camids, g_camids, max_rank=5).mAP
    assert before < 0.9
    assert after > before + 0.03


# ----------------------------------------------------------------------------
# Bad input fails loudly with a message that says what is wrong
# ----------------------------------------------------------------------------


def test_empty_gallery_is_rejected():
    with pytest.raises(ValueError, match="gallery is empty"):
        evaluate(np.zeros((2, 0)), np.array([1, 2]), np.array([], dtype=int), np.array([0, 0]), np.array([], dtype=int))


def test_feature_dim_mismatch_names_both_dims():
    with pytest.raises(ValueError, match=r"query features have dim 8 but gallery features have dim 16"):
        evaluate_features(
            np.zeros((3, 8), np.float32), np.zeros((4, 16), np.float32),
            np.arange(3), np.arange(4), np.zeros(3), np.ones(4),
        )


@pytest.mark.parametrize(
    ("name", "lengths", "expected"),
    [
        ("q_pids", (4, 5, 3, 5), "q_pids has 4 entries but there are 3 distmat rows"),
        ("g_camids", (3, 5, 3, 6), "g_camids has 6 entries but there are 5 distmat columns"),
    ],
)
def test_id_arrays_must_match_distmat_shape(name, lengths, expected):
    q_pids, g_pids, q_camids, g_camids = (np.zeros(n, dtype=int) for n in lengths)
    with pytest.raises(ValueError, match=expected):
        evaluate(np.zeros((3, 5)), q_pids, g_pids, q_camids, g_camids)


def test_query_identities_absent_from_gallery_are_rejected():
    with pytest.raises(ValueError, match=r"none of the query identities appear in the gallery \(query pids \[1, 2\]"):
        evaluate(np.zeros((2, 3)), np.array([1, 2]), np.array([7, 8, 9]), np.zeros(2), np.ones(3))


def test_all_queries_without_valid_match_is_an_error_not_a_zero_score():
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate(np.zeros((1, 2)), np.array([1]), np.array([1, 2]), np.array([0]), np.array([0, 1]))


@pytest.mark.parametrize("role", ["query", "gallery"])
def test_nan_features_are_rejected(role):
    feats = {"query": np.ones((2, 4), np.float32), "gallery": np.ones((3, 4), np.float32)}
    feats[role][1, 2] = np.nan
    with pytest.raises(ValueError, match=f"{role} features contain NaN"):
        evaluate_features(feats["query"], feats["gallery"], np.arange(2), np.arange(3), np.zeros(2), np.ones(3))


def test_nan_distances_are_rejected():
    with pytest.raises(ValueError, match="distances contain NaN"):
        evaluate(np.array([[np.nan, 0.1]]), np.array([1]), np.array([1, 2]), np.array([0]), np.array([1, 1]))


def test_unknown_metric_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"unknown metric 'manhattan'; expected one of \('cosine', 'euclidean'\)"):
        compute_distance(np.ones((1, 2)), np.ones((1, 2)), metric="manhattan")


def test_re_ranking_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match=r"q_q_dist \(2, 2\) and g_g_dist \(3, 3\)"):
        re_ranking(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((4, 4)))
