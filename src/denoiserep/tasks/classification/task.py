"""Image (and 1-D signal) classification: data, model, loss and top-1/top-5 evaluation."""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Subset

from ...data.images import SkipUnreadable, load_unlabeled_images, unlabeled_datasets
from ...finite import max_abs_difference, worst
from ...head import DenoiseHead
from ...models import create_model, default_model_for, feature_dim
from ...train.config import TrainConfig
from ...train.distributed import (DistInfo, GlobalBatchSampler, all_reduce_sum, loader_options, shard_indices,
                                  unlabeled_loader)
from ..base import TaskBase
from .data import ClassificationData, load_classification_data
from .models import HeadedClassifier


class ClassificationTask(TaskBase):
    """Image (and 1-D signal) classification; see `denoiserep.tasks.base.Task` for the interface."""

    name = "classification"
    primary_metric = "top1"
    metric_label = "top-1"
    demo_defaults = {"data": "digits", "epochs": 30, "extra_epochs": 10, "name": "demo"}
    data_sources = "digits | mnist1d | imagefolder:PATH | cifar10:PATH | cifar100:PATH | PATH (one of those layouts)"
    supports_test_split = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.data: ClassificationData = load_classification_data(cfg.data, image_size=cfg.image_size)
        # The validation images, and (--test-fraction) the held-out test images, stratified by class.
        labels = getattr(self.data.val, "targets", None)
        labels = getattr(self.data.val, "labels", None) if labels is None else labels
        self.val, self.test = self.hold_out_test(self.data.val, None if labels is None else [int(y) for y in labels],
                                                 f"validation images of {self.data.name}")
        load = functools.partial(load_unlabeled_images, image_size=self.data.input_shape[-1],
                                 in_chans=self.data.input_shape[0])
        self.extra, self.denoise_train = unlabeled_datasets(cfg.extra_data, cfg.denoise_data, load,
                                                            cfg.skip_bad_images)
        self.train = SkipUnreadable(self.data.train) if cfg.skip_bad_images else self.data.train
        self.mixup = self._mixup()
        self.loss = self._loss()

    # -- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        if self.cfg.model is None:
            name, kwargs = default_model_for(self.data.name)
        else:
            name, kwargs = self.cfg.model, {}
        kwargs.update(self.cfg.model_kwargs)
        kwargs.setdefault("num_classes", self.data.num_classes)
        if kwargs["num_classes"] != self.data.num_classes:
            raise ValueError(
                f"the model is built for {kwargs['num_classes']} classes but {self.data.name} has "
                f"{self.data.num_classes}; drop num_classes from --model-kwargs"
            )
        if name != "mnist1d_cnn":
            kwargs.setdefault("in_chans", self.data.input_shape[0])
        return create_model(name, **kwargs)

    @staticmethod
    def feature_dim(model: nn.Module) -> int:
        return feature_dim(model)

    @staticmethod
    def wrap_with_head(model: nn.Module, head: DenoiseHead) -> nn.Module:
        """DenoiseRep⁻: denoise the pooled feature before the classifier."""
        return HeadedClassifier(model, head)

    def example_inputs(self, device: torch.device, batch: int = 2) -> torch.Tensor:
        return torch.stack([self.val[i][0] for i in range(min(batch, len(self.val)))]).to(device)

    # -- training -----------------------------------------------------------------------------
    def train_loader(self, info: DistInfo, seed: int, epoch: int, for_denoisers: bool = False) -> DataLoader:
        """Shuffled global batches; the denoise stage may train on ``--denoise-data`` instead."""
        dataset = self.denoise_train if for_denoisers and self.denoise_train is not None else self.train
        sampler = GlobalBatchSampler(len(dataset), self.cfg.batch_size, info, seed, epoch)
        return DataLoader(dataset, batch_sampler=sampler, **loader_options(self.cfg))

    def extra_loader(self, info: DistInfo, seed: int, epoch: int) -> DataLoader | None:
        """Unlabeled images for the label-free loss (the paper's "merged datasets")."""
        return unlabeled_loader(self.extra, self.cfg.batch_size, info, seed, epoch, loader_options(self.cfg))

    def training_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy (label smoothing / mixup / cutmix as configured)."""
        inputs, targets = batch
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        return self.loss(model(inputs), targets), {}

    def _mixup(self) -> Mixup | None:
        if self.cfg.mixup <= 0 and self.cfg.cutmix <= 0:
            return None
        return Mixup(mixup_alpha=self.cfg.mixup, cutmix_alpha=self.cfg.cutmix,
                     label_smoothing=self.cfg.label_smoothing, num_classes=self.data.num_classes)

    def _loss(self) -> nn.Module:
        if self.mixup is not None:
            return SoftTargetCrossEntropy()
        if self.cfg.label_smoothing > 0:
            return LabelSmoothingCrossEntropy(self.cfg.label_smoothing)
        return nn.CrossEntropyLoss()

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, info: DistInfo, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, split: str = "val") -> dict[str, float]:
        """Top-1/top-5 accuracy (%) and mean cross-entropy, summed exactly over ranks."""
        dataset = self.eval_split(split)
        was_training = model.training
        model.eval()
        subset = Subset(dataset, shard_indices(len(dataset), info))
        loader = DataLoader(subset, batch_size=self.cfg.eval_batch_size, **loader_options(self.cfg))
        correct1 = correct5 = loss_sum = count = 0.0
        k = min(5, self.data.num_classes)
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(inputs)
            logits = logits.float()
            top = logits.topk(k, dim=1).indices
            correct1 += (top[:, 0] == targets).sum().item()
            correct5 += (top == targets[:, None]).any(dim=1).sum().item()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
        model.train(was_training)
        correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count], device)
        return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count,
                "loss": loss_sum / count, "samples": count}

    def validation_inputs(self, max_batches: int) -> list[torch.Tensor]:
        """The first ``max_batches`` validation batches, inputs only (fixed: for noise-loss diagnostics)."""
        loader = DataLoader(self.val, batch_size=self.cfg.eval_batch_size, **loader_options(self.cfg))
        return [inputs for inputs, _ in itertools.islice(loader, max_batches)]

    @torch.no_grad()
    def predictions(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        """Logits on the whole validation set (single process): used to compare fused vs unfused."""
        model.eval()
        loader = DataLoader(self.val, batch_size=self.cfg.eval_batch_size)
        return torch.cat([model(inputs.to(device)).float().cpu() for inputs, _ in loader])

    def compare_outputs(self, unfused: torch.Tensor, fused: torch.Tensor) -> dict:
        """Fused vs unfused validation logits: largest difference and changed predictions."""
        return {"fused_vs_unfused_max_logit_error": max_abs_difference(unfused, fused),
                "prediction_changes": int((fused.argmax(1) != unfused.argmax(1)).sum())}

    def fused_check(self, results: list) -> str:
        """The report's "fused == unfused" cell for DenoiseRep results (one per seed)."""
        changes = sum(r.extra["prediction_changes"] for r in results)
        same_metric = all(r.extra["unfused_metrics"]["top1"] == r.metrics["top1"] for r in results)
        error = worst(r.extra["fused_vs_unfused_max_logit_error"] for r in results)
        if not math.isfinite(error):
            return f"NO: the logits differ by {error} (non-finite outputs)"
        if changes == 0 and same_metric:
            return "yes (identical predictions)"
        return f"NO: {changes} predictions differ"
