"""``digits-reid``: scikit-learn's 8×8 digits laid out as a (tiny) re-identification benchmark.

Nothing is downloaded (the digits ship inside scikit-learn). The point is a ReID *protocol*
on real images, so that the whole pipeline (P×K sampling, ID + triplet loss, query/gallery
retrieval, mAP / CMC) runs in minutes on a CPU; it is a smoke test, not a ReID benchmark.

* identity = (digit, handwriting style): the images of each digit are split into
  ``STYLES_PER_DIGIT`` = 8 style clusters by k-means on the pixels (scikit-learn ``KMeans``,
  ``n_init=4, random_state=0``; clusters numbered by their first image), so there are 80
  identities of 10–42 images each. Like people in ReID they share a category (the digit) and
  differ in appearance; the hard negatives of a query are the other styles of its digit.
* train/test identities are disjoint, as in Market-1501: styles 0, 2, 4, 6 of every digit
  (40 identities, 895 images) train; styles 1, 3, 5, 7 (40 identities, 902 images) are only
  retrieved, so the model must embed handwriting it never classified.
* camera = parity of the image's index in ``sklearn.datasets.load_digits()`` (2 cameras). The
  protocol discards same-identity same-camera gallery images, so a query is only matched
  across cameras.
* query = every 4th image (in index order) of each test identity, gallery = the other test
  images: 240 queries against 662 gallery images, both cameras in both sets, every query
  with at least one cross-camera match.
* pixels are standardised with one scalar mean/std computed on the training images only.

The split is fixed: it depends on no training seed. Cosine retrieval on the (standardised)
pixels scores 64% mAP / 75% rank-1 on it (identities are pixel clusters by construction): a
reference for the demo's numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ...data.embedded import standardised_digit_images

NAME = "digits-reid"
STYLES_PER_DIGIT = 8
TEST_IDENTITY_PARITY = 1  # styles 1, 3, 5, 7 are test identities; 0, 2, 4, 6 train
NUM_CAMERAS = 2
QUERY_EVERY = 4
IMAGE_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class ReidTensors:
    """One split in memory: images (N, 1, 8, 8) float32, identities and 0-based cameras (int64)."""

    images: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor

    def __len__(self) -> int:
        return len(self.pids)


@dataclass(frozen=True)
class DigitsReid:
    """``train.pids`` are relabelled 0..N-1 (``train_identities`` holds the originals, digit × 8 +
    style); query/gallery keep the original identities, as the on-disk readers do."""

    train: ReidTensors
    query: ReidTensors
    gallery: ReidTensors
    train_identities: torch.Tensor
    name: str = NAME
    input_shape: tuple[int, ...] = IMAGE_SHAPE

    @property
    def num_train_pids(self) -> int:
        return int(self.train.pids.unique().numel())


def digit_style_identities(pixels: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Identity ``digit × STYLES_PER_DIGIT + style`` of every image (k-means style clusters)."""
    from sklearn.cluster import KMeans

    identities = np.zeros(len(digits), dtype=np.int64)
    for digit in np.unique(digits):
        members = np.flatnonzero(digits == digit)
        labels = KMeans(STYLES_PER_DIGIT, n_init=4, random_state=0).fit(pixels[members]).labels_
        order = sorted(range(STYLES_PER_DIGIT), key=lambda c: members[labels == c].min())
        style = {cluster: rank for rank, cluster in enumerate(order)}
        identities[members] = [digit * STYLES_PER_DIGIT + style[c] for c in labels]
    return identities


@functools.lru_cache(maxsize=1)
def load_digits_reid() -> DigitsReid:
    """The fixed digits-reid split (see the module docstring); cached, its tensors are shared."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = bunch.data.astype(np.float64)
    identities = digit_style_identities(pixels, bunch.target.astype(np.int64))
    cameras = np.arange(len(identities)) % NUM_CAMERAS

    is_test = (identities % STYLES_PER_DIGIT) % 2 == TEST_IDENTITY_PARITY
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    query_idx, gallery_idx = [], []
    for pid in np.unique(identities[test_idx]):
        members = test_idx[identities[test_idx] == pid]
        is_query = np.arange(len(members)) % QUERY_EVERY == 0
        query_idx.append(members[is_query])
        gallery_idx.append(members[~is_query])
    query_idx, gallery_idx = np.concatenate(query_idx), np.concatenate(gallery_idx)

    mean, std = float(pixels[train_idx].mean()), float(pixels[train_idx].std())
    train_identities = np.unique(identities[train_idx])
    relabel = {int(pid): label for label, pid in enumerate(train_identities)}

    def split(indices: np.ndarray, pids) -> ReidTensors:
        return ReidTensors(standardised_digit_images(pixels[indices], mean, std), torch.as_tensor(np.asarray(pids), dtype=torch.int64),
                           torch.as_tensor(cameras[indices], dtype=torch.int64))

    return DigitsReid(
        train=split(train_idx, [relabel[int(p)] for p in identities[train_idx]]),
        query=split(query_idx, identities[query_idx]),
        gallery=split(gallery_idx, identities[gallery_idx]),
        train_identities=torch.as_tensor(train_identities, dtype=torch.int64),
    )
