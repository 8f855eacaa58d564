"""Detection data: COCO and Pascal VOC layouts (tiny generated fixtures), every kind of bad input of
the issue's table, the digit canvases of the demo, transforms and aspect-ratio batches."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from denoiserep.tasks.detection.data import (
    DetectionTransform,
    collate,
    load_detection_data,
)
from denoiserep.tasks.detection.digits import compose_digit_canvases
from denoiserep.tasks.detection.sampling import AspectRatioBatchSampler
from denoiserep.train.distributed import DistInfo

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "bird"}]  # not contiguous
SIZES = [(48, 64), (64, 48), (48, 64), (64, 48)]  # (H, W): two wide, two tall images per split


def write_image(path, height, width, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def coco(root, count=4):
    """COCO 2017's layout: each image has a polygon object, an RLE object (compressed in train,
    uncompressed in val) and, on the first image, a crowd region."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        images, annotations = [], []
        for i in range(count):
            height, width = SIZES[i % len(SIZES)]
            name = f"{i:012d}.jpg"
            write_image(root / f"{split}2017" / name, height, width, seed=i)
            images.append({"id": 100 + i, "file_name": name, "height": height, "width": width})
            square = np.zeros((height, width), np.uint8)
            square[20:30, 24:40] = 1  # 160 pixels, box [24, 20, 40, 30]
            rle = mask_utils.encode(np.asfortranarray(square))
            rle = {"size": rle["size"], "counts": rle["counts"].decode()} if split == "train" else \
                {"size": [height, width], "counts": _uncompressed_counts(square)}
            annotations += [
                {"id": 10 * i + 1, "image_id": 100 + i, "category_id": 7, "bbox": [2, 4, 10, 8], "iscrowd": 0,
                 "area": 80.0, "segmentation": [[2, 4, 12, 4, 12, 12, 2, 12]]},
                {"id": 10 * i + 2, "image_id": 100 + i, "category_id": 12, "bbox": [24, 20, 16, 10], "iscrowd": 0,
                 "area": 160.0, "segmentation": rle},
            ]
            if i == 0:
                annotations.append({"id": 10 * i + 3, "image_id": 100 + i, "category_id": 3, "bbox": [0, 30, 20, 10],
                                    "iscrowd": 1, "area": 200.0, "segmentation": rle})
        data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    return [*counts, run]


def voc(root, count=4, extra_object=""):
    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir(parents=True)
    for split in ("train", "val"):
        names = [f"2012_{split}{i:03d}" for i in range(count)]
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for i, name in enumerate(names):
            height, width = SIZES[i % len(SIZES)]
            write_image(base / "JPEGImages" / f"{name}.jpg", height, width, seed=i)
            (base / "Annotations" / f"{name}.xml").write_text(f"""<annotation>
  <filename>{name}.jpg</filename><size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>3</xmin><ymin>5</ymin><xmax>12</xmax><ymax>12</ymax></bndbox></object>
  <object><name>person</name><difficult>1</difficult>
    <bndbox><xmin>20</xmin><ymin>20</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>{extra_object}
</annotation>""")
    return root


def test_coco_reads_boxes_polygons_rle_and_crowd_and_maps_category_ids_to_contiguous_labels(tmp_path):
    data = load_detection_data(f"coco:{coco(tmp_path / 'coco')}", with_masks=True)
    assert data.class_names == ["cat", "dog", "bird"] and data.category_ids == [3, 7, 12]
    image, target = data.val[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].tolist() == [[2, 4, 12, 12], [24, 20, 40, 30], [0, 30, 20, 40]]  # xyxy
    assert target["labels"].tolist() == [2, 3, 1]  # dog (7) -> 2, bird (12) -> 3, cat (3) -> 1
    assert target["iscrowd"].tolist() == [0, 0, 1] and target["image_id"] == 100
    masks = target["masks"]
    assert masks.shape == (3, 48, 64) and masks.dtype == torch.uint8
    assert masks[1].sum() == 160 and masks[1, 20:30, 24:40].all()  # uncompressed RLE (val)
    assert masks[0, 5:11, 3:11].all() and not masks[0, 20:, :].any()  # the polygon, rasterised
    _, train_target = data.train[0]
    assert train_target["labels"].tolist() == [2, 3] and train_target["masks"][1].sum() == 160  # no crowd; RLE
    images, targets = collate([data.val[0], data.val[1]])
    assert isinstance(images, list) and images[1].shape == (3, 64, 48) and targets[1]["image_id"] == 101


