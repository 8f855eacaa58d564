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

Validation ground truth is what the files say: COCOeval sees the json's (or XML's) boxes, areas and
masks unchanged. Training targets are torchvision's reference recipe: boxes clamped to the image
(`ClampBoundingBoxes`), then those under 1 px wide or high dropped (`SanitizeBoundingBoxes`),
counted and logged once per split.

Bad input (each found when the data set is loaded unless said otherwise; every error names the
annotation file, and the annotation or image):

==============================================  ================================================
a field missing, null or of the wrong type      error naming the field (``bbox``, ``category_id``,
(COCO json / VOC XML)                           ``width``, ``file_name``, ``<size>``, ``<bndbox>``…)
an image of width or height 0                   error
two images with one id, two categories          error naming the id
with one id
an image named in the json / list is missing    error naming the file and how many are missing
an annotation's category id is not listed       error naming the id and the annotation
a non-finite box or polygon coordinate          error (NaN, inf)
a polygon of fewer than 6 numbers, or reaching  error (checked before pycocotools rasterises it:
more than an image size past the image          such a file could exhaust memory or crash it)
an RLE without counts, with counts that do not  error (the same reason)
cover its image exactly, or of another size
a box past the image / under 1 px               training: clamped / dropped, counted, logged;
                                                validation: kept as the file says
an image without annotations                    training: dropped, counted, one warning;
                                                validation: kept (COCOeval counts it)
an image of another size than the json says     error naming the file (when read)
a corrupt image                                 error naming the file (when read); training
                                                with --skip-bad-images: skipped and logged
a VOC object of an unknown class                error naming the XML file and the class
==============================================  ================================================
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
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
    boxes: list[list[float]]  # xyxy, as the annotation file says (training: clamped, see `training_records`)
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
    """(N, H, W) uint8 masks from COCO polygons or RLE (boxes as masks where there is none: VOC),
    all checked by `_check_segmentation` when the annotations were read."""
    from pycocotools import mask as mask_utils

    masks = torch.zeros(len(segmentations), record.height, record.width, dtype=torch.uint8)
    for i, segmentation in enumerate(segmentations):
        if isinstance(segmentation, dict):  # RLE, compressed or not
            rle = segmentation if isinstance(segmentation["counts"], str) else \
                mask_utils.frPyObjects(segmentation, record.height, record.width)
            masks[i] = torch.from_numpy(mask_utils.decode(rle))
        elif segmentation:  # polygons
            rles = mask_utils.frPyObjects(segmentation, record.height, record.width)
            masks[i] = torch.from_numpy(mask_utils.decode(mask_utils.merge(rles)))
    return masks


# -- checks of untrusted annotation values ---------------------------------------------------------


def _field(values: dict, key: str, kinds: tuple, where: str, required: bool = True):
    """``values[key]`` if it is of one of ``kinds`` (numbers never bools), else a named error."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} is a {type(values).__name__}, not an object")
    if key not in values or values[key] is None:
        if not required:
            return None
        raise ValueError(f"{where} has no {key!r}")
    value = values[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise ValueError(f"{where} has {key!r} = {value!r} ({type(value).__name__}), expected {names}")
    return value


def _coordinates(values, count: int | None, where: str, what: str) -> list[float]:
    """A list of finite numbers (``count`` of them, when given)."""
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{where}: its {what} must be a list of numbers, got {values!r:.80}")
    if count is not None and len(values) != count:
        raise ValueError(f"{where}: its {what} has {len(values)} numbers, expected {count}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: its {what} holds a non-finite coordinate ({values!r:.80}); fix or remove it")
    return [float(v) for v in values]


def _check_segmentation(segmentation, width: int, height: int, where: str) -> None:
    """Polygons or RLE that pycocotools can rasterise safely at ``height`` × ``width``: it trusts its
    input, and a coordinate of 1e9 or counts that overrun the image exhaust memory or crash it."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            points = _coordinates(polygon, None, where, "polygon")
            if len(points) < 6 or len(points) % 2:
                raise ValueError(f"{where}: a polygon needs an even number of coordinates, at least 6 (3 points); "
                                 f"got {len(points)}")
            xs, ys = points[0::2], points[1::2]
            if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
                raise ValueError(f"{where}: a polygon reaches ({max(xs, key=abs):g}, {max(ys, key=abs):g}), more than "
                                 f"an image size past the {width}×{height} image; the annotation is broken")
        return
    if not isinstance(segmentation, dict):
        raise ValueError(f"{where}: its segmentation is a {type(segmentation).__name__}; COCO allows a list of "
                         "polygons or an RLE object")
    size = _field(segmentation, "size", (list,), f"{where}: its RLE")
    if size != [height, width]:
        raise ValueError(f"{where}: its RLE mask is {size} (height, width) but the image is {[height, width]}; the "
                         "annotation belongs to another image size")
    counts = _field(segmentation, "counts", (str, list), f"{where}: its RLE")
    if isinstance(counts, str):
        runs = _compressed_rle_counts(counts, where)
    elif all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        runs = counts
    else:
        raise ValueError(f"{where}: its RLE counts must be integers")
    if any(run < 0 for run in runs) or sum(runs) != height * width:
        raise ValueError(f"{where}: its RLE counts cover {sum(runs)} pixels (runs must be ≥ 0), but the image has "
                         f"{height} × {width} = {height * width}; the mask is truncated or belongs elsewhere")


