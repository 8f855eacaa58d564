"""The two small datasets that need no files from the user: scikit-learn digits and MNIST-1D.

Both are returned as in-memory tensors (:class:`TensorSplits`); wrapping them into
datasets is left to :mod:`denoiserep.tasks.classification.data`, so this module knows
nothing about transforms or the ``ClassificationData`` container.

Neither loader touches the network: digits ships inside scikit-learn, and MNIST-1D is
*generated* locally from its published procedure (the ``mnist1d`` package can also
download a pickle, which we never ask it to do).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write

DIGITS_TEST_SIZE = 0.3
DIGITS_SPLIT_SEED = 0
MNIST1D_CACHE_NAME = "mnist1d.npz"


@dataclass(frozen=True)
class TensorSplits:
    """Train/val inputs (float32) and labels (int64), plus class names, all in memory."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    class_names: list[str]


def load_digits_splits() -> TensorSplits:
    """scikit-learn's 1,797 real 8x8 handwritten digits as (N, 1, 8, 8) tensors.

    The split is fixed (stratified, ``test_size=0.3``, ``random_state=0``: 1,257 train
    / 540 val) and does not depend on any training seed, so that runs with different
    seeds differ only in training, never in which images they are evaluated on.

    Pixels (integers 0..16) are standardised with one scalar mean and std computed on
    the *train* split only (mean ~= 4.889, std ~= 6.018), so no val statistics leak
    into the inputs; the result is roughly zero-mean / unit-std.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    train_x, val_x, train_y, val_y = train_test_split(
        bunch.data,
        bunch.target,
        test_size=DIGITS_TEST_SIZE,
        random_state=DIGITS_SPLIT_SEED,
        stratify=bunch.target,
    )
    mean, std = float(train_x.mean()), float(train_x.std())
    return TensorSplits(
        train_x=standardised_digit_images(train_x, mean, std),
        train_y=torch.as_tensor(train_y, dtype=torch.int64),
        val_x=standardised_digit_images(val_x, mean, std),
        val_y=torch.as_tensor(val_y, dtype=torch.int64),
        class_names=[str(name) for name in bunch.target_names],
    )


@dataclass(frozen=True)
class DigitScenes:
    """Scenes of one split: images (N, 3, S, S) float32, standardised; masks (N, S, S) int64 with
    0 = background and 1 + d for digit d."""

    images: torch.Tensor
    masks: torch.Tensor


@dataclass(frozen=True)
class DigitScenesSplits:
    train: DigitScenes
    val: DigitScenes
    digit_names: list[str]


SCENE_SIZE = 48
SCENE_DIGIT_SCALE = 3  # 8×8 digits drawn as 24×24
SCENE_COUNTS = (800, 200)  # train / val scenes
INK_THRESHOLD = 4  # of 16: pixels at least this dark belong to the digit's mask


def load_digit_scenes(size: int = SCENE_SIZE, scale: int = SCENE_DIGIT_SCALE,
                      counts: tuple[int, int] = SCENE_COUNTS, max_digits: int = 2, seed: int = 0) -> DigitScenesSplits:
    """The digits (same fixed split as `load_digits_splits`) composed into ``size`` × ``size`` scenes of
    1 to ``max_digits`` non-overlapping digits, each upscaled ``scale`` times: real handwriting for
    the offline segmentation demo (detection composes its own, overlapping, canvases:
    `tasks/detection/digits.py`). Train scenes use train digits only, val scenes val
    digits; the generator is seeded, so the scenes are always the same. Three identical channels, so
    that 3-channel backbones take them as they are."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    train_x, val_x, train_y, val_y = train_test_split(
        bunch.data, bunch.target, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=bunch.target
    )
    rng = np.random.default_rng(seed)
    raw = [_compose_scenes(x, y, n, size, scale, max_digits, rng) for x, y, n in
           ((train_x, train_y, counts[0]), (val_x, val_y, counts[1]))]
    mean, std = float(raw[0][0].mean()), float(raw[0][0].std())  # train scenes only
    splits = [DigitScenes(torch.from_numpy(((pixels - mean) / std)[:, None].repeat(3, axis=1)),
                          torch.from_numpy(masks)) for pixels, masks in raw]
    return DigitScenesSplits(splits[0], splits[1], [str(name) for name in bunch.target_names])


