"""Object detection data behind one string ``spec``.

- ``digit-scenes``: real handwritten digits composed onto 64 × 64 canvases (`digits`), 10 classes,
  boxes and instance masks; the offline demo's data.
- ``coco:PATH``: ``PATH/annotations/instances_{train,val}<year>.json`` with the images in
  ``PATH/{train,val}<year>/`` (COCO 2017's layout); boxes, polygons and RLE masks (pycocotools),
  ``iscrowd``; the json's category ids are mapped to contiguous labels 1..K (0 is background) and
  back (`DetectionData.category_ids`) for COCO-format results.
- ``voc:PATH``: Pascal VOC (``Annotations/*.xml``, ``JPEGImages``, ``ImageSets/Main/{train,val}.txt``);
  PATH may be ``VOCdevkit/VOC2012`` or a folder above it; 20 classes; ``difficult`` objects are
  kept out of training and evaluated as COCOeval's ignored regions (``iscrowd``), as VOC ignores them.

Items are ``(image, target)``: a float (3, H, W) image in [0, 1] at its own size (the detector
normalises and resizes it) and torchvision's target dict (``boxes`` xyxy float, ``labels`` int64,
``image_id``, ``area``, ``iscrowd``, and ``masks`` (N, H, W) uint8 when the model needs them).
Batches are lists (`collate`). Training drops crowd / difficult objects and flips images (not
digits: a mirrored 2 is no 2); torchvision.transforms.v2 moves boxes and masks along (tv_tensors).

Bad input (each found when the data set is loaded unless said otherwise):

==========================================  ==================================================
an image named in the json / list is missing  error naming the file and how many are missing
an annotation's category id is not listed      error naming the id and the annotation
a box of zero or negative width / height       dropped, counted, one warning per split
an image without annotations                   training: dropped, counted, one warning;
                                               validation: kept (COCOeval counts it)
an RLE mask of another size than its image     error naming the annotation (when read)
an image of another size than the json says    error naming the file (when read)
a corrupt image                                error naming the file (when read); training
                                               with --skip-bad-images: skipped and logged
a VOC object of an unknown class               error naming the XML file and the class
==========================================  ==================================================
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ...data.images import existing_directory, list_entries, read_image
from .digits import compose_digit_canvases

logger = logging.getLogger(__name__)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
DIGIT_CANVASES = (640, 200)  # train / val: 40 batches of 16, small enough for the 5-minute demo
DIGIT_CANVAS_SIZE = 64
SPECS = "digit-scenes | coco:PATH | voc:PATH"


@dataclass
class DetectionData:
    name: str
    train: Dataset
    val: Dataset
    class_names: list[str]  # label 1 + i is class_names[i]; 0 is background
    category_ids: list[int] = field(default_factory=list)  # label 1 + i was the annotation file's id category_ids[i]
    in_chans: int = 3

    @property
    def num_classes(self) -> int:
        """Object classes, without the background."""
        return len(self.class_names)


def load_detection_data(spec: str, *, with_masks: bool = False) -> DetectionData:
    """``with_masks``: decode instance masks (Mask R-CNN training, segm AP); otherwise boxes only."""
    spec = spec.strip()
    if spec == "digit-scenes":
        return _digit_scenes(with_masks)
    kind, _, path = spec.partition(":")
    readers = {"coco": _coco, "voc": _voc}
    if kind not in readers or not path:
        raise ValueError(f"unknown detection data {spec!r}; use {SPECS}")
    return readers[kind](existing_directory(path, kind), with_masks)


# -- records: one image and its objects, as read from the annotation files -------------------------


@dataclass
class ImageRecord:
    path: Path
    image_id: int
    width: int
    height: int
    boxes: list[list[float]]  # xyxy
    labels: list[int]
    iscrowd: list[int]
    areas: list[float]
    segmentations: list = field(default_factory=list)  # COCO polygons / RLE, one per object


class DetectionFiles(Dataset):
    """Image records, read, checked and transformed on access."""

    def __init__(self, records: list[ImageRecord], transform, *, with_masks: bool, training: bool):
        self.records, self.transform, self.with_masks, self.training = records, transform, with_masks, training

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        return [r.width / r.height for r in self.records]

    def __getitem__(self, index: int):
        record = self.records[index]
        image = read_image(record.path, "RGB")
        if image.size != (record.width, record.height):
            raise ValueError(f"image {record.path} is {image.size[0]}×{image.size[1]} but its annotation says "
                             f"{record.width}×{record.height}; the annotation file and the images do not match")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        keep = [i for i, crowd in enumerate(record.iscrowd) if not (self.training and crowd)]
        target = {
            "boxes": torch.tensor([record.boxes[i] for i in keep], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([record.labels[i] for i in keep], dtype=torch.int64),
            "image_id": record.image_id,
            "area": torch.tensor([record.areas[i] for i in keep], dtype=torch.float32),
            "iscrowd": torch.tensor([record.iscrowd[i] for i in keep], dtype=torch.int64),
        }
        if self.with_masks:
            target["masks"] = _decode_masks([record.segmentations[i] for i in keep], record)
        return self.transform(tv_tensors.Image(pixels), target)


def _decode_masks(segmentations: list, record: ImageRecord) -> torch.Tensor:
    """(N, H, W) uint8 masks from COCO polygons or RLE (boxes as masks where there is none: VOC)."""
    from pycocotools import mask as mask_utils

    masks = torch.zeros(len(segmentations), record.height, record.width, dtype=torch.uint8)
    for i, segmentation in enumerate(segmentations):
        if isinstance(segmentation, dict):  # RLE, compressed or not
            size = list(segmentation.get("size", []))
            if size != [record.height, record.width]:
                raise ValueError(f"a mask of image {record.path} is {size} (height, width) but the image is "
                                 f"{[record.height, record.width]}; the annotation belongs to another image size")
            rle = segmentation if isinstance(segmentation["counts"], (str, bytes)) else \
                mask_utils.frPyObjects(segmentation, *size)
            masks[i] = torch.from_numpy(mask_utils.decode(rle))
        elif segmentation:  # polygons
            rles = mask_utils.frPyObjects(segmentation, record.height, record.width)
            masks[i] = torch.from_numpy(mask_utils.decode(mask_utils.merge(rles)))
    return masks


# -- COCO ------------------------------------------------------------------------------------------


def _coco(root: Path, with_masks: bool) -> DetectionData:
    annotations = root / "annotations"
    files = {split: sorted(annotations.glob(f"instances_{split}*.json")) if annotations.is_dir() else []
             for split in ("train", "val")}
    for split, found in files.items():
        if len(found) != 1:
            raise FileNotFoundError(f"COCO: expected one {annotations}/instances_{split}<year>.json, found "
                                    f"{[p.name for p in found] or 'none'} (entries of {root}: {list_entries(root)})")
    train_json, val_json = (json.loads(files[s][0].read_text()) for s in ("train", "val"))
    categories = sorted(train_json.get("categories", []), key=lambda c: c["id"])
    if not categories:
        raise ValueError(f"COCO: {files['train'][0]} lists no categories")
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    splits = []
    for split, data, path in (("train", train_json, files["train"][0]), ("val", val_json, files["val"][0])):
        folder = root / path.stem.removeprefix("instances_")  # instances_val2017.json -> val2017/
        if not folder.is_dir():
            raise FileNotFoundError(f"COCO: the images of {path.name} belong in {folder}, which does not exist")
        splits.append(_coco_records(data, path, folder, label_of, training=split == "train"))
    transform_train, transform_val = DetectionTransform(flip=True), DetectionTransform()
    return DetectionData(
        name="coco",
        train=DetectionFiles(splits[0], transform_train, with_masks=with_masks, training=True),
        val=DetectionFiles(splits[1], transform_val, with_masks=with_masks, training=False),
        class_names=[c["name"] for c in categories],
        category_ids=[c["id"] for c in categories],
    )


def _coco_records(data: dict, path: Path, folder: Path, label_of: dict[int, int], training: bool) -> list[ImageRecord]:
    records = {}
    for image in data.get("images", []):
        records[image["id"]] = ImageRecord(folder / image["file_name"], image["id"], image["width"], image["height"],
                                           [], [], [], [], [])
    missing = [r.path for r in records.values() if not r.path.is_file()]
    if missing:
        raise FileNotFoundError(f"COCO: {len(missing)} of the {len(records)} images that {path.name} names are "
                                f"missing, e.g. {missing[0]}; complete the image folder or use the matching json")
    degenerate = 0
    for ann in data.get("annotations", []):
        if ann["category_id"] not in label_of:
            raise ValueError(f"COCO: annotation {ann.get('id')} of {path.name} has category id {ann['category_id']}, "
                             f"which the categories ({sorted(label_of)}) do not list")
        record = records.get(ann["image_id"])
        if record is None:
            raise ValueError(f"COCO: annotation {ann.get('id')} of {path.name} is for image id {ann['image_id']}, "
                             "which the json's images do not list")
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            degenerate += 1
            continue
        record.boxes.append([x, y, x + w, y + h])
        record.labels.append(label_of[ann["category_id"]])
        record.iscrowd.append(int(ann.get("iscrowd", 0)))
        record.areas.append(float(ann.get("area", w * h)))
        record.segmentations.append(ann.get("segmentation") or [])
    return _finish_records(list(records.values()), path.name, degenerate, training)


def _finish_records(records: list[ImageRecord], source: str, degenerate: int, training: bool) -> list[ImageRecord]:
    if degenerate:
        logger.warning("%s: dropped %d boxes of zero or negative width or height", source, degenerate)
    if training:  # torchvision's reference script drops them too: they teach only the background
        empty = [r for r in records if not any(not crowd for crowd in r.iscrowd)]
        if empty:
            logger.warning("%s: %d of %d training images have no (non-crowd) objects and are not used for training",
                           source, len(empty), len(records))
        records = [r for r in records if any(not crowd for crowd in r.iscrowd)]
    if not records:
        raise ValueError(f"{source}: no images left to {'train on' if training else 'evaluate'}")
    return records


# -- Pascal VOC ------------------------------------------------------------------------------------


def _find_voc(root: Path) -> Path:
    for base in (root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))):
        if (base / "Annotations").is_dir() and (base / "ImageSets" / "Main").is_dir():
            return base
    raise FileNotFoundError(f"Pascal VOC: no Annotations/ and ImageSets/Main/ under {root} "
                            f"(found: {list_entries(root)})")


def _voc(root: Path, with_masks: bool) -> DetectionData:
    base = _find_voc(root)
    label_of = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    splits = []
    for split in ("train", "val"):
        listing = base / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"Pascal VOC: {listing} is missing")
        names = listing.read_text().split()
        records, degenerate = [], 0
        for number, name in enumerate(names):
            record, dropped = _voc_record(base, name, number, label_of)
            records.append(record)
            degenerate += dropped
        splits.append(_finish_records(records, f"VOC {split}", degenerate, training=split == "train"))
    return DetectionData(
        name="voc",
        train=DetectionFiles(splits[0], DetectionTransform(flip=True), with_masks=with_masks, training=True),
        val=DetectionFiles(splits[1], DetectionTransform(), with_masks=with_masks, training=False),
        class_names=list(VOC_CLASSES),
        category_ids=list(range(1, len(VOC_CLASSES) + 1)),
    )


def _voc_record(base: Path, name: str, number: int, label_of: dict[str, int]) -> tuple[ImageRecord, int]:
    xml_path = base / "Annotations" / f"{name}.xml"
    image_path = base / "JPEGImages" / f"{name}.jpg"
    for path in (xml_path, image_path):
        if not path.is_file():
            raise FileNotFoundError(f"Pascal VOC: {name} is listed in ImageSets/Main but {path} does not exist")
    try:
        tree = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"Pascal VOC: {xml_path} is not valid XML ({error})") from None
    size = tree.find("size")
    record = ImageRecord(image_path, number, int(size.findtext("width")), int(size.findtext("height")), [], [], [], [])
    dropped = 0
    for obj in tree.iter("object"):
        cls = (obj.findtext("name") or "").strip()
        if cls not in label_of:
            raise ValueError(f"Pascal VOC: {xml_path} has an object of class {cls!r}, not one of the 20 VOC classes")
        box = obj.find("bndbox")
        # VOC's pixel indices are 1-based and inclusive: [xmin − 1, xmax] in 0-based edges.
        x1, y1 = float(box.findtext("xmin")) - 1, float(box.findtext("ymin")) - 1
        x2, y2 = float(box.findtext("xmax")), float(box.findtext("ymax"))
        if x2 <= x1 or y2 <= y1:
            dropped += 1
            continue
        record.boxes.append([x1, y1, x2, y2])
        record.labels.append(label_of[cls])
        record.iscrowd.append(int(obj.findtext("difficult") or 0))
        record.areas.append((x2 - x1) * (y2 - y1))
        record.segmentations.append([[x1, y1, x2, y1, x2, y2, x1, y2]])  # VOC has no instance masks: the box
    return record, dropped


# -- digit scenes ----------------------------------------------------------------------------------


class DigitScenesDataset(Dataset):
    """`compose_digit_canvases` as (image, target) items."""

    def __init__(self, split: str, count: int, with_masks: bool, transform):
        self.canvases = compose_digit_canvases(count, split=split, size=DIGIT_CANVAS_SIZE)
        self.with_masks, self.transform = with_masks, transform

    def __len__(self) -> int:
        return len(self.canvases.images)

    def aspect_ratios(self) -> list[float]:
        return [1.0] * len(self)

    def __getitem__(self, index: int):
        boxes = self.canvases.boxes[index]
        target = {"boxes": boxes.clone(), "labels": self.canvases.labels[index].clone(), "image_id": index,
                  "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                  "iscrowd": torch.zeros(len(boxes), dtype=torch.int64)}
        if self.with_masks:
            target["masks"] = self.canvases.masks[index].clone()
        return self.transform(tv_tensors.Image(self.canvases.images[index]), target)


def _digit_scenes(with_masks: bool) -> DetectionData:
    return DetectionData(
        name="digit-scenes",
        train=DigitScenesDataset("train", DIGIT_CANVASES[0], with_masks, DetectionTransform()),
        val=DigitScenesDataset("val", DIGIT_CANVASES[1], with_masks, DetectionTransform()),
        class_names=[str(d) for d in range(10)],
        category_ids=list(range(1, 11)),
    )


# -- transforms and batches ------------------------------------------------------------------------


class DetectionTransform:
    """torchvision.transforms.v2 on an image and its target: optional horizontal flip, then float
    [0, 1] pixels; boxes and masks travel as tv_tensors, and boxes a transform made empty are
    removed (`SanitizeBoundingBoxes`). Resizing to the detector's scale is the detector's own
    (``min_size`` / ``max_size``), as in torchvision's reference scripts."""

    def __init__(self, flip: bool = False):
        steps = [v2.RandomHorizontalFlip(0.5)] if flip else []
        self.transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True),
                                     v2.SanitizeBoundingBoxes(labels_getter=_sanitized_fields)])

    def __call__(self, image: tv_tensors.Image, target: dict):
        height, width = image.shape[-2:]
        wrapped = dict(target)
        wrapped["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
        if "masks" in target:
            wrapped["masks"] = tv_tensors.Mask(target["masks"])
        image, wrapped = self.transform(image, wrapped)
        out = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in wrapped.items()}
        return image.as_subclass(torch.Tensor), out


def _sanitized_fields(inputs):
    """What `SanitizeBoundingBoxes` filters along with the boxes (masks are found by type)."""
    target = inputs[1]
    return tuple(target[k] for k in ("labels", "area", "iscrowd") if k in target)


def collate(batch: list[tuple]) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists, not stacks: detection images differ in size and in number of objects."""
    images, targets = zip(*batch)
    return list(images), list(targets)
