"""P x K identity sampling for metric-learning losses (batch-hard triplet), per rank under DDP."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ...train.distributed import DistInfo


class RandomIdentitySampler(Sampler[int]):
    """Yield dataset indices so that every ``batch_size`` run is P identities x K images.

    The standard torchreid / TransReID PK sampler: each identity's images are
    shuffled and cut into groups of K = ``num_instances`` (an identity with
    fewer than K images is sampled with replacement; leftovers are dropped),
    then batches repeatedly take one group from each of P = ``batch_size / K``
    distinct identities chosen at random, until fewer than P identities have
    groups left. A batch-hard triplet loss needs exactly this: every anchor
    has K - 1 positives and (P - 1) x K negatives in its batch.

    Deterministic: the order depends only on ``seed`` and the epoch given to
    :meth:`set_epoch`, so every DDP rank builds the same global batch list and
    rank r takes batches r, r + R, r + 2R, ... (``R = num_replicas``). The
    list is truncated to a multiple of R so all ranks run the same number of
    steps; shards are disjoint because every index sits in at most one group.
    Use with ``DataLoader(batch_size=batch_size, sampler=..., drop_last=True)``;
    ``batch_size`` is the per-rank batch size.
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances}) "
                "so that each batch holds whole identities"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas); got rank={rank}, num_replicas={num_replicas}")
        pids_array = np.asarray(pids, dtype=np.int64)
        unique_pids = np.unique(pids_array)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        if len(unique_pids) < self.num_pids_per_batch:
            raise ValueError(
                f"a batch needs {self.num_pids_per_batch} identities (batch_size {batch_size} / "
                f"num_instances {num_instances}) but the data has only {len(unique_pids)}"
            )
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._indices_by_pid = {int(pid): np.flatnonzero(pids_array == pid) for pid in unique_pids}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (seed, epoch)-determined order is produced next."""
        self.epoch = epoch

    def rank_batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch (lists of dataset indices)."""
        batches = self._global_batches()
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        for batch in self.rank_batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.rank_batches()) * self.batch_size

    def _global_batches(self) -> list[list[int]]:
        """The batch list shared by all ranks: P distinct identities x K indices each."""
        rng = np.random.default_rng((self.seed, self.epoch))
        groups = {pid: self._instance_groups(indices, rng) for pid, indices in self._indices_by_pid.items()}
        available = sorted(pid for pid, pid_groups in groups.items() if pid_groups)
        batches = []
        while len(available) >= self.num_pids_per_batch:
            chosen = rng.choice(len(available), size=self.num_pids_per_batch, replace=False)
            batch = []
            for pid in (available[i] for i in chosen):
                batch.extend(groups[pid].pop())
            batches.append(batch)
            available = [pid for pid in available if groups[pid]]
        return batches

    def _instance_groups(self, indices: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """Shuffle one identity's indices and cut them into groups of K."""
        if len(indices) < self.num_instances:
            indices = rng.choice(indices, size=self.num_instances, replace=True)
        shuffled = rng.permutation(indices)
        num_groups = len(shuffled) // self.num_instances
        return [shuffled[g * self.num_instances : (g + 1) * self.num_instances].tolist() for g in range(num_groups)]


class PKBatchSampler(Sampler[list[int]]):
    """P identities × K images per GLOBAL batch, each global batch cut into equal contiguous
    slices, one per rank (rank r takes the r-th slice), like `GlobalBatchSampler`.

    The global batches are `RandomIdentitySampler`'s (deterministic in ``seed`` and ``epoch``),
    so every world size sees the same batches as a single process.
    """

    def __init__(self, pids, global_batch: int, num_instances: int, info: DistInfo, seed: int, epoch: int):
        if global_batch % info.world_size:
            raise ValueError(
                f"the global batch size {global_batch} must be divisible by the number of processes "
                f"({info.world_size}); change --batch-size or --nproc_per_node"
            )
        if global_batch % num_instances or global_batch // num_instances < 2:
            raise ValueError(
                f"--batch-size {global_batch} must be a multiple of K = {num_instances} images per identity, "
                f"with at least 2 identities per batch for the triplet loss (e.g. {16 * num_instances} = "
                f"16 identities × {num_instances})"
            )
        sampler = RandomIdentitySampler(pids, global_batch, num_instances, seed=seed)
        sampler.set_epoch(epoch)
        self.batches = sampler.rank_batches()
        self.local = global_batch // info.world_size
        self.start = info.rank * self.local

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.start:self.start + self.local]
