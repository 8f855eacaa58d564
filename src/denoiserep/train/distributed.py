"""DDP under torchrun: process group setup, sharded batches, all-reduced metrics.

``torchrun --nproc_per_node N -m denoiserep train …`` sets RANK / WORLD_SIZE / LOCAL_RANK;
without them everything runs as a single process. Multi-node works through torchrun's own
``--nnodes`` / ``--rdzv-endpoint`` flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if there is one; pick the device (CUDA if present)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available (torch sees no GPU); use "
                             "--device cpu or auto")
        torch.cuda.set_device(info.local_rank)
        resolved = torch.device("cuda", info.local_rank)
    else:
        resolved = torch.device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return info, resolved


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum counters (correct predictions, sample counts, losses) over ranks."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def average_batchnorm_statistics(model: nn.Module) -> None:
    """Average the running statistics of every BatchNorm over the ranks (timm's ``distribute_bn``
    with ``reduce=True``), so that every rank evaluates and rank 0 saves the same model: each rank's
    statistics follow its own batches. Frozen BatchNorms (no ``_BatchNorm``) are equal already."""
    if not dist.is_initialized():
        return
    world_size = dist.get_world_size()
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.running_mean is not None:
            for statistic in (module.running_mean, module.running_var):
                dist.all_reduce(statistic)
                statistic /= world_size


class GlobalBatchSampler(Sampler[list[int]]):
    """Shuffled global batches of ``global_batch`` indices, each split evenly across ranks.

    Every epoch draws one permutation from ``seed`` and ``epoch``; rank r takes the r-th
    contiguous slice of every global batch. With mean losses and averaged gradients this
    reproduces a single-process run with the same global batch (incomplete batches are
    dropped so that every rank's slice has the same size).
    """

    def __init__(self, num_samples: int, global_batch: int, info: DistInfo, seed: int, epoch: int = 0,
                 shuffle: bool = True):
        if global_batch % info.world_size:
            raise ValueError(
                f"the global batch size {global_batch} must be divisible by the number of processes "
                f"({info.world_size}); change --batch-size or --nproc_per_node"
            )
        if num_samples < global_batch:
            raise ValueError(f"the training set has {num_samples} samples, fewer than one batch of {global_batch}")
        self.num_samples, self.global_batch, self.info = num_samples, global_batch, info
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=self.generator()).tolist() if self.shuffle else \
            list(range(self.num_samples))
        for b in range(len(self)):
            yield self.rank_share(order[b * self.global_batch:(b + 1) * self.global_batch])

    def generator(self) -> torch.Generator:
        """This epoch's generator: the same on every rank."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def rank_share(self, global_batch: list[int]) -> list[int]:
        """This rank's contiguous slice of one global batch."""
        local = self.global_batch // self.info.world_size
        return global_batch[self.info.rank * local:(self.info.rank + 1) * local]


def shard_indices(num_samples: int, info: DistInfo) -> list[int]:
    """This rank's share of an evaluation set: no padding, so sums over ranks are exact."""
    return list(range(info.rank, num_samples, info.world_size))


def loader_options(cfg) -> dict:
    """DataLoader settings every task's loaders share: ``--workers``, and pinned host memory when the
    batches go to a GPU (their copy then overlaps the step instead of waiting for it)."""
    return {"num_workers": cfg.workers, "pin_memory": cfg.device != "cpu" and torch.cuda.is_available()}


def unlabeled_loader(dataset, global_batch: int, info: DistInfo, seed: int, epoch: int, options: dict,
                     collate_fn=None):
    """Batches of extra unlabeled images for the label-free loss (the paper's "merged datasets"):
    at most one global batch, a multiple of the number of processes. None without a dataset."""
    from torch.utils.data import DataLoader

    if dataset is None:
        return None
    batch = min(global_batch, len(dataset) // info.world_size * info.world_size)
    sampler = GlobalBatchSampler(len(dataset), batch, info, seed + 1, epoch)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, **options)
