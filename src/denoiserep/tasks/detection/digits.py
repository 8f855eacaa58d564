"""The offline demo's detection data: scikit-learn's real handwritten digits composed onto canvases.

Each canvas holds 1 to ``max_digits`` digits, each resized to a random side in ``digit_sizes`` and
put at a random position. Digits may overlap (a later one is drawn over an earlier one) as long as
no earlier digit loses more than ``max_hidden`` of its ink; every digit gets its instance mask (its
visible ink) and the box of that mask. Train canvases use the train digits only, validation canvases
the validation digits (the fixed split of `denoiserep.data.embedded`); everything is drawn from one
seeded generator, so the scenes are the same on every machine and every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...data.embedded import DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE

INK_THRESHOLD = 0.25  # of the digit's full intensity: what counts as ink (the instance mask)
PLACEMENT_TRIES = 30


@dataclass(frozen=True)
class DigitCanvases:
    """One split: images (N, 3, S, S) float32 in [0, 1]; per image boxes (k, 4) xyxy, labels (k,)
    in 1..10 (1 + digit) and instance masks (k, S, S) uint8."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    masks: list[torch.Tensor]


def compose_digit_canvases(count: int, *, split: str, size: int = 64, digit_sizes: tuple[int, int] = (16, 32),
                           max_digits: int = 3, max_hidden: float = 0.3, seed: int = 0) -> DigitCanvases:
    """``count`` canvases of ``size`` × ``size`` from the ``split`` ("train" or "val") digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    train_x, val_x, train_y, val_y = train_test_split(
        bunch.data, bunch.target, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=bunch.target
    )
    digits, targets = (train_x, train_y) if split == "train" else (val_x, val_y)
    digits = torch.from_numpy(digits.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images = torch.zeros(count, size, size)
    all_boxes, all_labels, all_masks = [], [], []
    for scene in range(count):
        canvas, masks, labels = images[scene], [], []
        for _ in range(int(rng.integers(1, max_digits + 1))):
            index = int(rng.integers(len(digits)))
            side = int(rng.integers(digit_sizes[0], digit_sizes[1] + 1))
            digit = F.interpolate(digits[index][None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
            placed = _place(digit, masks, size, max_hidden, rng)
            if placed is None:
                continue
            top, left = placed
            ink = torch.zeros(size, size, dtype=torch.bool)
            ink[top:top + side, left:left + side] = digit >= INK_THRESHOLD
            for mask in masks:  # the new digit hides what it covers of the earlier ones
                mask &= ~ink
            window = canvas[top:top + side, left:left + side]
            window.copy_(torch.where(digit >= INK_THRESHOLD, digit, window))
            masks.append(ink)
            labels.append(int(targets[index]) + 1)
        stacked = torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)
        all_boxes.append(_mask_boxes(stacked))
        all_labels.append(torch.tensor(labels, dtype=torch.int64))
        all_masks.append(stacked.to(torch.uint8))
    return DigitCanvases(images[:, None].repeat(1, 3, 1, 1), all_boxes, all_labels, all_masks)


def _place(digit: torch.Tensor, masks: list[torch.Tensor], size: int, max_hidden: float,
           rng: np.random.Generator) -> tuple[int, int] | None:
    """A position where the digit hides at most ``max_hidden`` of every earlier digit's visible ink."""
    side = digit.shape[-1]
    for _ in range(PLACEMENT_TRIES):
        top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
        ink = torch.zeros(size, size, dtype=torch.bool)
        ink[top:top + side, left:left + side] = digit >= INK_THRESHOLD
        if all((mask & ink).sum() <= max_hidden * mask.sum() for mask in masks):
            return top, left
    return None


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes (pixel edges) around each mask's pixels."""
    boxes = torch.zeros(len(masks), 4)
    for i, mask in enumerate(masks):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        boxes[i] = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
    return boxes
