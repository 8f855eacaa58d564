"""Semantic segmentation: per-pixel cross-entropy (+ the auxiliary head where the network has one),
aAcc / mIoU / mAcc / Boundary IoU on full-resolution validation images (whole image or sliding
window), DenoiseRep on the encoder by default."""

from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ...data.images import SkipUnreadable, unlabeled_datasets
from ...head import DenoiseHead
from ...metrics.segmentation import SegmentationMetric
from ...train.config import TrainConfig
from ...train.distributed import DistInfo, GlobalBatchSampler, loader_options, shard_indices, unlabeled_loader
from ..base import TaskBase, model_kwargs_without_classes
from .data import IGNORE_INDEX, SPECS, SegmentationData, load_segmentation_data
from .models import AUX_LOSS_WEIGHT, SegmentationModel, build_segmentation_model

PREDICTION_IMAGES = 64  # validation images whose argmax maps are compared fused vs unfused
SLIDE_WINDOW = 512  # sliding-window size without --crop-size (mmseg's 512 × 512 crops)
DEMO_MODEL = "fcn:resnet18"

logger = logging.getLogger(__name__)


class SegmentationTask(TaskBase):
    """Semantic segmentation; see `denoiserep.tasks.base.Task` for the interface."""

    name = "segmentation"
    primary_metric = "mIoU"
    metric_label = "mIoU"
    other_metrics = ("aAcc", "mBIoU")
    data_sources = SPECS
    demo_defaults = {"data": "digit-scenes", "model": DEMO_MODEL, "epochs": 20, "extra_epochs": 5,
                     "batch_size": 32, "eval_batch_size": 64, "name": "demo-segmentation"}
    demo_note = ("Note: this is a smoke demo of the segmentation pipeline on handwritten digits composed into "
                 "scenes (11 classes), not ADE20K.\n")

    convert_scopes = ("backbone", "all")  # the encoder, or the whole network
    supports_test_split = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if cfg.mixup or cfg.cutmix:
            raise ValueError("--mixup / --cutmix are classification options; segmentation does not mix images")
        self.window = cfg.crop_size or SLIDE_WINDOW
        if cfg.slide_stride is not None and cfg.slide_stride > self.window:
            raise ValueError(f"--slide-stride {cfg.slide_stride} is larger than the sliding window (--crop-size "
                             f"{self.window}): the pixels between two windows would get no prediction. Use a stride "
                             f"of at most {self.window} (mmseg: about 2/3 of the crop)")
        self.data: SegmentationData = load_segmentation_data(cfg.data, crop_size=cfg.crop_size)
        # The validation images, and (--test-fraction) the held-out test images (every other one at 0.5).
        self.val, self.test = self.hold_out_test(self.data.val, what=f"validation images of {cfg.data}")
        self.train_set = SkipUnreadable(self.data.train) if cfg.skip_bad_images else self.data.train
        self.extra, self.denoise_train = unlabeled_datasets(cfg.extra_data, cfg.denoise_data, self.data.unlabeled,
                                                            skip_unreadable=cfg.skip_bad_images)
        self._unlabelled_batches = 0

    # -- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        if self.cfg.model is None and self.cfg.data != "digit-scenes":
            raise ValueError("pass --model: fcn_resnet50, deeplabv3_resnet50, segformer_mit_b0, fcn:<timm model>, …")
        kwargs = model_kwargs_without_classes(self.cfg.model_kwargs, self.data.num_classes, self.data.name)
        return build_segmentation_model(self.cfg.model or DEMO_MODEL, self.data.num_classes,
                                        in_chans=self.data.in_chans, **kwargs)

    def example_inputs(self, device: torch.device, batch: int = 2) -> torch.Tensor:
        """Validation images; full-resolution ones differ in size, so more than one is cropped to the
        smallest of them."""
        images = [self.val[i][0] for i in range(min(batch, len(self.val)))]
        height = min(image.shape[-2] for image in images)
        width = min(image.shape[-1] for image in images)
        return torch.stack([image[..., :height, :width] for image in images]).to(device)

    def conversion_root(self, model: nn.Module) -> nn.Module:
        """The encoder (the paper denoises the backbone's embedding layers), or the whole network."""
        return model.encoder if self.cfg.convert_scope == "backbone" else model

    @staticmethod
    def feature_dim(model: nn.Module) -> int:
        return model.num_features

    @staticmethod
    def wrap_with_head(model: nn.Module, head: DenoiseHead) -> nn.Module:
        """DenoiseRep⁻: the head on every pixel of the encoder's output map, before the decoder."""
        if not isinstance(model, SegmentationModel):
            raise ValueError(f"DenoiseRep⁻ for segmentation needs a SegmentationModel, got {type(model).__name__}")
        model.attach_head(head)
        return model

    # -- data --------------------------------------------------------------------------------
    def train_loader(self, info: DistInfo, seed: int, epoch: int, for_denoisers: bool = False) -> DataLoader:
        """Shuffled global batches of training crops; the denoise stage may train on ``--denoise-data``."""
        dataset = self.denoise_train if for_denoisers and self.denoise_train is not None else self.train_set
        sampler = GlobalBatchSampler(len(dataset), self.cfg.batch_size, info, seed, epoch)
        return DataLoader(dataset, batch_sampler=sampler, **loader_options(self.cfg))

    def extra_loader(self, info: DistInfo, seed: int, epoch: int) -> DataLoader | None:
        """Unlabeled crops for the label-free loss (``--extra-data``)."""
        return unlabeled_loader(self.extra, self.cfg.batch_size, info, seed, epoch, loader_options(self.cfg))

    def validation_inputs(self, max_batches: int) -> list[torch.Tensor]:
        batches = self._val_batches(list(range(len(self.val))))
        return [images for images, _ in itertools.islice(batches, max_batches)]

    # -- training ----------------------------------------------------------------------------
    def training_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy over the labelled pixels (+ the auxiliary head's). A batch without any (every
        pixel the ignore index) has no task loss: it contributes 0, where the mean over no pixels would be
        NaN, and the first one is logged."""
        images, masks = batch
        outputs = model(images)
        labelled = bool((masks != IGNORE_INDEX).any())
        if not labelled:
            self._unlabelled_batches += 1
            if self._unlabelled_batches == 1:
                logger.warning("a training batch has no labelled pixel (every mask value is %d): it adds no task loss "
                               "(further ones are not logged)", IGNORE_INDEX)

        def loss(logits: torch.Tensor) -> torch.Tensor:
            if not labelled:
                return logits.float().sum() * 0.0  # zero, still part of the graph (DDP reduces every parameter)
            return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)

        main = loss(outputs["out"])
        if "aux" not in outputs:
            return main, {}
        aux = loss(outputs["aux"])
        return main + AUX_LOSS_WEIGHT * aux, {"loss_main": main.detach(), "loss_aux": aux.detach()}

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Argmax maps (B, H, W) at the images' resolution: whole image, or sliding windows of
        ``crop_size`` every ``slide_stride`` pixels (logits averaged where windows overlap)."""
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if self.cfg.slide_stride is None:
                logits = model(images).float()
            else:
                logits = _slide(model, images, self.window, self.cfg.slide_stride, self.data.num_classes)
        if not bool(torch.isfinite(logits).all()):  # argmax would turn NaN into class 0 without a word
            raise ValueError("the model's logits hold NaN or infinite values on a validation image; its weights "
                             "diverged (lower --lr, set --grad-clip) or the checkpoint is damaged")
        return logits.argmax(1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, info: DistInfo, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, split: str = "val") -> dict[str, float]:
        """aAcc, mIoU, mAcc and mBIoU in percent over the validation set (each rank its shard, counts
        summed over ranks)."""
        was_training = model.training
        model.eval()
        metric = SegmentationMetric(self.data.num_classes, IGNORE_INDEX)
        dataset = self.eval_split(split)
        for images, masks in self._val_batches(shard_indices(len(dataset), info), dataset):
            metric.update(self.predict(model, images.to(device), autocast_dtype).cpu(), masks)
        model.train(was_training)
        metric.all_reduce()
        result = metric.compute()
        return {key: 100.0 * result[key] for key in ("mIoU", "aAcc", "mAcc", "mBIoU")}

    def _val_batches(self, indices: list[int], dataset: Dataset | None = None):
        """Fixed-size data (digit scenes) in batches; full-resolution files one image at a time."""
        batch = self.cfg.eval_batch_size if self.data.name == "digit-scenes" else 1
        return DataLoader(Subset(self.val if dataset is None else dataset, indices), batch_size=batch,
                          **loader_options(self.cfg))

    @torch.no_grad()
    def predictions(self, model: nn.Module, device: torch.device) -> list[torch.Tensor]:
        """Argmax maps of the first `PREDICTION_IMAGES` validation images (one process)."""
        model.eval()
        indices = list(range(min(PREDICTION_IMAGES, len(self.val))))
        return [pred.to(torch.uint8 if self.data.num_classes <= 256 else torch.int32).cpu()
                for images, _ in self._val_batches(indices) for pred in self.predict(model, images.to(device))]

    def compare_outputs(self, unfused: list[torch.Tensor], fused: list[torch.Tensor]) -> dict:
        changed = sum(int((a != b).sum()) for a, b in zip(unfused, fused))
        return {"pixel_changes": changed, "compared_pixels": sum(a.numel() for a in unfused)}

    def fused_check(self, results: list) -> str:
        changed = sum(r.extra["pixel_changes"] for r in results)
        total = sum(r.extra["compared_pixels"] for r in results)
        if changed == 0:
            return "yes (identical argmax maps)"
        return f"NO: {changed} of {total} pixels differ"


def _slide(model: nn.Module, images: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """mmseg's ``slide_inference``: windows of ``crop`` every ``stride``, the last one flush with the edge."""
    if stride > crop:
        raise ValueError(f"a sliding-window stride of {stride} leaves pixels between windows of {crop} uncovered")
    batch, _, height, width = images.shape
    logits = images.new_zeros((batch, num_classes, height, width))
    counts = images.new_zeros((1, 1, height, width))
    rows = max(math.ceil((height - crop) / stride), 0) + 1
    cols = max(math.ceil((width - crop) / stride), 0) + 1
    for row, col in itertools.product(range(rows), range(cols)):
        y2, x2 = min(row * stride + crop, height), min(col * stride + crop, width)
        y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
        logits[..., y1:y2, x1:x2] += model(images[..., y1:y2, x1:x2]).float()
        counts[..., y1:y2, x1:x2] += 1
    return logits / counts
