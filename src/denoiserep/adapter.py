"""The denoisers as an adapter, PEFT-style: an adapter-only checkpoint, `unload`, `disable_adapter`,
`print_trainable_parameters`.

The adapter file is one ``.safetensors`` file: the layer denoisers' tensors under
``<layer name>.<tensor>`` and, in its metadata, the conversion plan (which layers, their timesteps and
BatchNorms, the `DenoiseConfig`) as JSON. Nothing in it is pickled; the backbone's weights are not in it
(they are the model the user converted, as a PEFT adapter leaves the base model out).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import atomic_write, read_safetensors, read_safetensors_metadata
from .convert import (
    ConversionState,
    apply_plan,
    conversion_roots,
    denoiser_flag,
    denoiser_parameters,
    drop_conversion_state,
    is_converted,
    layer_denoisers,
    norm_statistics_held,
    unwrap,
)
from .fuse import _remove_weight_parametrization
from .layers import detach

ADAPTER_FORMAT = "denoiserep-adapter/1"
ADAPTER_FILE = "denoiserep_adapter.safetensors"  # the file's name inside a directory (save_pretrained's)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save only the denoisers and the conversion plan (safetensors; a directory gets `ADAPTER_FILE`).

    `load_adapter` attaches them to a freshly built original model; the backbone's weights come from
    wherever the user keeps them (they are frozen while the denoisers train)."""
    model = unwrap(model)
    roots = conversion_roots(model)
    if not roots:
        raise ValueError("this model has no DenoiseRep denoisers to save; call denoiserep.convert(model) first")
    tensors = {key: value.detach().contiguous() for key, value in _denoiser_tensors(model).items()}
    metadata = {"format": ADAPTER_FORMAT,
                "conversions": json.dumps({prefix: state.to_dict() for prefix, _, state in roots})}
    return atomic_write(_adapter_path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Convert a freshly built original ``model`` as the adapter file says and load its denoisers.

    The file is checked before the model changes: its format, its plan against the model's layers, and
    every tensor's name, shape and dtype; on any mismatch the model is left as it was (ValueError)."""
    model = unwrap(model)
    path = _adapter_path(path)
    if is_converted(model):
        raise RuntimeError("load_adapter() needs a model without denoisers (freshly built, or after unload())")
    metadata = read_safetensors_metadata(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a denoiserep adapter file (expected format {ADAPTER_FORMAT!r}, found "
                         f"{metadata.get('format')!r}); save one with denoiserep.save_adapter(model, path)")
    try:
        conversions = {prefix: ConversionState.from_dict(state)
                       for prefix, state in json.loads(metadata["conversions"]).items()}
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: its conversion plan is unreadable ({type(error).__name__}: {error})") from None
    modules = dict(model.named_modules())
    missing = [prefix for prefix in conversions if prefix not in modules]
    if missing:
        raise ValueError(f"{path} converts submodules this model does not have: {missing}; build the architecture "
                         "the adapter was saved from")
    tensors = read_safetensors(path)
    try:
        for prefix, state in conversions.items():
            apply_plan(modules[prefix], state)
        _load_denoiser_tensors(model, tensors, path)
    except Exception:
        unload(model)
        raise
    return model


def _load_denoiser_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = _denoiser_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{key}: file {tuple(tensors[key].shape)} {tensors[key].dtype} vs model {tuple(value.shape)}"
             for key, value in expected.items()
             if key in tensors and (tensors[key].shape != value.shape or not tensors[key].is_floating_point())]
    if missing or unexpected or wrong:
        parts = [f"{label}: {items[:5]}{' …' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("not in the model", unexpected),
                                      ("wrong shape or dtype", wrong)) if items]
        raise ValueError(f"adapter {path} does not match this model's denoisers ({'; '.join(parts)}); build the "
                         "architecture (and its kwargs) the adapter was saved from")
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key])


def _adapter_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def _denoiser_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every layer denoiser's state under its adapter-file key, ``<layer>.<tensor>``."""
    return {f"{name}.{key}": value for name, _, denoiser in layer_denoisers(model)
            for key, value in denoiser.state_dict().items()}


def unload(model: nn.Module) -> nn.Module:
    """Remove every denoiser without fusing (PEFT's ``unload``): the layers get back their original
    weights, class and hooks; the model computes exactly what it did before `convert`."""
    model = unwrap(model)
    for _, layer, _ in list(layer_denoisers(model)):
        detach(layer)
        _remove_weight_parametrization(layer)
    drop_conversion_state(model)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the original model for a while (PEFT's ``disable_adapter``): inside the block every converted
    layer computes its original ``W x + b`` and accumulates no noise loss; the denoisers are untouched
    and act again after it. DenoiseRep⁻ heads are modules of the model's own forward and stay on."""
    with denoiser_flag([denoiser for _, _, denoiser in layer_denoisers(model)], "enabled", False):
        yield model


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``trainable`` and ``total`` (as PEFT counts them), and per role."""
    model = unwrap(model)
    denoiser_ids = {id(p) for p in denoiser_parameters(model)}
    counts = dict.fromkeys(("trainable", "total", "denoisers", "denoisers_trainable", "backbone",
                            "backbone_trainable"), 0)
    for p in model.parameters():
        role = "denoisers" if id(p) in denoiser_ids else "backbone"
        counts["total"] += p.numel()
        counts[role] += p.numel()
        if p.requires_grad:
            counts["trainable"] += p.numel()
            counts[f"{role}_trainable"] += p.numel()
    return counts


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's line (``trainable params: … || all params: … || trainable%: …``), then what trains:
    denoisers, backbone, and whether the BatchNorm statistics are frozen."""
    counts = trainable_parameters(model)
    share = 100 * counts["trainable"] / counts["total"] if counts["total"] else 0.0
    print(f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || trainable%: {share:.4f}")
    layers = sum(1 for _ in layer_denoisers(model))
    print(f"denoisers of {layers} layers: {counts['denoisers']:,} params ({counts['denoisers_trainable']:,} trainable); "
          f"backbone: {counts['backbone']:,} params ({counts['backbone_trainable']:,} trainable); running statistics "
          f"of {len(norm_statistics_held(model))} norms frozen")