def test_voc_reads_boxes_in_zero_based_pixels_and_evaluates_difficult_objects_as_ignored(tmp_path):
    data = load_detection_data(f"voc:{voc(tmp_path / 'voc')}")
    assert data.num_classes == 20 and data.class_names[11] == "dog" and data.class_names[14] == "person"
    _, target = data.val[0]
    assert target["boxes"].tolist() == [[2, 4, 12, 12], [19, 19, 40, 30]]
    assert target["labels"].tolist() == [12, 15] and target["iscrowd"].tolist() == [0, 1]
    _, train_target = data.train[0]
    assert train_target["labels"].tolist() == [12]  # difficult objects are not trained on


def _break_coco(root, breakage):
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    if breakage == "missing_image":
        (root / "val2017" / data["images"][1]["file_name"]).unlink()
    elif breakage == "unknown_category":
        data["annotations"][0]["category_id"] = 99
    elif breakage == "corrupt_image":
        (root / "val2017" / data["images"][0]["file_name"]).write_bytes(b"not a jpeg")
    elif breakage == "mask_size":
        data["annotations"][1]["segmentation"]["size"] = [10, 10]
    elif breakage == "image_size":
        data["images"][0]["width"] = 99
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("breakage, error, message", [
    ("missing_image", FileNotFoundError, r"1 of the 4 images that instances_val2017.json names are missing"),
    ("unknown_category", ValueError, r"has category id 99, which the categories \(\[3, 7, 12\]\) do not list"),
    ("corrupt_image", ValueError, "cannot read image .*000000000000.jpg"),
    ("mask_size", ValueError, "belongs to another image size"),
    ("image_size", ValueError, "is 64×48 but its annotation says 99×48"),
])
def test_bad_coco_input_is_a_named_error(tmp_path, breakage, error, message):
    root = coco(tmp_path / "coco")
    _break_coco(root, breakage)
    with pytest.raises(error, match=message):
        # (with masks, a json size that differs from the image's is already one its RLE masks contradict)
        data = load_detection_data(f"coco:{root}", with_masks=breakage != "image_size")
        data.val[0]


def _edit_json(root, split, edit):
    path = root / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edge_boxes(data):
    """Image 100 (48 × 64): a box 0.02 px past the right edge, one 0.5 px wide, one of zero width."""
    data["annotations"][0]["bbox"] = [50.0, 4.0, 14.02, 8.0]
    data["annotations"][1]["bbox"] = [20.0, 20.0, 0.5, 10.0]
    data["annotations"].append({"id": 99, "image_id": 100, "category_id": 7, "bbox": [5, 5, 0, 4], "iscrowd": 0})


def test_training_clamps_boxes_and_drops_sub_pixel_ones_counted_and_logged_while_validation_keeps_the_files(
        tmp_path, caplog):
    from denoiserep.metrics.detection import evaluate

    root = coco(tmp_path / "coco")
    for split in ("train", "val"):
        _edit_json(root, split, _edge_boxes)
    _edit_json(root, "train", lambda data: data.update(
        annotations=[a for a in data["annotations"] if a["image_id"] != 101]))  # image 101: no objects
    with caplog.at_level(logging.WARNING):
        loaded = load_detection_data(f"coco:{root}")
    assert ("instances_train2017.json: 1 training boxes reached past their image and were clamped to it; 2 (after "
            "clamping) under 1 px wide or high were dropped from training") in caplog.text
    assert "1 of 4 training images have no (non-crowd) objects and are not used for training" in caplog.text
    # (records, before the flip; the crowd region stays out of training targets)
    assert loaded.train.records[0].boxes == [[50.0, 4.0, 64.0, 12.0], [0.0, 30.0, 20.0, 40.0]]
    assert len(loaded.train) == 3
    _, val_target = loaded.val[0]
    expected = [[50.0, 4.0, 64.02, 12.0], [20.0, 20.0, 20.5, 30.0], [0.0, 30.0, 20.0, 40.0], [5.0, 5.0, 5.0, 9.0]]
    assert torch.allclose(val_target["boxes"], torch.tensor(expected)) and len(val_target["labels"]) == 4
    # A detector that finds exactly the json's (non-degenerate) boxes scores AP 1 on them.
    keep = [0, 1]
    perfect = [{"boxes": val_target["boxes"][keep], "labels": val_target["labels"][keep], "scores": torch.ones(2)}]
    truth = [{key: val_target[key][keep] for key in ("boxes", "labels", "iscrowd", "area")}]
    assert evaluate(perfect, truth)["AP"] == pytest.approx(1.0)


