"""Semantic segmentation data behind one string ``spec``.

- ``digit-scenes``: scikit-learn's handwritten digits composed into scenes (`data.embedded`), masks of
  11 classes (background + the ten digits); the offline demo's data.
- ``ade20k:PATH``: ``ADEChallengeData2016/{images,annotations}/{training,validation}``; 150 classes:
  label 0 ("other") is ignored and the rest shift down by one (mmseg's ``reduce_zero_label``).
- ``cityscapes:PATH``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with
  ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (19 classes, 255 ignored).
- ``voc:PATH``: Pascal VOC 2012 (``JPEGImages``, ``SegmentationClass``, ``ImageSets/Segmentation``;
  21 classes, 255 ignored); PATH may be ``VOCdevkit/VOC2012`` or a folder above it.
- ``folder:PATH``: ``images/{train,val}/**`` with ``masks/{train,val}/<same relative path>.png`` (e.g.
  ``images/val/a/0.jpg`` → ``masks/val/a/0.png``) and ``classes.txt`` (one class name per line; mask
  values are class indices, 255 ignored).

Items are ``(image, mask)``: a float (3, H, W) image normalised with ImageNet's mean and std and an
int64 (H, W) mask. Training: mmseg's pipeline (random rescale by 0.5–2.0 of the data set's base
scale, random crop whose largest class covers at most 75 % of it, flip, photometric jitter);
evaluation: the full-resolution image. Files are checked when read: a missing annotation, two images
that would share one annotation, a mask of another size than its image, or label values outside the
classes (negative ones included) name the file. Unlabeled images (``--extra-data``, ``--denoise-data``)
go through the same training pipeline (`SegmentationData.unlabeled`); the embedded digit scenes take
none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, TensorDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ...data.embedded import load_digit_scenes
from ...data.images import (
    UnlabeledImageDataset,
    existing_directory,
    list_entries,
    read_image,
    read_label_map,
    unlabeled_image_files,
)

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# mmseg's base scales (the image is rescaled to fit in scale × ratio, ratio ∈ [0.5, 2]) and crops.
BASE_SCALES = {"ade20k": (2048, 512), "cityscapes": (2048, 1024), "voc": (2048, 512), "folder": (2048, 512)}
DEFAULT_CROPS = {"ade20k": 512, "cityscapes": 512, "voc": 512, "folder": 512}
SPECS = "digit-scenes | ade20k:PATH | cityscapes:PATH | voc:PATH | folder:PATH"


@dataclass
class SegmentationData:
    name: str
    train: Dataset
    val: Dataset
    class_names: list[str]
    in_chans: int = 3
    train_transform: "TrainTransform | None" = None  # None: tensors without a file pipeline (digit scenes)

    def unlabeled(self, path: str) -> Dataset:
        """Every image under ``path`` as the training images arrive (rescale, crop, flip, jitter,
        normalise), for the label-free loss."""
        if self.train_transform is None:
            raise ValueError(f"--extra-data / --denoise-data {path}: the {self.name} data are embedded tensors with "
                             "their own normalisation, which other images cannot share; use them with a file-based "
                             "data set (ade20k:, cityscapes:, voc:, folder:)")
        return UnlabeledImageDataset(unlabeled_image_files(path), "RGB", self.train_transform.image_only)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_segmentation_data(spec: str, *, crop_size: int | None = None) -> SegmentationData:
    spec = spec.strip()
    if spec == "digit-scenes":
        return _digit_scenes()
    kind, _, path = spec.partition(":")
    readers = {"ade20k": _ade20k, "cityscapes": _cityscapes, "voc": _voc, "folder": _folder}
    if kind not in readers or not path:
        raise ValueError(f"unknown segmentation data {spec!r}; use {SPECS}")
    root = existing_directory(path, kind)
    (train_pairs, val_pairs), class_names, reduce_zero_label = readers[kind](root)
    crop = crop_size or DEFAULT_CROPS[kind]
    train_tf = TrainTransform(BASE_SCALES[kind], crop)
    return SegmentationData(
        name=kind,
        train=SegmentationFiles(train_pairs, len(class_names), reduce_zero_label, train_tf),
        val=SegmentationFiles(val_pairs, len(class_names), reduce_zero_label, EvalTransform()),
        class_names=list(class_names),
        train_transform=train_tf,
    )


def _digit_scenes() -> SegmentationData:
    scenes = load_digit_scenes()
    return SegmentationData(
        name="digit-scenes",
        train=TensorDataset(scenes.train.images, scenes.train.masks),
        val=TensorDataset(scenes.val.images, scenes.val.masks),
        class_names=["background", *scenes.digit_names],
        in_chans=scenes.train.images.shape[1],
    )


# -- files ----------------------------------------------------------------------------------------


class SegmentationFiles(Dataset):
    """(image, mask) file pairs, read, checked and transformed on access."""

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, reduce_zero_label: bool, transform):
        self.pairs, self.num_classes = pairs, num_classes
        self.reduce_zero_label, self.transform = reduce_zero_label, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path, "RGB")
        labels = torch.from_numpy(read_label_map(mask_path))
        if tuple(labels.shape) != (image.size[1], image.size[0]):
            raise ValueError(f"mask {mask_path} is {labels.shape[1]}×{labels.shape[0]} but its image {image_path} is "
                             f"{image.size[0]}×{image.size[1]}; every mask must match its image")
        if self.reduce_zero_label:  # ADE20K: 0 is "other" (ignored); classes 1..150 become 0..149
            labels = torch.where(labels == 0, IGNORE_INDEX, labels - 1)
        bad = labels[((labels >= self.num_classes) | (labels < 0)) & (labels != IGNORE_INDEX)]
        if bad.numel():
            raise ValueError(f"mask {mask_path} holds label values {bad.unique()[:5].tolist()}, but the data set has "
                             f"{self.num_classes} classes (and {IGNORE_INDEX} = ignore); is it the right annotation?")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return tv_tensors.Image(pixels), tv_tensors.Mask(labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(*self.read(index))


def _pairs(images: list[Path], mask_for, what: str) -> list[tuple[Path, Path]]:
    if not images:
        raise FileNotFoundError(f"the {what} split has no images")
    pairs, image_of = [], {}
    for image in images:
        mask = mask_for(image)
        if not mask.is_file():
            raise FileNotFoundError(f"image {image} has no annotation: expected {mask}")
        if mask in image_of:
            raise ValueError(f"images {image_of[mask]} and {image} would share one annotation, {mask}; give each "
                             "image its own name (stem) or, for folder:, its own mask at the same relative path")
        image_of[mask] = image
        pairs.append((image, mask))
    return pairs


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _find(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, or the same up to two folders down (``VOCdevkit/VOC2012``), else an error
    listing ``root``."""
    levels = [[root]]
    for _ in range(2):
        levels.append(sorted(child for base in levels[-1] for child in base.iterdir() if child.is_dir()))
    for base in (base for level in levels for base in level):
        if (base / relative).is_dir():
            return base / relative
    raise FileNotFoundError(f"{what}: no {relative}/ under {root} (found: {list_entries(root)})")


