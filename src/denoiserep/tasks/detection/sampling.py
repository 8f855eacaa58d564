"""Aspect-ratio grouping for distributed detection training (torchvision's reference scripts group
images by aspect ratio so that a batch pads little; here with the pipeline's global batches)."""

from __future__ import annotations

import logging

import torch

from ...train.distributed import DistInfo, GlobalBatchSampler

logger = logging.getLogger(__name__)


class AspectRatioBatchSampler(GlobalBatchSampler):
    """Global batches of ``global_batch`` images that are all wide (w ≥ h) or all tall, except at most
    one mixed batch per epoch, each split evenly across ranks, as `GlobalBatchSampler` does.

    Every epoch draws one permutation from ``seed`` and ``epoch`` and, as `GlobalBatchSampler`, leaves
    out its last ``len(aspect_ratios) % global_batch`` images (different ones every epoch); the others
    fill the two groups' batches in permutation order, and the two groups' remainders (together 0 or
    ``global_batch`` images) form the mixed batch. So every image is trained on, also one of a group
    smaller than a batch, every rank agrees on the batches, and a run is reproducible."""

    def __init__(self, aspect_ratios: list[float], global_batch: int, info: DistInfo, seed: int, epoch: int = 0):
        super().__init__(len(aspect_ratios), global_batch, info, seed, epoch)
        self.wide = [ratio >= 1.0 for ratio in aspect_ratios]

    def __iter__(self):
        generator = self.generator()
        order = torch.randperm(len(self.wide), generator=generator).tolist()[:len(self) * self.global_batch]
        batches, remainders = [], []
        for orientation in (True, False):
            group = [i for i in order if self.wide[i] == orientation]
            full = len(group) // self.global_batch * self.global_batch
            batches += [group[s:s + self.global_batch] for s in range(0, full, self.global_batch)]
            remainders += group[full:]
        if remainders:
            batches.append(remainders)
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield self.rank_share(batches[b])


def warn_about_small_groups(aspect_ratios: list[float], global_batch: int, source: str) -> None:
    """Say when an orientation has fewer images than a batch: they are batched with the other one."""
    wide = sum(ratio >= 1.0 for ratio in aspect_ratios)
    if wide in (0, len(aspect_ratios)):
        return  # one orientation: plain global batches
    for name, count in (("wide", wide), ("tall", len(aspect_ratios) - wide)):
        if count < global_batch:
            logger.warning("%s: its %d %s images are fewer than one batch of %d; every epoch they are batched with "
                           "images of the other orientation (one mixed batch, padded)", source, count, name,
                           global_batch)