def _compressed_rle_counts(counts: str, where: str) -> list[int]:
    """The run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``: 5-bit groups with a
    continuation bit, each run after the second stored as a difference to the run two before)."""
    runs, position = [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                raise ValueError(f"{where}: its RLE counts string is truncated")
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"{where}: its RLE counts string holds {counts[position]!r}, not an RLE character")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position, shift = position + 1, shift + 5
            if not more and code & 0x10:
                value |= -1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs


# -- COCO ------------------------------------------------------------------------------------------


def _coco(root: Path, with_masks: bool) -> DetectionData:
    annotations = root / "annotations"
    files = {split: sorted(annotations.glob(f"instances_{split}*.json")) if annotations.is_dir() else []
             for split in ("train", "val")}
    for split, found in files.items():
        if len(found) != 1:
            raise FileNotFoundError(f"COCO: expected one {annotations}/instances_{split}<year>.json, found "
                                    f"{[p.name for p in found] or 'none'} (entries of {root}: {list_entries(root)})")
    train_json, val_json = (_read_json(files[s][0]) for s in ("train", "val"))
    categories = _coco_categories(train_json, files["train"][0])
    _coco_categories(val_json, files["val"][0])
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    splits = []
    for split, data, path in (("train", train_json, files["train"][0]), ("val", val_json, files["val"][0])):
        folder = root / path.stem.removeprefix("instances_")  # instances_val2017.json -> val2017/
        if not folder.is_dir():
            raise FileNotFoundError(f"COCO: the images of {path.name} belong in {folder}, which does not exist")
        records = _coco_records(data, path, folder, label_of, with_masks)
        splits.append(_finish_records(records, path.name, training=split == "train"))
    transform_train, transform_val = DetectionTransform(flip=True, training=True), DetectionTransform()
    return DetectionData(
        name="coco",
        train=DetectionFiles(splits[0], transform_train, with_masks=with_masks, training=True),
        val=DetectionFiles(splits[1], transform_val, with_masks=with_masks, training=False),
        class_names=[c["name"] for c in categories],
        category_ids=[c["id"] for c in categories],
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"COCO: {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"COCO: {path} holds a {type(data).__name__}, not COCO's object of images, annotations "
                         "and categories")
    return data


def _coco_list(data: dict, key: str, path: Path) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"COCO: {path.name} has {key!r} = {value!r:.40} ({type(value).__name__}), expected a list")
    return value


def _coco_categories(data: dict, path: Path) -> list[dict]:
    categories = _coco_list(data, "categories", path)
    if not categories:
        raise ValueError(f"COCO: {path} lists no categories")
    seen: dict[int, str] = {}
    for category in categories:
        where = f"COCO: {path.name}: category {category.get('id') if isinstance(category, dict) else category!r}"
        category_id, name = _field(category, "id", (int,), where), _field(category, "name", (str,), where)
        if category_id in seen:
            raise ValueError(f"COCO: {path.name} lists category id {category_id} twice ({seen[category_id]!r} and "
                             f"{name!r}); every category needs its own id")
        seen[category_id] = name
    return sorted(categories, key=lambda c: c["id"])


