"""Object detection: the detector's own losses, COCO AP (pycocotools) on the validation images,
DenoiseRep on the backbone by default (the paper denoises the backbone's embedding layers)."""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from ...convert import unwrap
from ...data.images import SkipUnreadable, UnlabeledImageDataset, unlabeled_datasets, unlabeled_image_files
from ...finite import max_abs_difference, within, worst
from ...head import DenoiseHead
from ...metrics.detection import DetectionMetric
from ...metrics.detection import evaluate as evaluate_detections  # `evaluate` is this task's method
from ...train.config import TrainConfig
from ...train.distributed import DistInfo, GlobalBatchSampler, loader_options, shard_indices, unlabeled_loader
from ..base import TaskBase, model_kwargs_without_classes
from .data import SPECS, DetectionData, collate, load_detection_data
from .models import DetectionModel, build_detection_model, parse_model_name
from .sampling import AspectRatioBatchSampler, warn_about_small_groups

PREDICTION_IMAGES = 64  # validation images whose detections are compared fused vs unfused
BOX_TOLERANCE = 1e-3  # pixels: detections this close are the same detection
SCORE_TOLERANCE = 1e-4
DEMO_MODEL = "fasterrcnn_test_resnet"  # timm's 1 M-parameter test ResNet
# Sized for 64 × 64 canvases of 6–32 px digits (measured: AP 0.50, AP50 0.79 after 6 epochs at lr 2e-3; a
# first epoch of warm-up at 1 % of it cost half of that): no
# upscaling, anchors of digit size, a narrow FPN and box head, and torchvision's proposal and RoI
# counts cut to what a few digits per image need (RoIAlign's backward dominates a CPU step).
DEMO_MODEL_KWARGS = {"min_size": 64, "max_size": 64, "fpn_channels": 32, "representation_size": 128,
                     "anchor_sizes": [8, 16, 32, 64, 128], "rpn_batch_size_per_image": 64,
                     "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100,
                     "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32}


class DetectionTask(TaskBase):
    """Object detection; see `denoiserep.tasks.base.Task` for the interface."""

    name = "detection"
    primary_metric = "AP"
    metric_label = "AP"
    other_metrics = ("AP50", "AP75")
    data_sources = SPECS
    demo_defaults: ClassVar[dict] = {"data": "digit-scenes", "model": DEMO_MODEL, "model_kwargs": DEMO_MODEL_KWARGS, "epochs": 6,
                     "extra_epochs": 1, "batch_size": 16, "eval_batch_size": 8, "lr": 2e-3, "warmup_epochs": 0,
                     "calibrate_batches": 10, "name": "demo-detection"}
    demo_note = ("Note: this is a smoke demo of the detection pipeline on handwritten digits composed onto 64 × 64 "
                 "canvases (10 classes), not COCO; AP / AP50 / AP75 are COCO's definitions (pycocotools).\n")

    # The backbone (the paper), the backbone and its FPN, or every layer of the detector.
    convert_scopes = ("backbone", "backbone+neck", "all")
    supports_test_split = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if cfg.mixup or cfg.cutmix:
            raise ValueError("--mixup / --cutmix are classification options; detection does not mix images")
        if cfg.model is None and cfg.data != "digit-scenes":
            raise ValueError("pass --model: fasterrcnn_resnet50, maskrcnn_swinv2_tiny_window8_256, retinanet_resnet50, "
                             "fcos_resnet50, detr_resnet50, or FAMILY_<any timm model>")
        self.family, _ = parse_model_name(cfg.model or DEMO_MODEL)
        if self.family == "detr" and cfg.convert_scope == "backbone+neck":
            raise ValueError("--convert-scope backbone+neck: DETR has no FPN neck (its input projection and "
                             "transformer are not one module with the backbone); use backbone or all")
        self.iou_types = ("bbox", "segm") if self.family == "maskrcnn" else ("bbox",)
        self.data: DetectionData = load_detection_data(cfg.data, with_masks=self.family == "maskrcnn")
        # The validation images, and (--test-fraction) the held-out test images (every other one at 0.5).
        self.val, self.test = self.hold_out_test(self.data.val, what=f"validation images of {cfg.data}")
        self.train_set: Dataset = SkipUnreadable(self.data.train) if cfg.skip_bad_images else self.data.train
        if hasattr(self.data.train, "aspect_ratios"):
            warn_about_small_groups(self.data.train.aspect_ratios(), cfg.batch_size, f"{cfg.data} training set")
        self.extra, self.denoise_train = unlabeled_datasets(cfg.extra_data, cfg.denoise_data, _unlabeled_images,
                                                            skip_unreadable=cfg.skip_bad_images)

    # -- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        kwargs = model_kwargs_without_classes(self.cfg.model_kwargs, self.data.num_classes, self.data.name)
        return build_detection_model(self.cfg.model or DEMO_MODEL, self.data.num_classes,
                                     in_chans=self.data.in_chans, **kwargs)

    def example_inputs(self, device: torch.device, batch: int = 2) -> list[torch.Tensor]:
        """Validation images (a list: detection images differ in size)."""
        return [self.val[i][0].to(device) for i in range(min(batch, len(self.val)))]

    def conversion_root(self, model: nn.Module) -> nn.Module:
        """The timm backbone (default), the backbone with its FPN, or the whole detector."""
        model = unwrap(model)
        if self.cfg.convert_scope == "backbone":
            return model.backbone
        return model.net.backbone if self.cfg.convert_scope == "backbone+neck" else model

    def conversion_inputs(self, model: nn.Module, device: torch.device) -> tuple:
        """The batch the backbone sees (the detector's own normalisation, resize and padding); the
        whole detector takes the images."""
        images = self.example_inputs(device)
        return (images,) if self.cfg.convert_scope == "all" else (unwrap(model).preprocess(images),)

    @staticmethod
    def feature_dim(model: nn.Module) -> int:
        return unwrap(model).head_dim

    @staticmethod
    def wrap_with_head(model: nn.Module, head: DenoiseHead) -> nn.Module:
        """DenoiseRep⁻: two-stage detectors denoise every RoI feature before the box predictor,
        one-stage ones every location of the FPN before their heads, DETR every decoder query."""
        if not isinstance(model, DetectionModel):
            raise ValueError(f"DenoiseRep⁻ for detection needs a DetectionModel, got {type(model).__name__}")
        model.attach_head(head)
        return model

    # -- data --------------------------------------------------------------------------------
    def train_loader(self, info: DistInfo, seed: int, epoch: int, for_denoisers: bool = False) -> DataLoader:
        dataset = self.denoise_train if for_denoisers and self.denoise_train is not None else self.train_set
        files = getattr(dataset, "dataset", dataset)  # under SkipUnreadable (--skip-bad-images)
        ratios = files.aspect_ratios() if hasattr(files, "aspect_ratios") else None
        if ratios is not None and len({r >= 1 for r in ratios}) > 1:
            # Wide and tall images in separate batches: less padding (torchvision's reference grouping).
            sampler = AspectRatioBatchSampler(ratios, self.cfg.batch_size, info, seed, epoch)
        else:
            sampler = GlobalBatchSampler(len(dataset), self.cfg.batch_size, info, seed, epoch)
        return DataLoader(dataset, batch_sampler=sampler, **loader_options(self.cfg), collate_fn=collate)

    def extra_loader(self, info: DistInfo, seed: int, epoch: int) -> DataLoader | None:
        return unlabeled_loader(self.extra, self.cfg.batch_size, info, seed, epoch, loader_options(self.cfg),
                                collate)

    def validation_inputs(self, max_batches: int) -> list[list[torch.Tensor]]:
        return [images for images, _ in itertools.islice(self._val_batches(range(len(self.val))), max_batches)]

    def _val_batches(self, indices, dataset: Dataset | None = None) -> DataLoader:
        return DataLoader(Subset(self.val if dataset is None else dataset, list(indices)),
                          batch_size=self.cfg.eval_batch_size,
                          **loader_options(self.cfg), collate_fn=collate)

    # -- training ----------------------------------------------------------------------------
    def training_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The detector's own loss dict, summed (torchvision's reference scripts do the same); the parts
        stay on the device (an ``.item()`` each would make every step wait for it)."""
        images, targets = batch
        losses = model(images, targets)
        total = sum(loss.float() for loss in losses.values())
        return total, {name: loss.detach() for name, loss in losses.items()}

    def noise_forward(self, model: nn.Module, inputs) -> None:
        """Label-free steps: only as far as the converted layers reach (the backbone by default)."""
        if self.cfg.convert_scope == "all":
            model(inputs)
        else:
            model(inputs, upto="backbone" if self.cfg.convert_scope == "backbone" else "neck")

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, model: nn.Module, images: list[torch.Tensor], device: torch.device,
               autocast_dtype: torch.dtype | None = None) -> list[dict]:
        """Detections on the CPU in float32 (boxes in the images' pixels, labels 1..K)."""
        images = [image.to(device) for image in images]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = model(images)
        return [{key: value.float().cpu() if value.is_floating_point() else value.cpu() for key, value in out.items()}
                for out in outputs]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, info: DistInfo, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, split: str = "val") -> dict[str, float]:
        """COCO AP, AP50, AP75, APs, APm, APl (and ``segm_…`` for Mask R-CNN) in percent; each rank
        detects its shard, COCOeval runs once on rank 0 and every rank gets its result."""
        dataset = self.eval_split(split)
        was_training = model.training
        model.eval()
        metric = DetectionMetric(self.iou_types)
        indices = shard_indices(len(dataset), info)
        for start, (images, targets) in zip(range(0, len(indices), self.cfg.eval_batch_size),
                                            self._val_batches(indices, dataset)):
            ids = indices[start:start + len(images)]
            metric.update(self.detect(model, images, device, autocast_dtype), targets, image_ids=ids)
        model.train(was_training)
        return {key: 100.0 * value for key, value in metric.compute().items()}

    @torch.no_grad()
    def predictions(self, model: nn.Module, device: torch.device) -> list[dict]:
        """Detections on the first `PREDICTION_IMAGES` validation images (one process)."""
        model.eval()
        indices = range(min(PREDICTION_IMAGES, len(self.val)))
        return [out for images, _ in self._val_batches(indices) for out in self.detect(model, images, device)]

    def compare_outputs(self, unfused: list[dict], fused: list[dict]) -> dict:
        """Images whose detections differ (count, labels, boxes beyond `BOX_TOLERANCE` px or scores beyond
        `SCORE_TOLERANCE`), the largest differences where they match, and the AP of both on those images."""
        differing, box_diffs, score_diffs = 0, [], []
        for a, b in zip(unfused, fused):
            if len(a["boxes"]) != len(b["boxes"]) or not torch.equal(a["labels"], b["labels"]):
                differing += 1
                continue
            box_diffs.append(max_abs_difference(a["boxes"], b["boxes"]))
            score_diffs.append(max_abs_difference(a["scores"], b["scores"]))
            if not (within(box_diffs[-1], BOX_TOLERANCE) and within(score_diffs[-1], SCORE_TOLERANCE)):
                differing += 1
        box_diff, score_diff = worst(box_diffs), worst(score_diffs)
        targets = [self.val[i][1] for i in range(len(unfused))]
        return {"detection_images_differ": differing, "compared_images": len(unfused),
                "max_box_difference": box_diff, "max_score_difference": score_diff,
                "unfused_ap": evaluate_detections(unfused, targets, self.iou_types)["AP"],
                "fused_ap": evaluate_detections(fused, targets, self.iou_types)["AP"]}

    def fused_check(self, results: list) -> str:
        differing = sum(r.extra["detection_images_differ"] for r in results)
        total = sum(r.extra["compared_images"] for r in results)
        if differing == 0:
            box = worst(r.extra["max_box_difference"] for r in results)
            return f"yes (identical detections; boxes within {box:.1e} px)"
        same_ap = all(r.extra["unfused_ap"] == r.extra["fused_ap"] for r in results)
        if same_ap:
            return f"yes (same AP; {differing} of {total} images' detections differ by float rounding)"
        return f"NO: {differing} of {total} images' detections differ and the AP changes"


def _unlabeled_images(path: str) -> Dataset:
    """Every image under ``path`` (recursive) as float [0, 1] tensors at their own size, for the
    label-free loss (``--extra-data``, ``--denoise-data``); the detector resizes them as it does
    labelled images."""
    to_tensor = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    return UnlabeledImageDataset(unlabeled_image_files(path), "RGB",
                                 lambda image: to_tensor(image).as_subclass(torch.Tensor))
