"""Backbones by name (timm's registry, no downloads), the embedded datasets' default models
(incl. the MNIST-1D paper's CNN), and the width of a backbone's pooled feature: shared by the tasks
and the benchmarks."""

from __future__ import annotations

import difflib
import pickle
from pathlib import Path

import timm
import torch
from timm.models import register_model
from torch import nn


# The embedded datasets' default models. digits: a small ViT for 8×8 inputs (2×2 patches,
# 16 tokens); mnist1d: the 1-D CNN of the MNIST-1D paper (which reports 94% for a CNN).
DEFAULT_MODELS: dict[str, tuple[str, dict]] = {
    "digits": (
        "vit_tiny_patch16_224",
        {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4},
    ),
    "mnist1d": ("mnist1d_cnn", {}),
}


class Mnist1dCNN(nn.Module):
    """Three stride-2 Conv1d layers and a linear classifier, as in the MNIST-1D paper.

    Implements timm's classifier interface (``forward_features``, ``forward_head``,
    ``get_classifier``) so that the pipeline treats it like any timm model.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, channels: int = 25, input_length: int = 40):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv1d(in_chans, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        with torch.no_grad():
            self.num_features = self.features(torch.zeros(1, in_chans, input_length)).numel()
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def mnist1d_cnn(pretrained: bool = False, **kwargs) -> Mnist1dCNN:
    if pretrained:
        raise ValueError("mnist1d_cnn has no pretrained weights; train it with `denoiserep train --stage baseline`")
    for framework_arg in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # passed by timm.create_model
        kwargs.pop(framework_arg, None)
    return Mnist1dCNN(**kwargs)


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` without downloads, with close-name suggestions for typos.

    ``pretrained=True`` is timm's way of starting from trained weights, here from a local file only:
    ``pretrained_cfg_overlay={"file": PATH}`` (.safetensors, or a .pth state_dict, read without unpickling).
    timm re-initialises the classifier when ``num_classes`` differs from the weights' (1000 for the
    ImageNet configs; give ``pretrained_cfg_overlay={"file": …, "num_classes": K}`` for a K-class file)
    and adapts the first convolution to ``in_chans``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models('*pattern*')."
        raise ValueError(f"unknown model {name!r}: timm has no model of that name.{hint}")
    if pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay")
        file = overlay.get("file") if isinstance(overlay, dict) else None
        if not file:
            raise ValueError(f"pretrained {name!r} needs a local weights file (nothing is downloaded): pass "
                             '\'{"pretrained": true, "pretrained_cfg_overlay": {"file": "/path/to/weights.safetensors"}}\'')
        if not Path(file).expanduser().is_file():
            raise FileNotFoundError(f"pretrained weights file {file} does not exist")
        kwargs["pretrained_cfg_overlay"] = {**overlay, "file": str(Path(file).expanduser())}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        raise ValueError(f"model {name!r} does not accept these arguments {kwargs}: {error}") from error
    except (RuntimeError, KeyError, pickle.UnpicklingError) as error:
        if not pretrained:
            raise
        raise ValueError(f"pretrained weights {kwargs['pretrained_cfg_overlay']['file']} do not fit {name!r} "
                         f"({type(error).__name__}: {str(error)[:300]}); pass the weights of this architecture") from None


def default_model_for(data_name: str) -> tuple[str, dict]:
    if data_name not in DEFAULT_MODELS:
        raise ValueError(
            f"no default model for dataset {data_name!r}; pass --model NAME (any timm model), e.g. resnet50"
        )
    name, kwargs = DEFAULT_MODELS[data_name]
    return name, dict(kwargs)


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled pre-logits feature of a timm-style classifier."""
    dim = getattr(model, "num_features", None)
    if not isinstance(dim, int):
        raise ValueError(f"cannot tell the feature width of {type(model).__name__}; it has no num_features")
    return getattr(model, "head_hidden_size", None) or dim
