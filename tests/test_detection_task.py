"""The detection task: every model family trains for two iterations, is denoised, calibrated and fused
with the same detections; DenoiseRep⁻ in each family's slot; the convert scopes; label-free steps
that stop at the backbone; torchvision checkpoints through --init; and the distributed evaluation."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, gloo_group
from test_detection_data import coco, voc

import denoiserep as dr
from denoiserep.cli import main
from denoiserep.convert import denoise_loss, layer_denoisers, noise_loss_only
from denoiserep.tasks.detection.models import (
    TimmBackboneWithFPN,
    build_detection_model,
    parse_model_name,
)
from denoiserep.tasks.detection.task import DetectionTask
from denoiserep.train.config import TrainConfig
from denoiserep.train.distributed import DistInfo
from denoiserep.train.stages import StageResult, load_init_weights

# Tiny members of every family: timm's 1 M-parameter test ResNet, narrow FPNs and heads.
SMALL = {"min_size": 64, "max_size": 64, "fpn_channels": 16}
FAMILIES = {
    "fasterrcnn_test_resnet": {**SMALL, "representation_size": 32},
    "maskrcnn_test_resnet": {**SMALL, "representation_size": 32, "mask_channels": 16, "box_detections_per_img": 10},
    "retinanet_test_resnet": SMALL,
    "fcos_test_resnet": {**SMALL, "fpn_channels": 32},  # its head's GroupNorm has 32 groups
    "detr_test_resnet": {"min_size": 64, "max_size": 64, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                      "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "encoder_attention_heads": 2,
                      "decoder_attention_heads": 2, "num_queries": 8},
}


def images(count=2):
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, 48 + 16 * i, 64, generator=generator) for i in range(count)]


# -- two iterations of every family through the CLI: train, convert, calibrate, train, fuse -------------


@pytest.mark.parametrize("name, scope", [("fasterrcnn_test_resnet", "backbone"), ("maskrcnn_test_resnet", "all"),
                                         ("retinanet_test_resnet", "backbone+neck"), ("fcos_test_resnet", "backbone"),
                                         ("detr_test_resnet", "backbone")])
def test_two_iterations_then_denoise_calibrate_and_fuse_with_the_same_detections(tmp_path, name, scope):
    root = coco(tmp_path / "coco")
    args = ["train", "--task", "detection", "--data", f"coco:{root}", "--model", name,
            "--model-kwargs", json.dumps(FAMILIES[name]), "--epochs", "1", "--extra-epochs", "1",
            "--batch-size", "2", "--eval-batch-size", "2", "--warmup-epochs", "0", "--convert-scope", scope,
            "--output", str(tmp_path / "runs"), "--stage", "baseline", "denoise", "--lambda", "0.5"]
    assert main(args) == 0
    run = tmp_path / "runs" / "run"
    baseline = json.loads((run / "baseline" / "result.json").read_text())
    assert len(baseline["history"]) == 1 and baseline["history"][0]["loss"] > 0  # 4 images / batch 2: 2 steps
    keys = {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert keys <= set(baseline["metrics"])
    assert ({f"segm_{k}" for k in keys} <= set(baseline["metrics"])) == name.startswith("maskrcnn")
    result = json.loads((run / "denoiserep" / "result.json").read_text())
    assert len(result["history"]) == 1 and result["history"][0]["denoise_loss"] > 0
    extra = result["extra"]
    assert extra["compared_images"] == 4 and extra["fuse_max_relative_error"] < 1e-4
    # Fused == unfused: the same detections (no flip happened on these images), hence the same AP.
    assert extra["detection_images_differ"] == 0 and extra["fused_ap"] == extra["unfused_ap"]
    calibration = extra["noise_loss"]["calibration"]  # the closed form ran on detection batches
    assert calibration["l2_optimum"] <= calibration["l2_after"] < calibration["l2_before"]
    # The fused weights are the plain detector's: they load into a freshly built one.
    cfg = TrainConfig.from_yaml(run / "config.yaml")
    dr.load_fused(DetectionTask(cfg).build_model(), run / "denoiserep" / "model.safetensors")


def test_label_free_training_on_voc_runs_only_the_backbone(tmp_path):
    root = voc(tmp_path / "voc")
    args = ["train", "--task", "detection", "--data", f"voc:{root}", "--model", "fcos_test_resnet",
            "--model-kwargs", json.dumps(FAMILIES["fcos_test_resnet"]), "--epochs", "1", "--extra-epochs", "1", "--batch-size", "2",
            "--warmup-epochs", "0", "--output", str(tmp_path / "runs"), "--stage", "baseline", "denoise",
            "--label-free", "--denoise-init", "identity"]
    assert main(args) == 0
    result = json.loads((tmp_path / "runs" / "run" / "denoiserep-label-free" / "result.json").read_text())
    assert result["history"][0]["task_loss"] == 0 and result["history"][0]["denoise_loss"] > 0
    assert result["extra"]["detection_images_differ"] == 0


def test_the_training_loss_parts_stay_on_the_device(tmp_path):
    # The loop sums them there and reads them every few steps: a float per part would wait for the device.
    cfg = TrainConfig(task="detection", data=f"coco:{coco(tmp_path / 'coco')}", model="fcos_test_resnet",
                      model_kwargs=FAMILIES["fcos_test_resnet"], batch_size=2)
    task = DetectionTask(cfg)
    model = task.build_model().train()
    loss, parts = task.training_loss(model, next(iter(task.train_loader(DistInfo(), seed=0, epoch=0))))
    assert parts and all(isinstance(value, torch.Tensor) and not value.requires_grad for value in parts.values())
    torch.testing.assert_close(sum(value.float() for value in parts.values()), loss.detach())


@pytest.mark.parametrize("scope, stops_before", [("backbone", "fpn"), ("backbone+neck", "head"), ("all", None)])
def test_label_free_forwards_go_as_far_as_the_converted_layers(tmp_path, scope, stops_before):
    cfg = TrainConfig(task="detection", data=f"coco:{coco(tmp_path / 'coco')}", model="fcos_test_resnet",
                      model_kwargs=FAMILIES["fcos_test_resnet"], convert_scope=scope)
    task = DetectionTask(cfg)
    model = task.build_model()
    dr.convert(task.conversion_root(model), example_inputs=task.conversion_inputs(model, torch.device("cpu")))
    dr.set_trainable(model, denoisers=True, backbone=False)
    ran = set()
    for part, module in (("fpn", model.net.backbone.fpn), ("head", model.net.head)):
        module.register_forward_hook(lambda *args, part=part: ran.add(part))
    model.train()
    with noise_loss_only(model):  # as the engine runs label-free steps
        task.noise_forward(model, images())
    loss = denoise_loss(model)
    loss.backward()
    assert loss > 0 and stops_before not in ran
    denoisers = {id(p) for p in dr.denoiser_parameters(model)}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dr.denoiser_parameters(model))
    assert all(p.grad is None for p in model.parameters() if id(p) not in denoisers)


def test_the_convert_scope_chooses_backbone_backbone_and_fpn_or_everything(tmp_path):
    data = f"coco:{coco(tmp_path / 'coco')}"
    roots = {}
    for scope in ("backbone", "backbone+neck", "all"):
        task = DetectionTask(TrainConfig(task="detection", data=data, model="fasterrcnn_test_resnet",
                                         model_kwargs=FAMILIES["fasterrcnn_test_resnet"], convert_scope=scope))
        model = task.build_model()
        roots[scope] = task.conversion_root(model)
        dr.convert(roots[scope], example_inputs=task.conversion_inputs(model, torch.device("cpu")))
        converted = [name for name, *_ in layer_denoisers(model)]
        if scope == "backbone":
            assert roots[scope] is model.backbone and all(n.startswith("net.backbone.body.") for n in converted)
        elif scope == "backbone+neck":
            assert isinstance(roots[scope], TimmBackboneWithFPN)
            assert any(".fpn." in n for n in converted) and not any("rpn" in n for n in converted)
        else:
            assert any("roi_heads.box_head" in n for n in converted) and any("rpn.head" in n for n in converted)
    with pytest.raises(ValueError, match="DETR has no FPN neck"):
        DetectionTask(TrainConfig(task="detection", data=data, model="detr_test_resnet", convert_scope="backbone+neck"))
    with pytest.raises(ValueError, match="--convert-scope 'neck' is not available for the detection task"):
        DetectionTask(TrainConfig(task="detection", data=data, model="fcos_test_resnet", convert_scope="neck"))


# -- models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_detects_in_input_pixels_and_takes_a_denoise_minus_head_in_its_slot(name):
    torch.manual_seed(0)
    # One-stage heads start at a 1 % prior (focal loss): keep their low scores, so detections exist.
    low_scores = {"score_thresh": 0.001} if name.startswith(("retinanet", "fcos")) else {}
    model = build_detection_model(name, 3, **FAMILIES[name], **low_scores).eval()
    inputs = images()
    with torch.no_grad():
        plain = model(inputs)
    assert len(plain) == 2 and {"boxes", "scores", "labels"} <= set(plain[0])
    assert ("masks" in plain[0]) == name.startswith("maskrcnn")
    for out, image in zip(plain, inputs):
        if len(out["boxes"]):
            assert out["boxes"][:, 2].max() <= image.shape[-1] and out["boxes"][:, 3].max() <= image.shape[-2]
            assert out["labels"].min() >= 1 and out["labels"].max() <= 3  # 0 is the background
    head = dr.DenoiseHead(DetectionTask.feature_dim(model), steps=2)
    DetectionTask.wrap_with_head(model, head)
    rows = []
    head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    with torch.no_grad():
        headed = model(inputs)
    assert rows and all(shape[-1] == DetectionTask.feature_dim(model) for shape in rows)
    expected_rows = {"fasterrcnn": None, "maskrcnn": None, "detr": 2 * 8}.get(parse_model_name(name)[0], "levels")
    if expected_rows == "levels":  # one-stage: every location of the five FPN levels
        assert len(rows) == 5
    elif expected_rows is not None:  # DETR: every query of every image
        assert rows[0][0] == expected_rows
    else:  # two-stage: every RoI
        assert len(rows) == 1 and rows[0][0] > 0
    assert any(not torch.equal(a["scores"], b["scores"]) for a, b in zip(plain, headed)
               if len(a["scores"]) == len(b["scores"])) or [len(a["scores"]) for a in plain] != \
        [len(b["scores"]) for b in headed]


def test_swin_features_are_nhwc_and_reach_the_fpn_as_nchw():
    model = build_detection_model("maskrcnn_swinv2_tiny_window8_256", 2, min_size=64, max_size=96).eval()
    assert model.net.backbone.channels_last
    with torch.no_grad():
        features = model(images(), upto="neck")
    assert [tuple(f.shape[:2]) for f in features.values()] == [(2, 256)] * 5
    assert [f.shape[-1] for f in features.values()] == [24, 12, 6, 3, 2]  # 96-px batch: strides 4 … 32, pool


def test_names_and_options_are_checked_with_what_exists():
    assert parse_model_name("fasterrcnn_resnet50_fpn") == ("fasterrcnn", "resnet50")
    assert parse_model_name("maskrcnn_swinv2_tiny_window8_256") == ("maskrcnn", "swinv2_tiny_window8_256")
    with pytest.raises(ValueError, match="FAMILY one of fasterrcnn, maskrcnn, retinanet, fcos, detr"):
        parse_model_name("yolov3_darknet53")
    with pytest.raises(ValueError, match="'darknet99' is not a timm model"):
        parse_model_name("fcos_darknet99")
    with pytest.raises(ValueError, match="anchor_sizes needs 5 sizes"):
        build_detection_model("fcos_test_resnet", 2, anchor_sizes=[8, 16])
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_detection_model("fcos_test_resnet", 2, backbone_weights="/no/such/file.safetensors")
    with pytest.raises(ValueError, match="backbone_weights is not an option of detr_"):
        build_detection_model("detr_test_resnet", 2, backbone_weights="x")


def test_backbone_weights_come_from_a_local_file_and_freeze_batchnorm(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_resnet", pretrained=False)
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    model = build_detection_model("fcos_test_resnet", 2, backbone_weights=str(tmp_path / "backbone.safetensors"))
    body = model.backbone
    for key, value in body.state_dict().items():  # the stem up to the last returned stage, as saved
        if key in source.state_dict() and value.is_floating_point():
            assert torch.equal(value, source.state_dict()[key]), key
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())  # FrozenBatchNorm2d, as torchvision


def test_backbone_weights_that_would_run_code_or_do_not_fit_are_named_errors(tmp_path):
    from denoiserep.checkpoint import UntrustedFileError

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"conv1.weight": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(UntrustedFileError, match=r"refusing to load .*evil.pth: it references posix.system"):
        build_detection_model("fcos_test_resnet", 2, backbone_weights=str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()
    torch.save({"conv1.0.weight": torch.zeros(3)}, tmp_path / "other.pth")  # another shape
    with pytest.raises(ValueError, match=r"backbone_weights .*other.pth do not fit timm's test_resnet"):
        build_detection_model("fcos_test_resnet", 2, backbone_weights=str(tmp_path / "other.pth"))


def test_a_torchvision_detector_checkpoint_loads_with_init_and_detects_the_same(tmp_path):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    reference = FasterRCNN(backbone, num_classes=4, min_size=64, max_size=64).eval()
    torch.save({"model": reference.state_dict(), "epoch": 25}, tmp_path / "model_25.pth")  # the reference scripts' file
    ours = build_detection_model("fasterrcnn_resnet18_fpn", 3, frozen_bn=True, min_size=64, max_size=64).eval()
    load_init_weights(ours, str(tmp_path / "model_25.pth"))
    with torch.no_grad():
        expected, actual = reference(images()), ours(images())
    for a, b in zip(expected, actual):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
    with pytest.raises(ValueError, match="shape mismatch"):  # a checkpoint of another number of classes
        load_init_weights(build_detection_model("fasterrcnn_resnet18", 5, frozen_bn=True), str(tmp_path / "model_25.pth"))


# -- fused == unfused, as the report says it ------------------------------------------------------


def test_fused_check_says_identical_same_ap_or_no(tmp_path):
    task = DetectionTask(TrainConfig(task="detection", data=f"coco:{coco(tmp_path / 'coco')}",
                                     model="fcos_test_resnet"))
    targets = [task.data.val[i][1] for i in range(4)]
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(0.9, 0.5, len(t["labels"]))}
               for t in targets]
    same = task.compare_outputs(perfect, [dict(p) for p in perfect])
    assert same["detection_images_differ"] == 0 and same["unfused_ap"] == same["fused_ap"]
    nudged = [dict(p, boxes=p["boxes"] + 1e-5) for p in perfect]
    flipped = [dict(p) for p in perfect]
    flipped[0] = dict(perfect[0], scores=perfect[0]["scores"].flip(0))  # a ranking flip inside one image
    worse = [dict(p) for p in perfect]
    worse[1] = dict(perfect[1], labels=perfect[1]["labels"] % 3 + 1)
    checks = {name: task.fused_check([StageResult("v", "denoise", {}, extra=task.compare_outputs(perfect, other))])
              for name, other in (("nudged", nudged), ("flipped", flipped), ("worse", worse))}
    assert checks["nudged"].startswith("yes (identical detections")
    assert checks["flipped"].startswith("yes (same AP; 1 of 4 images")
    assert checks["worse"].startswith("NO: 1 of 4 images")


# -- distributed evaluation -----------------------------------------------------------------------


def _evaluate_worker(rank, world, port, data, result_file):
    with gloo_group(rank, world, port):
        torch.set_num_threads(1)
        metrics = _evaluate(data, DistInfo(rank, world))
        torch.save(metrics, f"{result_file}.{rank}")


def _evaluate(data: str, info: DistInfo) -> dict:
    task = DetectionTask(TrainConfig(task="detection", data=data, model="maskrcnn_test_resnet",
                                     model_kwargs=FAMILIES["maskrcnn_test_resnet"], eval_batch_size=1))
    torch.manual_seed(0)
    return task.evaluate(task.build_model(), info, torch.device("cpu"))


def test_two_gloo_processes_evaluate_to_the_single_process_ap(tmp_path):
    data = f"coco:{coco(tmp_path / 'coco', count=5)}"
    mp.spawn(_evaluate_worker, args=(2, free_port(), data, str(tmp_path / "r.pt")), nprocs=2, join=True)
    single = _evaluate(data, DistInfo())
    assert {"AP", "AP50", "segm_AP"} <= set(single)
    for rank in range(2):
        distributed = torch.load(tmp_path / f"r.pt.{rank}", weights_only=True)
        assert distributed.keys() == single.keys()
        for key, value in single.items():
            assert distributed[key] == pytest.approx(value, rel=1e-12, nan_ok=True)


def test_unlabeled_folders_feed_the_label_free_loss_at_their_own_sizes(tmp_path):
    from test_detection_data import write_image

    for i, (height, width) in enumerate([(40, 56), (56, 40), (48, 48)]):
        write_image(tmp_path / "unlabeled" / "sub" / f"{i}.png", height, width, seed=i)
    cfg = TrainConfig(task="detection", data=f"coco:{coco(tmp_path / 'coco')}", model="fcos_test_resnet",
                      model_kwargs=FAMILIES["fcos_test_resnet"], extra_data=[str(tmp_path / "unlabeled")],
                      batch_size=2)
    task = DetectionTask(cfg)
    inputs, ignored = next(iter(task.extra_loader(DistInfo(), seed=0, epoch=0)))
    assert len(inputs) == 2 and ignored == [-1, -1] and all(0 <= x.min() and x.max() <= 1 for x in inputs)
    assert {tuple(x.shape[-2:]) for x in inputs} <= {(40, 56), (56, 40), (48, 48)}
    model = task.build_model()
    dr.convert(task.conversion_root(model), example_inputs=task.conversion_inputs(model, torch.device("cpu")))
    dr.set_trainable(model, denoisers=True, backbone=False)
    model.train()
    with noise_loss_only(model):
        task.noise_forward(model, inputs)
    assert denoise_loss(model) > 0
    with pytest.raises(FileNotFoundError, match="no images found under"):
        DetectionTask(TrainConfig(task="detection", data=cfg.data, model="fcos_test_resnet",
                                  extra_data=[str(tmp_path / "coco" / "annotations")]))


def test_skip_bad_images_replaces_a_corrupt_training_image_and_keeps_the_aspect_ratio_batches(tmp_path, caplog):
    root = coco(tmp_path / "coco")
    (root / "train2017" / "000000000001.jpg").write_bytes(b"not a jpeg")
    cfg = TrainConfig(task="detection", data=f"coco:{root}", model="fcos_test_resnet", batch_size=2,
                      skip_bad_images=True)
    loader = DetectionTask(cfg).train_loader(DistInfo(), seed=0, epoch=0)
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert len(batches) == 2 and all(len(images) == 2 for images, _ in batches)
    assert "skipped an unreadable image" in caplog.text and "000000000001.jpg" in caplog.text
    orientations = [{image.shape[-1] >= image.shape[-2] for image in images} for images, _ in batches]
    # Batched by aspect ratio: the wide batch stays wide; the tall one holds the wide image (index 2) that
    # replaced the unreadable tall image 1.
    assert sorted(len(o) for o in orientations) == [1, 2]
