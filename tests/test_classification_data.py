"""Specification of denoiserep.tasks.classification.data: what each dataset spec yields, and
how every misuse is reported. All fixtures are built in tmp_path; nothing is downloaded."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import PILToTensor

from denoiserep.data import embedded
from denoiserep.data.images import load_unlabeled_images
from denoiserep.tasks.classification.data import ClassificationData, load_classification_data

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------- fixture builders


def write_jpeg(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def make_imagefolder(root: Path, classes=("cat", "dog", "frog"), train_per_class=3, val_per_class=2) -> Path:
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            for i in range(count):
                write_jpeg(root / split / name / f"{i}.jpg", seed=100 * c + i)
    return root


def cifar_rows(count: int, offset: int) -> np.ndarray:
    """Rows in the official CHW order whose red/green/blue planes are recognisable:
    image k has red = k + offset, green = 100 + k, blue = 200 + (k % 50)."""
    rows = np.empty((count, 3, 32, 32), dtype=np.uint8)
    for k in range(count):
        rows[k, 0], rows[k, 1], rows[k, 2] = k + offset, 100 + k, 200 + k % 50
    return rows.reshape(count, 3072)


def dump_official(path: Path, content: dict) -> None:
    """As the official archives: a dict with bytes keys, pickle protocol 2."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


def make_cifar10(parent: Path, per_batch: int = 4, test_count: int = 6) -> Path:
    folder = parent / "cifar-10-batches-py"
    for b in range(1, 6):
        dump_official(folder / f"data_batch_{b}", {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": [(b + i) % 10 for i in range(per_batch)],
            b"data": cifar_rows(per_batch, offset=10 * b),
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
        })
    dump_official(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [i % 10 for i in range(test_count)],
        b"data": cifar_rows(test_count, offset=0),
        b"filenames": [f"test_{i}.png".encode() for i in range(test_count)],
    })
    dump_official(folder / "batches.meta", {
        b"num_cases_per_batch": per_batch,
        b"label_names": [name.encode() for name in CIFAR10_NAMES],
        b"num_vis": 3072,
    })
    return folder


def make_cifar100(parent: Path, train_count: int = 7, test_count: int = 3) -> Path:
    folder = parent / "cifar-100-python"
    for name, count in (("train", train_count), ("test", test_count)):
        dump_official(folder / name, {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(count)],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": [(7 * i) % 100 for i in range(count)],
            b"coarse_labels": [i % 20 for i in range(count)],
            b"data": cifar_rows(count, offset=0),
        })
    dump_official(folder / "meta", {
        b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)],
    })
    return folder


def check_items(dataset, expected_shape: tuple[int, ...]) -> None:
    x, y = dataset[0]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and tuple(x.shape) == expected_shape
    assert type(y) is int


# ---------------------------------------------------------------- digits


def test_digits_is_scikit_learns_1797_images_in_a_fixed_stratified_70_30_split():
    data = load_classification_data("digits")
    assert isinstance(data, ClassificationData)
    assert data.name == "digits"
    assert (len(data.train), len(data.val)) == (1257, 540)
    assert data.num_classes == 10 and data.class_names == [str(d) for d in range(10)]
    assert data.input_shape == (1, 8, 8)
    check_items(data.train, (1, 8, 8))
    check_items(data.val, (1, 8, 8))
    val_counts = np.bincount([y for _, y in data.val], minlength=10)
    assert val_counts.min() >= 52 and val_counts.max() <= 55  # stratified: ~54 per class


def test_digits_split_does_not_depend_on_any_seed():
    torch.manual_seed(1)
    np.random.seed(1)
    first = load_classification_data("digits")
    torch.manual_seed(2)
    np.random.seed(2)
    second = load_classification_data("digits")
    assert torch.equal(first.train.inputs, second.train.inputs)
    assert torch.equal(first.val.labels, second.val.labels)


def test_digits_are_standardised_with_train_statistics():
    data = load_classification_data("digits")
    train = data.train.inputs
    assert abs(train.mean().item()) < 1e-5 and abs(train.std().item() - 1) < 1e-3
    # val uses the same (train) statistics, so it is only roughly standardised
    assert abs(data.val.inputs.mean().item()) < 0.1
    # the raw value 0 maps to -mean/std of the train pixels (~ -4.889 / 6.018)
    assert data.train.inputs.min().item() == pytest.approx(-0.8124, abs=1e-3)


