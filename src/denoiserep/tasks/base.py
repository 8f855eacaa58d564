"""The task interface: everything the training pipeline asks of a kind of problem.

A task (classification, person re-identification, …) owns its data, its models, its loss and its
metrics. The pipeline (`denoiserep.train`: stages, engine, report) talks to a task only through
`Task`; the method itself (`convert`, `calibrate`, `fuse`) never imports a task. To add one, write
a class that satisfies `Task` (subclass `TaskBase` for the defaults), put it in
``tasks/<name>/``, and add one line to ``tasks/__init__.py``'s registry; `docs/architecture.md`
walks through the classification task as the example.

Conventions:

- **Model inputs** (``inputs``): what the model is called with, as one argument: ``model(inputs)``
  (a batched tensor for classification and ReID; a list of images for a torchvision detector).
- **Training batches**: ``(inputs, targets)`` pairs from `Task.train_loader`; ``len(inputs)`` is the
  number of samples. Unlabeled batches (`Task.extra_loader`, ``--denoise-data``) carry ignored
  targets, so they are pairs too.
- **Distributed**: loaders shard by ``DistInfo``; `Task.evaluate` returns metrics already reduced
  over ranks; `Task.predictions` runs on one process.
- **Held-out test split** (``--test-fraction F``): a task that sets ``supports_test_split`` splits its
  validation data once, deterministically (`holdout_split`), into the validation split every other
  member uses and a test split that only ``evaluate(..., split="test")`` reads.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Subset

from ..convert import call_model
from ..head import DenoiseHead
from ..train.config import TrainConfig
from ..train.distributed import DistInfo


@runtime_checkable
class Task(Protocol):
    """What `denoiserep.train` needs from a task."""

    name: ClassVar[str]  # the --task value
    primary_metric: ClassVar[str]  # the key of `evaluate`'s result that the tables report
    metric_label: ClassVar[str]  # that metric's column title
    other_metrics: ClassVar[tuple[str, ...]]  # further keys of `evaluate`'s result shown as table columns
    demo_defaults: ClassVar[dict]  # TrainConfig fields of `denoiserep demo --task NAME` (embedded data)
    demo_note: ClassVar[str]  # printed before the demo runs ("" for none)
    data_sources: ClassVar[str]  # what --data accepts, for --help
    cfg: TrainConfig

    def __init__(self, cfg: TrainConfig) -> None:
        """Resolve ``cfg.data`` (read files, check layouts) and fail here, before anything is written."""

    # -- models ----------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A fresh model for ``cfg.model`` / ``cfg.model_kwargs`` (random or user-given weights)."""

    def example_inputs(self, device: torch.device, batch: int = 2) -> Any:
        """Real model inputs (from the validation split): for latency, FLOPs and fused == unfused."""

    def conversion_root(self, model: nn.Module) -> nn.Module:
        """The module whose embedding layers DenoiseRep converts (the whole model, or its backbone)."""

    def conversion_inputs(self, model: nn.Module, device: torch.device) -> tuple:
        """Positional arguments of ``conversion_root(model)`` for the tracing forward of `convert`."""

    def feature_dim(self, model: nn.Module) -> int:
        """Width of the feature the DenoiseRep⁻ head denoises."""

    def wrap_with_head(self, model: nn.Module, head: DenoiseHead) -> nn.Module:
        """The model with a DenoiseRep⁻ head in its slot (after the backbone's feature)."""

    # -- data ------------------------------------------------------------------------------
    def train_loader(self, info: DistInfo, seed: int, epoch: int, for_denoisers: bool = False) -> Iterable:
        """Training batches of this rank for ``epoch`` (deterministic in ``seed`` and ``epoch``). With
        ``for_denoisers`` the denoise stage's data (``--denoise-data`` when given, else the training set)."""

    def extra_loader(self, info: DistInfo, seed: int, epoch: int) -> Iterable | None:
        """Unlabeled batches for the label-free loss on merged datasets (``--extra-data``), or None."""

    def validation_inputs(self, max_batches: int) -> list:
        """The first ``max_batches`` validation batches, inputs only, always the same."""

    # -- training --------------------------------------------------------------------------
    def training_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Forward ``batch`` (on the device, in train mode) and return the task loss and its named
        parts (for the log; may be empty): detached tensors, which the loop sums on the device and
        reads every few steps, or floats. Label-aug DenoiseRep adds the noise loss to it."""

    def noise_forward(self, model: nn.Module, inputs: Any) -> None:
        """A forward that only feeds the denoisers' noise losses (label-free steps, extra data): no
        targets, its output unused."""

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, info: DistInfo, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, split: str = "val") -> dict[str, float]:
        """Validation metrics, reduced over ranks; ``primary_metric`` among them. ``split="test"``: the
        held-out test split instead (only when ``has_test_split``)."""

    def predictions(self, model: nn.Module, device: torch.device) -> Any:
        """Outputs on the whole validation set (one process), to compare fused and unfused models."""

    def compare_outputs(self, unfused: Any, fused: Any) -> dict:
        """How two `predictions` differ (stored in the denoise stage's result)."""

    def fused_check(self, results: list) -> str:
        """The report's "fused == unfused" cell for a DenoiseRep variant's results (one per seed)."""


class TaskBase:
    """Defaults for the parts of `Task` most tasks share."""

    demo_note: ClassVar[str] = ""
    data_sources: ClassVar[str] = ""
    other_metrics: ClassVar[tuple[str, ...]] = ()
    convert_scopes: ClassVar[tuple[str, ...]] = ("backbone",)  # the --convert-scope values the task offers
    # Whether `evaluate` takes ``split="test"`` (the held-out part of the validation data, --test-fraction).
    supports_test_split: ClassVar[bool] = False

    @property
    def has_test_split(self) -> bool:
        return self.supports_test_split and self.cfg.test_fraction > 0

    def hold_out_test(self, dataset, groups: Sequence | None = None, what: str = "validation images"):
        """(validation, test) datasets of ``dataset`` for ``--test-fraction`` (`holdout_split`; ``groups``:
        stratify by them, e.g. the labels); ``(dataset, None)`` without a test fraction."""
        val_idx, test_idx = holdout_split(len(dataset), self.cfg.test_fraction, groups, what)
        if not test_idx:
            return dataset, None
        return Subset(dataset, val_idx), Subset(dataset, test_idx)

    def eval_split(self, split: str):
        """The evaluation data of ``split``: ``self.val``, or the held-out ``self.test`` (set by tasks that
        support a test split)."""
        if split == "val":
            return self.val
        if split == "test" and getattr(self, "test", None) is not None:
            return self.test
        raise ValueError(f"the {self.name} task has no {split!r} split: evaluate 'val', or 'test' with "
                         "--test-fraction > 0")

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.convert_scope not in self.convert_scopes:
            raise ValueError(f"--convert-scope {cfg.convert_scope!r} is not available for the {self.name} task; "
                             f"choose {' or '.join(self.convert_scopes)}")

    @staticmethod
    def conversion_root(model: nn.Module) -> nn.Module:
        return model

    def conversion_inputs(self, model: nn.Module, device: torch.device) -> tuple:
        return (self.example_inputs(device),)

    def extra_loader(self, info: DistInfo, seed: int, epoch: int) -> Iterable | None:
        return None

    def noise_forward(self, model: nn.Module, inputs: Any) -> None:
        call_model(model, (inputs,))


def holdout_split(count: int, fraction: float, groups: Sequence | None = None,
                  what: str = "validation items") -> tuple[list[int], list[int]]:
    """``range(count)`` split into (validation, test) indices: within each group (a class; one group when
    ``groups`` is None), in index order, position j goes to the test split when ⌊(j + 1)·f⌋ > ⌊j·f⌋, an
    even spread of ⌊n·f⌋ of the group's n items. Deterministic: it depends on no seed, so every run and
    stage of a data set holds out the same items. ``fraction`` 0: all validation, no test."""
    if fraction <= 0:
        return list(range(count)), []
    members: dict = {}
    for index in range(count):
        members.setdefault(None if groups is None else groups[index], []).append(index)
    test = sorted(index for items in members.values() for j, index in enumerate(items)
                  if int((j + 1) * fraction) > int(j * fraction))
    held = set(test)
    val = [index for index in range(count) if index not in held]
    if not test or not val:
        raise ValueError(f"--test-fraction {fraction} of {count} {what} leaves "
                         f"{'no test' if not test else 'no validation'} item; choose a fraction between "
                         f"{1 / max(count, 1):.2g} and {1 - 1 / max(count, 1):.2g}")
    return val, test


def model_kwargs_without_classes(model_kwargs: dict, num_classes: int, data_name: str) -> dict:
    """``--model-kwargs`` for a model whose class count the data decides: a copy, refusing ``num_classes``."""
    if "num_classes" in model_kwargs:
        raise ValueError(f"num_classes comes from the data ({num_classes} classes in {data_name}); "
                         "drop it from --model-kwargs")
    return dict(model_kwargs)
