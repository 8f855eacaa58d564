"""Semantic segmentation metrics, as mmsegmentation computes them, plus Boundary IoU.

Per class, intersection / union / prediction area / label area are accumulated over the whole data
set on the labelled pixels (``target != ignore_index``); then

- ``aAcc`` = correct labelled pixels / labelled pixels;
- ``IoU_c`` = I_c / U_c, ``mIoU`` = mean over classes with U_c > 0;
- ``Acc_c`` = I_c / label area_c, ``mAcc`` = mean over classes with a label area > 0;
- ``BIoU_c`` (Boundary IoU, Cheng et al., CVPR 2021): the same ratio on mask boundaries, where the
  boundary of a binary mask M is ``M ∧ ¬erode(M)`` with a 3 × 3 erosion repeated
  d = max(1, round(ratio · √(H² + W²))) times and pixels outside the image counting as 0 (the
  reference code's ``mask_to_boundary``); ignored pixels are 0 in both masks. ``mBIoU`` = mean over
  classes whose boundary union is non-empty.

All values lie in [0, 1]. Usable without the training pipeline::

    metric = SegmentationMetric(num_classes=150)
    for pred, target in batches:          # (B, H, W) integer maps
        metric.update(pred, target)
    metric.all_reduce()                   # under torch.distributed, once, on every rank
    result = metric.compute()             # {"aAcc", "mIoU", "mAcc", "mBIoU", "IoU", "Acc", "BIoU"}
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

COUNTERS = ("intersection", "union", "pred_area", "label_area", "boundary_intersection", "boundary_union")


class SegmentationMetric:
    """Accumulates the counts of `COUNTERS` per class (int64) over ``update`` calls."""

    def __init__(self, num_classes: int, ignore_index: int = 255, boundary_dilation_ratio: float = 0.02):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes={num_classes}); use e.g. 255")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.boundary_dilation_ratio = boundary_dilation_ratio
        self.counts = {name: torch.zeros(num_classes, dtype=torch.int64) for name in COUNTERS}
        self._reduced = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add predicted and target label maps: (B, H, W) or (H, W) integer tensors of one shape."""
        pred, target = _as_batch(pred), _as_batch(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}; "
                             "resize the logits to the label size before the argmax")
        valid = target != self.ignore_index
        _check_range("target", target[valid], self.num_classes,
                     f"label values must be < num_classes ({self.num_classes}) or the ignore index {self.ignore_index}")
        _check_range("prediction", pred, self.num_classes, f"predicted classes must be < {self.num_classes}")
        pred, target = pred.long(), target.long()
        labelled_pred, labelled_target = pred[valid], target[valid]
        hits = labelled_pred[labelled_pred == labelled_target]
        intersection = torch.bincount(hits, minlength=self.num_classes).cpu()
        pred_area = torch.bincount(labelled_pred, minlength=self.num_classes).cpu()
        label_area = torch.bincount(labelled_target, minlength=self.num_classes).cpu()
        self.counts["intersection"] += intersection
        self.counts["pred_area"] += pred_area
        self.counts["label_area"] += label_area
        self.counts["union"] += pred_area + label_area - intersection
        for image_pred, image_target, image_valid in zip(pred, target, valid):
            b_intersection, b_union = self._boundary_counts(image_pred, image_target, image_valid)
            self.counts["boundary_intersection"] += b_intersection
            self.counts["boundary_union"] += b_union

    def _boundary_counts(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
        height, width = target.shape
        dilation = max(1, round(self.boundary_dilation_ratio * (height**2 + width**2) ** 0.5))
        present = torch.unique(torch.cat([pred[valid], target[valid]]))
        intersection = torch.zeros(self.num_classes, dtype=torch.int64)
        union = torch.zeros(self.num_classes, dtype=torch.int64)
        if present.numel() == 0:
            return intersection, union
        classes = present.view(-1, 1, 1)
        gt_masks = (target.unsqueeze(0) == classes) & valid
        pred_masks = (pred.unsqueeze(0) == classes) & valid
        gt_boundary, pred_boundary = mask_boundary(gt_masks, dilation), mask_boundary(pred_masks, dilation)
        intersection[present.cpu()] = (gt_boundary & pred_boundary).flatten(1).sum(1).cpu()
        union[present.cpu()] = (gt_boundary | pred_boundary).flatten(1).sum(1).cpu()
        return intersection, union

    def all_reduce(self) -> None:
        """Sum the counts over torch.distributed ranks (collective: every rank calls it once, after its
        last update). Without a process group it does nothing."""
        if self._reduced:
            raise RuntimeError("all_reduce() was already called: a second call would count every rank twice")
        self._reduced = True
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        stacked = torch.stack([self.counts[name] for name in COUNTERS]).to(device)
        dist.all_reduce(stacked)
        for name, row in zip(COUNTERS, stacked.cpu()):
            self.counts[name] = row

    def compute(self) -> dict:
        """Scalars ``aAcc``, ``mIoU``, ``mAcc``, ``mBIoU`` (floats; NaN when no class qualifies) and the
        per-class arrays ``IoU``, ``Acc``, ``BIoU`` (float64 tensors, NaN for classes without pixels)."""
        c = {name: value.double() for name, value in self.counts.items()}
        iou = _ratio(c["intersection"], c["union"])
        acc = _ratio(c["intersection"], c["label_area"])
        biou = _ratio(c["boundary_intersection"], c["boundary_union"])
        labelled = c["label_area"].sum()
        return {
            "aAcc": float(c["intersection"].sum() / labelled) if labelled > 0 else float("nan"),
            "mIoU": _nanmean(iou), "mAcc": _nanmean(acc), "mBIoU": _nanmean(biou),
            "IoU": iou, "Acc": acc, "BIoU": biou,
        }


def mask_boundary(masks: torch.Tensor, dilation: int) -> torch.Tensor:
    """``M ∧ ¬erode(M)`` for boolean masks (N, H, W): erosion by a (2d + 1)² square (the same as a
    3 × 3 erosion repeated d times), with everything outside the image counting as 0."""
    outside_zero = F.pad((~masks).float().unsqueeze(1), (dilation,) * 4, value=1.0)  # 1 where M is 0
    touches_zero = F.max_pool2d(outside_zero, 2 * dilation + 1, stride=1).squeeze(1) > 0
    return masks & touches_zero


def evaluate(preds: Iterable[torch.Tensor], targets: Iterable[torch.Tensor], num_classes: int,
             ignore_index: int = 255, boundary_dilation_ratio: float = 0.02) -> dict:
    """`SegmentationMetric` over lists of (H, W) maps (images may differ in size)."""
    metric = SegmentationMetric(num_classes, ignore_index, boundary_dilation_ratio)
    for pred, target in zip(preds, targets, strict=True):
        metric.update(pred, target)
    return metric.compute()


def _as_batch(labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"label maps must hold integer class ids, got {labels.dtype}; take the argmax of the logits")
    if labels.ndim == 2:
        return labels.unsqueeze(0)
    if labels.ndim != 3:
        raise ValueError(f"label maps must be (H, W) or (B, H, W), got shape {tuple(labels.shape)}")
    return labels


def _check_range(what: str, values: torch.Tensor, num_classes: int, rule: str) -> None:
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
        bad = values[(values < 0) | (values >= num_classes)].unique()[:5].tolist()
        raise ValueError(f"{what} holds class ids {bad}: {rule}")


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), torch.full_like(numerator, float("nan")))


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else float("nan")
