"""Detectors by name: torchvision's detection models on any timm backbone, and Hugging Face's DETR.

``--model FAMILY_BACKBONE``, BACKBONE any timm model with ``features_only`` (a trailing ``_fpn``, as
in torchvision's names, is accepted and ignored: every torchvision family here has an FPN):

- ``fasterrcnn_<timm>`` / ``maskrcnn_<timm>``: torchvision's `FasterRCNN` / `MaskRCNN`;
- ``retinanet_<timm>``: torchvision's `RetinaNet` (P3–P7, as torchvision's ``retinanet_resnet50_fpn``);
- ``fcos_<timm>``: torchvision's `FCOS`, the nearest relative of the paper's ATSS in torchvision
  (both are one-stage, FPN P3–P7, centre-ness; ATSS differs in how it picks positive samples, and
  torchvision has no ATSS);
- ``detr_<timm>``: Hugging Face `DetrForObjectDetection` built from a `DetrConfig` with a timm
  backbone (no hub download; needs the ``[hf]`` extra), with DETR's own Hungarian loss and
  post-processing.

YOLO (DarkNet-53) and CenterNet, the paper's other two rows, have no maintained, permissively
licensed PyTorch implementation in this project's dependencies, so they are not offered.

The timm backbone returns its last four feature maps (strides 4–32; timm's Swin returns NHWC maps,
which are permuted to NCHW), torchvision's `FeaturePyramidNetwork` merges them; module names follow
torchvision's `BackboneWithFPN` (``backbone.body``, ``backbone.fpn``), so a torchvision detector's
state_dict (e.g. ``fasterrcnn_resnet50_fpn``'s, whose ResNet has timm's layer names) loads with
``--init``. `DetectionModel` gives every family one interface: ``model(images)`` (a list of float
(3, H, W) images in [0, 1]) returns torchvision's list of dicts in eval mode and a dict of losses
in train mode with targets.

Options (``--model-kwargs``): ``min_size`` / ``max_size`` (the detector's resize), ``fpn_channels``,
``anchor_sizes`` (one per pyramid level), ``representation_size`` (two-stage box head width),
``mask_channels`` (Mask R-CNN's mask head width, 256 as torchvision),
``backbone_weights`` (a local timm weights file, or ``"hub"`` to let timm download them),
``frozen_bn`` (default: on with backbone weights, as torchvision does for trained backbones),
``backbone_kwargs`` (passed to ``timm.create_model``); anything else goes to the torchvision
detector (e.g. ``box_score_thresh``) or to `DetrConfig` (e.g. ``num_queries``, ``d_model``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ...checkpoint import read_state_dict
from ...head import DenoiseHead, PerPositionHead

TORCHVISION_FAMILIES = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")
FAMILIES = (*TORCHVISION_FAMILIES, "detr")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# torchvision's defaults per family: anchor sizes per pyramid level.
DEFAULT_ANCHOR_SIZES = {"fasterrcnn": (32, 64, 128, 256, 512), "maskrcnn": (32, 64, 128, 256, 512),
                        "retinanet": (32, 64, 128, 256, 512), "fcos": (8, 16, 32, 64, 128)}
DETR_RESIZE = (800, 1333)  # DETR's shortest / longest side, as torchvision's detectors


def parse_model_name(name: str) -> tuple[str, str]:
    """``"fasterrcnn_resnet50_fpn"`` → ``("fasterrcnn", "resnet50")``."""
    family, _, backbone = name.partition("_")
    backbone = backbone.removesuffix("_fpn")
    if family not in FAMILIES or not backbone:
        raise ValueError(f"unknown detection model {name!r}; use FAMILY_BACKBONE with FAMILY one of "
                         f"{', '.join(FAMILIES)} and BACKBONE any timm model, e.g. fasterrcnn_resnet50, "
                         "maskrcnn_swinv2_tiny_window8_256, fcos_resnet50, detr_resnet50 "
                         "(YOLO and CenterNet are not offered: see the README)")
    if backbone not in timm.list_models():
        raise ValueError(f"{name}: {backbone!r} is not a timm model (timm.list_models() lists them)")
    return family, backbone


# -- the backbone ----------------------------------------------------------------------------------


class TimmBackboneWithFPN(nn.Module):
    """torchvision's `BackboneWithFPN` with a timm ``features_only`` body: ``body`` (the timm network,
    last four feature maps) → NCHW → ``fpn`` (+ ``extra_blocks``). ``out_channels`` as torchvision
    detectors expect it."""

    def __init__(self, name: str, *, in_chans: int = 3, fpn_channels: int = 256, skip_levels: int = 0,
                 extra_blocks: nn.Module | None = None, weights: str | None = None, frozen_bn: bool | None = None,
                 **timm_kwargs):
        super().__init__()
        self.body = create_timm_features(name, in_chans=in_chans, weights=weights, frozen_bn=frozen_bn,
                                         skip_levels=skip_levels, **timm_kwargs)
        self.channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), fpn_channels, extra_blocks)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        features = self.body(x)
        if self.channels_last:  # timm's Swin / ConvNeXt-style NHWC maps
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def create_timm_features(name: str, *, in_chans: int = 3, weights: str | None = None, frozen_bn: bool | None = None,
                         skip_levels: int = 0, **kwargs) -> nn.Module:
    """timm's ``features_only`` network returning the last ``4 − skip_levels`` maps of stride ≥ 4.

    ``weights``: a local file (timm's ``pretrained_cfg_overlay``), or ``"hub"`` (timm downloads);
    None: random. BatchNorms become `FrozenBatchNorm2d` when ``frozen_bn`` (default: with weights)."""
    probe = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans, **_size_free(name, kwargs))
    reductions = probe.feature_info.reduction()
    levels = [i for i, r in enumerate(reductions) if r >= 4][-4:]
    if len(levels) < 4:
        raise ValueError(f"{name} offers feature maps of strides {reductions}; a detector needs four of stride ≥ 4")
    options = dict(features_only=True, in_chans=in_chans, out_indices=tuple(levels[skip_levels:]),
                   **_size_free(name, kwargs))
    if weights is None:
        body = timm.create_model(name, pretrained=False, **options)
    elif weights == "hub":
        body = timm.create_model(name, pretrained=True, **options)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights {path} do not exist (nothing is downloaded: pass a local "
                                    "file, or \"hub\" to let timm download them)")
        # Read by denoiserep's own reader (nothing but tensors is unpickled; a named error otherwise),
        # then handed to timm, which adapts it (classifier, input channels) as for its own weights.
        state = read_state_dict(path)
        try:
            body = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **options)
        except (RuntimeError, KeyError, ValueError) as error:
            raise ValueError(f"backbone_weights {path} do not fit timm's {name} ({type(error).__name__}: "
                             f"{str(error)[:300]}); pass weights of the same timm model") from None
    if frozen_bn if frozen_bn is not None else weights is not None:
        body = timm.layers.freeze_batch_norm_2d(body)
    return body


def _size_free(name: str, kwargs: dict) -> dict:
    """Transformers such as Swin fix their input size unless told not to; detection images vary."""
    if "swin" in name and "strict_img_size" not in kwargs:
        return {"strict_img_size": False, **kwargs}
    return kwargs


# -- the detector ----------------------------------------------------------------------------------


class DetectionModel(nn.Module):
    """One interface over torchvision's detectors and Hugging Face's DETR.

    - eval: ``model(images)`` → ``[{"boxes", "scores", "labels"(, "masks")}]`` per image, boxes xyxy in
      the input image's pixels, labels 1..K;
    - train: ``model(images, targets)`` → a dict of losses (the detector's own);
    - ``model(images, upto="backbone" | "neck")``: only the detector's preprocessing and the backbone
      (+ FPN): what the label-free DenoiseRep steps need, whose noise losses live there.

    ``backbone`` is the timm network DenoiseRep converts by default, ``neck`` the FPN (DETR: the input
    projection), `attach_head` puts a DenoiseRep⁻ head in its slot.
    """

    def __init__(self, net: nn.Module, family: str, resize: tuple[int, int] = DETR_RESIZE):
        super().__init__()
        self.net, self.family = net, family
        if family == "detr":  # torchvision's detectors carry this transform themselves
            min_size, max_size = resize
            self.transform = GeneralizedRCNNTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))

    @property
    def backbone(self) -> nn.Module:
        return self.net.model.backbone.model if self.family == "detr" else self.net.backbone.body

    @property
    def neck(self) -> nn.Module:
        return self.net.model.input_projection if self.family == "detr" else self.net.backbone.fpn

    @property
    def head_dim(self) -> int:
        """Width of what the DenoiseRep⁻ head denoises: RoI features (two-stage), FPN locations
        (one-stage), decoder queries (DETR)."""
        if self.family == "detr":
            return self.net.config.d_model
        if self.family in ("fasterrcnn", "maskrcnn"):
            return self.net.roi_heads.box_predictor.cls_score.in_features
        return self.net.backbone.out_channels

    def preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The batch the backbone sees: normalised, resized, padded (the detector's own transform)."""
        transform = self.transform if self.family == "detr" else self.net.transform
        return transform(list(images))[0].tensors

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None, upto: str | None = None):
        if upto is not None:
            return self._features(images, upto)
        if self.family == "detr":
            return self._detr(images, targets)
        if self.family in ("retinanet", "fcos"):
            # One-stage heads score K classes with sigmoids: no background output, labels 0..K−1.
            targets = [dict(t, labels=t["labels"] - 1) for t in targets] if targets is not None else None
        if self.training and targets is None:
            with _inference_path(self.net):  # label-free steps with every layer converted ("all")
                return self._shifted(self.net(images))
        return self._shifted(self.net(images, targets))

    def _shifted(self, outputs):
        """One-stage detections back to labels 1..K (0 stays the background everywhere else)."""
        if self.family not in ("retinanet", "fcos") or isinstance(outputs, dict):
            return outputs
        return [dict(out, labels=out["labels"] + 1) for out in outputs]

    def _features(self, images, upto: str):
        if upto not in ("backbone", "neck"):
            raise ValueError(f"upto must be 'backbone' or 'neck', got {upto!r}")
        x = self.preprocess(images)
        if self.family == "detr":
            features = self.backbone(x)
            return self.neck(features[-1]) if upto == "neck" else features
        return self.net.backbone(x) if upto == "neck" else self.backbone(x)

    # -- DETR: torchvision's resize / batching, Hugging Face's model, loss and post-processing -----
    def _detr(self, images: list[torch.Tensor], targets: list[dict] | None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(list(images), targets)
        pixel_mask = torch.zeros(batch.tensors.shape[0], *batch.tensors.shape[-2:], dtype=torch.long,
                                 device=batch.tensors.device)
        for mask, (height, width) in zip(pixel_mask, batch.image_sizes):
            mask[:height, :width] = 1
        if self.training and targets is not None:
            labels = [{"class_labels": t["labels"] - 1, "boxes": _normalized_cxcywh(t["boxes"], size)}
                      for t, size in zip(targets, batch.image_sizes)]
            output = self.net(pixel_values=batch.tensors, pixel_mask=pixel_mask, labels=labels)
            # DETR's Hungarian loss, weighted by its config (class 1, L1 5, GIoU 2, + auxiliary decoders).
            return {"loss_detr": output.loss}
        output = self.net(pixel_values=batch.tensors, pixel_mask=pixel_mask)
        results = _detr_processor().post_process_object_detection(output, threshold=0.0,
                                                                  target_sizes=original_sizes)
        return [{"boxes": r["boxes"], "scores": r["scores"], "labels": r["labels"] + 1} for r in results]

    # -- DenoiseRep⁻ -----------------------------------------------------------------------------
    def attach_head(self, head: DenoiseHead) -> None:
        """Two-stage: every RoI's feature before the box predictor; one-stage: every location of every
        FPN level before the heads; DETR: every decoder query before the class / box heads."""
        self.denoise_head = PerPositionHead(head)
        if self.family in ("fasterrcnn", "maskrcnn"):
            slot = self.net.roi_heads.box_head
        elif self.family == "detr":
            slot = self.net.model.decoder.layernorm
        else:
            slot = self.net.backbone
        slot.register_forward_hook(_denoised_output(self))


def _denoised_output(model: DetectionModel):
    def hook(module, args, output):
        if isinstance(output, dict):  # FPN levels
            return OrderedDict((key, model.denoise_head(value)) for key, value in output.items())
        return model.denoise_head(output)

    return hook


@contextlib.contextmanager
def _inference_path(net: nn.Module):
    """The detector's inference code path (no targets, no losses) while its layers stay as they are
    (denoisers in train mode accumulate their noise losses; BatchNorm keeps its mode)."""
    switched = [m for m in net.modules() if m.training and isinstance(
        m, (GeneralizedRCNN, GeneralizedRCNNTransform, RegionProposalNetwork, RoIHeads, RetinaNet, FCOS))]
    for module in switched:
        module.training = False
    try:
        yield
    finally:
        for module in switched:
            module.training = True


def _normalized_cxcywh(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    height, width = size
    x1, y1, x2, y2 = boxes.unbind(-1)
    scale = boxes.new_tensor([width, height, width, height])
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1) / scale


_PROCESSOR = None


def _detr_processor():
    global _PROCESSOR
    if _PROCESSOR is None:
        from transformers import DetrImageProcessor

        _PROCESSOR = DetrImageProcessor()
    return _PROCESSOR


# -- builders --------------------------------------------------------------------------------------


def build_detection_model(name: str, num_classes: int, *, in_chans: int = 3, **kwargs) -> DetectionModel:
    """A detector for ``num_classes`` object classes (labels 1..K; 0 is the background), random
    weights unless ``backbone_weights`` names a file (or ``--init`` loads a whole detector)."""
    family, backbone_name = parse_model_name(name)
    if family == "detr":
        return _build_detr(backbone_name, num_classes, in_chans, **kwargs)
    kwargs = dict(kwargs)
    backbone_options = {"fpn_channels": kwargs.pop("fpn_channels", 256), "weights": kwargs.pop("backbone_weights", None),
                        "frozen_bn": kwargs.pop("frozen_bn", None), "in_chans": in_chans,
                        **kwargs.pop("backbone_kwargs", {})}
    anchor_sizes = tuple(kwargs.pop("anchor_sizes", DEFAULT_ANCHOR_SIZES[family]))
    representation_size = kwargs.pop("representation_size", 1024)
    if in_chans != 3 and ("image_mean" not in kwargs or "image_std" not in kwargs):
        raise ValueError(f"{in_chans}-channel images: pass image_mean and image_std (one value per channel)")
    channels = backbone_options["fpn_channels"]
    if family == "fcos" and channels % 32:
        raise ValueError(f"{name}: FCOS's head normalises with GroupNorm(32 groups); fpn_channels must be a multiple "
                         f"of 32, got {channels}")
    if family in ("fasterrcnn", "maskrcnn"):
        backbone = TimmBackboneWithFPN(backbone_name, extra_blocks=LastLevelMaxPool(), **backbone_options)
        _check_levels(name, anchor_sizes, 5)
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        box_head = TwoMLPHead(channels * 7 * 7, representation_size)
        predictor = FastRCNNPredictor(representation_size, num_classes + 1)
        if family == "maskrcnn":  # torchvision's mask head (width selectable), its predictor sized for our classes
            width = kwargs.pop("mask_channels", 256)
            kwargs["mask_head"] = MaskRCNNHeads(channels, (width,) * 4, 1)
            kwargs["mask_predictor"] = MaskRCNNPredictor(width, width, num_classes + 1)
        detector = FasterRCNN if family == "fasterrcnn" else MaskRCNN
        net = detector(backbone, None, rpn_anchor_generator=anchors, box_head=box_head, box_predictor=predictor,
                       **kwargs)
    else:
        # P3–P7: the stride-8, 16 and 32 maps and two extra levels, as torchvision's RetinaNet / FCOS.
        backbone = TimmBackboneWithFPN(backbone_name, skip_levels=1, extra_blocks=LastLevelP6P7(channels, channels),
                                       **backbone_options)
        _check_levels(name, anchor_sizes, 5)
        if family == "retinanet":
            sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in anchor_sizes)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
            net = RetinaNet(backbone, num_classes, anchor_generator=anchors, **kwargs)
        else:
            anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))
            net = FCOS(backbone, num_classes, anchor_generator=anchors, **kwargs)
    return DetectionModel(net, family)