def _coco_records(data: dict, path: Path, folder: Path, label_of: dict[int, int],
                  with_masks: bool) -> list[ImageRecord]:
    """The json's images and objects as it says them, every value checked."""
    records: dict[int, ImageRecord] = {}
    for image in _coco_list(data, "images", path):
        where = f"COCO: {path.name}: image {image.get('id') if isinstance(image, dict) else image!r}"
        image_id = _field(image, "id", (int,), where)
        file_name = _field(image, "file_name", (str,), where)
        width, height = _field(image, "width", (int,), where), _field(image, "height", (int,), where)
        if width < 1 or height < 1:
            raise ValueError(f"{where} ({file_name}) is {width}×{height} pixels; width and height must be positive")
        if image_id in records:
            raise ValueError(f"COCO: {path.name} lists image id {image_id} twice ({records[image_id].path.name} and "
                             f"{file_name}); every image needs its own id, or their annotations get mixed up")
        records[image_id] = ImageRecord(folder / file_name, image_id, width, height, [], [], [], [], [])
    missing = [r.path for r in records.values() if not r.path.is_file()]
    if missing:
        raise FileNotFoundError(f"COCO: {len(missing)} of the {len(records)} images that {path.name} names are "
                                f"missing, e.g. {missing[0]}; complete the image folder or use the matching json")
    for ann in _coco_list(data, "annotations", path):
        where = f"COCO: {path.name}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r}"
        category_id = _field(ann, "category_id", (int,), where)
        if category_id not in label_of:
            raise ValueError(f"{where} has category id {category_id}, which the categories ({sorted(label_of)}) do "
                             "not list")
        image_id = _field(ann, "image_id", (int,), where)
        record = records.get(image_id)
        if record is None:
            raise ValueError(f"{where} is for image id {image_id}, which the json's images do not list")
        x, y, w, h = _coordinates(_field(ann, "bbox", (list,), where), 4, where, "bbox [x, y, width, height]")
        iscrowd = _field(ann, "iscrowd", (int,), where, required=False) or 0
        area = _field(ann, "area", (int, float), where, required=False)
        if area is not None and not (math.isfinite(area) and area >= 0):
            raise ValueError(f"{where} has area {area}; it must be a finite number ≥ 0")
        segmentation = ann.get("segmentation") or []
        if with_masks:
            _check_segmentation(segmentation, record.width, record.height, f"{where} (image {record.path.name})")
        record.boxes.append([x, y, x + w, y + h])
        record.labels.append(label_of[category_id])
        record.iscrowd.append(int(iscrowd != 0))
        record.areas.append(float(w * h if area is None else area))
        record.segmentations.append(segmentation)
    return list(records.values())


def _finish_records(records: list[ImageRecord], source: str, training: bool) -> list[ImageRecord]:
    """Validation records as they are; training records as torchvision's reference scripts train
    (`training_records`), and without images that have no (non-crowd) object left."""
    if training:
        records = training_records(records, source)
        empty = [r for r in records if not any(not crowd for crowd in r.iscrowd)]
        if empty:  # torchvision's reference script drops them too: they teach only the background
            logger.warning("%s: %d of %d training images have no (non-crowd) objects and are not used for training",
                           source, len(empty), len(records))
        records = [r for r in records if any(not crowd for crowd in r.iscrowd)]
    if not records:
        raise ValueError(f"{source}: no images left to {'train on' if training else 'evaluate'}")
    return records


MIN_TRAINING_BOX_SIZE = 1.0  # pixels: torchvision's SanitizeBoundingBoxes default


def training_records(records: list[ImageRecord], source: str) -> list[ImageRecord]:
    """Boxes clamped to their image, then those under `MIN_TRAINING_BOX_SIZE` wide or high dropped
    (torchvision's ``ClampBoundingBoxes`` and ``SanitizeBoundingBoxes``); both counted and logged."""
    out, clamped, dropped = [], 0, 0
    for record in records:
        keep, boxes = [], []
        for i, (x1, y1, x2, y2) in enumerate(record.boxes):
            box = [min(max(x1, 0.0), record.width), min(max(y1, 0.0), record.height),
                   min(max(x2, 0.0), record.width), min(max(y2, 0.0), record.height)]
            clamped += box != [x1, y1, x2, y2]
            if box[2] - box[0] < MIN_TRAINING_BOX_SIZE or box[3] - box[1] < MIN_TRAINING_BOX_SIZE:
                dropped += 1
                continue
            keep.append(i)
            boxes.append(box)
        out.append(dataclasses.replace(
            record, boxes=boxes, labels=[record.labels[i] for i in keep], iscrowd=[record.iscrowd[i] for i in keep],
            areas=[record.areas[i] for i in keep], segmentations=[record.segmentations[i] for i in keep]))
    if clamped or dropped:
        logger.warning("%s: %d training boxes reached past their image and were clamped to it; %d (after clamping) "
                       "under %g px wide or high were dropped from training. Validation keeps every box as the file "
                       "says.", source, clamped, dropped, MIN_TRAINING_BOX_SIZE)
    return out


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
        records = [_voc_record(base, name, number, label_of) for number, name in enumerate(names)]
        splits.append(_finish_records(records, f"VOC {split}", training=split == "train"))
    return DetectionData(
        name="voc",
        train=DetectionFiles(splits[0], DetectionTransform(flip=True, training=True), with_masks=with_masks,
                             training=True),
        val=DetectionFiles(splits[1], DetectionTransform(), with_masks=with_masks, training=False),
        class_names=list(VOC_CLASSES),
        category_ids=list(range(1, len(VOC_CLASSES) + 1)),
    )


