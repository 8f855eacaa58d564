"""Specification of the ReID dataset readers on tiny on-disk fixtures of every layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from denoiserep.tasks.reid.data import (
    ReidImageDataset,
    ReidSample,
    load_reid_dataset,
    load_reid_spec,
    merge_reid_datasets,
    parse_reid_spec,
    read_cuhk03,
    read_msmt17,
)


def write_image(path: Path, size: tuple[int, int] = (8, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color=(200, 30, 60)).save(path)


def make_folder_dataset(root: Path, files: dict[str, list[str]]) -> Path:
    for folder, names in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_image(root / folder / name)
    return root


MARKET_FILES = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s3_012345_02.jpg"],
    "query": ["0002_c4s2_000100_01.jpg", "0007_c1s1_000200_01.jpg"],
    "bounding_box_test": [
        "0002_c5s1_000300_01.jpg",
        "0007_c6s1_000400_02.jpg",
        "0000_c1s1_000151_01.jpg",  # distractor: kept
        "-1_c1s1_000401_03.jpg",  # junk: dropped
    ],
}
DUKE_FILES = {
    "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0047000.jpg", "0003_c8_f0001234.jpg"],
    "query": ["0005_c1_f0000001.jpg"],
    "bounding_box_test": ["0005_c3_f0000002.jpg", "0006_c7_f0000003.jpg"],
}


@pytest.fixture
def market_root(tmp_path: Path) -> Path:
    root = make_folder_dataset(tmp_path / "market", MARKET_FILES)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    return root


@pytest.fixture
def duke_root(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "duke", DUKE_FILES)


def make_msmt(root: Path, version: str) -> Path:
    train_dir, test_dir = {"v1": ("train", "test"), "v2": ("mask_train_v2", "mask_test_v2")}[version]
    lists = {
        "list_train.txt": (train_dir, [("0000/0000_000_01_0303morning_0015_0.jpg", 0), ("0001/0001_000_15_0303noon_0020_1.jpg", 1)]),
        "list_val.txt": (train_dir, [("0002/0002_000_03_0303morning_0001_0.jpg", 2)]),
        "list_query.txt": (test_dir, [("0000/0000_000_02_0303morning_0015_0.jpg", 0)]),
        "list_gallery.txt": (test_dir, [("0000/0000_001_07_0303noon_0015_0.jpg", 0), ("0005/0005_000_01_0303noon_0015_0.jpg", 5)]),
    }
    for list_name, (image_dir, entries) in lists.items():
        for rel, _ in entries:
            write_image(root / image_dir / rel)
        (root / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))
    return root


CUHK03_NAMES = ["1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "1_002_2_07.png", "2_010_1_02.png", "2_010_2_08.png"]


def make_cuhk03(root: Path, variant: str, drop_field: str | None = None) -> Path:
    for name in CUHK03_NAMES:
        write_image(root / f"images_{variant}" / name)
    filelist = np.empty((len(CUHK03_NAMES), 1), dtype=object)  # a MATLAB cell array
    for i, name in enumerate(CUHK03_NAMES):
        filelist[i, 0] = name
    fields = {
        "filelist": filelist,
        "labels": np.array([[1], [1], [2], [2], [10], [10]], dtype=float),
        "camId": np.array([[1], [2], [1], [2], [1], [2]], dtype=float),
        "train_idx": np.array([[1], [2], [3], [4]]),  # 1-based, MATLAB style
        "query_idx": np.array([[5]]),
        "gallery_idx": np.array([[6]]),
    }
    fields.pop(drop_field, None)
    scipy.io.savemat(root / f"cuhk03_new_protocol_config_{variant}.mat", fields)
    return root


def summary(samples) -> list[tuple[str, int, int]]:
    return [(s.path.name, s.pid, s.camid) for s in samples]


# ----------------------------------------------------------------------------
# Reading each layout
# ----------------------------------------------------------------------------


def test_market1501_ids_cameras_junk_and_distractors(market_root: Path):
    dataset = load_reid_dataset("market1501", market_root)
    # Training pids are relabelled 0..N-1 in sorted order; cameras become 0-based.
    assert summary(dataset.train) == [
        ("0002_c1s1_000451_03.jpg", 0, 0),
        ("0002_c2s1_000551_01.jpg", 0, 1),
        ("0007_c3s3_012345_02.jpg", 1, 2),
    ]
    assert summary(dataset.query) == [("0002_c4s2_000100_01.jpg", 2, 3), ("0007_c1s1_000200_01.jpg", 7, 0)]
    # Junk (-1) is dropped, the distractor (0000) stays; non-jpg files are ignored.
    assert sorted(s.pid for s in dataset.gallery) == [0, 2, 7]
    assert (dataset.num_train_pids, dataset.num_train_cams, dataset.name) == (2, 3, "market1501")
    assert all(s.path.is_file() and s.dsetid == 0 for s in dataset.train + dataset.query + dataset.gallery)


def test_market1501_found_inside_extracted_archive_folder(tmp_path: Path):
    make_folder_dataset(tmp_path / "Market-1501-v15.09.15", MARKET_FILES)
    assert len(load_reid_dataset("market1501", tmp_path).train) == 3


def test_dukemtmc_reid(duke_root: Path):
    dataset = load_reid_dataset("dukemtmc", duke_root)
    assert summary(dataset.train) == [("0001_c2_f0046182.jpg", 0, 1), ("0001_c5_f0047000.jpg", 0, 4), ("0003_c8_f0001234.jpg", 1, 7)]
    assert summary(dataset.query) == [("0005_c1_f0000001.jpg", 5, 0)]
    assert [(s.pid, s.camid) for s in dataset.gallery] == [(5, 2), (6, 6)]
    assert dataset.num_train_cams == 8


@pytest.mark.parametrize(("version", "train_dir", "test_dir"), [("v1", "train", "test"), ("v2", "mask_train_v2", "mask_test_v2")])
def test_msmt17_versions_are_detected_from_the_image_folders(tmp_path: Path, version, train_dir, test_dir):
    root = make_msmt(tmp_path / "MSMT17", version)
    dataset = load_reid_dataset("msmt17", root)
    # Camera = third "_" field of the file name, 1-based on disk.
    assert [(s.pid, s.camid) for s in dataset.train] == [(0, 0), (1, 14), (2, 2)]  # train + val
    assert all(s.path.parent.parent.name == train_dir and s.path.is_file() for s in dataset.train)
    assert [(s.pid, s.camid) for s in dataset.query] == [(0, 1)]
    assert [(s.pid, s.camid) for s in dataset.gallery] == [(0, 6), (5, 0)]
    assert all(s.path.parent.parent.name == test_dir for s in dataset.query + dataset.gallery)


def test_msmt17_found_in_version_subfolder_and_val_optional(tmp_path: Path):
    make_msmt(tmp_path / "MSMT17_V2", "v2")
    assert len(read_msmt17(tmp_path, include_val=False).train) == 2
    assert len(read_msmt17(tmp_path).train) == 3


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_cuhk03_new_protocol_from_mat_split(tmp_path: Path, variant):
    root = make_cuhk03(tmp_path / "cuhk03", variant)
    dataset = load_reid_dataset(f"cuhk03_{variant}", root)
    assert summary(dataset.train) == [
        ("1_001_1_01.png", 0, 0),
        ("1_001_2_06.png", 0, 1),
        ("1_002_1_01.png", 1, 0),
        ("1_002_2_07.png", 1, 1),
    ]
    assert summary(dataset.query) == [("2_010_1_02.png", 10, 0)]
    assert summary(dataset.gallery) == [("2_010_2_08.png", 10, 1)]
    assert all(s.path.parent.name == f"images_{variant}" and s.path.is_file() for s in dataset.train)


def test_image_dataset_yields_rgb_tensor_pid_and_camid(market_root: Path):
    dataset = load_reid_dataset("market1501", market_root)
    image, pid, camid = ReidImageDataset(dataset.train)[2]
    assert image.shape == (3, 16, 8) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert (pid, camid) == (1, 2)
    resized = ReidImageDataset(dataset.train, transform=lambda im: torch.tensor(im.size))
    assert resized[0][0].tolist() == [8, 16]
    assert len(resized) == 3


# ----------------------------------------------------------------------------
# Several datasets trained together
# ----------------------------------------------------------------------------


def test_spec_parsing_keeps_colons_in_paths():
    assert parse_reid_spec("market1501:/data/m,dukemtmc:C:/data/d") == [
        ("market1501", Path("/data/m")),
        ("dukemtmc", Path("C:/data/d")),
    ]


def test_merged_training_ids_and_cameras_are_disjoint_and_contiguous(market_root: Path, duke_root: Path):
    merged = load_reid_spec(f"market1501:{market_root},dukemtmc:{duke_root}")
    assert merged.name == "market1501+dukemtmc"
    market, duke = merged.parts
    market_pids = {s.pid for s in market.train}
    duke_pids = {s.pid for s in duke.train}
    assert market_pids == {0, 1} and duke_pids == {2, 3}
    assert {s.pid for s in merged.train} == set(range(merged.num_train_pids)) == set(range(4))
    # Market uses cameras 0..5, so Duke's cameras start at 6 in every split.
    assert {s.camid for s in duke.train} == {6 + 1, 6 + 4, 6 + 7}
    assert [s.camid for s in duke.query] == [6 + 0]
    assert merged.num_train_cams == 6 + 8
    # Query/gallery stay per dataset, with original pids, tagged by dataset.
    assert [s.pid for s in duke.query] == [5] and sorted(s.pid for s in market.gallery) == [0, 2, 7]
    assert {s.dsetid for s in market.train + market.query} == {0}
    assert {s.dsetid for s in duke.train + duke.gallery} == {1}


def test_merging_one_dataset_changes_nothing_but_the_container(market_root: Path):
    dataset = load_reid_dataset("market1501", market_root)
    merged = merge_reid_datasets([dataset])
    assert merged.train == dataset.train and merged.parts == (dataset,)


# ----------------------------------------------------------------------------
# Wrong layouts fail with errors that say what was expected and what was found
# ----------------------------------------------------------------------------


def test_missing_folder_lists_what_is_present(market_root: Path):
    (market_root / "query").rename(market_root / "queries")
    with pytest.raises(FileNotFoundError, match=r"Market-1501 layout expects folders .*missing: query/; found: .*queries/"):
        load_reid_dataset("market1501", market_root)


def test_missing_root_is_reported(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reid_dataset("dukemtmc", tmp_path / "nowhere")


def test_malformed_file_name_names_the_file_and_the_pattern(market_root: Path):
    write_image(market_root / "query" / "0002_c1_000451.jpg")
    with pytest.raises(ValueError, match=r"malformed file name .*0002_c1_000451\.jpg: expected PPPP_cCsS_FFFFFF_NN\.jpg"):
        load_reid_dataset("market1501", market_root)


def test_market_file_in_duke_folder_is_malformed(duke_root: Path):
    write_image(duke_root / "query" / "0002_c1s1_000451_03.jpg")
    with pytest.raises(ValueError, match=r"expected PPPP_cC_fFFFFFFF\.jpg"):
        load_reid_dataset("dukemtmc", duke_root)


def test_split_with_only_junk_is_empty(tmp_path: Path):
    files = dict(MARKET_FILES, query=["-1_c1s1_000401_03.jpg"])
    root = make_folder_dataset(tmp_path / "market", files)
    with pytest.raises(ValueError, match=r"market1501: split 'query' is empty \(read from .*query\)"):
        load_reid_dataset("market1501", root)


def test_zero_camera_is_rejected(market_root: Path):
    write_image(market_root / "query" / "0002_c0s1_000451_03.jpg")
    with pytest.raises(ValueError, match="camera ids are 1-based"):
        load_reid_dataset("market1501", market_root)


def test_unknown_dataset_name_lists_known_ones(tmp_path: Path):
    known = "cuhk03_detected, cuhk03_labeled, dukemtmc, market1501, msmt17"
    with pytest.raises(ValueError, match=f"unknown ReID dataset 'market'; known datasets: {known}"):
        load_reid_dataset("market", tmp_path)
    with pytest.raises(ValueError, match="unknown ReID dataset 'duke' in spec"):
        parse_reid_spec(f"market1501:{tmp_path},duke:{tmp_path}")


def test_spec_entry_without_path_is_rejected():
    with pytest.raises(ValueError, match=r"bad dataset spec entry 'market1501' .*expected NAME:PATH"):
        parse_reid_spec("market1501")


def test_msmt17_without_image_folders_explains_both_versions(tmp_path: Path):
    root = make_msmt(tmp_path / "msmt", "v1")
    (root / "test").rename(root / "testing")
    with pytest.raises(FileNotFoundError, match=r"MSMT17_V1: train/ \+ test/; MSMT17_V2: mask_train_v2/ \+ mask_test_v2/.*found: .*testing/"):
        load_reid_dataset("msmt17", root)


def test_msmt17_malformed_list_line_names_file_and_line(tmp_path: Path):
    root = make_msmt(tmp_path / "msmt", "v1")
    (root / "list_query.txt").write_text("0000/0000_000_02_0303morning_0015_0.jpg 0\n0000/broken.jpg\n")
    with pytest.raises(ValueError, match=r"malformed line 2 of .*list_query\.txt: '0000/broken\.jpg'; expected"):
        load_reid_dataset("msmt17", root)


def test_cuhk03_missing_split_file_lists_directory(tmp_path: Path):
    root = make_cuhk03(tmp_path / "cuhk03", "labeled")
    with pytest.raises(FileNotFoundError, match=r"expects cuhk03_new_protocol_config_detected\.mat .*found: .*_labeled\.mat"):
        read_cuhk03(root, "detected")


def test_cuhk03_mat_without_required_field_is_rejected(tmp_path: Path):
    root = make_cuhk03(tmp_path / "cuhk03", "labeled", drop_field="gallery_idx")
    with pytest.raises(ValueError, match=r"missing fields \['gallery_idx'\]"):
        read_cuhk03(root)


def test_samples_are_immutable_records():
    sample = ReidSample(Path("a.jpg"), pid=3, camid=1)
    assert sample.dsetid == 0
    with pytest.raises(AttributeError):
        sample.pid = 4  # type: ignore[misc]
