"""Metric-learning loss for person re-identification.

The identity (classification) loss of the ReID recipe is cross-entropy with
label smoothing; use ``timm.loss.LabelSmoothingCrossEntropy`` for it (it is
the same formula as torchreid's ``CrossEntropyLabelSmooth``), so it is not
re-implemented here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
