"""ReID as a pipeline task: Market-1501 / DukeMTMC fixtures on disk, digits-reid, DDP pieces."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import denoiserep as dr
from denoiserep.cli import main as cli_main
from denoiserep.metrics.reid import evaluate_features
from denoiserep.tasks import create_task
from denoiserep.tasks.reid import ReidTask
from denoiserep.tasks.reid.digits import TEST_IDENTITY_PARITY, load_digits_reid
from denoiserep.tasks.reid.losses import ReidLoss
from denoiserep.tasks.reid.models import ReidModel, ReidTrainOutput, create_reid_model
from denoiserep.train.config import TrainConfig
from denoiserep.train.distributed import DistInfo

from conftest import free_port, gloo_group

TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_stride": 6}

# ----------------------------------------------------------------------------
# Fixtures in the real on-disk layouts
# ----------------------------------------------------------------------------


def _write_image(path: Path, pid: int, index: int, size=(16, 32)) -> None:
    """A small JPEG whose colours depend on the identity (so there is something to learn)."""
    rng = np.random.default_rng(pid * 1000 + index)
    base = np.array([(pid * 67) % 256, (pid * 131) % 256, (pid * 199) % 256], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    pixels[: size[1] // 2] = 255 - pixels[: size[1] // 2]  # a two-tone "person"
    Image.fromarray(pixels).save(path, quality=90)


def write_market(root: Path, train_pids=(2, 4, 6, 8, 10, 12), test_pids=(1, 3, 5), per_cam=2,
                 query_pids=None) -> Path:
    """Market-1501 layout: bounding_box_train/, query/, bounding_box_test/ with valid names."""
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for pid in train_pids:
        for cam in (1, 2):
            for i in range(per_cam):
                _write_image(root / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{i:06d}_01.jpg", pid, cam * 10 + i)
    for pid in query_pids if query_pids is not None else test_pids:
        for cam in (1, 2):
            _write_image(root / "query" / f"{pid:04d}_c{cam}s1_{900:06d}_00.jpg", pid, cam * 10 + 9)
    for pid in test_pids:
        for cam in (1, 2):
            for i in range(per_cam):
                _write_image(root / "bounding_box_test" / f"{pid:04d}_c{cam}s1_{i:06d}_01.jpg", pid, cam * 10 + i)
    _write_image(root / "bounding_box_test" / "0000_c1s1_000001_01.jpg", 0, 0)  # distractor: stays
    _write_image(root / "bounding_box_test" / "-1_c1s1_000002_01.jpg", 99, 0)  # junk: dropped
    return root


def write_duke(root: Path, train_pids=(1, 3, 5, 7), test_pids=(2, 9)) -> Path:
    """DukeMTMC-reID layout: the Market folders with PPPP_cC_fFFFFFFF.jpg names."""
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for pid in train_pids:
        for cam in (1, 3):
            for i in range(2):
                _write_image(root / "bounding_box_train" / f"{pid:04d}_c{cam}_f{cam * 100 + i:07d}.jpg", 50 + pid, i)
    for pid in test_pids:
        for cam in (1, 3):
            _write_image(root / "query" / f"{pid:04d}_c{cam}_f{9000 + cam:07d}.jpg", 50 + pid, 9)
            _write_image(root / "bounding_box_test" / f"{pid:04d}_c{cam}_f{8000 + cam:07d}.jpg", 50 + pid, 8)
    return root


def disk_cfg(data: str, tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(task="reid", data=data, model=TINY_VIT, model_kwargs=dict(TINY_VIT_KWARGS), image_size=32,
                  batch_size=8, eval_batch_size=16, output=str(tmp_path / "runs"), device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------
# The whole pipeline on a Market-1501 fixture
# ----------------------------------------------------------------------------


def test_train_all_stages_on_a_market1501_fixture(tmp_path, capsys):
    root = write_market(tmp_path / "Market-1501-v15.09.15")
    runs = tmp_path / "runs"
    code = cli_main([
        "train", "--task", "reid", "--data", f"market1501:{root}", "--model", TINY_VIT,
        "--model-kwargs", json.dumps(TINY_VIT_KWARGS), "--image-size", "32", "--epochs", "2", "--extra-epochs", "1",
        "--batch-size", "8", "--eval-batch-size", "16", "--label-smoothing", "0.1", "--stage", "all",
        "--device", "cpu", "--output", str(runs), "--name", "market",
    ])
    assert code == 0
    table = capsys.readouterr().out
    assert "| baseline |" in table and "mAP" in table
    variants = ["baseline", "control", "denoiserep-minus", "denoiserep-label-free", "denoiserep-label-aug"]
    for variant in variants:
        result = json.loads((runs / "market" / variant / "result.json").read_text())
        metrics = result["metrics"]
        for key in ("mAP", "rank1", "rank5", "rank10"):
            assert 0.0 <= metrics[key] <= 100.0
        assert metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"]
        assert metrics["num_query"] == 6 and metrics["num_gallery"] == 13  # 3 ids x 2 cams x 2 + distractor
        assert metrics["skipped_queries"] == 0
        assert (runs / "market" / variant / "model.safetensors").exists()
    for variant in ("denoiserep-label-free", "denoiserep-label-aug"):
        extra = json.loads((runs / "market" / variant / "result.json").read_text())["extra"]
        assert extra["fuse_max_relative_error"] <= 1e-5
        assert extra["unfused_metrics"]["mAP"] == pytest.approx(
            json.loads((runs / "market" / variant / "result.json").read_text())["metrics"]["mAP"], abs=1e-9)
    # The fused DenoiseRep weights load into a freshly built plain ReID model.
    cfg = TrainConfig.from_yaml(runs / "market" / "config.yaml")
    task = create_task(cfg)
    model = dr.load_fused(task.build_model(), runs / "market" / "denoiserep-label-aug" / "model.safetensors")
    expected = json.loads((runs / "market" / "denoiserep-label-aug" / "result.json").read_text())["metrics"]
    assert task.evaluate(model, DistInfo(), torch.device("cpu"))["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)


# ----------------------------------------------------------------------------
# Data: merged datasets, digits-reid, loaders
# ----------------------------------------------------------------------------


def test_merged_market_and_duke_train_in_one_id_space_and_evaluate_on_market(tmp_path):
    market = write_market(tmp_path / "market")
    duke = write_duke(tmp_path / "duke")
    task = ReidTask(disk_cfg(f"market1501:{market},dukemtmc:{duke}", tmp_path))
    assert task.num_train_pids == 6 + 4
    assert sorted(set(task.train_pids)) == list(range(10))  # market 0..5, duke 6..9
    duke_paths = [s.path for s in task.train.samples if s.dsetid == 1]
    assert {s.pid for s in task.train.samples if s.dsetid == 1} == {6, 7, 8, 9} and len(duke_paths) == 16
    assert task.val.num_query == 6 and task.val.num_gallery == 13  # the FIRST dataset's query/gallery
    model = task.build_model()
    assert model.get_classifier().out_features == 10
    seen = Counter(int(p) for _, pids in task.train_loader(DistInfo(), 0, 0) for p in pids)
    assert set(seen) <= set(range(10)) and any(p >= 6 for p in seen)
    metrics = task.evaluate(model, DistInfo(), torch.device("cpu"))
    assert metrics["num_query"] == 6 and 0 <= metrics["mAP"] <= 100
    # --extra-data: unlabeled images (here: a folder of Duke crops) go through the ReID eval pipeline
    extra = ReidTask(disk_cfg(f"market1501:{market}", tmp_path, extra_data=[str(duke / "bounding_box_train")]))
    images, labels = next(iter(extra.extra_loader(DistInfo(), 0, 0)))
    assert images.shape == (8, 3, 32, 16) and set(labels.tolist()) == {-1}


def test_digits_reid_follows_the_reid_protocol():
    data = load_digits_reid()
    train_identities = set(data.train_identities.tolist())
    query_ids, gallery_ids = set(data.query.pids.tolist()), set(data.gallery.pids.tolist())
    assert not train_identities & (query_ids | gallery_ids)  # test identities never trained on
    assert query_ids == gallery_ids
    assert sorted(set(data.train.pids.tolist())) == list(range(data.num_train_pids))
    assert data.num_train_pids == 40 and len(query_ids) == 40
    # every digit appears in both train and test identities (identity = digit x style cluster)
    assert {i // 8 for i in train_identities} == {i // 8 for i in query_ids} == set(range(10))
    assert all((i % 8) % 2 == TEST_IDENTITY_PARITY for i in query_ids)
    for split in (data.query, data.gallery):
        assert set(split.camids.tolist()) == {0, 1}
    assert len(data.train) + len(data.query) + len(data.gallery) == 1797
    assert load_digits_reid().query.pids.equal(data.query.pids)  # fixed split, no seed
    task = ReidTask(TrainConfig(task="reid", data="digits-reid"))
    metrics = task.evaluate(task.build_model(), DistInfo(), torch.device("cpu"))
    assert metrics["skipped_queries"] == 0 and metrics["num_query"] == len(data.query)


def test_train_loader_is_pk_deterministic_and_sliced_across_ranks():
    task = ReidTask(TrainConfig(task="reid", data="digits-reid", batch_size=32))
    batches = [pids.tolist() for _, pids in task.train_loader(DistInfo(), seed=3, epoch=1)]
    assert batches == [pids.tolist() for _, pids in task.train_loader(DistInfo(), seed=3, epoch=1)]
    assert batches != [pids.tolist() for _, pids in task.train_loader(DistInfo(), seed=3, epoch=2)]
    for batch in batches:
        assert len(batch) == 32 and set(Counter(batch).values()) == {task.num_instances}
    ranks = [[pids.tolist() for _, pids in task.train_loader(DistInfo(r, 2, r), seed=3, epoch=1)] for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == batches  # rank slices put together = the global batch
    with pytest.raises(ValueError, match="multiple of K"):
        ReidTask(TrainConfig(task="reid", data="digits-reid", batch_size=30)).train_loader(DistInfo(), 0, 0)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------


class _ProjectionModel(nn.Module):
    """Features we control: a fixed random projection of the pixels."""

    def __init__(self, dim_in: int = 64, dim: int = 16):
        super().__init__()
        self.register_buffer("weight", torch.randn(dim_in, dim, generator=torch.Generator().manual_seed(1)))
        self.num_features = dim

    def forward(self, x):
        return x.flatten(1) @ self.weight


def test_evaluate_matches_metrics_reid_on_features_we_control():
    task = ReidTask(TrainConfig(task="reid", data="digits-reid", eval_batch_size=100))
    model = _ProjectionModel()
    data = load_digits_reid()
    q, g = model(data.query.images), model(data.gallery.images)
    expected = evaluate_features(q, g, data.query.pids.numpy(), data.gallery.pids.numpy(),
                                 data.query.camids.numpy(), data.gallery.camids.numpy(), metric="cosine")
    metrics = task.evaluate(model, DistInfo(), torch.device("cpu"))
    assert metrics["mAP"] == pytest.approx(100 * expected.mAP, abs=1e-6)
    ranks = (1, 5, 10)
    assert [metrics[f"rank{k}"] for k in ranks] == pytest.approx([100 * float(expected.cmc[k - 1]) for k in ranks])
    features = task.predictions(model, torch.device("cpu"))
    assert features.shape == (len(data.query) + len(data.gallery), 16)
    assert task.compare_outputs(features, features.clone())["prediction_changes"] == 0
    moved = features.clone()
    moved[len(data.query):] = torch.roll(moved[len(data.query):], 1, dims=0)
    assert task.compare_outputs(features, moved)["prediction_changes"] > 0


def test_fused_check_judges_the_embeddings_and_reports_the_map_gap():
    task = ReidTask(TrainConfig(task="reid", data="digits-reid"))

    def result(unfused_map, fused_map, relative_error, changes=0):
        return SimpleNamespace(metrics={"mAP": fused_map}, extra={
            "unfused_metrics": {"mAP": unfused_map}, "fused_vs_unfused_max_relative_error": relative_error,
            "prediction_changes": changes})

    assert task.fused_check([result(40.0, 40.0, 2e-7)]) == "yes (embeddings within 2e-07, mAP identical)"
    near_tie = task.fused_check([result(40.0, 40.00001, 2e-7, changes=1)])
    assert near_tie.startswith("yes (") and "mAP within 1.0e-05" in near_tie and "1 rank-1" in near_tie
    assert task.fused_check([result(40.0, 30.0, 1e-2)]).startswith("NO: ")


def test_bad_query_gallery_splits_fail_before_training_with_a_clear_message(tmp_path):
    root = write_market(tmp_path / "market", query_pids=(7, 11))  # query people absent from the gallery
    with pytest.raises(ValueError, match="none of the 4 query identities appear in the 13-image gallery"):
        ReidTask(disk_cfg(f"market1501:{root}", tmp_path))
    single_cam = tmp_path / "single"
    write_market(single_cam)
    for path in (single_cam / "bounding_box_test").glob("*_c2s1_*.jpg"):
        path.unlink()
    for path in (single_cam / "query").glob("*_c2s1_*.jpg"):
        path.unlink()
    with pytest.raises(ValueError, match="ANOTHER camera"):
        ReidTask(disk_cfg(f"market1501:{single_cam}", tmp_path))
    with pytest.raises(ValueError, match="pass --model"):
        ReidTask(disk_cfg(f"market1501:{root}", tmp_path, model=None))
    with pytest.raises(ValueError, match="digits-reid"):
        ReidTask(TrainConfig(task="reid", data="market1501"))
    assert cli_main(["train", "--task", "reid", "--data", f"market1501:{tmp_path / 'nowhere'}", "--model", TINY_VIT,
                     "--output", str(tmp_path / "runs")]) == 2


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


def test_reid_model_outputs_classifier_and_transreid_backbones():
    model = create_reid_model("vit_small_patch16_224", num_classes=751, input_size=(256, 128), patch_stride=12)
    vit = model.backbone
    assert isinstance(model, ReidModel) and isinstance(vit, VisionTransformer) and model.num_features == 384
    assert vit.patch_embed.grid_size == (21, 10) and vit.pos_embed.shape == (1, 211, 384)  # TransReID's grid
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 256, 128)).shape == (2, 384)
    model.train()
    out = model(torch.randn(4, 3, 256, 128))
    assert isinstance(out, ReidTrainOutput) and out.logits.shape == (4, 751) and out.features.shape == (4, 384)
    assert model.get_classifier() is model.classifier and model.classifier.bias is None
    assert not model.bottleneck.bias.requires_grad
    resnet = create_reid_model("resnet50", num_classes=10, input_size=(256, 128), last_stride=1).eval()
    with torch.no_grad():
        assert resnet.backbone.forward_features(torch.randn(1, 3, 64, 32)).shape == (1, 2048, 4, 2)  # /16, not /32
    with pytest.raises(ValueError, match="drop num_classes"):
        ReidTask(TrainConfig(task="reid", data="digits-reid", model_kwargs={"num_classes": 5})).build_model()
    with pytest.raises(ValueError, match="VisionTransformer"):
        create_reid_model("resnet18", num_classes=5, patch_stride=8)


def test_backbone_weights_load_with_position_embedding_resampled(tmp_path):
    source = create_reid_model(TINY_VIT, num_classes=3, input_size=(32, 16),
                               **{k: v for k, v in TINY_VIT_KWARGS.items() if k != "patch_stride"})
    state = {**source.backbone.state_dict(), "head.weight": torch.zeros(1000, 32), "head.bias": torch.zeros(1000)}
    torch.save({"model": state}, tmp_path / "backbone.pth")
    model = create_reid_model(TINY_VIT, num_classes=3, input_size=(32, 16),
                              backbone_weights=str(tmp_path / "backbone.pth"), **TINY_VIT_KWARGS)
    assert model.backbone.pos_embed.shape == (1, 1 + 5 * 2, 32)
    assert torch.equal(model.backbone.blocks[1].mlp.fc2.weight, source.backbone.blocks[1].mlp.fc2.weight)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        create_reid_model(TINY_VIT, num_classes=3, backbone_weights=str(tmp_path / "missing.pth"))
    torch.save(create_reid_model("resnet18", num_classes=3).backbone.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="same timm model as --model"):
        create_reid_model(TINY_VIT, num_classes=3, backbone_weights=str(tmp_path / "resnet.pth"))


def test_denoiserep_leaves_the_id_classifier_alone_and_fuses_exactly():
    task = ReidTask(TrainConfig(task="reid", data="digits-reid"))
    model = task.build_model().eval()
    inputs = task.example_inputs(torch.device("cpu"), batch=8)
    with torch.no_grad():
        before = model(inputs)
    dr.convert(model, dr.DenoiseConfig(init="random", schedule="ddpm", timestep_range=(1, 1000)), example_inputs=inputs)
    converted = {name for name, _, _ in dr.layer_denoisers(model)}
    assert "classifier" not in converted and any(name.startswith("backbone.blocks") for name in converted)
    with torch.no_grad():
        unfused = model(inputs)
        fused = dr.fuse(model)(inputs)
    assert not torch.allclose(unfused, before)
    assert float((fused - unfused).abs().max() / unfused.abs().max()) < 1e-5
    head = dr.DenoiseHead(task.feature_dim(model), steps=3)
    wrapped = task.wrap_with_head(task.build_model(), head)
    assert wrapped.denoise_head is head and wrapped.eval()(inputs).shape == (8, 64)


# ----------------------------------------------------------------------------
# DDP: sharded evaluation and the global-batch triplet loss (2 gloo processes)
# ----------------------------------------------------------------------------


def _loss_gradient(task: ReidTask, info: DistInfo) -> torch.Tensor:
    task.train.transform = task.eval_transform  # no random augmentation: same inputs in every layout
    torch.manual_seed(0)
    model = nn.Linear(3 * 32 * 16, 8 + task.num_train_pids)
    inputs, pids = next(iter(task.train_loader(info, seed=0, epoch=0)))
    outputs = model(inputs.flatten(1))
    loss = ReidLoss(label_smoothing=0.1)(ReidTrainOutput(outputs[:, 8:], outputs[:, :8]), pids)
    loss.backward()
    return model.weight.grad


def _ddp_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        info = DistInfo(rank, world, rank)
        task = ReidTask(disk_cfg(f"market1501:{root}", Path(out_dir), eval_batch_size=4))
        metrics = task.evaluate(_ProjectionModel(3 * 32 * 16), info, torch.device("cpu"))
        grad = _loss_gradient(task, info).clone()
        dist.all_reduce(grad)
        grad /= world  # what DDP does
        torch.save({"metrics": metrics, "grad": grad}, Path(out_dir) / f"rank{rank}.pt")


def test_ddp_evaluation_and_loss_equal_a_single_process(tmp_path):
    """2 gloo processes: sharded + gathered features give the single-process metrics, and the
    averaged gradient of the ReID loss (global-batch triplet) equals the single-process one."""
    root = write_market(tmp_path / "market")
    port = free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(root), str(tmp_path)), nprocs=2, join=True)
    task = ReidTask(disk_cfg(f"market1501:{root}", tmp_path, eval_batch_size=4))
    single = task.evaluate(_ProjectionModel(3 * 32 * 16), DistInfo(), torch.device("cpu"))
    grad = _loss_gradient(task, DistInfo())
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["metrics"] == pytest.approx(single)
        torch.testing.assert_close(result["grad"], grad, rtol=1e-5, atol=1e-7)
