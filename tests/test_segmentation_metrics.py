"""Segmentation metrics (mmseg's definitions, Boundary IoU) against hand-computed maps and a
brute-force per-pixel reference."""

import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from denoiserep.metrics.segmentation import SegmentationMetric, evaluate, mask_boundary

from conftest import free_port, gloo_group


def square(size=8, lo=2, hi=6, label=1):
    out = torch.zeros(size, size, dtype=torch.long)
    out[lo:hi, lo:hi] = label
    return out


def test_a_perfect_prediction_scores_one_everywhere():
    target = square()
    result = evaluate([target], [target], num_classes=2)
    assert result["aAcc"] == result["mIoU"] == result["mAcc"] == result["mBIoU"] == 1.0


def test_iou_accuracy_and_pixel_accuracy_of_a_shifted_square_by_hand():
    target = square(lo=2, hi=6)  # 16 pixels of class 1, 48 of class 0
    pred = square(lo=3, hi=7)  # shifted by one row and one column: overlap 3 × 3 = 9
    result = evaluate([pred], [target], num_classes=2)
    assert result["IoU"][1] == pytest.approx(9 / (16 + 16 - 9))
    assert result["IoU"][0] == pytest.approx((48 - 7) / (48 + 7))  # background: 41 agree, 7 + 7 disagree
    assert result["Acc"][1] == pytest.approx(9 / 16)
    assert result["aAcc"] == pytest.approx((9 + 41) / 64)
    assert result["mIoU"] == pytest.approx((9 / 23 + 41 / 55) / 2)


def test_ignored_pixels_count_nowhere_and_absent_classes_are_skipped():
    target = square(label=1)
    target[0, :] = 255  # ignored row
    pred = square(label=1)
    pred[0, :] = 2  # whatever the prediction says there
    result = evaluate([pred], [target], num_classes=4)
    assert result["aAcc"] == 1.0 and result["mIoU"] == 1.0
    assert math.isnan(result["IoU"][2]) and math.isnan(result["IoU"][3])  # in neither map (where labelled)


def test_a_class_only_in_the_prediction_has_iou_zero_and_no_accuracy():
    target = torch.zeros(6, 6, dtype=torch.long)
    pred = target.clone()
    pred[0, 0] = 2
    result = evaluate([pred], [target], num_classes=3)
    assert result["IoU"][2] == 0.0 and math.isnan(result["Acc"][2])
    assert result["mIoU"] == pytest.approx((35 / 36 + 0.0) / 2)


def test_boundary_of_a_square_and_of_a_ring_by_hand():
    # 8 × 8 image: d = max(1, round(0.02 · √128)) = 1: the boundary is the mask's outer 1-pixel rim.
    solid = square(lo=2, hi=6).bool()
    expected = solid.clone()
    expected[3:5, 3:5] = False
    assert torch.equal(mask_boundary(solid[None], 1)[0], expected)
    ring = solid.clone()
    ring[3:5, 3:5] = False  # a 4 × 4 ring of width 1 is all boundary
    assert torch.equal(mask_boundary(ring[None], 1)[0], ring)
    full = torch.ones(1, 5, 5, dtype=torch.bool)  # outside the image counts as 0
    assert int(mask_boundary(full, 1).sum()) == 16


def brute_force_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    h, w = mask.shape
    padded = np.zeros((h + 2 * d, w + 2 * d), bool)
    padded[d:d + h, d:d + w] = mask
    eroded = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            eroded[y, x] = padded[y:y + 2 * d + 1, x:x + 2 * d + 1].all()
    return mask & ~eroded


def brute_force(preds, targets, num_classes, ignore=255, ratio=0.02):
    counts = np.zeros((6, num_classes))
    for pred, target in zip(preds, targets):
        pred, target = pred.numpy(), target.numpy()
        valid = target != ignore
        d = max(1, round(ratio * math.hypot(*target.shape)))
        for c in range(num_classes):
            p, t = (pred == c) & valid, (target == c) & valid
            counts[0, c] += (p & t).sum()
            counts[1, c] += (p | t).sum()
            counts[2, c] += t.sum()
            bp, bt = brute_force_boundary(p, d), brute_force_boundary(t, d)
            counts[3, c] += (bp & bt).sum()
            counts[4, c] += (bp | bt).sum()
        counts[5, 0] += valid.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc, biou = counts[0] / counts[1], counts[0] / counts[2], counts[3] / counts[4]
    return {"aAcc": counts[0].sum() / counts[5, 0], "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc),
            "mBIoU": np.nanmean(biou)}


@pytest.mark.parametrize("seed", range(4))
def test_random_maps_match_a_brute_force_per_pixel_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for size in [(23, 17), (40, 31), (9, 64)]:  # images of different sizes, d = 1 and d = 2
        target = torch.randint(0, 5, size, generator=generator)
        target = torch.nn.functional.max_pool2d(target[None, None].float(), 3, 1, 1)[0, 0].long()  # blobs
        target[torch.rand(size, generator=generator) < 0.05] = 255
        pred = torch.where(torch.rand(size, generator=generator) < 0.2, torch.randint(0, 5, size, generator=generator),
                           target.clamp(max=4))
        preds.append(pred)
        targets.append(target)
    ours, reference = evaluate(preds, targets, num_classes=5), brute_force(preds, targets, num_classes=5)
    for key in ("aAcc", "mIoU", "mAcc", "mBIoU"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-12), key


def test_bad_maps_are_refused_with_the_reason():
    metric = SegmentationMetric(num_classes=3)
    with pytest.raises(ValueError, match="differs from target shape"):
        metric.update(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"label values must be < num_classes \(3\)"):
        metric.update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 7))
    with pytest.raises(ValueError, match="argmax"):
        metric.update(torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="is a class id"):
        SegmentationMetric(num_classes=300, ignore_index=255)


def _reduce_worker(rank, world, port, result_file):
    with gloo_group(rank, world, port):
        preds, targets = random_pairs()
        metric = SegmentationMetric(num_classes=4)
        for pred, target in list(zip(preds, targets))[rank::world]:
            metric.update(pred, target)
        metric.all_reduce()
        if rank == 0:
            torch.save({k: v for k, v in metric.compute().items()}, result_file)


def random_pairs():
    generator = torch.Generator().manual_seed(3)
    targets = [torch.randint(0, 4, (12, 10), generator=generator) for _ in range(5)]
    preds = [torch.randint(0, 4, (12, 10), generator=generator) for _ in range(5)]
    return preds, targets


def test_two_gloo_processes_reduce_to_the_single_process_metrics(tmp_path):
    mp.spawn(_reduce_worker, args=(2, free_port(), str(tmp_path / "r.pt")), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "r.pt", weights_only=True)
    single = evaluate(*random_pairs(), num_classes=4)
    for key in ("aAcc", "mIoU", "mAcc", "mBIoU"):
        assert distributed[key] == pytest.approx(single[key], rel=1e-12)
