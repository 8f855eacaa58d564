"""COCO AP through pycocotools' COCOeval, against cases small enough to compute by hand (COCO's AP
is the mean over IoU 0.50:0.05:0.95 of the precision envelope sampled at 101 recall points)."""

import math

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, gloo_group

from denoiserep.metrics.detection import DetectionMetric, evaluate

RECALL_POINTS = 101


def target(boxes, labels, **extra):
    return {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64), **extra}


def prediction(boxes, labels, scores, **extra):
    return {**target(boxes, labels), "scores": torch.as_tensor(scores, dtype=torch.float32), **extra}


def box_mask(boxes, size=32):
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[y1:y2, x1:x2] = 1
    return masks


A, B = [2, 2, 12, 12], [16, 16, 28, 28]  # two 10×10 / 12×12 objects: "small" in COCO's ranges (< 32²)


def test_perfect_predictions_score_one_and_ranges_without_objects_are_nan():
    targets = [target([A, B], [1, 2]), target([B], [1])]
    result = evaluate([prediction(t["boxes"], t["labels"], [0.9] * len(t["labels"])) for t in targets], targets)
    assert [result[k] for k in ("AP", "AP50", "AP75", "APs")] == pytest.approx([1.0] * 4)
    assert math.isnan(result["APm"]) and math.isnan(result["APl"])  # COCOeval's -1: no medium / large objects


def test_a_false_positive_ranked_above_the_true_positive_halves_ap():
    targets = [target([A], [1])]
    fp_first = prediction([B, A], [1, 1], [0.9, 0.8])  # precision 0 then 1/2 at recall 1
    assert evaluate([fp_first], targets)["AP"] == pytest.approx(0.5)
    tp_first = prediction([B, A], [1, 1], [0.8, 0.9])  # the false positive comes after full recall
    assert evaluate([tp_first], targets)["AP"] == pytest.approx(1.0)


def test_a_wrong_label_is_a_miss_and_a_false_positive():
    result = evaluate([prediction([A], [2], [0.9])], [target([A], [1])])
    assert result["AP"] == 0.0  # class 1: nothing found; class 2: no ground truth, so not averaged


def test_detections_on_crowd_regions_are_ignored_but_count_when_the_region_is_not_crowd():
    crowd = [0, 0, 32, 32]
    inside = [20, 20, 26, 26]  # small IoU with the region, but wholly inside it
    predictions = [prediction([inside, A], [1, 1], [0.95, 0.9])]
    assert evaluate(predictions, [target([A, crowd], [1, 1], iscrowd=torch.tensor([0, 1]))])["AP"] == pytest.approx(1.0)
    # Not crowd: the first detection is a false positive and the region a missed object: precision
    # 1/2 up to recall 1/2, then nothing (51 of the 101 recall points are ≤ 0.5).
    plain = evaluate(predictions, [target([A, crowd], [1, 1], iscrowd=torch.tensor([0, 0]))])
    assert plain["AP"] == pytest.approx(0.5 * 51 / RECALL_POINTS)


def test_images_without_ground_truth_or_without_predictions_count_as_cocoeval_counts_them():
    # A detection on an image with no objects is a false positive (here ranked first).
    result = evaluate([prediction([A], [1], [0.8]), prediction([B], [1], [0.9])], [target([A], [1]), target([], [])])
    assert result["AP"] == pytest.approx(0.5)
    # An image whose object nobody found caps recall at 1/2.
    result = evaluate([prediction([A], [1], [0.8]), prediction([], [], [])], [target([A], [1]), target([B], [1])])
    assert result["AP"] == pytest.approx(51 / RECALL_POINTS)
    # No detections at all (COCO's loadRes cannot even load that): AP 0.
    assert evaluate([prediction([], [], [])], [target([A], [1])])["AP"] == 0.0


def test_a_box_with_iou_0_6_counts_at_three_of_the_ten_thresholds():
    shifted = [2, 2, 12, 18]  # 10 × 16 around A's 10 × 10: IoU = 100 / 160 = 0.625
    result = evaluate([prediction([shifted], [1], [0.9])], [target([A], [1])])
    assert result["AP50"] == pytest.approx(1.0) and result["AP75"] == 0.0
    assert result["AP"] == pytest.approx(3 / 10)  # matched at IoU 0.50, 0.55 and 0.60


def test_the_area_field_decides_small_medium_large():
    targets = [target([A], [1], area=torch.tensor([50.0 ** 2]))]  # declared medium (32² … 96²)
    result = evaluate([prediction([A], [1], [0.9])], targets)
    assert result["APm"] == pytest.approx(1.0) and math.isnan(result["APs"])