def _voc_number(element: ElementTree.Element | None, tag: str, where: str) -> float:
    text = element.findtext(tag) if element is not None else None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where} has no number in <{tag}> (found {text!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"{where} has <{tag}>{text}</{tag}>, not a finite number")
    return value


def _voc_record(base: Path, name: str, number: int, label_of: dict[str, int]) -> ImageRecord:
    xml_path = base / "Annotations" / f"{name}.xml"
    image_path = base / "JPEGImages" / f"{name}.jpg"
    for path in (xml_path, image_path):
        if not path.is_file():
            raise FileNotFoundError(f"Pascal VOC: {name} is listed in ImageSets/Main but {path} does not exist")
    try:
        tree = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"Pascal VOC: {xml_path} is not valid XML ({error})") from None
    where = f"Pascal VOC: {xml_path}"
    size = tree.find("size")
    if size is None:
        raise ValueError(f"{where} has no <size> (the image's width and height)")
    width, height = _voc_number(size, "width", f"{where} <size>"), _voc_number(size, "height", f"{where} <size>")
    if width < 1 or height < 1 or width != int(width) or height != int(height):
        raise ValueError(f"{where} says the image is {width:g}×{height:g} pixels; width and height must be positive "
                         "integers")
    record = ImageRecord(image_path, number, int(width), int(height), [], [], [], [])
    for index, obj in enumerate(tree.iter("object")):
        cls = (obj.findtext("name") or "").strip()
        if cls not in label_of:
            raise ValueError(f"{where} has an object of class {cls!r}, not one of the 20 VOC classes")
        box = obj.find("bndbox")
        object_where = f"{where}, object {index} ({cls})"
        if box is None:
            raise ValueError(f"{object_where} has no <bndbox>")
        # VOC's pixel indices are 1-based and inclusive: [xmin − 1, xmax] in 0-based edges.
        x1, y1 = _voc_number(box, "xmin", object_where) - 1, _voc_number(box, "ymin", object_where) - 1
        x2, y2 = _voc_number(box, "xmax", object_where), _voc_number(box, "ymax", object_where)
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise ValueError(f"{object_where} has <difficult>{difficult}</difficult>; it must be 0 or 1")
        record.boxes.append([x1, y1, x2, y2])
        record.labels.append(label_of[cls])
        record.iscrowd.append(int(difficult))
        record.areas.append(max(x2 - x1, 0.0) * max(y2 - y1, 0.0))
        # VOC has no instance masks: the box is the mask (clamped to the image for rasterising).
        cx1, cx2 = (min(max(v, 0.0), record.width) for v in (x1, x2))
        cy1, cy2 = (min(max(v, 0.0), record.height) for v in (y1, y2))
        record.segmentations.append([[cx1, cy1, cx2, cy1, cx2, cy2, cx1, cy2]])
    return record


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
        train=DigitScenesDataset("train", DIGIT_CANVASES[0], with_masks, DetectionTransform(training=True)),
        val=DigitScenesDataset("val", DIGIT_CANVASES[1], with_masks, DetectionTransform()),
        class_names=[str(d) for d in range(10)],
        category_ids=list(range(1, 11)),
    )


# -- transforms and batches ------------------------------------------------------------------------


class DetectionTransform:
    """torchvision.transforms.v2 on an image and its target: optional horizontal flip, then float
    [0, 1] pixels; boxes and masks travel as tv_tensors. ``training``: boxes are clamped to the image
    and those a transform made smaller than 1 px removed (``ClampBoundingBoxes`` then
    ``SanitizeBoundingBoxes``, as torchvision's reference scripts); evaluation targets stay as the
    annotation file says. Resizing to the detector's scale is the detector's own (``min_size`` /
    ``max_size``), as in torchvision's reference scripts."""

    def __init__(self, flip: bool = False, training: bool = False):
        steps = [v2.RandomHorizontalFlip(0.5)] if flip else []
        sanitize = [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=MIN_TRAINING_BOX_SIZE,
                                                                      labels_getter=_sanitized_fields)]
        self.transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), *(sanitize if training else [])])

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