def test_digits_apply_given_transforms_to_the_input_tensor():
    data = load_classification_data("digits", train_transform=lambda x: x * 0, eval_transform=lambda x: x[:, :4, :4])
    assert data.train[0][0].abs().sum() == 0
    assert data.input_shape == (1, 4, 4)  # read off a real (transformed) val item


def test_fixed_size_datasets_reject_an_image_size_they_cannot_honour():
    assert load_classification_data("digits", image_size=8).input_shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"'digits' has 8x8 images.*leave image_size unset"):
        load_classification_data("digits", image_size=32)
    with pytest.raises(ValueError, match=r"'mnist1d' has fixed-length 1-D signals"):
        load_classification_data("mnist1d", image_size=40)


# ---------------------------------------------------------------- mnist1d


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory):
    """Generate MNIST-1D once into a private HOME; record the global RNG draws around it."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        random.seed(7)
        np.random.seed(7)
        data = load_classification_data("mnist1d")
        draws_after = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    draws_expected = (random.random(), np.random.rand())
    return data, home, draws_after, draws_expected


def test_mnist1d_has_its_published_4000_1000_split_of_1x40_signals(mnist1d_run):
    data, _, _, _ = mnist1d_run
    assert data.name == "mnist1d"
    assert (len(data.train), len(data.val)) == (4000, 1000)
    assert data.num_classes == 10 and data.class_names == [str(d) for d in range(10)]
    assert data.input_shape == (1, 40)
    check_items(data.train, (1, 40))
    assert sorted(set(data.val.labels.tolist())) == list(range(10))


def test_mnist1d_is_cached_under_home_and_reused(mnist1d_run, monkeypatch):
    data, home, _, _ = mnist1d_run
    assert (home / ".cache" / "denoiserep" / "mnist1d.npz").is_file()
    assert not list((home / ".cache" / "denoiserep").glob("*.tmp"))  # atomic write left no temp file

    def must_not_generate(args):
        raise AssertionError("cache was not used")

    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(embedded, "_generate_mnist1d", must_not_generate)
    again = load_classification_data("mnist1d")
    assert torch.equal(again.train.inputs, data.train.inputs)
    assert torch.equal(again.val.labels, data.val.labels)


def test_mnist1d_cache_made_with_other_generator_arguments_is_ignored(mnist1d_run):
    _, home, _, _ = mnist1d_run
    cache = home / ".cache" / "denoiserep" / "mnist1d.npz"
    other_args = dict(embedded._mnist1d_generation_args(), seed=43)
    assert embedded._read_mnist1d_cache(cache, other_args) is None
    assert embedded._read_mnist1d_cache(cache, embedded._mnist1d_generation_args()) is not None


def test_mnist1d_generation_leaves_the_global_rngs_untouched(mnist1d_run):
    _, _, draws_after, draws_expected = mnist1d_run
    assert draws_after == draws_expected


# ---------------------------------------------------------------- ImageFolder


def test_imagefolder_loads_train_and_val_with_timm_transforms(tmp_path):
    root = make_imagefolder(tmp_path / "tiny-imagenet")
    data = load_classification_data(f"imagefolder:{root}", image_size=32)
    assert data.name == "tiny-imagenet"
    assert data.class_names == ["cat", "dog", "frog"] and data.num_classes == 3
    assert (len(data.train), len(data.val)) == (9, 6)
    assert data.input_shape == (3, 32, 32)
    check_items(data.train, (3, 32, 32))
    assert sorted(y for _, y in data.val) == [0, 0, 1, 1, 2, 2]


def test_imagefolder_is_autodetected_from_a_bare_path_and_converts_grayscale(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a", "b"))
    write_jpeg(root / "val" / "b" / "gray.jpg", mode="L")
    data = load_classification_data(str(root), image_size=32)
    assert data.class_names == ["a", "b"]
    assert data.val[len(data.val) - 1][0].shape == (3, 32, 32)


def test_imagefolder_defaults_to_224_and_accepts_custom_transforms(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a", "b"), train_per_class=1, val_per_class=1)
    assert load_classification_data(f"imagefolder:{root}").input_shape == (3, 224, 224)

    def to_small(image):
        return PILToTensor()(image.resize((8, 8))).float()

    data = load_classification_data(f"imagefolder:{root}", train_transform=to_small, eval_transform=to_small)
    assert data.input_shape == (3, 8, 8)
    assert data.train[0][0].shape == (3, 8, 8)


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("form", ["folder", "parent", "bare folder", "bare parent"])
def test_cifar10_loads_from_the_extracted_folder_or_its_parent(tmp_path, form):
    folder = make_cifar10(tmp_path)
    spec = {
        "folder": f"cifar10:{folder}",
        "parent": f"cifar10:{tmp_path}",
        "bare folder": str(folder),
        "bare parent": str(tmp_path),
    }[form]
    data = load_classification_data(spec)
    assert data.name == "cifar10"
    assert data.class_names == CIFAR10_NAMES and data.num_classes == 10
    assert (len(data.train), len(data.val)) == (20, 6)
    assert data.input_shape == (3, 32, 32)
    check_items(data.train, (3, 32, 32))
    assert [data.train[i][1] for i in range(4)] == [1, 2, 3, 4]  # data_batch_1 comes first


def test_cifar_rows_are_decoded_in_the_official_chw_order(tmp_path):
    make_cifar10(tmp_path)
    data = load_classification_data(f"cifar10:{tmp_path}", eval_transform=PILToTensor())
    image, label = data.val[3]
    assert label == 3
    assert image.shape == (3, 32, 32)
    assert image[0].unique().tolist() == [3]  # red plane
    assert image[1].unique().tolist() == [103]  # green plane
    assert image[2].unique().tolist() == [203]  # blue plane


def test_cifar_image_size_resizes_the_default_transforms(tmp_path):
    make_cifar10(tmp_path)
    data = load_classification_data(f"cifar10:{tmp_path}", image_size=48)
    assert data.input_shape == (3, 48, 48)
    check_items(data.train, (3, 48, 48))


@pytest.mark.parametrize("form", ["folder", "parent", "bare parent"])
def test_cifar100_uses_the_fine_labels_and_names(tmp_path, form):
    folder = make_cifar100(tmp_path)
    spec = {"folder": f"cifar100:{folder}", "parent": f"cifar100:{tmp_path}", "bare parent": str(tmp_path)}[form]
    data = load_classification_data(spec)
    assert data.name == "cifar100"
    assert data.num_classes == 100 and data.class_names[:2] == ["fine00", "fine01"]
    assert (len(data.train), len(data.val)) == (7, 3)
    assert [y for _, y in data.train] == [(7 * i) % 100 for i in range(7)]
    check_items(data.val, (3, 32, 32))


# ---------------------------------------------------------------- errors


def test_unknown_spec_lists_the_accepted_forms():
    with pytest.raises(ValueError, match=r"unknown dataset spec 'imagenet'.*'digits'.*'mnist1d'.*imagefolder:PATH.*cifar10:PATH"):
        load_classification_data("imagenet")


@pytest.mark.parametrize("prefix", ["imagefolder", "cifar10", "cifar100"])
def test_known_prefix_with_an_empty_path_says_how_to_write_it(prefix):
    with pytest.raises(ValueError, match=rf"empty path; write it as '{prefix}:/path/to/data'"):
        load_classification_data(f"{prefix}:  ")


def test_missing_paths_are_reported_with_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"imagefolder path '.*nope' does not exist"):
        load_classification_data(f"imagefolder:{missing}")
    with pytest.raises(FileNotFoundError, match=r"cifar100 path '.*nope' does not exist"):
        load_classification_data(f"cifar100:{missing}")
    with pytest.raises(FileNotFoundError, match=r"dataset path '.*nope' does not exist"):
        load_classification_data(str(missing))


def test_a_file_instead_of_a_folder_is_rejected(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"is a file, expected a folder"):
        load_classification_data(f"cifar10:{tmp_path / 'data.zip'}")


def test_bare_path_in_no_known_layout_lists_what_it_found(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"could not recognise the dataset layout.*found: images/, notes.txt"):
        load_classification_data(str(tmp_path))


def test_cifar_folder_missing_files_names_them(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"not a cifar10 folder.*'cifar-10-batches-py/' lacks \['data_batch_3'\]"):
        load_classification_data(f"cifar10:{tmp_path}")


def test_cifar10_spec_on_a_cifar100_folder_explains_the_expected_files(tmp_path):
    make_cifar100(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"expected the files \['data_batch_1'.*found: cifar-100-python/"):
        load_classification_data(f"cifar10:{tmp_path}")


def test_cifar_batch_with_wrong_data_shape_is_rejected(tmp_path):
    folder = make_cifar10(tmp_path)
    dump_official(folder / "test_batch", {b"labels": [0], b"data": np.zeros((1, 1024), dtype=np.uint8)})
    with pytest.raises(ValueError, match=r"'data' should be uint8 with shape \(N, 3072\)"):
        load_classification_data(str(folder))


def test_imagefolder_without_val_names_the_expected_layout(tmp_path):
    make_imagefolder(tmp_path)
    for image in (tmp_path / "val").rglob("*.jpg"):
        image.unlink()
    for folder in sorted((tmp_path / "val").rglob("*"), reverse=True):
        folder.rmdir()
    (tmp_path / "val").rmdir()
    (tmp_path / "validation").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected 'val/'.*found: train/, validation/"):
        load_classification_data(f"imagefolder:{tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"not an ImageFolder root"):
        load_classification_data(str(tmp_path))  # autodetection picks ImageFolder from train/


def test_imagefolder_with_differing_class_lists_names_the_classes(tmp_path):
    make_imagefolder(tmp_path, classes=("cat", "dog"))
    write_jpeg(tmp_path / "train" / "emu" / "0.jpg")
    write_jpeg(tmp_path / "val" / "yak" / "0.jpg")
    with pytest.raises(ValueError, match=r"only in train: \['emu'\], only in val: \['yak'\]"):
        load_classification_data(f"imagefolder:{tmp_path}", image_size=32)


def test_imagefolder_with_an_empty_class_folder_names_it(tmp_path):
    make_imagefolder(tmp_path, classes=("cat", "dog"))
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "val" / "emu").mkdir()
    (tmp_path / "val" / "emu" / "readme.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"class folders without images.*\['train/emu', 'val/emu'\]"):
        load_classification_data(f"imagefolder:{tmp_path}", image_size=32)


def test_imagefolder_with_images_but_no_class_folders_says_one_folder_per_class(tmp_path):
    write_jpeg(tmp_path / "train" / "0.jpg")
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no class folders in '.*train'.*one sub-folder per class.*found: 0.jpg"):
        load_classification_data(f"imagefolder:{tmp_path}")


# ---------------------------------------------------------------- unlabeled images


def test_unlabeled_images_are_found_recursively_and_converted(tmp_path):
    write_jpeg(tmp_path / "a" / "x.jpg")
    write_jpeg(tmp_path / "a" / "deep" / "y.JPEG", mode="L")
    Image.new("RGBA", (20, 50), (1, 2, 3, 4)).save(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("not an image")

    rgb = load_unlabeled_images(str(tmp_path), image_size=32, in_chans=3)
    assert len(rgb) == 3
    assert [rgb[i][0].shape for i in range(3)] == [(3, 32, 32)] * 3
    assert {rgb[i][1] for i in range(3)} == {-1}

    gray = load_unlabeled_images(str(tmp_path), image_size=16, in_chans=1)
    x, y = gray[0]
    assert x.dtype == torch.float32 and x.shape == (1, 16, 16) and y == -1


def test_unlabeled_images_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images found under .*\.jpg.*it holds: notes.txt"):
        load_unlabeled_images(str(tmp_path), image_size=32, in_chans=3)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_unlabeled_images(str(tmp_path / "nope"), image_size=32, in_chans=3)
    with pytest.raises(ValueError, match=r"in_chans must be 1 \(grayscale\) or 3 \(RGB\), got 4"):
        load_unlabeled_images(str(tmp_path), image_size=32, in_chans=4)
