"""Aspect-ratio grouping for distributed detection training (torchvision's reference scripts group
images by aspect ratio so that a batch pads little; here with the pipeline's global batches)."""

from __future__ import annotations

import torch

from ...train.distributed import DistInfo, GlobalBatchSampler


class AspectRatioBatchSampler(GlobalBatchSampler):
    """Global batches of ``global_batch`` images that are all wide (w ≥ h) or all tall, each split
    evenly across ranks, as `GlobalBatchSampler` does.

    Every epoch draws one permutation from ``seed`` and ``epoch``, fills the two groups' batches in
    that order, drops each group's incomplete last batch and shuffles the batches' order with the
    same generator; so every rank agrees on the batches and a run is reproducible."""

    def __init__(self, aspect_ratios: list[float], global_batch: int, info: DistInfo, seed: int, epoch: int = 0):
        super().__init__(len(aspect_ratios), global_batch, info, seed, epoch)
        self.wide = [ratio >= 1.0 for ratio in aspect_ratios]
        if len(self) == 0:
            raise ValueError(f"the training set's {sum(self.wide)} wide and {len(self.wide) - sum(self.wide)} tall "
                             f"images make no full batch of {global_batch} images of one orientation")

    def __len__(self) -> int:
        wide = sum(self.wide)
        return wide // self.global_batch + (len(self.wide) - wide) // self.global_batch

    def __iter__(self):
        generator = self.generator()
        order = torch.randperm(len(self.wide), generator=generator).tolist()
        batches = []
        for orientation in (True, False):
            group = [i for i in order if self.wide[i] == orientation]
            batches += [group[s:s + self.global_batch] for s in range(0, len(group) - self.global_batch + 1,
                                                                          self.global_batch)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield self.rank_share(batches[b])
