"""The moments of a layer's input that its L2 noise loss depends on: count, mean, covariance.

A layer's noise loss sees its input as rows (positions × channels: every token of a Linear's
input, every unpadded pixel of a conv's). `Moments` accumulates, over batches, the count, the sum
and the per-group Gram matrix of those rows in float64 (float32 products of rows shifted by the
first batch's mean, so that a large mean does not cancel the variance), and merges them exactly
across torch.distributed ranks. `InputStatistics` is the result: what `denoiserep.optimum` solves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class InputStatistics:
    """Mean and covariance of one layer's input channels over the positions its noise loss sees."""

    count: int  # rows (tokens / pixels) seen
    mean: torch.Tensor  # (channels,) float64
    covariance: torch.Tensor  # (groups, d, d) float64: the within-group blocks (population covariance)

    @property
    def groups(self) -> int:
        return self.covariance.shape[0]

    @property
    def channels(self) -> int:
        return self.mean.numel()

    @property
    def rows_per_channel(self) -> float:
        """Rows per channel of a group: how well Σ is determined (below ~1, Σ is singular)."""
        return self.count / self.covariance.shape[-1]

    def second_moment_about(self, centre: torch.Tensor) -> torch.Tensor:
        """E (x − centre)(x − centre)ᵀ per group: Σ + δδᵀ with δ = μ − centre."""
        offset = (self.mean - centre.to(self.mean)).reshape(self.groups, -1)
        return self.covariance + offset.unsqueeze(-1) * offset.unsqueeze(-2)


class NonFiniteMoments(Exception):
    """A batch's rows or their products are NaN or inf (nothing was added)."""


# Gram matrices are accumulated by block rows of this many channels, upper blocks only: xᵀx is
# symmetric, so this skips almost half the products of a wide layer (fc2 of ViT-S: 46%; a 384-channel
# one: 33%), while each block is still a large enough GEMM to run at full speed.
GRAM_BLOCK = 128


class Moments:
    """Running float64 sums of one layer's input rows: count, Σ (x − shift), Σ (x − shift)(x − shift)ᵀ
    per group, with the shift = the first batch's mean (the shifted-data algorithm)."""

    def __init__(self, groups: int, group_channels: int, precision: torch.dtype):
        self.groups, self.group_channels = groups, group_channels
        self.precision = precision
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Add rows (M, channels). Raises `NonFiniteMoments` on NaN or inf, including products that
        overflow the precision they are formed in; the moments are then unusable."""
        rows = rows.to(torch.promote_types(rows.dtype, self.precision))
        self.precision = rows.dtype  # a float64 model's rows stay float64
        if self.shift is None:
            self.shift = rows.mean(dim=0)
            self.sum = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
            shape = (self.groups, self.group_channels, self.group_channels)
            self.gram = torch.zeros(shape, dtype=torch.float64, device=rows.device)
        centred = rows - self.shift
        self.sum += centred.sum(dim=0).double()  # centred: small values, a float32 sum is accurate
        per_group = centred.reshape(-1, self.groups, self.group_channels)
        if self.groups == 1:
            for start in range(0, self.group_channels, GRAM_BLOCK):  # upper block rows only
                stop = min(start + GRAM_BLOCK, self.group_channels)
                self.gram[0, start:stop, start:] += (centred[:, start:stop].T @ centred[:, start:]).double()
        elif self.group_channels == 1:  # depthwise: one variance per channel
            self.gram += per_group.square().sum(dim=0).unsqueeze(-1).double()
        else:
            self.gram += torch.einsum("mgi,mgj->gij", per_group, per_group).double()
        # Once per batch (one device sync): overflow in the float32 x xᵀ shows up here, not in the rows
        # (a sum of the float64 accumulators is finite exactly when every entry is).
        if not bool(torch.isfinite(self.gram.sum() + self.sum.sum())):
            raise NonFiniteMoments
        self.count += rows.shape[0]

    def _symmetric_gram(self) -> torch.Tensor:
        if self.groups > 1:
            return self.gram
        # `add` fills each block row from its diagonal block rightwards: mirror, in place, each diagonal
        # block's upper triangle onto its lower one (a GEMM's two triangles may differ in rounding) and
        # the blocks right of the diagonal below it. `add` never writes below the diagonal blocks, so
        # this stays correct after more batches (each call mirrors again).
        gram = self.gram[0]
        for start in range(0, self.group_channels, GRAM_BLOCK):
            stop = min(start + GRAM_BLOCK, self.group_channels)
            block = gram[start:stop, start:stop]
            block.copy_(torch.triu(block) + torch.triu(block, 1).T)
            gram[stop:, start:stop] = gram[start:stop, stop:].T
        return self.gram

    @property
    def nbytes(self) -> int:
        return 0 if self.gram is None else (self.gram.numel() + self.sum.numel()) * 8

    def statistics(self) -> InputStatistics | None:
        """Mean and covariance, merged over torch.distributed ranks (None if no rank saw a row).
        Under torch.distributed every rank must call this, in the same order of layers."""
        count = self.count
        local_mean = scatter = None
        if count:
            local_mean = self.shift.double() + self.sum / count
            sums = self.sum.reshape(self.groups, self.group_channels)
            # Σ (x − shift)(x − shift)ᵀ − s sᵀ / count, as one product of u = s / √count with itself: u_i u_j
            # and u_j u_i round alike, so the scatter stays exactly symmetric (a scaled α s sᵀ would not).
            root = sums / math.sqrt(count)
            scatter = torch.baddbmm(self._symmetric_gram(), root.unsqueeze(-1), root.unsqueeze(-2), alpha=-1.0)
        if not (dist.is_available() and dist.is_initialized()):
            return InputStatistics(count, local_mean, scatter.div_(count)) if count else None
        return self._merged(count, local_mean, scatter)

    def _merged(self, count: int, local_mean, scatter) -> InputStatistics | None:
        # Chan et al.'s parallel merge: exact, whatever shift each rank used.
        device = self.gram.device if self.gram is not None else collective_device()
        channels = self.groups * self.group_channels
        totals = torch.zeros(channels + 1, dtype=torch.float64, device=device)
        if count:
            totals[0], totals[1:] = count, count * local_mean
        dist.all_reduce(totals)
        total = int(totals[0].item())
        shape = (self.groups, self.group_channels, self.group_channels)
        merged = torch.zeros(shape, dtype=torch.float64, device=device)
        if count:
            mean = totals[1:] / total
            offset = (local_mean - mean).reshape(self.groups, self.group_channels)
            merged = scatter + count * offset.unsqueeze(-1) * offset.unsqueeze(-2)
        dist.all_reduce(merged)
        if not total:
            return None
        return InputStatistics(total, totals[1:] / total, merged / total)


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
