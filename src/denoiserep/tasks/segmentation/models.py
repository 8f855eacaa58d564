"""Segmentation networks by name, all built without downloading anything, behind one wrapper.

- torchvision: ``fcn_resnet50``, ``fcn_resnet101``, ``deeplabv3_resnet50``, ``deeplabv3_resnet101``,
  ``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large`` (``aux_loss`` as torchvision offers it);
- Hugging Face: ``segformer_mit_b0`` … ``segformer_mit_b5`` (`SegformerForSemanticSegmentation` from a
  config; needs the ``[hf]`` extra);
- ``fcn:<timm model>``: torchvision's FCN head on a timm backbone's stride-8 feature map (any timm model
  with ``features_only``), e.g. ``fcn:resnet18`` for the offline demo.

`SegmentationModel` gives them one interface: ``model(images)`` returns logits at the input's
resolution (train mode: a dict with ``"out"`` and, where the network has one, ``"aux"``), ``.encoder``
is the backbone DenoiseRep converts by default, and `attach_head` puts a DenoiseRep⁻ head on every
pixel of the encoder's output map, before the decoder.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation.fcn import FCN, FCNHead

from ...head import DenoiseHead, PerPositionHead

TORCHVISION_MODELS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                      "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
# Hidden sizes / depths of the SegFormer encoders (Xie et al. 2021, Table 6).
SEGFORMER_CONFIGS = {
    "segformer_mit_b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "segformer_mit_b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "segformer_mit_b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "segformer_mit_b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "segformer_mit_b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "segformer_mit_b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}
AUX_LOSS_WEIGHT = 0.4  # mmseg's FCN / DeepLabV3 configs


class _TimmFeatures(nn.Module):
    """A timm backbone's stride-8 feature map as torchvision segmentation backbones return it."""

    def __init__(self, name: str, in_chans: int, **kwargs):
        super().__init__()
        reductions = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans,
                                       **kwargs).feature_info.reduction()
        if 8 not in reductions:
            raise ValueError(f"fcn:{name} needs a stride-8 feature map; timm's {name} offers strides {reductions}")
        self.body = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans,
                                      out_indices=(reductions.index(8),), **kwargs)
        self.out_channels = self.body.feature_info.channels()[-1]

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return OrderedDict(out=self.body(x)[-1])


class SegmentationModel(nn.Module):
    """One interface over torchvision, Hugging Face and timm-backed segmentation networks."""

    def __init__(self, net: nn.Module, family: str):
        super().__init__()
        self.net = net
        self.family = family  # "torchvision" or "segformer"
        self.num_features = self._encoder_output_width()

    @property
    def encoder(self) -> nn.Module:
        return self.net.segformer if self.family == "segformer" else self.net.backbone

    def forward(self, images: torch.Tensor):
        size = images.shape[-2:]
        if self.family == "segformer":
            outputs = {"out": self.net(pixel_values=images).logits}
        else:
            outputs = dict(self.net(images))
        outputs = {key: F.interpolate(value, size=size, mode="bilinear", align_corners=False)
                   if value.shape[-2:] != size else value for key, value in outputs.items()}
        return outputs if self.training else outputs["out"]

    def attach_head(self, head: DenoiseHead) -> None:
        """DenoiseRep⁻: denoise every pixel of the encoder's output map before the decoder sees it."""
        self.denoise_head = PerPositionHead(head)
        module, key = self._encoder_output()
        module.register_forward_hook(_replace_output(self, key))

    def _encoder_output(self) -> tuple[nn.Module, str | None]:
        """The module whose output is the encoder's final map, and its key in a dict output."""
        if self.family == "segformer":
            names = dict(self.net.named_modules())
            last = len(self.net.config.depths) - 1
            for name in (f"segformer.stages.{last}.layer_norm", f"segformer.encoder.layer_norm.{last}"):
                if name in names:  # transformers 5 / 4
                    return names[name], None
            raise ValueError("this transformers version's SegFormer has no final encoder norm we recognise")
        key = "high" if isinstance(self.net, torchvision.models.segmentation.LRASPP) else "out"
        return self.net.backbone, key

    def _encoder_output_width(self) -> int:
        if self.family == "segformer":
            return self.net.config.hidden_sizes[-1]
        classifier = self.net.classifier
        if isinstance(classifier, FCNHead):
            return classifier[0].in_channels
        if isinstance(self.net, torchvision.models.segmentation.LRASPP):
            return classifier.cbr[0].in_channels
        return classifier[0].convs[0][0].in_channels  # DeepLabHead: ASPP's first branch


def _replace_output(model: SegmentationModel, key: str | None):
    def hook(module, args, output):
        if key is None:
            return model.denoise_head(output)
        output[key] = model.denoise_head(output[key])
        return output

    return hook


def build_segmentation_model(name: str, num_classes: int, *, in_chans: int = 3, aux_loss: bool | None = None,
                             **kwargs) -> SegmentationModel:
    """A randomly initialised model (load weights from a file with ``--init``)."""
    if name in TORCHVISION_MODELS:
        if in_chans != 3:
            raise ValueError(f"{name} (torchvision) takes 3-channel images; the data has {in_chans}")
        if name == "lraspp_mobilenet_v3_large" and aux_loss:
            raise ValueError("lraspp_mobilenet_v3_large has no auxiliary head; drop aux_loss")
        builder = getattr(torchvision.models.segmentation, name)
        options = {} if name.startswith("lraspp") else {"aux_loss": aux_loss}
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes, **options, **kwargs)
        return SegmentationModel(net, "torchvision")
    if name in SEGFORMER_CONFIGS:
        if importlib.util.find_spec("transformers") is None:
            raise ValueError(f"{name} needs Hugging Face transformers: pip install 'denoiserep[hf]'")
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        config = SegformerConfig(num_labels=num_classes, num_channels=in_chans, semantic_loss_ignore_index=255,
                                 **{**SEGFORMER_CONFIGS[name], **kwargs})
        return SegmentationModel(SegformerForSemanticSegmentation(config), "segformer")
    if name.startswith("fcn:"):
        backbone = _TimmFeatures(name.removeprefix("fcn:"), in_chans, **kwargs)
        aux = FCNHead(backbone.out_channels, num_classes) if aux_loss else None
        return SegmentationModel(FCN(backbone, FCNHead(backbone.out_channels, num_classes), aux), "torchvision")
    known = ", ".join([*TORCHVISION_MODELS, *SEGFORMER_CONFIGS, "fcn:<timm model>"])
    raise ValueError(f"unknown segmentation model {name!r}; choose one of {known}")
