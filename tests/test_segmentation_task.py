"""The segmentation task: every data layout (tiny generated fixtures), its bad input, the model
families, DenoiseRep⁻, sliding windows, and short training runs that fuse exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import denoiserep as dr
from denoiserep.cli import main
from denoiserep.tasks.segmentation.data import IGNORE_INDEX, load_segmentation_data
from denoiserep.tasks.segmentation.models import build_segmentation_model
from denoiserep.tasks.segmentation.task import SegmentationTask, _slide
from denoiserep.train.config import TrainConfig

SIZE = (32, 40)  # H, W of every fixture image (SegFormer needs ≥ 32: its first stage reduces by 8 × 4)


def write_pair(image_path, mask_path, labels: np.ndarray, palette: bool = False, seed: int = 0):
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*labels.shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path)
    mask = Image.fromarray(labels.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        mask.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    mask.save(mask_path)


def stripes(num_classes: int, seed: int, first: int = 0) -> np.ndarray:
    """A mask of horizontal bands of classes first … num_classes − 1 (plus an ignored corner)."""
    rows = np.arange(SIZE[0])[:, None].repeat(SIZE[1], 1)
    labels = first + (rows * (num_classes - first) // SIZE[0] + seed) % (num_classes - first)
    labels[:2, :2] = IGNORE_INDEX
    return labels


def ade20k(root, count=4):
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(count):
            labels = stripes(151, i, first=0)  # 0 = "other", ignored after reduce_zero_label
            labels[labels == IGNORE_INDEX] = 0
            write_pair(base / "images" / split / f"ADE_{split}_{i:08d}.jpg",
                       base / "annotations" / split / f"ADE_{split}_{i:08d}.png", labels, seed=i)
    return root


def cityscapes(root, count=4):
    for split in ("train", "val"):
        for i in range(count):
            stem = f"aachen_{i:06d}_000019"
            write_pair(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png",
                       root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelTrainIds.png", stripes(19, i), seed=i)
    return root


def voc(root, count=4):
    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train", "val"):
        names = [f"2007_{split}{i:04d}" for i in range(count)]
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for i, name in enumerate(names):
            write_pair(base / "JPEGImages" / f"{name}.jpg", base / "SegmentationClass" / f"{name}.png",
                       stripes(21, i), palette=True, seed=i)
    return root


def folder(root, count=4, classes=("sky", "sea", "sand")):
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for split in ("train", "val"):
        for i in range(count):
            write_pair(root / "images" / split / f"{i}.jpg", root / "masks" / split / f"{i}.png",
                       stripes(len(classes), i), seed=i)
    return root


LAYOUTS = {"ade20k": (ade20k, 150), "cityscapes": (cityscapes, 19), "voc": (voc, 21), "folder": (folder, 3)}


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_every_layout_reads_into_images_and_masks_with_its_classes(tmp_path, kind):
    make, num_classes = LAYOUTS[kind]
    data = load_segmentation_data(f"{kind}:{make(tmp_path / kind)}", crop_size=16)
    assert data.num_classes == num_classes and len(data.train) == len(data.val) == 4
    image, mask = data.val[1]
    assert image.shape == (3, *SIZE) and image.dtype == torch.float32 and mask.shape == SIZE
    assert mask.dtype == torch.int64 and mask[0, 0] == IGNORE_INDEX
    labelled = mask[mask != IGNORE_INDEX]
    assert labelled.min() >= 0 and labelled.max() < num_classes
    crop_image, crop_mask = data.train[0]
    assert crop_image.shape == (3, 16, 16) and crop_mask.shape == (16, 16)


def test_ade20k_ignores_label_zero_and_shifts_the_others_down(tmp_path):
    root = ade20k(tmp_path / "ade")
    data = load_segmentation_data(f"ade20k:{root}")
    raw = np.asarray(Image.open(sorted((root / "ADEChallengeData2016/annotations/validation").iterdir())[0]))
    _, mask = data.val[0]
    assert torch.equal(mask, torch.from_numpy(np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int64) - 1)))


def test_the_training_crop_pads_small_images_with_the_ignore_index(tmp_path):
    data = load_segmentation_data(f"folder:{folder(tmp_path / 'f')}", crop_size=2048)
    torch.manual_seed(0)
    _, mask = data.train[0]
    assert mask.shape == (2048, 2048) and (mask == IGNORE_INDEX).float().mean() > 0.5


@pytest.mark.parametrize("breakage, message", [
    ("mask_size", "every mask must match its image"),
    ("labels", r"holds label values \[7\]"),
    ("missing", "has no annotation"),
    ("empty", "split has no images"),
    ("corrupt", "cannot read image"),
    ("negative", r"holds label values \[-1\]"),
])
def test_bad_files_name_the_file_and_the_fix(tmp_path, breakage, message):
    root = folder(tmp_path / "f")
    val_image, val_mask = root / "images" / "val" / "0.jpg", root / "masks" / "val" / "0.png"
    if breakage == "mask_size":
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(val_mask)
    elif breakage == "labels":
        Image.fromarray(np.full(SIZE, 7, np.uint8)).save(val_mask)
    elif breakage == "missing":
        val_mask.unlink()
    elif breakage == "empty":
        for path in (root / "images" / "val").iterdir():
            path.unlink()
    elif breakage == "corrupt":
        val_image.write_bytes(b"not a jpeg")
    elif breakage == "negative":  # a 32-bit grey-level mask ("I", here a TIFF named .png) can hold negatives
        Image.fromarray(np.full(SIZE, -1, np.int32), mode="I").save(val_mask, format="TIFF")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data = load_segmentation_data(f"folder:{root}")
        data.val[0]


def test_nested_images_get_the_mask_at_their_own_relative_path_and_a_shared_mask_is_an_error(tmp_path):
    root = folder(tmp_path / "f")
    for sub, value in (("a", 0), ("b", 2)):
        write_pair(root / "images" / "val" / sub / "0.jpg", root / "masks" / "val" / sub / "0.png",
                   np.full(SIZE, value), seed=value)
    data = load_segmentation_data(f"folder:{root}")
    masks = {pair[0].relative_to(root).as_posix(): pair[1].relative_to(root).as_posix() for pair in data.val.pairs}
    assert masks["images/val/a/0.jpg"] == "masks/val/a/0.png" and masks["images/val/b/0.jpg"] == "masks/val/b/0.png"
    assert {int(data.val[i][1].unique()[0]) for i in range(len(data.val)) if data.val[i][1].unique().numel() == 1} \
        == {0, 2}
    write_pair(root / "images" / "val" / "0.png", root / "masks" / "val" / "unused.png", stripes(3, 0))  # 0.jpg's mask
    with pytest.raises(ValueError, match=r"images .*val/0.jpg and .*val/0.png would share one annotation"):
        load_segmentation_data(f"folder:{root}")


def test_extra_and_denoise_data_feed_their_loaders_and_skip_bad_images_replaces_unreadable_ones(tmp_path, caplog):
    from test_detection_data import write_image

    from denoiserep.train.distributed import DistInfo

    root = folder(tmp_path / "f")
    for i, (height, width) in enumerate([(40, 56), (56, 40), (48, 48)]):
        write_image(tmp_path / "unlabeled" / "sub" / f"{i}.png", height, width, seed=i)
    (root / "images" / "train" / "1.jpg").write_bytes(b"not a jpeg")
    cfg = TrainConfig(task="segmentation", data=f"folder:{root}", model="fcn:resnet18", crop_size=16, batch_size=2,
                      extra_data=[str(tmp_path / "unlabeled")], denoise_data=str(tmp_path / "unlabeled"),
                      label_free=True, skip_bad_images=True)
    task = SegmentationTask(cfg)
    images, ignored = next(iter(task.extra_loader(DistInfo(), seed=0, epoch=0)))
    assert images.shape == (2, 3, 16, 16) and ignored.tolist() == [-1, -1]
    denoise_batches = list(task.train_loader(DistInfo(), seed=0, epoch=0, for_denoisers=True))
    assert len(denoise_batches) == 1 and denoise_batches[0][1].tolist() == [-1, -1]  # 3 images, batches of 2
    with caplog.at_level("WARNING"):
        train_batches = list(task.train_loader(DistInfo(), seed=0, epoch=0))
    assert len(train_batches) == 2 and "skipped an unreadable image" in caplog.text and "1.jpg" in caplog.text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegmentationTask(TrainConfig(task="segmentation", data=cfg.data, extra_data=[str(tmp_path / "nowhere")]))
    with pytest.raises(ValueError, match="embedded tensors with their own normalisation"):
        SegmentationTask(TrainConfig(task="segmentation", data="digit-scenes", label_free=True,
                                     denoise_data=str(tmp_path / "unlabeled")))


def test_a_slide_stride_larger_than_the_window_is_refused_before_it_leaves_pixels_without_logits(tmp_path):
    data = f"folder:{folder(tmp_path / 'f')}"
    with pytest.raises(ValueError, match="--slide-stride 24 is larger than the sliding window"):
        SegmentationTask(TrainConfig(task="segmentation", data=data, crop_size=16, slide_stride=24))
    with pytest.raises(ValueError, match="leaves pixels between windows of 16 uncovered"):
        _slide(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 50, 37), crop=16, stride=24, num_classes=4)


def test_a_batch_without_labelled_pixels_adds_no_task_loss_instead_of_nan(tmp_path, caplog):
    task = SegmentationTask(TrainConfig(task="segmentation", data=f"folder:{folder(tmp_path / 'f')}",
                                        model="fcn_resnet50", model_kwargs={"aux_loss": True}))
    model = task.build_model().train()
    images = torch.randn(2, 3, *SIZE)  # (two images: BatchNorm trains on the batch)
    with caplog.at_level("WARNING"):
        loss, parts = task.training_loss(model, (images, torch.full((2, *SIZE), IGNORE_INDEX)))
    assert loss.item() == 0.0 and parts == {"loss_main": 0.0, "loss_aux": 0.0}
    assert all(isinstance(value, torch.Tensor) for value in parts.values())  # summed on the device, read rarely
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert "a training batch has no labelled pixel" in caplog.text
    labelled, _ = task.training_loss(model, (images, torch.zeros((2, *SIZE), dtype=torch.int64)))
    assert torch.isfinite(labelled) and labelled > 0


def test_unknown_specs_and_models_list_what_exists(tmp_path):
    with pytest.raises(ValueError, match="digit-scenes \\| ade20k:PATH"):
        load_segmentation_data("coco:/data")
    with pytest.raises(ValueError, match="fcn_resnet50.*segformer_mit_b0"):
        build_segmentation_model("unet", 3)


# -- models ------------------------------------------------------------------------------------------


FAMILIES = {
    "fcn_resnet50": {"aux_loss": True},
    "lraspp_mobilenet_v3_large": {},
    "segformer_mit_b0": {},
    "fcn:resnet18": {},
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_gives_input_resolution_logits_and_takes_a_denoise_minus_head(name):
    torch.manual_seed(0)
    model = build_segmentation_model(name, 5, **FAMILIES[name])
    x = torch.randn(2, 3, 32, 40)
    model.train()
    outputs = model(x)
    assert outputs["out"].shape == (2, 5, 32, 40)
    assert ("aux" in outputs) == bool(FAMILIES[name].get("aux_loss"))
    model.eval()
    with torch.no_grad():
        plain = model(x)
    before = sum(p.numel() for p in model.parameters())
    head = dr.DenoiseHead(SegmentationTask.feature_dim(model), steps=2)
    SegmentationTask.wrap_with_head(model, head)
    assert sum(p.numel() for p in model.parameters()) == before + sum(p.numel() for p in head.parameters())
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    with torch.no_grad():
        headed = model(x)
    assert calls and calls[0][-1] == SegmentationTask.feature_dim(model)  # per pixel of the encoder's map
    assert headed.shape == plain.shape and not torch.equal(headed, plain)


def test_a_checkpoint_of_the_bare_network_loads_into_the_wrapper(tmp_path):
    from denoiserep.checkpoint import load_state_dict_checked

    source = build_segmentation_model("fcn:resnet18", 4)
    target = build_segmentation_model("fcn:resnet18", 4)
    load_state_dict_checked(target, source.net.state_dict(), "bare.pth")  # e.g. torchvision's or HF's keys
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    ddp = {f"module.{key}": value for key, value in source.state_dict().items()}  # saved from a DDP wrapper
    load_state_dict_checked(build_segmentation_model("fcn:resnet18", 4), ddp, "ddp.pth")


def test_sliding_windows_cover_the_image_and_equal_the_whole_image_for_a_pointwise_model():
    model = nn.Conv2d(3, 4, 1).eval()
    x = torch.randn(1, 3, 50, 37)
    with torch.no_grad():
        torch.testing.assert_close(_slide(model, x, crop=16, stride=11, num_classes=4), model(x))
        torch.testing.assert_close(_slide(model, x, crop=64, stride=32, num_classes=4), model(x))


# -- short runs: train, convert, calibrate, fuse --------------------------------------------------------


@pytest.mark.parametrize("name, scope", [("fcn_resnet50", "backbone"), ("segformer_mit_b0", "all")])
def test_two_iterations_of_training_then_denoise_and_fuse_with_identical_argmax_maps(tmp_path, name, scope):
    root = folder(tmp_path / "data")
    args = ["train", "--task", "segmentation", "--data", f"folder:{root}", "--model", name, "--epochs", "1",
            "--extra-epochs", "1", "--batch-size", "2", "--crop-size", "32", "--warmup-epochs", "0",
            "--convert-scope", scope, "--output", str(tmp_path / "runs"), "--stage", "baseline", "denoise",
            "--lambda", "0.5"]
    assert main(args) == 0
    result = json.loads((tmp_path / "runs" / "run" / "denoiserep" / "result.json").read_text())
    assert len(result["history"]) == 1 and result["extra"]["pixel_changes"] == 0
    assert set(result["metrics"]) == {"mIoU", "aAcc", "mAcc", "mBIoU"}
    calibration = result["extra"]["noise_loss"]["calibration"]  # on training crops it did not fit
    assert calibration["l2_optimum"] <= calibration["l2_after"] < calibration["l2_before"]


def test_the_convert_scope_chooses_the_encoder_or_everything(tmp_path):
    cfg = TrainConfig(task="segmentation", data=f"folder:{folder(tmp_path / 'f')}", model="fcn:resnet18")
    task = SegmentationTask(cfg)
    model = task.build_model()
    assert task.conversion_root(model) is model.encoder
    with pytest.raises(ValueError, match="--convert-scope 'neck' is not available for the segmentation task"):
        SegmentationTask(TrainConfig(task="segmentation", data=cfg.data, convert_scope="neck"))
