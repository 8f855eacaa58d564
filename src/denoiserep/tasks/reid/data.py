"""Readers for the on-disk layouts of person re-identification datasets.

Nothing is downloaded: each reader parses a layout the user already has and
fails with an error naming the expected layout and what was actually found.

Conventions shared by every reader (torchreid / TransReID):
  * camera ids are stored 0-based (file names and .mat files are 1-based);
  * training pids are relabelled to contiguous 0..N-1 (sorted by original
    pid), so they can index a classifier; query/gallery keep original pids;
  * Market-1501 junk images (pid -1) are dropped; its distractors (pid 0)
    stay in the gallery as the standard protocol requires.

Several datasets can be trained on together (``"market1501:PATH,dukemtmc:PATH"``):
training identities and cameras are offset per dataset so that they never
collide, while each dataset keeps its own query/gallery for evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from ...data.images import read_image

MARKET_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)s\d+_\d+_\d+\.jpg$")
MARKET_PATTERN_TEXT = "PPPP_cCsS_FFFFFF_NN.jpg (e.g. 0002_c1s1_000451_03.jpg; pid -1 = junk)"
DUKE_PATTERN = re.compile(r"^(\d+)_c(\d+)_f\d+\.jpg$")
DUKE_PATTERN_TEXT = "PPPP_cC_fFFFFFFF.jpg (e.g. 0001_c2_f0046182.jpg)"
MSMT_LINE_TEXT = "'<pid dir>/<pid>_<idx>_<camera>_<...>.jpg <pid>' (e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0')"

MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
MSMT_LIST_FILES = {
    "train": "list_train.txt",
    "val": "list_val.txt",
    "query": "list_query.txt",
    "gallery": "list_gallery.txt",
}
MSMT_VERSION_FOLDERS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
CUHK03_MAT_FIELDS = ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx")


@dataclass(frozen=True)
class ReidSample:
    """One image: identity, 0-based camera, and which merged dataset it came from."""

    path: Path
    pid: int
    camid: int
    dsetid: int = 0


@dataclass(frozen=True)
class ReidDataset:
    """Train / query / gallery splits of one dataset (or one part of a merged set)."""

    train: tuple[ReidSample, ...]
    query: tuple[ReidSample, ...]
    gallery: tuple[ReidSample, ...]
    name: str

    @property
    def num_train_pids(self) -> int:
        """Number of training identities (= classifier size; pids are 0..N-1)."""
        return _count_pids(self.train)

    @property
    def num_train_cams(self) -> int:
        """1 + largest training camera id: the size of a camera-embedding table."""
        return _count_cams(self.train)


@dataclass(frozen=True)
class MergedReidDataset:
    """Training samples of several datasets in one id/camera space.

    ``parts`` holds each dataset with the merged ids (``dsetid`` = its index),
    so that every dataset is still evaluated on its own query/gallery.
    """

    train: tuple[ReidSample, ...]
    parts: tuple[ReidDataset, ...]

    @property
    def name(self) -> str:
        return "+".join(part.name for part in self.parts)

    @property
    def num_train_pids(self) -> int:
        return _count_pids(self.train)

    @property
    def num_train_cams(self) -> int:
        return _count_cams(self.train)


class ReidImageDataset(Dataset):
    """Torch dataset yielding ``(image_tensor, pid, camid)`` for a list of samples.

    Images are loaded with PIL as RGB; without a transform they become float
    tensors in [0, 1] (C x H x W).
    """

    def __init__(
        self, samples: Sequence[ReidSample], transform: Callable[[Image.Image], torch.Tensor] | None = None
    ) -> None:
        self.samples = list(samples)
        self.transform = transform if transform is not None else to_tensor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        return self.transform(read_image(sample.path)), sample.pid, sample.camid


# ----------------------------------------------------------------------------
# Factory and multi-dataset specs
# ----------------------------------------------------------------------------


def read_market1501(root: str | Path) -> ReidDataset:
    """Market-1501: ``bounding_box_train/``, ``query/``, ``bounding_box_test/``."""
    return _read_folder_dataset(
        root, "Market-1501", "market1501", ("Market-1501-v15.09.15",), MARKET_PATTERN, MARKET_PATTERN_TEXT
    )


def read_dukemtmc(root: str | Path) -> ReidDataset:
    """DukeMTMC-reID: the Market-1501 folder layout with ``PPPP_cC_fFFFFFFF.jpg`` names."""
    return _read_folder_dataset(root, "DukeMTMC-reID", "dukemtmc", ("DukeMTMC-reID",), DUKE_PATTERN, DUKE_PATTERN_TEXT)


def read_msmt17(root: str | Path, include_val: bool = True) -> ReidDataset:
    """MSMT17 v1 (``train/``, ``test/``) or v2 (``mask_train_v2/``, ``mask_test_v2/``).

    ``include_val`` adds ``list_val.txt`` to training, as TransReID (which
    DenoiseRep builds on) does; torchreid's default trains on
    ``list_train.txt`` only.
    """
    base, train_dir, test_dir = _resolve_msmt_root(Path(root))
    train = _read_msmt_list(base / MSMT_LIST_FILES["train"], train_dir)
    if include_val:
        train += _read_msmt_list(base / MSMT_LIST_FILES["val"], train_dir)
    query = _read_msmt_list(base / MSMT_LIST_FILES["query"], test_dir)
    gallery = _read_msmt_list(base / MSMT_LIST_FILES["gallery"], test_dir)
    sources = {"train": train_dir, "query": test_dir, "gallery": test_dir}
    return _finish_dataset("msmt17", train, query, gallery, sources)


def read_cuhk03(root: str | Path, variant: str = "labeled") -> ReidDataset:
    """CUHK03 new protocol (767/700 ids), ``labeled`` or ``detected`` boxes.

    Expects ``cuhk03_new_protocol_config_<variant>.mat`` (fields
    ``filelist, labels, camId, train_idx, query_idx, gallery_idx`` with
    1-based indices) next to ``images_<variant>/``, as torchreid documents.
    """
    if variant not in ("labeled", "detected"):
        raise ValueError(f"unknown CUHK03 variant {variant!r}; expected 'labeled' or 'detected'")
    root = Path(root)
    mat_path = root / f"cuhk03_new_protocol_config_{variant}.mat"
    image_dir = root / f"images_{variant}"
    for expected in (mat_path, image_dir):
        if not expected.exists():
            raise FileNotFoundError(
                f"CUHK03 ({variant}) layout expects {expected.name} in {root}; found: {_listing(root)}"
            )
    split = _load_cuhk03_split(mat_path)
    splits = {name: _cuhk03_samples(split, name, image_dir, mat_path) for name in ("train", "query", "gallery")}
    sources = {name: mat_path for name in splits}
    return _finish_dataset(f"cuhk03_{variant}", splits["train"], splits["query"], splits["gallery"], sources)


READERS: dict[str, Callable[[Path], ReidDataset]] = {
    "market1501": read_market1501,
    "dukemtmc": read_dukemtmc,
    "msmt17": read_msmt17,
    "cuhk03_labeled": lambda root: read_cuhk03(root, "labeled"),
    "cuhk03_detected": lambda root: read_cuhk03(root, "detected"),
}


def load_reid_dataset(name: str, root: str | Path) -> ReidDataset:
    """Read dataset ``name`` (see ``READERS``) from ``root`` with default options."""
    if name not in READERS:
        raise ValueError(f"unknown ReID dataset {name!r}; known datasets: {', '.join(sorted(READERS))}")
    return READERS[name](Path(root))


def parse_reid_spec(spec: str) -> list[tuple[str, Path]]:
    """``"market1501:/data/market,dukemtmc:/data/duke"`` -> [(name, root), ...].

    Only the first ``:`` of each entry separates name from path, so paths
    may contain colons; they may not contain commas.
    """
    entries = []
    for entry in spec.split(","):
        name, sep, path = entry.strip().partition(":")
        if not sep or not name or not path:
            raise ValueError(f"bad dataset spec entry {entry!r} in {spec!r}; expected NAME:PATH[,NAME:PATH...]")
        if name not in READERS:
            raise ValueError(
                f"unknown ReID dataset {name!r} in spec {spec!r}; known datasets: {', '.join(sorted(READERS))}"
            )
        entries.append((name, Path(path)))
    return entries


def load_reid_spec(spec: str) -> MergedReidDataset:
    """Read and merge every dataset of a ``NAME:PATH,...`` spec."""
    return merge_reid_datasets([load_reid_dataset(name, root) for name, root in parse_reid_spec(spec)])


def merge_reid_datasets(datasets: Sequence[ReidDataset]) -> MergedReidDataset:
    """Put datasets into one id/camera space without collisions.

    Dataset i's training pids are shifted by the number of training ids of
    datasets 0..i-1 (each dataset's train pids are already 0..N-1, so the
    result is contiguous), and all its camera ids by the camera count of
    datasets 0..i-1 (1 + largest camid over all splits). Query/gallery pids
    are left alone: they are only compared within their own dataset.
    """
    if not datasets:
        raise ValueError("cannot merge an empty list of ReID datasets")
    parts = []
    pid_offset = cam_offset = 0
    for dsetid, dataset in enumerate(datasets):
        parts.append(
            ReidDataset(
                train=_shift(dataset.train, pid_offset, cam_offset, dsetid),
                query=_shift(dataset.query, 0, cam_offset, dsetid),
                gallery=_shift(dataset.gallery, 0, cam_offset, dsetid),
                name=dataset.name,
            )
        )
        pid_offset += dataset.num_train_pids
        cam_offset += 1 + max(s.camid for s in dataset.train + dataset.query + dataset.gallery)
    return MergedReidDataset(train=tuple(s for part in parts for s in part.train), parts=tuple(parts))


def _shift(samples: tuple[ReidSample, ...], pid_shift: int, cam_shift: int, dsetid: int) -> tuple[ReidSample, ...]:
    return tuple(replace(s, pid=s.pid + pid_shift, camid=s.camid + cam_shift, dsetid=dsetid) for s in samples)


# ----------------------------------------------------------------------------
# Market-1501 / DukeMTMC-reID (one image folder per split)
# ----------------------------------------------------------------------------


def _read_folder_dataset(
    root: str | Path, title: str, name: str, nested_dirs: tuple[str, ...], pattern: re.Pattern[str], pattern_text: str
) -> ReidDataset:
    base = _resolve_folder_root(Path(root), title, nested_dirs)
    folders = dict(zip(("train", "query", "gallery"), (base / folder for folder in MARKET_FOLDERS)))
    splits = {split: _read_image_folder(folder, pattern, pattern_text) for split, folder in folders.items()}
    return _finish_dataset(name, splits["train"], splits["query"], splits["gallery"], folders)


def _resolve_folder_root(root: Path, title: str, nested_dirs: tuple[str, ...]) -> Path:
    """``root`` itself, or its extracted-archive subfolder, holding the three split folders."""
    for candidate in (root, *(root / nested for nested in nested_dirs)):
        if all((candidate / folder).is_dir() for folder in MARKET_FOLDERS):
            return candidate
    missing = [folder + "/" for folder in MARKET_FOLDERS if not (root / folder).is_dir()]
    raise FileNotFoundError(
        f"{title} layout expects folders {', '.join(f + '/' for f in MARKET_FOLDERS)} in {root} "
        f"(or in {', '.join(nested_dirs)}/ inside it); missing: {', '.join(missing)}; found: {_listing(root)}"
    )


def _read_image_folder(folder: Path, pattern: re.Pattern[str], pattern_text: str) -> list[ReidSample]:
    """Parse every ``.jpg`` in ``folder``; other files (e.g. Thumbs.db) are ignored."""
    samples = []
    for path in sorted(folder.glob("*.jpg")):
        match = pattern.match(path.name)
        if match is None:
            raise ValueError(f"malformed file name {path}: expected {pattern_text}")
        pid, camera = int(match.group(1)), int(match.group(2))
        if pid == -1:
            continue  # junk detections, excluded by the protocol
        samples.append(ReidSample(path, pid, _zero_based_camera(camera, path)))
    return samples


# ----------------------------------------------------------------------------
# MSMT17 (list files)
# ----------------------------------------------------------------------------


def _resolve_msmt_root(root: Path) -> tuple[Path, Path, Path]:
    """Find the folder with the list files and detect v1 vs v2 by image folder names."""
    for base in (root, *(root / version for version in MSMT_VERSION_FOLDERS)):
        for train_name, test_name in MSMT_VERSION_FOLDERS.values():
            train_dir, test_dir = base / train_name, base / test_name
            if train_dir.is_dir() and test_dir.is_dir() and all((base / f).is_file() for f in MSMT_LIST_FILES.values()):
                return base, train_dir, test_dir
    versions = "; ".join(f"{v}: {a}/ + {b}/" for v, (a, b) in MSMT_VERSION_FOLDERS.items())
    raise FileNotFoundError(
        f"MSMT17 layout expects {', '.join(MSMT_LIST_FILES.values())} and image folders ({versions}) in {root} "
        f"or in {' or '.join(MSMT_VERSION_FOLDERS)}/ inside it; found: {_listing(root)}"
    )


def _read_msmt_list(list_path: Path, image_dir: Path) -> list[ReidSample]:
    """Lines ``relative/path.jpg pid``; the camera is field 3 (1-based) of the file name."""
    samples = []
    for line_number, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        name_fields = Path(fields[0]).name.split("_")
        if len(fields) != 2 or not fields[1].isdigit() or len(name_fields) < 3 or not name_fields[2].isdigit():
            raise ValueError(f"malformed line {line_number} of {list_path}: {line!r}; expected {MSMT_LINE_TEXT}")
        camid = _zero_based_camera(int(name_fields[2]), list_path)
        samples.append(ReidSample(image_dir / fields[0], int(fields[1]), camid))
    return samples


# ----------------------------------------------------------------------------
# CUHK03 new protocol (.mat split file)
# ----------------------------------------------------------------------------


def _load_cuhk03_split(mat_path: Path) -> dict[str, np.ndarray]:
    contents = scipy.io.loadmat(str(mat_path))
    missing = [field for field in CUHK03_MAT_FIELDS if field not in contents]
    if missing:
        present = sorted(key for key in contents if not key.startswith("__"))
        raise ValueError(f"{mat_path} is missing fields {missing}; expected {list(CUHK03_MAT_FIELDS)}, found {present}")
    return {field: contents[field] for field in CUHK03_MAT_FIELDS}


def _cuhk03_samples(split: dict[str, np.ndarray], name: str, image_dir: Path, mat_path: Path) -> list[ReidSample]:
    """Samples of one split; the .mat indices are 1-based (MATLAB)."""
    filelist = split["filelist"].reshape(-1)
    labels = split["labels"].reshape(-1).astype(np.int64)
    cameras = split["camId"].reshape(-1).astype(np.int64)
    indices = split[f"{name}_idx"].reshape(-1).astype(np.int64) - 1
    if indices.size and (indices.min() < 0 or indices.max() >= len(filelist)):
        raise ValueError(f"{mat_path}: {name}_idx must be 1-based indices into filelist (1..{len(filelist)})")
    return [
        ReidSample(
            image_dir / _matlab_string(filelist[i]), int(labels[i]), _zero_based_camera(int(cameras[i]), mat_path)
        )
        for i in indices
    ]


def _matlab_string(cell: np.ndarray | str) -> str:
    """Unwrap a MATLAB cell entry (nested object/char arrays) to a Python str."""
    while isinstance(cell, np.ndarray):
        cell = cell.reshape(-1)[0]
    return str(cell)


# ----------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------


def _finish_dataset(
    name: str, train: list[ReidSample], query: list[ReidSample], gallery: list[ReidSample], sources: dict[str, Path]
) -> ReidDataset:
    """Reject empty splits and relabel training pids to 0..N-1."""
    for split, samples in (("train", train), ("query", query), ("gallery", gallery)):
        if not samples:
            raise ValueError(f"{name}: split {split!r} is empty (read from {sources[split]}); check the dataset layout")
    pid_to_label = {pid: label for label, pid in enumerate(sorted({s.pid for s in train}))}
    relabelled = tuple(replace(s, pid=pid_to_label[s.pid]) for s in train)
    return ReidDataset(train=relabelled, query=tuple(query), gallery=tuple(gallery), name=name)


def _zero_based_camera(camera: int, source: Path) -> int:
    if camera < 1:
        raise ValueError(f"camera ids are 1-based in {source}, got {camera}")
    return camera - 1


def _count_pids(samples: Sequence[ReidSample]) -> int:
    return len({s.pid for s in samples})


def _count_cams(samples: Sequence[ReidSample]) -> int:
    return 1 + max((s.camid for s in samples), default=-1)


def _listing(folder: Path, limit: int = 20) -> str:
    """Short listing of what is actually in ``folder`` for error messages."""
    if not folder.is_dir():
        return f"nothing ({folder} does not exist or is not a directory)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "an empty directory"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
