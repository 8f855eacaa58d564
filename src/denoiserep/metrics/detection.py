"""COCO detection metrics: pycocotools' ``COCOeval`` behind torchvision's conventions.

Predictions and targets are lists of dicts, one per image, as torchvision's detectors return and
take them:

- ``boxes``: (N, 4) xyxy in pixels; ``labels``: (N,) integer class ids; predictions add ``scores``;
- ``masks`` (for ``"segm"``): predictions (N, 1, H, W) probabilities (thresholded at 0.5, as
  torchvision's reference evaluation does) or (N, H, W) bool; targets (N, H, W) {0, 1};
- targets may carry ``iscrowd`` (crowd regions: matching them costs nothing, missing them is no
  error) and ``area`` (what the small / medium / large split uses; without it, the box area for
  ``"bbox"`` and the mask area for ``"segm"``, as COCO's annotations define it).

The result holds ``AP, AP50, AP75, APs, APm, APl`` (bbox) and the same with a ``segm_`` prefix, in
[0, 1]: COCOeval's ``stats[0:6]``, computed by COCOeval itself (nothing is re-implemented here).
COCOeval's -1 ("no ground truth in this range", e.g. APs without small objects) becomes NaN.
Images without predictions or without ground truth count as COCOeval counts them (an image with
ground truth and no prediction lowers recall; a prediction on an image without ground truth is a
false positive). Usable without the training pipeline::

    metric = DetectionMetric(iou_types=("bbox", "segm"))
    for images, targets in loader:                    # this rank's share of the images
        metric.update(model(images), targets, image_ids)
    result = metric.compute()                         # every rank gets the same, evaluated on rank 0
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK_THRESHOLD = 0.5


class DetectionMetric:
    """Collects COCO-format annotations of every image seen, then runs COCOeval once on rank 0.

    Masks are run-length encoded as they arrive (a COCO validation set's masks would not fit in
    memory as tensors)."""

    def __init__(self, iou_types: Sequence[str] = ("bbox",)):
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {tuple(iou_types)}")
        self.iou_types = tuple(iou_types)
        self.images: dict[int, dict] = {}  # image id -> {"height", "width", "gt": [...], "dt": {iou_type: [...]}}

    def update(self, predictions: Sequence[dict], targets: Sequence[dict],
               image_ids: Sequence[int] | None = None) -> None:
        """Add images. ``image_ids`` (unique over the whole data set, also across ranks) keep the
        same numbering whether one process or several see the images; default: in arrival order."""
        if len(predictions) != len(targets):
            raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets; one dict per image each")
        if image_ids is None:
            image_ids = range(len(self.images), len(self.images) + len(targets))
        for image_id, prediction, target in zip(image_ids, predictions, targets):
            image_id = int(image_id)
            if image_id in self.images:
                raise ValueError(f"image id {image_id} was added twice; pass unique image_ids")
            self.images[image_id] = self._convert(image_id, prediction, target)

    def _convert(self, image_id: int, prediction: dict, target: dict) -> dict:
        segm = "segm" in self.iou_types
        for name, item, keys in (("prediction", prediction, ("boxes", "scores", "labels")),
                                 ("target", target, ("boxes", "labels"))):
            missing = [k for k in keys + (("masks",) if segm else ()) if k not in item]
            if missing:
                raise ValueError(f"the {name} of image {image_id} has no {missing}; it needs {keys}"
                                 f"{' and masks (segm)' if segm else ''}")
        height = width = 0
        gt_masks = dt_masks = None
        if segm:
            gt_masks = _binary_masks(target["masks"], "target", image_id)
            dt_masks = _binary_masks(prediction["masks"], "prediction", image_id)
            height, width = gt_masks.shape[-2:]
            if dt_masks.shape[-2:] != (height, width) and len(dt_masks):
                raise ValueError(f"image {image_id}: predicted masks are {tuple(dt_masks.shape[-2:])}, target masks "
                                 f"{(height, width)}; predict at the image's own resolution")
        gt_boxes = _xywh(target["boxes"], "target", image_id)
        labels = _as_list(target["labels"], int)
        crowd = _as_list(target.get("iscrowd", torch.zeros(len(labels))), int)
        given_area = _as_list(target["area"], float) if "area" in target else None
        gt_rles = _encode(gt_masks) if segm else None
        gt = []
        for i, (box, label) in enumerate(zip(gt_boxes, labels)):
            ann = {"image_id": image_id, "category_id": label, "bbox": box, "iscrowd": crowd[i]}
            box_area = box[2] * box[3]
            ann["area_bbox"] = given_area[i] if given_area is not None else box_area
            if segm:
                ann["segmentation"] = gt_rles[i]
                ann["area_segm"] = given_area[i] if given_area is not None else float(_mask_area(gt_rles[i]))
            gt.append(ann)
        scores = _as_list(prediction["scores"], float)
        dt_labels = _as_list(prediction["labels"], int)
        dt = {"bbox": [{"image_id": image_id, "category_id": label, "bbox": box, "score": score}
                       for box, label, score in zip(_xywh(prediction["boxes"], "prediction", image_id), dt_labels,
                                                    scores)]}
        if segm:
            dt["segm"] = [{"image_id": image_id, "category_id": label, "segmentation": rle, "score": score}
                          for rle, label, score in zip(_encode(dt_masks), dt_labels, scores)]
        return {"height": int(height), "width": int(width), "gt": gt, "dt": dt}

    def gather(self) -> None:
        """Under torch.distributed, send every rank's images to rank 0 (once, on every rank)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(self.images, gathered, dst=0)
        if dist.get_rank() == 0:
            merged: dict[int, dict] = {}
            for part in gathered:
                overlap = set(merged) & set(part)
                if overlap:
                    raise ValueError(f"ranks evaluated the same image ids {sorted(overlap)[:5]}; shard the data set")
                merged.update(part)
            self.images = merged
        else:
            self.images = {}

    def compute(self) -> dict[str, float]:
        """Gather to rank 0, evaluate there, and give every rank the result."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.gather()
        result = [self._evaluate()] if not distributed or dist.get_rank() == 0 else [None]
        if distributed:
            dist.broadcast_object_list(result, src=0)
        return result[0]

    def _evaluate(self) -> dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not self.images:
            raise ValueError("no images were added to the detection metric")
        result: dict[str, float] = {}
        ids = sorted(self.images)
        categories = sorted({a["category_id"] for i in ids for a in self.images[i]["gt"]}
                            | {a["category_id"] for i in ids for t in self.iou_types for a in self.images[i]["dt"][t]})
        for iou_type in self.iou_types:
            images = [{"id": i, "height": self.images[i]["height"], "width": self.images[i]["width"]} for i in ids]
            annotations = []
            for i in ids:
                for ann in self.images[i]["gt"]:
                    ann = {k: v for k, v in ann.items() if not k.startswith("area_")} | {"area": ann[f"area_{iou_type}"]}
                    annotations.append({**ann, "id": len(annotations) + 1})
            detections = [dict(d) for i in ids for d in self.images[i]["dt"][iou_type]]
            with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress
                ground_truth = COCO()
                ground_truth.dataset = {"images": images, "annotations": annotations,
                                        "categories": [{"id": c, "name": str(c)} for c in categories]}
                ground_truth.createIndex()
                results = ground_truth.loadRes(detections) if detections else _empty_results(ground_truth)
                evaluation = COCOeval(ground_truth, results, iou_type)
                evaluation.evaluate()
                evaluation.accumulate()
                evaluation.summarize()
            prefix = "" if iou_type == "bbox" else "segm_"
            for name, value in zip(STAT_NAMES, evaluation.stats[:6]):
                result[prefix + name] = float("nan") if value < 0 else float(value)
        return result


def evaluate(predictions: Sequence[dict], targets: Sequence[dict], iou_types: Sequence[str] = ("bbox",)) -> dict:
    """COCO AP, AP50, AP75, APs, APm, APl (and ``segm_…``) of one process's predictions."""
    metric = DetectionMetric(iou_types)
    metric.update(predictions, targets)
    return metric._evaluate()