def test_coco_images_or_categories_that_share_an_id_are_named_errors(tmp_path):
    root = coco(tmp_path / "coco")
    _edit_json(root, "val", lambda data: data["images"][1].update(id=100))
    with pytest.raises(ValueError, match=r"instances_val2017.json lists image id 100 twice \(000000000000.jpg and "
                                         r"000000000001.jpg\)"):
        load_detection_data(f"coco:{root}")
    root = coco(tmp_path / "coco2")
    _edit_json(root, "train", lambda data: data["categories"].append({"id": 7, "name": "wolf"}))
    with pytest.raises(ValueError, match=r"lists category id 7 twice \('dog' and 'wolf'\)"):
        load_detection_data(f"coco:{root}")


def _rle_counts_of(size):
    square = np.zeros(size, np.uint8)
    square[2:5, 3:6] = 1
    return mask_utils.encode(np.asfortranarray(square))["counts"].decode()


# Each breaks annotation 2 (an RLE object) or 1 (a polygon) of image 100 (48 × 64) in the validation json.
MALFORMED_COCO = {
    "no bbox": (lambda d: d["annotations"][0].pop("bbox"), "annotation 1 has no 'bbox'"),
    "no category": (lambda d: d["annotations"][0].pop("category_id"), "annotation 1 has no 'category_id'"),
    "no width": (lambda d: d["images"][0].pop("width"), "image 100 has no 'width'"),
    "string bbox": (lambda d: d["annotations"][0].update(bbox="2 4 10 8"), r"'bbox' = '2 4 10 8' \(str\)"),
    "short bbox": (lambda d: d["annotations"][0].update(bbox=[2, 4, 10]), "has 3 numbers, expected 4"),
    "nan bbox": (lambda d: d["annotations"][0].update(bbox=[2, float("nan"), 10, 8]), "non-finite coordinate"),
    "images null": (lambda d: d.update(images=None), r"'images' = None \(NoneType\), expected a list"),
    "integer file name": (lambda d: d["images"][0].update(file_name=7), r"'file_name' = 7 \(int\)"),
    "height 0": (lambda d: d["images"][0].update(height=0), "is 64×0 pixels"),
    "short polygon": (lambda d: d["annotations"][0].update(segmentation=[[2, 4, 12, 4]]), "at least 6"),
    "inf polygon": (lambda d: d["annotations"][0].update(segmentation=[[2, 4, float("inf"), 4, 12, 12]]),
                    "non-finite coordinate"),
    "far polygon": (lambda d: d["annotations"][0].update(segmentation=[[2, 4, 1e9, 4, 12, 12]]),
                    "more than an image size past the 64×48 image"),
    "string segmentation": (lambda d: d["annotations"][0].update(segmentation="mask"), "segmentation is a str"),
    "rle without counts": (lambda d: d["annotations"][1]["segmentation"].pop("counts"), "its RLE has no 'counts'"),
    "garbage counts": (lambda d: d["annotations"][1]["segmentation"].update(counts="\x01\x02zz"),
                       "not an RLE character"),
    "partial uncompressed rle": (lambda d: d["annotations"][1]["segmentation"].update(counts=[100, 50, 2]),
                                 r"cover 152 pixels .* 48 × 64 = 3072"),
    "partial compressed rle": (lambda d: d["annotations"][1]["segmentation"].update(
        size=[48, 64], counts=_rle_counts_of((20, 64))), r"cover 1280 pixels"),
}


