"""The person re-identification model: any timm backbone + BNNeck + ID classifier.

``ReidModel`` follows the "bag of tricks" / TransReID recipe (Luo et al. 2019; He et al. 2021)::

    f   = denoise_head(backbone(x))      # pooled embedding; denoise_head is nn.Identity unless
                                         # the DenoiseRep⁻ stage puts a DenoiseHead there
    bn  = bottleneck(f)                  # BNNeck: BatchNorm1d, bias frozen at 0
    train mode: ReidTrainOutput(logits=classifier(bn), features=f)   # ID loss on logits, triplet on f
    eval mode:  f (neck_feat="before", TransReID's setting) or bn (neck_feat="after")

Backbone options understood by `create_reid_model` (passed through ``--model-kwargs`` next to
timm's own keyword arguments):

* ``patch_stride``: overlapping patches for timm ``VisionTransformer`` models, as TransReID
  does (``12`` with 16×16 patches gives a 21×10 grid at 256×128 instead of 16×8). The
  patch-embedding conv's stride is changed and ``pos_embed`` resampled to the new grid.
* ``last_stride``: ``1`` removes the stride of ResNet's last stage (BoT / TransReID's ResNet-50
  baseline: a 16×8 feature map at 256×128 instead of 8×4).
* ``backbone_weights``: a local file (.pth/.pt/.bin/.safetensors) with the backbone's weights,
  e.g. ImageNet weights of the same timm model. Loaded after ``patch_stride`` so that timm's
  ``checkpoint_filter_fn`` resamples the position embedding once, to the final grid. The
  classifier head of the file is dropped.
* ``neck_feat``: ``"before"`` (default) or ``"after"`` the BNNeck for the inference embedding.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from timm.layers import resample_abs_pos_embed, to_2tuple
from torch import nn

from ...checkpoint import load_state_dict_checked, read_state_dict
from ...models import create_model, feature_dim

REID_MODEL_KWARGS = ("patch_stride", "last_stride", "backbone_weights", "neck_feat")
NECK_FEATS = ("before", "after")


class ReidTrainOutput(NamedTuple):
    """What a ``ReidModel`` returns in train mode: everything the ReID loss needs."""

    logits: torch.Tensor
    features: torch.Tensor


class ReidModel(nn.Module):
    """Backbone → (DenoiseRep⁻ head) → BNNeck → bias-free ID classifier.

    ``get_classifier()`` returns the ID classifier, so ``DenoiseConfig.exclude_classifier``
    leaves it alone, and ``num_features`` is the embedding width.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, neck_feat: str = "before"):
        super().__init__()
        if neck_feat not in NECK_FEATS:
            raise ValueError(f"neck_feat must be 'before' or 'after' (the BNNeck), got {neck_feat!r}")
        if num_classes < 2:
            raise ValueError(f"a ReID model needs at least 2 training identities, got {num_classes}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.num_classes = num_classes
        self.neck_feat = neck_feat
        self.denoise_head: nn.Module = nn.Identity()
        self.bottleneck = nn.BatchNorm1d(self.num_features)
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift, as in BoT / TransReID
        self.classifier = nn.Linear(self.num_features, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled backbone feature after the (optional) DenoiseRep⁻ head, before the BNNeck."""
        features = self.backbone(x)
        if features.ndim != 2:
            raise ValueError(
                f"the backbone {type(self.backbone).__name__} returned features of shape {tuple(features.shape)}; "
                "a ReID embedding must be (batch, dim). Keep the model's global pooling (do not pass "
                "global_pool='' in --model-kwargs)."
            )
        return self.denoise_head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ReidTrainOutput:
        features = self.forward_embedding(x)
        normed = self.bottleneck(features)
        if self.training:
            return ReidTrainOutput(self.classifier(normed), features)
        return normed if self.neck_feat == "after" else features


def create_reid_model(name: str, num_classes: int, input_size: tuple[int, int] | None = None,
                      **kwargs) -> ReidModel:
    """A ``ReidModel`` on timm backbone ``name`` (built without downloads, classifier removed).

    ``input_size`` (H, W) is given to backbones that take an ``img_size`` (ViTs) unless
    ``kwargs`` sets ``img_size`` itself; CNNs ignore it (their pooling adapts).
    """
    kwargs = dict(kwargs)
    patch_stride = kwargs.pop("patch_stride", None)
    last_stride = kwargs.pop("last_stride", None)
    backbone_weights = kwargs.pop("backbone_weights", None)
    neck_feat = kwargs.pop("neck_feat", "before")
    if "img_size" in kwargs and isinstance(kwargs["img_size"], list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    backbone = _create_backbone(name, input_size, kwargs)
    if patch_stride is not None:
        set_patch_stride(backbone, patch_stride)
    if last_stride is not None:
        set_last_stride(backbone, last_stride)
    if backbone_weights is not None:
        load_backbone_weights(backbone, backbone_weights)
    return ReidModel(backbone, num_classes, neck_feat=neck_feat)


def _create_backbone(name: str, input_size: tuple[int, int] | None, kwargs: dict) -> nn.Module:
    if input_size is not None and "img_size" not in kwargs:
        try:
            return create_model(name, num_classes=0, img_size=tuple(input_size), **kwargs)
        except ValueError as error:
            if "img_size" not in str(error):
                raise
    return create_model(name, num_classes=0, **kwargs)


def set_patch_stride(vit: nn.Module, stride: int | tuple[int, int]) -> None:
    """Overlapping patch embedding (TransReID): set the patch conv's stride, resample ``pos_embed``."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"patch_stride is supported for timm VisionTransformer models (vit_*, deit_*), not "
            f"{type(vit).__name__}"
        )
    embed = vit.patch_embed
    if embed.img_size is None or getattr(vit, "dynamic_img_size", False) or embed.dynamic_img_pad:
        raise ValueError("patch_stride needs a fixed input size: do not combine it with dynamic_img_size or "
                         "dynamic_img_pad")
    stride = to_2tuple(stride)
    if not all(1 <= s <= p for s, p in zip(stride, embed.patch_size)):
        raise ValueError(f"patch_stride {stride} must be between 1 and the patch size {embed.patch_size}")
    grid = tuple((size - patch) // s + 1 for size, patch, s in zip(embed.img_size, embed.patch_size, stride))
    old_grid = embed.grid_size
    embed.proj.stride = stride
    embed.grid_size, embed.num_patches = grid, grid[0] * grid[1]
    if vit.pos_embed is not None:
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        with torch.no_grad():
            resampled = resample_abs_pos_embed(vit.pos_embed.data, new_size=grid, old_size=old_grid,
                                               num_prefix_tokens=prefix)
        vit.pos_embed = nn.Parameter(resampled, requires_grad=vit.pos_embed.requires_grad)


def set_last_stride(resnet: nn.Module, stride: int) -> None:
    """``stride=1`` removes the downsampling of a ResNet's last stage (``layer4``), as BoT does."""
    layer4 = getattr(resnet, "layer4", None)
    if not isinstance(layer4, nn.Sequential) or len(layer4) == 0:
        raise ValueError(f"last_stride is supported for timm ResNet models (resnet*), not {type(resnet).__name__}")
    if stride == 2:
        return  # timm's default
    if stride != 1:
        raise ValueError(f"last_stride must be 1 (BoT / TransReID) or 2 (the default), got {stride}")
    block = layer4[0]
    if any(isinstance(m, nn.AvgPool2d) for m in block.modules()):
        raise ValueError("last_stride supports ResNets whose first layer4 block downsamples by strided convs "
                         "(resnet18/34/50/101/152); this variant pools instead")
    for module in block.modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local weights file into the backbone (classifier dropped, position embedding resampled)."""
    path = Path(path).expanduser()
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    _resample_position_embedding(state, backbone, path)
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, backbone)
    own = backbone.state_dict()
    head_keys = [k for k in state if k not in own and k.split(".")[0] in ("head", "fc", "classifier", "last_linear")]
    state = {k: v for k, v in state.items() if k not in head_keys}
    load_state_dict_checked(backbone, state, path, fix=f"backbone_weights must be weights of the same timm model "
                                                        f"as --model ({type(backbone).__name__}).")


def _resample_position_embedding(state: dict, vit: nn.Module, path: Path) -> None:
    """Resample a ViT ``pos_embed`` of another grid to this model's (possibly strided) grid.

    The file's grid is this model's grid without ``patch_stride`` when the token count
    matches (weights trained at the same input size), else square (e.g. ImageNet 14×14).
    """
    weight, own = state.get("pos_embed"), getattr(vit, "pos_embed", None)
    if weight is None or not isinstance(own, torch.Tensor) or weight.shape == own.shape:
        return
    prefix = 0 if getattr(vit, "no_embed_class", False) else getattr(vit, "num_prefix_tokens", 1)
    tokens = weight.shape[1] - prefix
    embed = vit.patch_embed
    unstrided = tuple(s // p for s, p in zip(embed.img_size, embed.patch_size))
    side = math.isqrt(tokens)
    if unstrided[0] * unstrided[1] == tokens:
        old_grid = unstrided
    elif side * side == tokens:
        old_grid = (side, side)
    else:
        raise ValueError(f"backbone_weights {path}: cannot tell the patch grid of its pos_embed ({tokens} tokens)")
    state["pos_embed"] = resample_abs_pos_embed(weight.float(), new_size=list(embed.grid_size), old_size=list(old_grid),
                                                num_prefix_tokens=prefix).to(weight.dtype)
