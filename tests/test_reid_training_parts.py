"""Specification of the ReID training parts: P x K sampler and batch-hard triplet loss."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy
from torch.utils.data import DataLoader

from denoiserep.tasks.reid.sampling import RandomIdentitySampler
from denoiserep.tasks.reid.losses import TripletLoss

# 12 identities with 1..9 images each, interleaved as in a real file listing.
PIDS = [pid for pid in range(12) for _ in range(1 + pid % 9)]
PIDS = [PIDS[i] for i in np.random.default_rng(0).permutation(len(PIDS))]


def pk_sampler(**overrides) -> RandomIdentitySampler:
    options = dict(pids=PIDS, batch_size=12, num_instances=3, seed=0)
    options.update(overrides)
    return RandomIdentitySampler(**options)


# ----------------------------------------------------------------------------
# RandomIdentitySampler
# ----------------------------------------------------------------------------


def test_every_batch_is_p_identities_times_k_images():
    sampler = pk_sampler()
    batches = sampler.rank_batches()
    assert len(batches) > 0
    for batch in batches:
        counts = Counter(PIDS[i] for i in batch)
        assert len(batch) == 12
        assert len(counts) == 4 and set(counts.values()) == {3}


def test_identities_with_fewer_than_k_images_are_sampled_with_replacement():
    # pid 0 has a single image: when it appears, that image fills all K slots.
    sampler = pk_sampler()
    only_image = PIDS.index(0)
    batches_with_it = [batch for batch in sampler.rank_batches() if only_image in batch]
    assert batches_with_it
    assert all(batch.count(only_image) == 3 for batch in batches_with_it)


def test_iteration_is_the_flattened_batches_and_len_matches():
    sampler = pk_sampler()
    flat = list(sampler)
    assert flat == [i for batch in sampler.rank_batches() for i in batch]
    assert len(sampler) == len(flat)


def test_dataloader_with_the_sampler_yields_pk_batches():
    sampler = pk_sampler()
    loader = DataLoader(torch.tensor(PIDS), batch_size=12, sampler=sampler, drop_last=True)
    for batch_pids in loader:
        assert sorted(Counter(batch_pids.tolist()).values()) == [3, 3, 3, 3]


def test_order_is_deterministic_per_seed_and_epoch():
    a, b = pk_sampler(seed=1), pk_sampler(seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(pk_sampler(seed=2)) != list(pk_sampler(seed=1))


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_ranks_get_disjoint_equal_sized_shards_of_the_same_global_order(num_replicas):
    batch_size = 6  # P=3 identities x K=2 images, so that every rank gets batches
    single = pk_sampler(batch_size=batch_size, num_instances=2, seed=3)
    shards = [
        pk_sampler(batch_size=batch_size, num_instances=2, seed=3, num_replicas=num_replicas, rank=r).rank_batches()
        for r in range(num_replicas)
    ]
    assert len({len(shard) for shard in shards}) == 1 and len(shards[0]) > 0
    indices = [set(i for batch in shard for i in batch) for shard in shards]
    for r in range(num_replicas):
        for other in range(r + 1, num_replicas):
            assert indices[r].isdisjoint(indices[other])
    # Interleaving the shards gives back the single-process batch order.
    interleaved = [batch for group in zip(*shards) for batch in group]
    assert interleaved == single.rank_batches()[: len(interleaved)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(batch_size=10, num_instances=3), r"batch_size \(10\) must be a positive multiple of num_instances \(3\)"),
        (dict(batch_size=64, num_instances=4), "a batch needs 16 identities .* only 12"),
        (dict(num_replicas=2, rank=2), r"rank must be in \[0, num_replicas\); got rank=2, num_replicas=2"),
    ],
)
def test_invalid_sampler_settings_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        pk_sampler(**overrides)


# ----------------------------------------------------------------------------
# TripletLoss
# ----------------------------------------------------------------------------


def two_clusters(separation: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two identities, three points each, spread 0.1 around centres ``separation`` apart."""
    offsets = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    features = torch.cat([offsets, offsets + torch.tensor([separation, 0.0])])
    return features.requires_grad_(), torch.tensor([0, 0, 0, 1, 1, 1])


def test_triplet_loss_is_zero_when_identities_are_separated_beyond_the_margin():
    features, pids = two_clusters(separation=5.0)
    assert TripletLoss(margin=0.3)(features, pids).item() == 0.0


def test_triplet_loss_is_positive_and_trainable_when_identities_overlap():
    features, pids = two_clusters(separation=0.1)
    loss = TripletLoss(margin=0.3)(features, pids)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_batch_hard_uses_the_farthest_positive_and_closest_negative():
    # 1-D: anchor 0 has positives at 0 and 1, negatives at 3 and 10.
    features = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    pids = torch.tensor([0, 0, 1, 1])
    loss = TripletLoss(margin=2.5)(features, pids)
    # relu(d_ap - d_an + 2.5) per anchor 0, 1, 3, 10:
    # relu(1 - 3 + 2.5), relu(1 - 2 + 2.5), relu(7 - 2 + 2.5), relu(7 - 9 + 2.5)
    assert loss.item() == pytest.approx((0.5 + 1.5 + 7.5 + 0.5) / 4, rel=1e-5)


def test_soft_margin_is_softplus_of_the_gap_and_never_exactly_zero():
    features, pids = two_clusters(separation=5.0)
    loss = TripletLoss(margin=None)(features, pids)
    assert 0 < loss.item() < 1e-2
    loss.backward()
    assert torch.isfinite(features.grad).all()


def test_identical_features_keep_gradients_finite():
    features = torch.zeros(4, 3, requires_grad=True)
    TripletLoss(margin=0.3, normalize_features=True)(features + 1.0, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(features.grad).all()


def test_triplet_loss_needs_two_identities():
    with pytest.raises(ValueError, match="at least two identities"):
        TripletLoss()(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))


def test_label_smoothing_comes_from_timm_with_the_torchreid_formula():
    # torchreid's CrossEntropyLabelSmooth: targets (1 - eps) * onehot + eps / C.
    logits, targets, eps = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2]), 0.1
    smoothed = (1 - eps) * torch.nn.functional.one_hot(targets, 7) + eps / 7
    expected = -(smoothed * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert LabelSmoothingCrossEntropy(smoothing=eps)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)
