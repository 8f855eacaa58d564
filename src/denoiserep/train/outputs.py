"""The files a stage writes, and the one loader of each that every command reading them uses.

``checkpoint.pt`` (`read_checkpoint`: --resume, ``denoiserep fuse``), ``model.safetensors``
(`load_stage_weights`: --resume of a finished stage, ``denoiserep evaluate``) and ``result.json``
(`read_result`: --resume). A file is checked when it is read, and anything it does not hold as the
run wrote it is an error naming the file and the field; the architecture a set of weights belongs
to (a DenoiseRep⁻ head, biases added at fusion) is read from the file itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_fused, load_torch_file, read_fused_metadata
from ..head import DenoiseHead
from .config import TrainConfig

# What `checkpoint.pt` holds: field → accepted types (None: the field may be null).
CHECKPOINT_FIELDS: dict[str, tuple] = {
    "epoch": (int,), "num_updates": (int,), "history": (list,), "model": (dict,), "conversion": (dict, None),
    "optimizer": (dict,), "scheduler": (dict, None), "ema": (dict, None), "noise_loss": (dict, None), "rng": (dict,),
    "best": (dict, None),
}


@dataclass
class StageResult:
    variant: str
    stage: str
    metrics: dict
    history: list[dict] = field(default_factory=list)
    weights: str | None = None  # relative to the run directory (``<variant>/model.safetensors``)
    extra: dict = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # live model; not saved

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model"}


def read_result(path: Path) -> StageResult:
    """A finished stage's ``result.json``."""
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable result file ({type(error).__name__}: {error}); delete it to run "
                         "the stage again") from None
    saved = [f.name for f in fields(StageResult) if f.name != "model"]
    kinds = {"variant": str, "stage": str, "metrics": dict, "history": list, "weights": (str, type(None)),
             "extra": dict}
    if not isinstance(values, dict) or set(values) - set(saved) or not {"variant", "stage", "metrics"} <= set(values) \
            or any(not isinstance(values[k], kinds[k]) for k in values):
        raise ValueError(f"{path} is not a result file denoiserep wrote (expected the fields {saved}); delete it to "
                         "run the stage again")
    return StageResult(**values)


RESUME_FIELDS = tuple(name for name in CHECKPOINT_FIELDS if name not in ("noise_loss", "best"))  # (older runs lack them)
FUSE_FIELDS = ("epoch", "model", "conversion")  # what ``denoiserep fuse`` reads


def read_checkpoint(path: Path, device: str | torch.device = "cpu", *, needed: tuple[str, ...] = RESUME_FIELDS,
                    denoise: bool = False) -> dict:
    """A stage's ``checkpoint.pt``: the ``needed`` fields present, every field it has of its type;
    ``denoise``: it must hold a conversion plan."""
    payload = load_torch_file(path, device)
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a stage checkpoint of denoiserep (it holds a {type(payload).__name__}); "
                         "pass the checkpoint.pt of a run's stage folder")
    missing = [name for name in needed if name not in payload]
    wrong = [f"{name} ({type(payload[name]).__name__})" for name, kinds in CHECKPOINT_FIELDS.items() if name in payload
             and not isinstance(payload[name], tuple(type(None) if k is None else k for k in kinds))]
    not_tensors = [key for key, value in payload.get("model", {}).items() if not isinstance(value, torch.Tensor)] \
        if isinstance(payload.get("model"), dict) else []
    best = payload.get("best")
    bad_best = isinstance(best, dict) and not (
        isinstance(best.get("epoch"), int) and isinstance(best.get("metric"), float)
        and isinstance(best.get("model"), dict) and all(isinstance(v, torch.Tensor) for v in best["model"].values()))
    if missing or wrong or not_tensors or bad_best:
        problems = ([f"missing fields {missing}"] if missing else []) + \
                   ([f"fields of the wrong type: {wrong}"] if wrong else []) + \
                   ([f"model entries that are not tensors: {not_tensors[:5]}"] if not_tensors else []) + \
                   (["a 'best' entry that is not the selected epoch's {epoch, metric, model}"] if bad_best else [])
        raise ValueError(f"{path} is not a complete stage checkpoint ({'; '.join(problems)}); it was changed after "
                         "the run wrote it. Use the stage's checkpoint as written, or rerun the stage.")
    if denoise and payload["conversion"] is None:
        raise ValueError(f"{path} is not from a denoise stage: there are no denoisers to fuse")
    return payload


def denoise_head(task, cfg: TrainConfig, backbone: nn.Module) -> DenoiseHead:
    """The DenoiseRep⁻ head of a run's head stage, for ``backbone``'s feature."""
    dcfg = cfg.denoise_config()
    return DenoiseHead(task.feature_dim(backbone), steps=cfg.head_steps, schedule=dcfg.schedule,
                       num_timesteps=dcfg.num_timesteps, beta_start=dcfg.beta_start, beta_end=dcfg.beta_end,
                       loss=dcfg.loss)


def stage_model(task, cfg: TrainConfig, stage: str | None) -> nn.Module:
    """A freshly built model in the architecture of ``stage``'s weights (with its head for "head")."""
    model = task.build_model()
    return task.wrap_with_head(model, denoise_head(task, cfg, model)) if stage == "head" else model


def load_stage_weights(task, cfg: TrainConfig, path: str | os.PathLike, device: torch.device,
                       expected_stage: str | None = None) -> nn.Module:
    """Weights a run wrote (``model.safetensors`` of any stage, or of ``denoiserep fuse``), loaded into
    the architecture its metadata names; a file that names no stage (another tool's, or an older
    ``denoiserep fuse``'s) loads into the task's plain model."""
    stage = read_fused_metadata(path).get("stage")
    if expected_stage is not None and stage is not None and stage != expected_stage:
        raise ValueError(f"{path} holds the weights of a {stage or 'plain'} stage, not of the {expected_stage} stage "
                         "whose folder it is in; the stage folders were mixed up")
    return load_fused(stage_model(task, cfg, stage), path).to(device)