def _empty_results(ground_truth):
    """COCO's result object for no detections at all (``loadRes`` cannot take an empty list)."""
    from pycocotools.coco import COCO

    results = COCO()
    results.dataset = {"images": list(ground_truth.dataset["images"]), "annotations": [],
                       "categories": list(ground_truth.dataset["categories"])}
    results.createIndex()
    return results


def _as_list(values, kind) -> list:
    return [kind(v) for v in torch.as_tensor(values).reshape(-1).tolist()]


def _xywh(boxes, what: str, image_id: int) -> list[list[float]]:
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4) if len(boxes) else torch.zeros(0, 4)
    if not torch.isfinite(boxes).all():
        raise ValueError(f"the {what} of image {image_id} holds non-finite boxes")
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    return xywh.tolist()


def _binary_masks(masks, what: str, image_id: int) -> torch.Tensor:
    masks = torch.as_tensor(masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"the {what} masks of image {image_id} have shape {tuple(masks.shape)}; "
                         "expected (N, H, W) or (N, 1, H, W)")
    return masks > MASK_THRESHOLD if masks.is_floating_point() else masks.bool()


def _encode(masks: torch.Tensor) -> list[dict]:
    from pycocotools import mask as mask_utils

    array = np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    return mask_utils.encode(array) if len(masks) else []


def _mask_area(rle: dict) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(rle))