@pytest.mark.parametrize("breakage", list(MALFORMED_COCO))
def test_malformed_coco_annotations_are_named_errors_before_anything_is_rasterised(tmp_path, breakage):
    edit, message = MALFORMED_COCO[breakage]
    root = coco(tmp_path / "coco")
    _edit_json(root, "val", edit)
    with pytest.raises(ValueError, match=f"instances_val2017.json.*{message}"):
        load_detection_data(f"coco:{root}", with_masks=True)


MALFORMED_VOC = {
    "no size": ("<size><width>64</width><height>48</height><depth>3</depth></size>", "", "has no <size>"),
    "size 0": ("<height>48</height>", "<height>0</height>", "says the image is 64×0 pixels"),
    "no bndbox": ("<bndbox><xmin>3</xmin><ymin>5</ymin><xmax>12</xmax><ymax>12</ymax></bndbox>", "",
                  r"object 0 \(dog\) has no <bndbox>"),
    "no xmin": ("<xmin>3</xmin>", "", r"has no number in <xmin> \(found None\)"),
    "text ymax": ("<ymax>12</ymax>", "<ymax>twelve</ymax>", r"has no number in <ymax> \(found 'twelve'\)"),
    "nan xmax": ("<xmax>12</xmax>", "<xmax>nan</xmax>", "not a finite number"),
    "difficult yes": ("<difficult>0</difficult>", "<difficult>yes</difficult>", "it must be 0 or 1"),
}


@pytest.mark.parametrize("breakage", list(MALFORMED_VOC))
def test_malformed_voc_annotations_are_named_errors(tmp_path, breakage):
    old, new, message = MALFORMED_VOC[breakage]
    root = voc(tmp_path / "voc")
    xml = root / "VOCdevkit" / "VOC2012" / "Annotations" / "2012_val000.xml"
    xml.write_text(xml.read_text().replace(old, new, 1))
    with pytest.raises(ValueError, match=f"2012_val000.xml.*{message}"):
        load_detection_data(f"voc:{root}", with_masks=True)


def test_a_voc_box_far_past_the_image_is_clamped_for_training_and_masks_and_kept_for_evaluation(tmp_path):
    root = voc(tmp_path / "voc")
    for split in ("train", "val"):
        xml = root / "VOCdevkit" / "VOC2012" / "Annotations" / f"2012_{split}000.xml"
        xml.write_text(xml.read_text().replace("<xmax>12</xmax>", "<xmax>1e30</xmax>", 1))
    data = load_detection_data(f"voc:{root}", with_masks=True)
    assert data.train.records[0].boxes[0] == [2.0, 4.0, 64.0, 12.0]
    _, val_target = data.val[0]
    assert val_target["boxes"][0].tolist() == [2.0, 4.0, float(torch.tensor(1e30)), 12.0]  # (float32)
    assert val_target["masks"][0].sum() == (64 - 2) * (12 - 4)  # rasterised from the box clamped to the image


