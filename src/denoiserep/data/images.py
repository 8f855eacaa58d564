"""Image folders shared by every task: path checks with helpful errors, timm's default
transforms, and unlabeled images for the label-free loss (``--extra-data`` / ``--denoise-data``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

Transform = Callable[[Any], torch.Tensor]

UNLABELED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_MAX_LISTED_ENTRIES = 20

logger = logging.getLogger(__name__)


class UnreadableImageError(ValueError):
    """An image file that PIL cannot decode (truncated, corrupt, or not an image)."""


# What PIL raises for a file it cannot decode (truncated, corrupt, not an image, too large).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """The decoded image in ``mode``, or an `UnreadableImageError` naming the file and the fix."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # decodes the whole file: truncation shows here, not mid-epoch
    except _DECODE_ERRORS as error:
        raise UnreadableImageError(
            f"cannot read image {path} ({type(error).__name__}: {error}). Remove or replace the file; for training "
            "data --skip-bad-images trains without it instead."
        ) from None


def read_label_map(path: str | Path) -> np.ndarray:
    """A segmentation mask's class indices (int64, H × W) from a palette ("P") or grey-level image."""
    try:
        with Image.open(path) as image:
            image.load()
            mode, labels = image.mode, np.asarray(image, dtype=np.int64).copy()
    except _DECODE_ERRORS as error:
        raise UnreadableImageError(f"cannot read mask {path} ({type(error).__name__}: {error}). Remove or replace "
                                   "the file and its image.") from None
    if mode not in ("P", "L", "I", "I;16"):
        raise UnreadableImageError(f"mask {path} is a {mode} image; masks must hold class indices (palette or "
                                   "grey-level PNG), not colours")
    return labels


class SkipUnreadable(Dataset):
    """Training data that replaces an unreadable image by the next readable one and logs each skip
    (``--skip-bad-images``). Never for evaluation data: a replaced query would change the metric."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for offset in range(len(self.dataset)):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except UnreadableImageError as error:
                logger.warning("--skip-bad-images: skipped an unreadable image: %s", error)
        raise UnreadableImageError(f"none of the {len(self.dataset)} images of this data set can be read")


class UnlabeledImageDataset(Dataset):
    """Image files without labels; items are ``(tensor, -1)`` so they collate like labelled ones."""

    def __init__(self, paths: list[Path], mode: str, transform: Transform):
        self.paths = paths
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image(self.paths[index], self.mode)), -1


def load_unlabeled_images(path: str, *, image_size: int, in_chans: int) -> Dataset:
    """Every image under ``path`` (recursive; jpg/jpeg/png/bmp/webp), for label-free losses.

    Images are converted to ``in_chans`` channels (1 = grayscale, 3 = RGB) and go
    through the same timm eval pipeline as labelled data (resize, centre crop to
    ``image_size``, normalise), so merged datasets reach the backbone on one scale.
    Files are sorted so that the dataset order is reproducible.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    mode = "L" if in_chans == 1 else "RGB"
    transform = default_image_transform(image_size, is_training=False, in_chans=in_chans)
    return UnlabeledImageDataset(unlabeled_image_files(path), mode, transform)


def unlabeled_image_files(path: str) -> list[Path]:
    """Every image file under ``path`` (recursive; jpg/jpeg/png/bmp/webp), sorted, or an error
    listing the folder when there is none."""
    root = existing_directory(path, "unlabeled images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in UNLABELED_EXTENSIONS)
    if not files:
        raise FileNotFoundError(
            f"no images found under '{root}' (searched recursively for {', '.join(UNLABELED_EXTENSIONS)}); "
            f"it holds: {list_entries(root)}. Point the path at a folder tree containing such images."
        )
    return files


def unlabeled_datasets(
    extra_paths: list[str], denoise_path: str | None, load: Callable[[str], Dataset], skip_unreadable: bool = False
) -> tuple[Dataset | None, Dataset | None]:
    """A run's unlabeled images, each folder read by the task's ``load``: the ``--extra-data``
    folders merged into one set (the label-free loss on merged datasets) and the
    ``--denoise-data`` folder (the denoisers' training set); None where not given. Both are
    training data: ``skip_unreadable`` wraps them in `SkipUnreadable`."""
    wrap = SkipUnreadable if skip_unreadable else (lambda dataset: dataset)
    extra = wrap(ConcatDataset([load(path) for path in extra_paths])) if extra_paths else None
    denoise = wrap(load(denoise_path)) if denoise_path else None
    return extra, denoise


def existing_directory(raw_path: str, what: str) -> Path:
    """The expanded path, or an error saying it is missing or not a folder."""
    path = Path(raw_path.strip()).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what} path '{path}' does not exist; check the path or download the data there"
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} path '{path}' is a file, expected a folder; pass the dataset's folder"
        )
    return path


def default_image_transform(image_size: int, is_training: bool, in_chans: int = 3) -> Transform:
    """timm's standard pipeline (random-resized-crop/flip/jitter for training; resize +
    centre crop for eval) with ImageNet normalisation, which pretrained timm backbones
    expect. For one channel the ImageNet mean/std are averaged over RGB."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if in_chans == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return create_transform(
        input_size=(in_chans, image_size, image_size), is_training=is_training, mean=mean, std=std
    )


def list_entries(folder: Path) -> str:
    """A short, sorted listing of ``folder`` for error messages (folders end with '/')."""
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    if not entries:
        return "nothing (the folder is empty)"
    shown = entries[:_MAX_LISTED_ENTRIES]
    more = len(entries) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more else "")
