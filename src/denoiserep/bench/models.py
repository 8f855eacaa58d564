"""The benchmarked architectures, and per kind of model what gets converted, what the model is
called with and where the DenoiseRep⁻ head goes.

Classifiers take those choices from the classification task (`ClassificationTask`'s conversion
root and DenoiseRep⁻ slot). Detection and segmentation have no task yet (their own issues), so
their choices live here until those tasks land, each in one `Kind`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import timm
import torch
import torchvision
from torch import nn

import denoiserep as dr
from denoiserep.config import DenoiseConfig
from denoiserep.head import PerPositionHead
from denoiserep.tasks.classification import ClassificationTask

from .settings import Settings


def _classifier_minus(baseline: nn.Module, steps: int) -> nn.Module:
    # Shares the baseline's modules (it adds only the head): no copy of the backbone.
    head = dr.DenoiseHead(ClassificationTask.feature_dim(baseline), steps=steps)
    return ClassificationTask.wrap_with_head(baseline, head)


def _detector_minus(baseline: nn.Module, steps: int) -> nn.Module:
    """The head on each RoI's box-head feature (1024-d), before the box predictor."""
    model = copy.deepcopy(baseline)
    box_head = model.roi_heads.box_head
    head = PerPositionHead(dr.DenoiseHead(box_head.fc7.out_features, steps=steps))
    model.roi_heads.box_head = nn.Sequential(box_head, head)
    return model


def _segmenter_minus(baseline: nn.Module, steps: int) -> nn.Module:
    """The head on each pixel of the backbone's output map (2048-d), before the FCN head."""
    model = copy.deepcopy(baseline)
    head = PerPositionHead(dr.DenoiseHead(model.classifier[0].in_channels, steps=steps))
    model.classifier = nn.Sequential(head, model.classifier)
    return model


def _timm_model(spec: "ModelSpec", settings: Settings) -> nn.Module:
    return timm.create_model(spec.name, **dict(spec.timm_kwargs))


def _faster_rcnn(spec: "ModelSpec", settings: Settings) -> nn.Module:
    size = spec.size(settings)
    return torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=size, max_size=size
    )


def _fcn(spec: "ModelSpec", settings: Settings) -> nn.Module:
    return torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False)


def _detector_backbone(model: nn.Module) -> nn.Module:
    return model.backbone


def _whole_model(model: nn.Module) -> nn.Module:
    return model


def _image_batch(batch: int, size: int, device: str) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, device=device)


def _image_list(batch: int, size: int, device: str) -> list[torch.Tensor]:
    return [torch.rand(3, size, size, device=device) for _ in range(batch)]


@dataclass(frozen=True)
class Kind:
    """Everything that differs between classifiers, detectors and segmenters in the benchmarks."""

    name: str
    build: Callable[["ModelSpec", Settings], nn.Module]  # random weights, nothing downloaded
    inputs: Callable[[int, int, str], Any]  # (batch, size, device) -> what model(...) takes
    conversion_root: Callable[[nn.Module], nn.Module]
    scope: str  # what the conversion covers, for the table
    denoise_minus: Callable[[nn.Module, int], nn.Module]  # (baseline, steps) -> DenoiseRep⁻ model
    dense: bool  # DenoiseRep⁻ runs per RoI / pixel: time one step only, fewer rounds
    # The forward's FLOPs depend on its outputs (a detector's proposals surviving NMS): fused and
    # baseline FLOPs may then differ by a rounding flip, up to 1e-3 of the total.
    output_dependent_flops: bool = False

    def __reduce__(self):  # pickled by name (memory is measured in a fresh process)
        return _kind, (self.name,)


def _kind(name: str) -> Kind:
    return KINDS[name]


CLASSIFICATION = Kind("classification", _timm_model, _image_batch, ClassificationTask.conversion_root, "whole model",
                      _classifier_minus, dense=False)
# Detection converts its backbone (ResNet-50 body + FPN); RPN and RoI heads stay plain.
DETECTION = Kind("detection", _faster_rcnn, _image_list, _detector_backbone, "backbone (body + FPN)", _detector_minus,
                 dense=True, output_dependent_flops=True)
SEGMENTATION = Kind("segmentation", _fcn, _image_batch, _whole_model, "whole model", _segmenter_minus, dense=True)
KINDS = {kind.name: kind for kind in (CLASSIFICATION, DETECTION, SEGMENTATION)}


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked architecture: its constructor, `Kind` and input size; ``init`` is the
    denoisers' initialisation."""

    name: str  # the timm / torchvision constructor
    kind: Kind
    image_size: int
    cpu_image_size: int | None = None
    timm_kwargs: tuple[tuple[str, Any], ...] = ()
    init: str = "random"

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.timm_kwargs if k != "img_size")
        return f"{self.name} ({extra})" if extra else self.name

    def size(self, settings: Settings) -> int:
        return self.cpu_image_size if settings.device == "cpu" and self.cpu_image_size else self.image_size

    def build(self, settings: Settings) -> nn.Module:
        return self.kind.build(self, settings)

    def inputs(self, batch: int, settings: Settings) -> tuple:
        """Positional arguments of ``model(...)``."""
        return (self.kind.inputs(batch, self.size(settings), settings.device),)

    def root_example(self, settings: Settings) -> torch.Tensor:
        """What the conversion root takes (the detector's backbone takes a batched tensor)."""
        return _image_batch(1, self.size(settings), settings.device)

    def denoise_minus(self, baseline: nn.Module, steps: int) -> nn.Module:
        return self.kind.denoise_minus(baseline, steps).to(next(baseline.parameters()).device).eval()


CLASSIFIERS = [ModelSpec(n, CLASSIFICATION, 224) for n in (
    "vit_small_patch16_224", "vit_base_patch16_224", "swinv2_cr_tiny_ns_224", "resnet50", "convnext_tiny")]
# Random proposals make the detector's cost depend on its weights; identity-initialised
# denoisers keep the fused detector's proposals, hence its FLOPs, comparable to the baseline's.
DETECTOR = ModelSpec("fasterrcnn_resnet50_fpn", DETECTION, 512, cpu_image_size=256, init="identity")
SEGMENTER = ModelSpec("fcn_resnet50", SEGMENTATION, 512, cpu_image_size=160)
# Quick mode: a 2-block ViT-Ti at 64 px, so that the smoke test stays well under a minute.
QUICK_VIT = ModelSpec("vit_tiny_patch16_224", CLASSIFICATION, 64, timm_kwargs=(("img_size", 64), ("depth", 2)))


def inference_specs(settings: Settings) -> list[ModelSpec]:
    return [QUICK_VIT] if settings.quick else [*CLASSIFIERS, DETECTOR, SEGMENTER]


def training_specs(settings: Settings) -> list[ModelSpec]:
    return [QUICK_VIT] if settings.quick else [CLASSIFIERS[0], CLASSIFIERS[3]]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def benchmark_config(spec: ModelSpec, **overrides: Any) -> DenoiseConfig:
    """keep_state_dict_keys: the fused model must load into the original architecture (Swin's
    bias-free patch-merging ``reduction`` layers are left out for that)."""
    return DenoiseConfig(init=spec.init, keep_state_dict_keys=True, **overrides)


def convert_quietly(root: nn.Module, config: DenoiseConfig, example: torch.Tensor) -> None:
    """The skipped layers are reported in the conversion table, not as warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dr.convert(root, config, example_inputs=example)
