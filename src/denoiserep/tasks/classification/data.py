"""Classification datasets behind one string ``spec``.

``load_classification_data(spec)`` understands:

* ``"digits"`` -- scikit-learn's 8x8 handwritten digits, inputs (1, 8, 8);
* ``"mnist1d"`` -- MNIST-1D generated locally, inputs (1, 40);
* ``"imagefolder:PATH"`` -- ImageNet layout, ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``;
* ``"cifar10:PATH"`` / ``"cifar100:PATH"`` -- the official CIFAR python-pickle folders
  (``cifar-10-batches-py`` / ``cifar-100-python``), PATH being that folder or its parent;
* a bare ``PATH`` in either CIFAR layout (checked first) or the ImageFolder layout.

Every dataset item is ``(float tensor, int label)``. Errors raised for bad specs or
bad folders say what was expected, what was found, and how to fix it, because these
are usually the first thing a new user hits.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ...checkpoint import UntrustedFileError
from ...data.embedded import TensorSplits, load_digits_splits, load_mnist1d_splits
from ...data.images import Transform, default_image_transform, existing_directory, list_entries, read_image

ACCEPTED_SPECS = (
    "accepted dataset specs: 'digits'; 'mnist1d'; "
    "'imagefolder:PATH' (PATH/train/<class>/*.jpg and PATH/val/<class>/*.jpg); "
    "'cifar10:PATH' or 'cifar100:PATH' (PATH = the extracted 'cifar-10-batches-py' / "
    "'cifar-100-python' folder or its parent); or a bare PATH in one of those layouts"
)
DEFAULT_IMAGEFOLDER_SIZE = 224
DEFAULT_CIFAR_SIZE = 32
DIGITS_SIZE = 8


@dataclass
class ClassificationData:
    """A train/val pair with the facts a model needs to be built for it."""

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images, (C, L) for 1-D signals
    class_names: list[str]
    name: str


@dataclass(frozen=True)
class CifarLayout:
    """Where the official CIFAR archives put their files and which pickle keys they use."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    class_names_key: str

    @property
    def required_files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        name="cifar10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        class_names_key="label_names",
    ),
    "cifar100": CifarLayout(
        name="cifar100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        class_names_key="fine_label_names",
    ),
}


