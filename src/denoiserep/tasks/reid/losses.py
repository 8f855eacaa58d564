"""The ReID loss: identity cross-entropy (label smoothing as torchreid's ``CrossEntropyLabelSmooth``,
through timm's ``LabelSmoothingCrossEntropy``) plus the batch-hard triplet loss, global over DDP ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy
from torch import nn

from .models import ReidTrainOutput

TRIPLET_MARGIN = 0.3


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al., "In Defense of the Triplet Loss", 2017).

    For every anchor only its hardest positive (farthest same-id sample) and
    hardest negative (closest other-id sample) in the batch are used, which
    is what makes P x K batches (see ``RandomIdentitySampler``) effective.

    ``margin`` gives ``relu(d_ap - d_an + margin)``; ``margin=None`` gives the
    soft-margin ``softplus(d_ap - d_an)``, which never stops pushing.
    Distances are Euclidean, optionally on L2-normalised features.
    """

    def __init__(self, margin: float | None = 0.3, normalize_features: bool = False) -> None:
        super().__init__()
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 or None (soft margin), got {margin}")
        self.margin = margin
        self.normalize_features = normalize_features

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or pids.shape != features.shape[:1]:
            raise ValueError(
                f"expected features (batch, dim) and pids (batch,), got {tuple(features.shape)} and {tuple(pids.shape)}"
            )
        same_id = pids[:, None] == pids[None, :]
        if same_id.all():
            raise ValueError("triplet loss needs at least two identities in the batch (no negatives found)")
        if self.normalize_features:
            features = F.normalize(features, p=2, dim=1)
        dist = _euclidean_distances(features)
        hardest_positive = dist.masked_fill(~same_id, float("-inf")).amax(dim=1)
        hardest_negative = dist.masked_fill(same_id, float("inf")).amin(dim=1)
        gap = hardest_positive - hardest_negative
        if self.margin is None:
            return F.softplus(gap).mean()
        return F.relu(gap + self.margin).mean()


def _euclidean_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise distances; the clamp keeps sqrt's gradient finite at zero distance."""
    squared_norms = x.pow(2).sum(dim=1, keepdim=True)
    squared = squared_norms + squared_norms.T - 2.0 * (x @ x.T)
    return squared.clamp(min=1e-12).sqrt()


class ReidLoss(nn.Module):
    """``id_weight · CE_ls(logits, pids) + triplet_weight · batch-hard triplet(features, pids)``.

    Under an initialised process group the triplet loss is computed on the features and
    identities of the whole global batch (all-gathered; the other ranks' features are
    constants) and its gradient scaled by the world size, so that DDP's gradient average
    equals the single-process gradient exactly.
    """

    def __init__(self, label_smoothing: float = 0.0, margin: float | None = TRIPLET_MARGIN,
                 id_weight: float = 1.0, triplet_weight: float = 1.0):
        super().__init__()
        self.id_loss = LabelSmoothingCrossEntropy(label_smoothing) if label_smoothing > 0 else nn.CrossEntropyLoss()
        self.triplet = TripletLoss(margin=margin)
        self.id_weight, self.triplet_weight = id_weight, triplet_weight

    def forward(self, outputs: ReidTrainOutput, pids: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, ReidTrainOutput):
            raise TypeError(
                f"the ReID loss needs the model's train-mode output (logits, features), got {type(outputs).__name__}; "
                "call the ReidModel in train mode"
            )
        id_loss = self.id_loss(outputs.logits.float(), pids)
        features = outputs.features.float()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return self.id_weight * id_loss + self.triplet_weight * self.triplet(features, pids)
        all_features, all_pids = _gather_global_batch(features, pids)
        triplet = self.triplet(all_features, all_pids)
        triplet = triplet + (world - 1) * (triplet - triplet.detach())  # same value, local gradient × world
        return self.id_weight * id_loss + self.triplet_weight * triplet


def _gather_global_batch(features: torch.Tensor, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (equal-size) batch slice in rank order; only this rank's part keeps its graph."""
    rank, world = dist.get_rank(), dist.get_world_size()
    feature_list = [torch.empty_like(features) for _ in range(world)]
    pid_list = [torch.empty_like(pids) for _ in range(world)]
    dist.all_gather(feature_list, features.detach().contiguous())
    dist.all_gather(pid_list, pids.contiguous())
    feature_list[rank] = features
    return torch.cat(feature_list), torch.cat(pid_list)