def test_masks_as_probabilities_or_bool_give_segm_ap_and_partial_masks_match_by_mask_iou():
    targets = [target([A, B], [1, 2], masks=box_mask([A, B]))]
    exact = prediction([A, B], [1, 2], [0.9, 0.8], masks=box_mask([A, B]).bool())
    result = evaluate([exact], targets, iou_types=("bbox", "segm"))
    assert result["AP"] == pytest.approx(1.0) and result["segm_AP"] == pytest.approx(1.0)
    # Probabilities (N, 1, H, W) thresholded at 0.5: the second mask keeps 6 of B's 12 rows → IoU 0.5;
    # the first covers A plus 2 rows of 0.4 (dropped by the threshold) → IoU 1.
    probabilities = box_mask([A, B]).float()[:, None]
    probabilities[0, 0, 12:14, 2:12] = 0.4
    probabilities[1, 0, 22:28] = 0.3
    result = evaluate([prediction([A, B], [1, 2], [0.9, 0.8], masks=probabilities)], targets, iou_types=("segm",))
    assert result["segm_AP50"] == pytest.approx(1.0) and result["segm_AP75"] == pytest.approx(0.5)  # class 2 missed at 0.75
    assert result["segm_AP"] == pytest.approx((1.0 + 0.1) / 2)  # class 1 everywhere, class 2 at IoU 0.5 only
    assert "AP" not in result


def test_the_mask_area_not_the_box_area_decides_the_size_range_of_a_mask():
    hollow = box_mask([[0, 0, 40, 40]])
    hollow[0, 2:38, 2:38] = 0  # a 40 × 40 box (medium) around a thin frame of 304 pixels (small)
    targets = [target([[0, 0, 40, 40]], [1], masks=hollow)]
    result = evaluate([prediction([[0, 0, 40, 40]], [1], [0.9], masks=hollow.bool())], targets, ("bbox", "segm"))
    assert result["APm"] == pytest.approx(1.0) and math.isnan(result["APs"])
    assert result["segm_APs"] == pytest.approx(1.0) and math.isnan(result["segm_APm"])


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        evaluate([prediction([A], [1], [1.0])] * 2, [target([A], [1])])
    with pytest.raises(ValueError, match=r"has no \['scores'\]"):
        evaluate([target([A], [1])], [target([A], [1])])
    with pytest.raises(ValueError, match="masks"):
        evaluate([prediction([A], [1], [1.0])], [target([A], [1])], iou_types=("segm",))
    with pytest.raises(ValueError, match="subset of"):
        DetectionMetric(iou_types=("keypoints",))
    with pytest.raises(ValueError, match="non-finite"):
        evaluate([prediction([[0, 0, float("nan"), 1]], [1], [1.0])], [target([A], [1])])
    metric = DetectionMetric()
    metric.update([prediction([A], [1], [1.0])], [target([A], [1])], image_ids=[7])
    with pytest.raises(ValueError, match="image id 7 was added twice"):
        metric.update([prediction([A], [1], [1.0])], [target([A], [1])], image_ids=[7])


def random_images(count=6):
    """Images with 0–3 objects of 3 classes, and noisy, partly wrong predictions with masks."""
    generator = torch.Generator().manual_seed(5)
    predictions, targets = [], []
    for _ in range(count):
        n = int(torch.randint(0, 4, (1,), generator=generator))
        corners = torch.randint(0, 20, (n, 2), generator=generator)
        boxes = torch.cat([corners, corners + torch.randint(4, 12, (n, 2), generator=generator)], 1)
        labels = torch.randint(1, 4, (n,), generator=generator)
        targets.append(target(boxes.tolist(), labels.tolist(), masks=box_mask(boxes.tolist())))
        noisy = (boxes + torch.randint(-2, 3, boxes.shape, generator=generator)).clamp(0, 31)
        scores = torch.rand(n, generator=generator)
        predictions.append(prediction(noisy.tolist(), labels.tolist(), scores.tolist(),
                                      masks=box_mask(noisy.tolist()).float()[:, None] * 0.9))
    return predictions, targets


def _gather_worker(rank, world, port, result_file):
    with gloo_group(rank, world, port):
        predictions, targets = random_images()
        metric = DetectionMetric(("bbox", "segm"))
        ids = list(range(rank, len(targets), world))  # shard_indices: rank 0 even images, rank 1 odd
        metric.update([predictions[i] for i in ids], [targets[i] for i in ids], image_ids=ids)
        result = metric.compute()
        torch.save(result, f"{result_file}.{rank}")


def test_two_gloo_processes_gather_to_rank_zero_and_equal_one_process(tmp_path):
    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path / "r.pt")), nprocs=2, join=True)
    single = evaluate(*random_images(), iou_types=("bbox", "segm"))
    assert 0.0 < single["AP"] < 1.0 and 0.0 < single["segm_AP"] < 1.0
    for rank in range(2):  # every rank returns rank 0's result
        distributed = torch.load(tmp_path / f"r.pt.{rank}", weights_only=True)
        assert distributed.keys() == single.keys()
        for key, value in single.items():
            assert distributed[key] == pytest.approx(value, rel=1e-12, nan_ok=True)