class TensorClassificationDataset(Dataset):
    """In-memory inputs with int labels (``TensorDataset`` would yield 0-d label tensors)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, transform: Transform | None = None):
        self.inputs = inputs
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.inputs[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])


class CifarDataset(Dataset):
    """CIFAR images held as uint8 HWC arrays, handed to the transform as PIL images."""

    def __init__(self, images: np.ndarray, labels: list[int], transform: Transform):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def load_classification_data(
    spec: str,
    *,
    image_size: int | None = None,
    train_transform: Transform | None = None,
    eval_transform: Transform | None = None,
) -> ClassificationData:
    """Resolve ``spec`` (see the module docstring) into a :class:`ClassificationData`.

    ``image_size`` and the default timm transforms apply to image-file datasets
    (default 224 for ImageFolder, 32 for CIFAR); a transform passed in replaces the
    default for its split. For ``digits``/``mnist1d`` transforms receive the input
    tensor, and ``image_size`` must be left out (or be 8 for digits) because those
    inputs have a fixed size.
    """
    spec = spec.strip()
    if spec == "digits":
        _check_fixed_size("digits", image_size, allowed=DIGITS_SIZE)
        return _from_tensor_splits("digits", load_digits_splits(), train_transform, eval_transform)
    if spec == "mnist1d":
        _check_fixed_size("mnist1d", image_size, allowed=None)
        return _from_tensor_splits("mnist1d", load_mnist1d_splits(), train_transform, eval_transform)

    prefix, separator, rest = spec.partition(":")
    if separator and prefix in ("imagefolder", *CIFAR_LAYOUTS):
        if not rest.strip():
            raise ValueError(f"dataset spec '{spec}' has an empty path; write it as '{prefix}:/path/to/data'")
        root = existing_directory(rest, prefix)
        if prefix == "imagefolder":
            return _load_imagefolder(root, image_size, train_transform, eval_transform)
        layout = CIFAR_LAYOUTS[prefix]
        folder = _find_cifar_folder(root, layout)
        if folder is None:
            raise FileNotFoundError(_cifar_layout_mismatch(root, layout))
        return _load_cifar(folder, layout, image_size, train_transform, eval_transform)

    path = Path(spec).expanduser()
    if path.exists():
        root = existing_directory(spec, "dataset")
        return _load_autodetected(root, image_size, train_transform, eval_transform)
    if os.sep in spec or spec.startswith(("~", ".")):
        raise FileNotFoundError(f"dataset path '{spec}' does not exist; check the path ({ACCEPTED_SPECS})")
    raise ValueError(
        f"unknown dataset spec '{spec}': it is not a named dataset nor an existing path; {ACCEPTED_SPECS}"
    )


def _from_tensor_splits(
    name: str, splits: TensorSplits, train_transform: Transform | None, eval_transform: Transform | None
) -> ClassificationData:
    """Wrap in-memory splits; the transforms, if any, are applied per item."""
    train = TensorClassificationDataset(splits.train_x, splits.train_y, train_transform)
    val = TensorClassificationDataset(splits.val_x, splits.val_y, eval_transform)
    return _assemble(name, train, val, splits.class_names)


def _assemble(name: str, train: Dataset, val: Dataset, class_names: list[str]) -> ClassificationData:
    """Build the container; ``input_shape`` is read off a real val item so that custom
    transforms (which may change the size) can never make it lie."""
    return ClassificationData(
        train=train,
        val=val,
        num_classes=len(class_names),
        input_shape=tuple(val[0][0].shape),
        class_names=list(class_names),
        name=name,
    )


def _check_fixed_size(name: str, image_size: int | None, allowed: int | None) -> None:
    """Reject an ``image_size`` the dataset cannot honour instead of silently ignoring it."""
    if image_size is None or image_size == allowed:
        return
    native = f"{allowed}x{allowed} images" if allowed else "fixed-length 1-D signals"
    raise ValueError(
        f"'{name}' has {native}, so image_size={image_size} cannot be applied; "
        "leave image_size unset (resize inside train_transform/eval_transform if you need to)"
    )


def _load_autodetected(
    root: Path, image_size: int | None, train_transform: Transform | None, eval_transform: Transform | None
) -> ClassificationData:
    """Bare path: CIFAR layouts first (they are unambiguous file names), then ImageFolder
    (a 'train/' or 'val/' folder is enough to pick it, so its checks explain what is off)."""
    for layout in CIFAR_LAYOUTS.values():
        folder = _find_cifar_folder(root, layout)
        if folder is not None:
            return _load_cifar(folder, layout, image_size, train_transform, eval_transform)
    if (root / "train").is_dir() or (root / "val").is_dir():
        return _load_imagefolder(root, image_size, train_transform, eval_transform)
    raise ValueError(
        f"could not recognise the dataset layout of '{root}': expected a CIFAR folder "
        f"('{CIFAR_LAYOUTS['cifar10'].folder}' or '{CIFAR_LAYOUTS['cifar100'].folder}', or their parent) "
        f"or an ImageFolder root with 'train/' and 'val/'; found: {list_entries(root)}. {ACCEPTED_SPECS}"
    )


# ---------------------------------------------------------------- ImageFolder


def _load_imagefolder(
    root: Path, image_size: int | None, train_transform: Transform | None, eval_transform: Transform | None
) -> ClassificationData:
    """ImageNet-style folders through torchvision's ImageFolder, after checking the layout
    ourselves: ImageFolder numbers classes per split, so differing class lists would
    silently misalign train and val labels."""
    class_names = _check_imagefolder_layout(root)
    size = image_size or DEFAULT_IMAGEFOLDER_SIZE
    train_tf, eval_tf = _image_transforms(size, train_transform, eval_transform)
    train = ImageFolder(str(root / "train"), transform=train_tf, loader=read_image)
    val = ImageFolder(str(root / "val"), transform=eval_tf, loader=read_image)
    return _assemble(root.name, train, val, class_names)


def _check_imagefolder_layout(root: Path) -> list[str]:
    """Sorted class names, after checking train/ and val/ exist, agree, and hold images."""
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"'{root}' is not an ImageFolder root: expected '{split}/' next to "
                f"{'val/' if split == 'train' else 'train/'} (layout PATH/train/<class>/*.jpg, "
                f"PATH/val/<class>/*.jpg); found: {list_entries(root)}"
            )
    train_classes = _class_folders(root / "train")
    val_classes = _class_folders(root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ValueError(
            f"train and val class folders differ in '{root}': only in train: {only_train}, "
            f"only in val: {only_val}; give both splits the same class folders (an empty class "
            "is not allowed either), otherwise label indices would not match"
        )
    empty = [f"{split}/{name}" for split in ("train", "val") for name in train_classes
             if not _has_image(root / split / name)]
    if empty:
        raise FileNotFoundError(
            f"class folders without images in '{root}': {empty}; add images "
            f"({', '.join(IMG_EXTENSIONS)}) to them or remove the class from both splits"
        )
    return train_classes


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted sub-folder names (torchvision's class order); an error if there are none."""
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"no class folders in '{split_dir}': expected one sub-folder per class holding its images "
            f"(e.g. {split_dir}/<class>/img.jpg); found: {list_entries(split_dir)}"
        )
    return classes