def test_an_unlabelled_validation_image_is_kept_for_cocoeval(tmp_path):
    root = coco(tmp_path / "coco")
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 102]
    path.write_text(json.dumps(data))
    _, target = load_detection_data(f"coco:{root}").val[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_bad_voc_input_and_layouts_name_the_problem(tmp_path):
    root = voc(tmp_path / "voc", extra_object="<object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                                               "<xmax>5</xmax><ymax>5</ymax></bndbox></object>")
    with pytest.raises(ValueError, match="object of class 'unicorn', not one of the 20 VOC classes"):
        load_detection_data(f"voc:{root}")
    with pytest.raises(FileNotFoundError, match="no Annotations/ and ImageSets/Main/"):
        load_detection_data(f"voc:{tmp_path}/voc/VOCdevkit/VOC2012/Annotations")
    with pytest.raises(FileNotFoundError, match=r"expected one .*instances_train<year>.json, found none"):
        load_detection_data(f"coco:{tmp_path}")
    with pytest.raises(ValueError, match="digit-scenes \\| coco:PATH \\| voc:PATH"):
        load_detection_data("lvis:/data")


def test_digit_canvases_are_deterministic_with_several_occluding_digits_boxed_by_their_masks():
    first = compose_digit_canvases(60, split="val", size=64)
    second = compose_digit_canvases(60, split="val", size=64)
    assert torch.equal(first.images, second.images)
    assert all(torch.equal(a, b) for a, b in zip(first.boxes, second.boxes))
    assert first.images.shape == (60, 3, 64, 64) and 0 <= first.images.min() and first.images.max() <= 1
    counts = [len(labels) for labels in first.labels]
    assert min(counts) >= 1 and max(counts) == 3
    overlapping = 0
    for boxes, labels, masks in zip(first.boxes, first.labels, first.masks):
        assert labels.min() >= 1 and labels.max() <= 10
        for box, mask in zip(boxes, masks):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        for i in range(len(boxes)):
            for j in range(i):
                x1, y1 = torch.maximum(boxes[i, :2], boxes[j, :2])
                x2, y2 = torch.minimum(boxes[i, 2:], boxes[j, 2:])
                overlapping += bool(x2 > x1 and y2 > y1)
    assert overlapping > 0  # occlusion is allowed
    assert not torch.equal(compose_digit_canvases(5, split="train").images, compose_digit_canvases(5, split="val").images)


def test_the_flip_moves_boxes_and_masks_together_and_drops_what_becomes_empty():
    image = torch.zeros(3, 10, 20, dtype=torch.uint8)
    masks = torch.zeros(2, 10, 20, dtype=torch.uint8)
    masks[0, 2:6, 1:4] = 1
    target = {"boxes": torch.tensor([[1.0, 2, 4, 6], [3, 3, 3, 8]]), "labels": torch.tensor([1, 2]),
              "area": torch.tensor([12.0, 0.0]), "iscrowd": torch.tensor([0, 0]), "masks": masks, "image_id": 5}
    from torchvision import tv_tensors

    flipped = None
    for seed in range(10):  # some seed flips (p = 0.5)
        torch.manual_seed(seed)
        _, out = DetectionTransform(flip=True, training=True)(tv_tensors.Image(image), target)
        if out["boxes"][0, 0] != 1.0:
            flipped = out
            break
    assert flipped is not None
    assert flipped["boxes"].tolist() == [[16.0, 2.0, 19.0, 6.0]] and flipped["labels"].tolist() == [1]
    assert flipped["masks"].shape == (1, 10, 20) and flipped["masks"][0, 2:6, 16:19].all()
    assert flipped["area"].tolist() == [12.0] and flipped["image_id"] == 5


def test_aspect_ratio_batches_hold_one_orientation_and_split_the_same_global_batches_across_ranks():
    ratios = [1.5, 0.5, 1.2, 0.7, 2.0, 0.9, 1.0, 0.8, 1.3]  # 5 wide, 4 tall
    single = list(AspectRatioBatchSampler(ratios, 2, DistInfo(), seed=1, epoch=3))
    assert len(single) == 4 == len(AspectRatioBatchSampler(ratios, 2, DistInfo(), seed=1))  # one image left out each epoch
    assert sum(len({ratios[i] >= 1 for i in batch}) > 1 for batch in single) <= 1  # at most one mixed batch
    ranks = [list(AspectRatioBatchSampler(ratios, 2, DistInfo(rank, 2), seed=1, epoch=3)) for rank in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    assert single != list(AspectRatioBatchSampler(ratios, 2, DistInfo(), seed=1, epoch=4))


def test_an_orientation_with_fewer_images_than_a_batch_is_still_trained_on_and_the_user_is_told(caplog):
    from denoiserep.tasks.detection.sampling import warn_about_small_groups

    ratios = [1.5] * 12 + [0.5] * 3  # 12 wide, 3 tall, batches of 4: the tall ones never fill a batch
    seen = set()
    for epoch in range(20):
        batches = list(AspectRatioBatchSampler(ratios, 4, DistInfo(), seed=0, epoch=epoch))
        assert len(batches) == 3 and all(len(batch) == 4 for batch in batches)
        assert sum(len({ratios[i] >= 1 for i in batch}) > 1 for batch in batches) <= 1  # at most one mixed batch
        seen.update(i for batch in batches for i in batch)
    assert seen == set(range(15))
    with caplog.at_level(logging.WARNING):
        warn_about_small_groups(ratios, 4, "coco:x training set")
    assert "its 3 tall images are fewer than one batch of 4" in caplog.text
