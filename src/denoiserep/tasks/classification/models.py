"""Classification models beyond timm's: the DenoiseRep⁻ wrapper of a timm-style classifier."""

from __future__ import annotations

import torch
from torch import nn

from ...head import DenoiseHead


class HeadedClassifier(nn.Module):
    """DenoiseRep⁻: ``classifier(head(pre_logits(backbone(x))))`` for a timm-style classifier.

    The backbone keeps its own classifier; the head denoises the pooled feature first.
    """

    def __init__(self, backbone: nn.Module, head: DenoiseHead):
        super().__init__()
        for method in ("forward_features", "forward_head", "get_classifier"):
            if not callable(getattr(backbone, method, None)):
                raise ValueError(
                    f"DenoiseRep⁻ needs a timm-style classifier with {method}(); {type(backbone).__name__} lacks it"
                )
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.backbone.get_classifier()(self.head(features))
