"""Object detection: torchvision's Faster R-CNN / Mask R-CNN / RetinaNet / FCOS on any timm backbone
with an FPN, Hugging Face's DETR; COCO and Pascal VOC; COCO AP via pycocotools."""

from .task import DetectionTask

__all__ = ["DetectionTask"]
