"""Person re-identification: P×K batches, ID + triplet loss, BNNeck, mAP / CMC (torchreid's protocol)."""

from .task import ReidTask

__all__ = ["ReidTask"]
