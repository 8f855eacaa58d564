"""Semantic segmentation: FCN / DeepLabV3 / LR-ASPP (torchvision), SegFormer (Hugging Face), FCN on any
timm backbone; ADE20K, Cityscapes, Pascal VOC, plain folders; aAcc / mIoU / mAcc / Boundary IoU."""

from .task import SegmentationTask

__all__ = ["SegmentationTask"]