def _ade20k(root: Path):
    images = _find(root, "images/training", "ADE20K").parent
    annotations = images.parent / "annotations"
    splits = tuple(_pairs(_images_in(images / split), lambda p, s=split: annotations / s / f"{p.stem}.png",
                          f"ADE20K {split}") for split in ("training", "validation"))
    return splits, [f"class{i}" for i in range(1, ADE20K_CLASSES + 1)], True


def _cityscapes(root: Path):
    images = _find(root, "leftImg8bit/train", "Cityscapes").parent
    labels = images.parent / "gtFine"

    def label_for(image: Path, split: str) -> Path:
        name = image.name.replace("_leftImg8bit", "_gtFine_labelTrainIds")
        path = labels / split / image.parent.name / name
        if not path.is_file() and (path.parent / name.replace("labelTrainIds", "labelIds")).is_file():
            raise FileNotFoundError(f"{path} is missing but labelIds exist: convert them with cityscapesscripts' "
                                    "createTrainIdLabelImgs first")
        return path

    splits = tuple(_pairs(_images_in(images / split), lambda p, s=split: label_for(p, s), f"Cityscapes {split}")
                   for split in ("train", "val"))
    return splits, list(CITYSCAPES_CLASSES), False


def _voc(root: Path):
    voc = _find(root, "SegmentationClass", "Pascal VOC 2012")
    base = voc.parent
    splits = []
    for split in ("train", "val"):
        listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"Pascal VOC: {listing} is missing")
        images = [base / "JPEGImages" / f"{line.strip()}.jpg" for line in listing.read_text().split() if line.strip()]
        missing = [p for p in images if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"Pascal VOC: {listing} lists {missing[0]}, which does not exist")
        splits.append(_pairs(images, lambda p: base / "SegmentationClass" / f"{p.stem}.png", f"VOC {split}"))
    return tuple(splits), list(VOC_CLASSES), False