def _check_levels(name: str, anchor_sizes: tuple, levels: int) -> None:
    if len(anchor_sizes) != levels:
        raise ValueError(f"{name} has {levels} pyramid levels: anchor_sizes needs {levels} sizes, got {anchor_sizes}")


def _build_detr(backbone_name: str, num_classes: int, in_chans: int, **kwargs) -> DetectionModel:
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("detr_* models need Hugging Face transformers: pip install 'denoiserep[hf]'")
    from transformers import DetrConfig, DetrForObjectDetection

    kwargs = dict(kwargs)
    resize = (kwargs.pop("min_size", DETR_RESIZE[0]), kwargs.pop("max_size", DETR_RESIZE[1]))
    for option in ("backbone_weights", "frozen_bn", "backbone_kwargs", "anchor_sizes", "fpn_channels",
                   "representation_size", "mask_channels"):
        if option in kwargs:
            raise ValueError(f"{option} is not an option of detr_* models (DETR's backbone is built by transformers "
                             "and always has frozen BatchNorms; load a whole checkpoint with --init)")
    config = DetrConfig(use_timm_backbone=True, backbone=backbone_name, use_pretrained_backbone=False,
                        num_labels=num_classes, num_channels=in_chans, **kwargs)
    net = DetrForObjectDetection(config)
    return DetectionModel(net, "detr", resize)
