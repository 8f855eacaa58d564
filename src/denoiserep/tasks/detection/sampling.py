"""Aspect-ratio grouping for distributed detection training (torchvision's reference scripts group
images by aspect ratio so that a batch pads little; here with the pipeline's global batches)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from ...train.distributed import DistInfo


class AspectRatioBatchSampler(Sampler[list[int]]):
    """Global batches of ``global_batch`` images that are all wide (w ≥ h) or all tall, each split
    evenly across ranks, as `GlobalBatchSampler` does.

    Every epoch draws one permutation from ``seed`` and ``epoch``, fills the two groups' batches in
    that order, drops each group's incomplete last batch and shuffles the batches' order with the
    same generator; so every rank agrees on the batches and a run is reproducible."""

    def __init__(self, aspect_ratios: list[float], global_batch: int, info: DistInfo, seed: int, epoch: int = 0):
        if global_batch % info.world_size:
            raise ValueError(f"the global batch size {global_batch} must be divisible by the number of processes "
                             f"({info.world_size}); change --batch-size or --nproc_per_node")
        self.wide = [ratio >= 1.0 for ratio in aspect_ratios]
        self.global_batch, self.info, self.seed, self.epoch = global_batch, info, seed, epoch
        if len(self) == 0:
            raise ValueError(f"the training set's {sum(self.wide)} wide and {len(self.wide) - sum(self.wide)} tall "
                             f"images make no full batch of {global_batch} images of one orientation")

    def __len__(self) -> int:
        wide = sum(self.wide)
        return wide // self.global_batch + (len(self.wide) - wide) // self.global_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.wide), generator=generator).tolist()
        batches = []
        for orientation in (True, False):
            group = [i for i in order if self.wide[i] == orientation]
            batches += [group[s:s + self.global_batch] for s in range(0, len(group) - self.global_batch + 1,
                                                                          self.global_batch)]
        local = self.global_batch // self.info.world_size
        start = self.info.rank * local
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b][start:start + local]