def _compose_scenes(digits: np.ndarray, targets: np.ndarray, count: int, size: int, scale: int, max_digits: int,
                    rng: np.random.Generator):
    side = 8 * scale
    pixels = np.zeros((count, size, size), np.float32)
    masks = np.zeros((count, size, size), np.int64)
    for scene in range(count):
        placed: list[tuple[int, int]] = []
        for _ in range(rng.integers(1, max_digits + 1)):
            for _attempt in range(20):
                top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
                if all(abs(top - t) >= side or abs(left - l) >= side for t, l in placed):
                    placed.append((top, left))
                    break
        for top, left in placed:
            index = rng.integers(len(digits))
            digit = digits[index].reshape(8, 8).repeat(scale, axis=0).repeat(scale, axis=1)
            ink = digit >= INK_THRESHOLD
            pixels[scene, top:top + side, left:left + side] = digit
            masks[scene, top:top + side, left:left + side][ink] = int(targets[index]) + 1
    return pixels, masks


def standardised_digit_images(flat: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """Turn (N, 64) digits pixel rows into standardised (N, 1, 8, 8) float32 images."""
    images = ((flat - mean) / std).astype(np.float32).reshape(-1, 1, 8, 8)
    return torch.from_numpy(images)


def load_mnist1d_splits(cache_dir: Path | None = None) -> TensorSplits:
    """MNIST-1D with its published 4,000 / 1,000 train/test split, as (N, 1, 40) tensors.

    Generation takes a few seconds, so the arrays are cached in
    ``<cache_dir>/mnist1d.npz`` (default ``~/.cache/denoiserep``). The cache records
    the generator arguments and is regenerated when they no longer match, so an
    upgraded ``mnist1d`` with different defaults cannot silently serve stale data.
    """
    cache_path = (cache_dir or default_cache_dir()) / MNIST1D_CACHE_NAME
    args = _mnist1d_generation_args()
    arrays = _read_mnist1d_cache(cache_path, args)
    if arrays is None:
        arrays = _generate_mnist1d(args)
        _write_npz_atomically(cache_path, arrays)
    return TensorSplits(
        train_x=torch.from_numpy(arrays["x"].astype(np.float32)[:, None, :]),
        train_y=torch.from_numpy(arrays["y"].astype(np.int64)),
        val_x=torch.from_numpy(arrays["x_test"].astype(np.float32)[:, None, :]),
        val_y=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        class_names=[str(digit) for digit in range(10)],
    )


def default_cache_dir() -> Path:
    """``~/.cache/denoiserep``, resolved at call time so a changed ``HOME`` is honoured."""
    return Path("~/.cache/denoiserep").expanduser()


def _mnist1d_generation_args() -> dict:
    """The package's published default arguments, minus the download URL (never used)."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    return args


def _generate_mnist1d(args: dict) -> dict[str, np.ndarray]:
    """Run MNIST-1D's own generator locally.

    ``make_dataset`` reseeds Python's and NumPy's *global* RNGs; their states are
    restored afterwards so that loading data never changes the randomness of the
    training run that asked for it.
    """
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        dataset = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    arrays = {key: np.asarray(dataset[key]) for key in ("x", "y", "x_test", "y_test")}
    arrays["args_json"] = np.asarray(json.dumps(args, sort_keys=True))
    return arrays


def _read_mnist1d_cache(cache_path: Path, args: dict) -> dict[str, np.ndarray] | None:
    """Cached arrays if the file exists and was made with ``args``; otherwise None."""
    if not cache_path.is_file():
        return None
    with np.load(cache_path, allow_pickle=False) as cached:
        arrays = {key: cached[key] for key in cached.files}
    if str(arrays.get("args_json")) != json.dumps(args, sort_keys=True):
        return None
    return arrays


def _write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temp file in the same folder, then rename over ``path``.

    Concurrent runs (e.g. several seeds started together) therefore never read a
    half-written cache: they see either no file or a complete one.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)
