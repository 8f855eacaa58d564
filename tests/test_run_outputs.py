"""Every file a run writes loads with the run's own commands, for every task and every stage: the
weights with `evaluate` (to the metrics the stage reported), a denoise stage's checkpoint with
`fuse`, finished and unfinished stages with `--resume`; and under DDP the reported metrics are
those of the saved weights."""

from __future__ import annotations

import json
import os

import pytest
import torch.multiprocessing as mp

from denoiserep.cli import main

from conftest import free_port
from test_detection_data import coco
from test_detection_task import FAMILIES as DETECTION_MODELS
from test_reid_task import TINY_VIT, TINY_VIT_KWARGS, write_market
from test_segmentation_task import folder

STAGES = ["--stage", "baseline", "control", "head", "denoise", "--lambda", "0.5"]
VARIANTS = ("baseline", "control", "denoiserep-minus", "denoiserep")


def task_args(task: str, tmp_path) -> list[str]:
    """The smallest run of each task, on a fixture in its real on-disk layout (classification: a ViT
    without qkv biases, so that fusion adds biases to the qkv layers)."""
    if task == "classification":
        return ["--data", "digits", "--batch-size", "64",
                "--model-kwargs", json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2, "qkv_bias": False})]
    if task == "reid":
        return ["--task", "reid", "--data", f"market1501:{write_market(tmp_path / 'market')}", "--model", TINY_VIT,
                "--model-kwargs", json.dumps(TINY_VIT_KWARGS), "--image-size", "32", "--batch-size", "8"]
    if task == "segmentation":
        return ["--task", "segmentation", "--data", f"folder:{folder(tmp_path / 'seg')}", "--model", "fcn:resnet18",
                "--crop-size", "32", "--batch-size", "2"]
    name = "fasterrcnn_test_resnet"
    return ["--task", "detection", "--data", f"coco:{coco(tmp_path / 'coco')}", "--model", name,
            "--model-kwargs", json.dumps(DETECTION_MODELS[name]), "--batch-size", "2", "--eval-batch-size", "2"]


def evaluated(capsys, run, weights) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--config", str(run / "config.yaml"), "--weights", str(weights)]) == 0
    return json.loads(capsys.readouterr().out)


def same_metrics(actual: dict, expected: dict) -> bool:
    return actual.keys() == expected.keys() and all(
        actual[k] == pytest.approx(expected[k], rel=1e-9, nan_ok=True) for k in expected)


@pytest.mark.parametrize("task", ["classification", "reid", "segmentation", "detection"])
def test_every_file_of_every_stage_loads_with_evaluate_fuse_and_resume(tmp_path, capsys, task):
    config = tmp_path / "run.yaml"
    config.write_text("denoise: {keep_state_dict_keys: false}\n")  # layers without a bias gain one at fusion
    train = ["train", *task_args(task, tmp_path), "--config", str(config), "--epochs", "1", "--extra-epochs", "1",
             "--warmup-epochs", "0", "--output", str(tmp_path / "runs"), *STAGES]
    assert main(train) == 0
    run = tmp_path / "runs" / "run"
    results = {v: json.loads((run / v / "result.json").read_text()) for v in VARIANTS}
    if task == "classification":
        assert results["denoiserep"]["extra"]["added_biases"]  # the case this test is about
    for variant, result in results.items():
        assert same_metrics(evaluated(capsys, run, run / variant / "model.safetensors"), result["metrics"]), variant
    fused = tmp_path / "fused.safetensors"
    assert main(["fuse", str(run / "denoiserep"), "--output", str(fused)]) == 0
    assert same_metrics(evaluated(capsys, run, fused), results["denoiserep"]["metrics"])
    assert main([*train, "--resume"]) == 0  # every stage finished: each is rebuilt from its weights
    for variant in ("denoiserep-minus", "denoiserep"):  # unfinished after their last epoch: from checkpoint.pt
        (run / variant / "result.json").unlink()
    assert main([*train, "--resume"]) == 0
    for variant in ("denoiserep-minus", "denoiserep"):
        resumed = json.loads((run / variant / "result.json").read_text())
        assert same_metrics(resumed["metrics"], results[variant]["metrics"]), variant


# -- DDP: the metrics a stage reports are its saved weights' -----------------------------------------


def _train_worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    assert main(args) == 0


def test_two_gloo_processes_report_the_metrics_of_the_weights_they_save_with_batchnorm(tmp_path, capsys):
    # ResNet's BatchNorms: each rank's running statistics follow its own half of every batch.
    train = ["train", "--data", "digits", "--model", "resnet10t", "--epochs", "1", "--extra-epochs", "1",
             "--batch-size", "64", "--warmup-epochs", "0", "--ema", "0.9", "--stage", "baseline", "control",
             "--threads", "1", "--output", str(tmp_path / "runs")]
    mp.spawn(_train_worker, args=(2, free_port(), train), nprocs=2, join=True)
    run = tmp_path / "runs" / "run"
    for variant in ("baseline", "control"):
        reported = json.loads((run / variant / "result.json").read_text())["metrics"]
        reevaluated = evaluated(capsys, run, run / variant / "model.safetensors")
        assert reevaluated["top1"] == reported["top1"] and reevaluated["samples"] == reported["samples"], variant
        assert reevaluated["loss"] == pytest.approx(reported["loss"], rel=1e-6), variant