def _has_image(folder: Path) -> bool:
    """Whether ImageFolder would find at least one image (it also searches recursively)."""
    return any(p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS) for p in folder.rglob("*"))


# ---------------------------------------------------------------- CIFAR


def _find_cifar_folder(path: Path, layout: CifarLayout) -> Path | None:
    """The folder holding all of ``layout``'s files: ``path`` itself or ``path/<layout.folder>``."""
    for candidate in (path, path / layout.folder):
        if all((candidate / name).is_file() for name in layout.required_files):
            return candidate
    return None


def _cifar_layout_mismatch(root: Path, layout: CifarLayout) -> str:
    """Say which files a CIFAR folder needs and what ``root`` (and its CIFAR sub-folder) hold."""
    message = (
        f"'{root}' is not a {layout.name} folder: expected the files {list(layout.required_files)} "
        f"in it or in its '{layout.folder}/' sub-folder (as extracted from the official python archive); "
        f"found: {list_entries(root)}"
    )
    subfolder = root / layout.folder
    if subfolder.is_dir():
        missing = [name for name in layout.required_files if not (subfolder / name).is_file()]
        message += f"; '{layout.folder}/' lacks {missing}"
    return message + ". Re-extract the official archive there."


def _load_cifar(
    folder: Path,
    layout: CifarLayout,
    image_size: int | None,
    train_transform: Transform | None,
    eval_transform: Transform | None,
) -> ClassificationData:
    """CIFAR read with our own pickle reader: torchvision's CIFAR classes insist on the
    official md5 sums, which rejects any re-packed or test copy of the same format."""
    size = image_size or DEFAULT_CIFAR_SIZE
    train_images, train_labels = _read_cifar_batches(folder, layout.train_files, layout.label_key)
    val_images, val_labels = _read_cifar_batches(folder, layout.test_files, layout.label_key)
    meta = _read_cifar_pickle(folder / layout.meta_file)
    class_names = [_as_text(name) for name in meta[layout.class_names_key]]
    train_tf, eval_tf = _image_transforms(size, train_transform, eval_transform)
    train = CifarDataset(train_images, train_labels, train_tf)
    val = CifarDataset(val_images, val_labels, eval_tf)
    return _assemble(layout.name, train, val, class_names)


def _read_cifar_batches(folder: Path, files: tuple[str, ...], label_key: str) -> tuple[np.ndarray, list[int]]:
    """Concatenate batch files into uint8 (N, 32, 32, 3) images and their labels.

    The official rows are 3,072 bytes in CHW order (1,024 red, then green, then blue),
    hence the reshape to (N, 3, 32, 32) followed by a transpose to HWC for PIL.
    """
    images, labels = [], []
    for name in files:
        batch = _read_cifar_pickle(folder / name)
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"'{folder / name}' is not a CIFAR batch: 'data' should be uint8 with shape (N, 3072), "
                f"got {data.dtype} {data.shape}; re-extract the official archive"
            )
        if len(batch[label_key]) != len(data):
            raise ValueError(
                f"'{folder / name}' has {len(data)} images but {len(batch[label_key])} '{label_key}'; "
                "the file is corrupt, re-extract the official archive"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(label) for label in batch[label_key])
    return np.ascontiguousarray(np.concatenate(images)), labels


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch is made of (dicts, lists, bytes, numbers and NumPy arrays):
    a pickle is a program, and a file in a user's folder must not be able to run one."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # protocol-2 bytes written by Python 3
    }

    def __init__(self, handle, path: Path):
        super().__init__(handle, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise UntrustedFileError(
                f"refusing to read '{self.path}': it references {module}.{name}, which a CIFAR batch never "
                "contains, and unpickling it could run code. Use the files of the official archive."
            )
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    """Load one official CIFAR pickle (Python-2 era, bytes keys) with str keys.

    ``encoding="bytes"`` is what the CIFAR page prescribes for Python 3; keys are then
    decoded so that str-keyed re-pickles of the same data work too. Only the types a CIFAR
    batch holds are unpickled (`_CifarUnpickler`).
    """
    with open(path, "rb") as handle:
        try:
            content = _CifarUnpickler(handle, path).load()
        except (pickle.UnpicklingError, EOFError) as error:
            raise ValueError(f"'{path}' is not a readable CIFAR pickle ({error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"'{path}' is not a CIFAR pickle (expected a dict, got {type(content).__name__})")
    return {_as_text(key): value for key, value in content.items()}


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


# ---------------------------------------------------------------- shared helpers


def _image_transforms(
    image_size: int, train_transform: Transform | None, eval_transform: Transform | None
) -> tuple[Transform, Transform]:
    """The caller's transforms where given, timm's defaults at ``image_size`` otherwise."""
    return (
        train_transform or default_image_transform(image_size, is_training=True),
        eval_transform or default_image_transform(image_size, is_training=False),
    )