def _folder(root: Path):
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise FileNotFoundError(f"{classes_file} is missing: list the class names, one per line, in mask-value order")
    classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    def mask_for(image: Path, split: str) -> Path:  # images/val/a/0.jpg -> masks/val/a/0.png
        return (root / "masks" / split / image.relative_to(root / "images" / split)).with_suffix(".png")

    splits = tuple(_pairs(_images_in(root / "images" / split), lambda p, s=split: mask_for(p, s), f"folder {split}")
                   for split in ("train", "val"))
    return splits, classes, False


# -- transforms -----------------------------------------------------------------------------------


def _normalize(image: torch.Tensor) -> torch.Tensor:
    image = v2.functional.to_dtype(image, torch.float32, scale=True)
    return v2.functional.normalize(image, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


class EvalTransform:
    """The full-resolution image, normalised; the mask as it is."""

    def __call__(self, image, mask):
        return _normalize(image).as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class TrainTransform:
    """mmseg's training pipeline with torchvision.transforms.v2: rescale to fit ``base_scale × r``,
    r ~ U(0.5, 2), random crop (≤ 75 % one class, up to 10 tries, padded with the ignore index),
    horizontal flip, photometric jitter, normalise."""

    def __init__(self, base_scale: tuple[int, int], crop: int, ratio: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75):
        self.base_scale, self.crop, self.ratio, self.cat_max_ratio = base_scale, crop, ratio, cat_max_ratio
        self.flip_and_color = v2.Compose([
            v2.RandomHorizontalFlip(0.5),
            v2.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360),
        ])

    def image_only(self, image: Image.Image) -> torch.Tensor:
        """The same pipeline for an unlabeled image (its crop ignores the class-ratio rule)."""
        pixels = tv_tensors.Image(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
        ignored = tv_tensors.Mask(torch.full(pixels.shape[-2:], IGNORE_INDEX, dtype=torch.int64))
        return self(pixels, ignored)[0]

    def __call__(self, image, mask):
        r = random.uniform(*self.ratio)
        height, width = image.shape[-2:]
        factor = min(self.base_scale[0] * r / max(height, width), self.base_scale[1] * r / min(height, width))
        size = [max(1, round(height * factor)), max(1, round(width * factor))]
        image = v2.functional.resize(image, size, antialias=True)
        mask = v2.functional.resize(mask, size, interpolation=v2.InterpolationMode.NEAREST)
        image, mask = self._crop(image, mask)
        image, mask = self.flip_and_color(image, mask)
        return _normalize(image).as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def _crop(self, image, mask):
        pad_h, pad_w = max(self.crop - image.shape[-2], 0), max(self.crop - image.shape[-1], 0)
        if pad_h or pad_w:
            image = v2.functional.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = v2.functional.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
        height, width = image.shape[-2:]
        for _ in range(10):
            top, left = random.randint(0, height - self.crop), random.randint(0, width - self.crop)
            window = mask[..., top:top + self.crop, left:left + self.crop]
            counts = torch.bincount(window[window != IGNORE_INDEX].flatten())
            if int((counts > 0).sum()) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return (image[..., top:top + self.crop, left:left + self.crop],
                mask[..., top:top + self.crop, left:left + self.crop])
