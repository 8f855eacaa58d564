"""The task interface and the package's layering: what a task must provide, that a new task needs
only its own folder and one registry line, and that the method never depends on the pipeline."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from denoiserep.cli import main
from denoiserep.tasks import TASKS, task_class
from denoiserep.tasks.base import Task, TaskBase
from denoiserep.train.config import TrainConfig
from denoiserep.train.distributed import GlobalBatchSampler, all_reduce_sum

CORE_MODULES = ["schedule", "config", "noise_loss", "layer_step", "layers", "convert", "fuse", "head", "checkpoint", "moments",
                "optimum", "calibrate"]


def modules_loaded_by(statement: str) -> set[str]:
    """The denoiserep modules a fresh interpreter has loaded after ``statement``."""
    code = f"{statement}\nimport sys, json\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('denoiserep'))))"
    return set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                         text=True).stdout))


def test_the_method_imports_nothing_from_tasks_training_or_benchmarks():
    loaded = modules_loaded_by("; ".join(f"import denoiserep.{name}" for name in CORE_MODULES))
    assert {f"denoiserep.{name}" for name in CORE_MODULES} <= loaded
    assert not [m for m in loaded if m.startswith(("denoiserep.tasks", "denoiserep.train", "denoiserep.bench"))]


def test_metrics_import_without_the_pipeline():
    loaded = modules_loaded_by("from denoiserep.metrics.reid import evaluate")
    assert not [m for m in loaded if m.startswith(("denoiserep.tasks", "denoiserep.train", "denoiserep.bench"))]


def protocol_members() -> dict[str, object]:
    members = {name: value for name, value in vars(Task).items()
               if not name.startswith("_") and callable(value)}
    assert {"build_model", "training_loss", "evaluate", "conversion_root", "wrap_with_head"} <= set(members)
    return members


@pytest.mark.parametrize("name", list(TASKS))
def test_every_registered_task_provides_the_whole_interface_with_its_signatures(name):
    cls = task_class(name)
    for attribute in ("name", "primary_metric", "metric_label", "other_metrics", "demo_defaults", "demo_note"):
        assert hasattr(cls, attribute), f"{cls.__name__} lacks {attribute}"
    assert cls.name == name
    for member, spec in protocol_members().items():
        assert inspect.getattr_static(cls, member, None) is not None, f"{cls.__name__} lacks {member}()"
        # Static methods (usable without data, e.g. by the benchmarks) have no self: compare the rest.
        expected = [p for p in inspect.signature(spec).parameters if p != "self"]
        actual = [p for p in inspect.signature(getattr(cls, member)).parameters if p != "self"]
        assert actual == expected, f"{cls.__name__}.{member}{actual} != Task.{member}{expected}"


# -- a new task: one class in its own module, one registry line ---------------------------------


class BlobsTask(TaskBase):
    """Two Gaussian blobs in 8-d, told apart by a small MLP: the smallest complete task."""

    name = "blobs"
    primary_metric = "accuracy"
    metric_label = "accuracy"
    demo_defaults = {"data": "blobs", "epochs": 3, "extra_epochs": 1, "name": "demo-blobs"}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 2, (256,), generator=generator)
        inputs = torch.randn(256, 8, generator=generator) + 2.0 * labels[:, None].float()
        self.train = TensorDataset(inputs[:192], labels[:192])
        self.val_inputs, self.val_labels = inputs[192:], labels[192:]

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def example_inputs(self, device, batch=2):
        return self.val_inputs[:batch].to(device)

    def feature_dim(self, model):
        return 16

    def wrap_with_head(self, model, head):
        return nn.Sequential(model[0], model[1], head, model[2])

    def train_loader(self, info, seed, epoch, for_denoisers=False):
        sampler = GlobalBatchSampler(len(self.train), self.cfg.batch_size, info, seed, epoch)
        return DataLoader(self.train, batch_sampler=sampler)

    def validation_inputs(self, max_batches):
        return [self.val_inputs]

    def training_loss(self, model, batch):
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels), {}

    @torch.no_grad()
    def evaluate(self, model, info, device, autocast_dtype=None):
        model.eval()
        correct = (model(self.val_inputs.to(device)).argmax(1).cpu() == self.val_labels).sum().item()
        correct, count = all_reduce_sum([correct, len(self.val_labels)], device)
        return {"accuracy": 100.0 * correct / count}

    @torch.no_grad()
    def predictions(self, model, device):
        return model.eval()(self.val_inputs.to(device)).cpu()

    def compare_outputs(self, unfused, fused):
        return {"prediction_changes": int((unfused.argmax(1) != fused.argmax(1)).sum())}

    def fused_check(self, results):
        changes = sum(r.extra["prediction_changes"] for r in results)
        return "yes (identical predictions)" if changes == 0 else f"NO: {changes} predictions differ"


def test_a_new_task_runs_the_whole_pipeline_from_one_class_and_one_registry_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TASKS, "blobs", f"{__name__}:BlobsTask")
    assert isinstance(BlobsTask(TrainConfig(data="blobs")), Task)
    assert main(["demo", "--task", "blobs", "--output", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for variant in ("baseline", "control", "denoiserep-minus", "denoiserep-calibrated", "denoiserep-label-free",
                    "denoiserep-label-aug"):
        assert f"| {variant} |" in table
    result = json.loads((tmp_path / "demo-blobs" / "denoiserep-label-aug" / "result.json").read_text())
    assert result["extra"]["prediction_changes"] == 0
    assert result["extra"]["noise_loss"]["calibrated"]["l2_gap"] < result["extra"]["noise_loss"]["identity"]["l2_gap"]


def test_an_unknown_task_is_refused_with_the_registered_names():
    with pytest.raises(ValueError, match="classification, reid"):
        task_class("detection-of-typos")
