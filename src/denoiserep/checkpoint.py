"""Saving and loading: converted (unfused) models to resume training, fused weights as safetensors.

Every write goes to a temporary file in the destination folder first and is renamed into
place, so an interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .convert import ConversionState, apply_plan, conversion_state, is_converted, unwrap

CONVERTED_FORMAT = "denoiserep-converted/1"
FUSED_FORMAT = "denoiserep-fused/1"


class UntrustedFileError(ValueError):
    """A file holds Python objects that unpickling could run as code; it was not loaded."""


class OutputWriteError(OSError):
    """A file could not be written (disk full, read-only folder, …); the file it would have replaced
    is unchanged."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files are created as every other tool creates them: 0666 minus the user's umask (mkstemp's
# temporary files are 0600, which would otherwise survive the rename).
FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` (atomic on POSIX).

    When the write fails for lack of space or permission (what torch raises as RuntimeError and
    safetensors as SafetensorError included), the temporary file is removed and an
    `OutputWriteError` says so and that ``path`` is unchanged."""
    path = Path(path)
    previous = "the previous version stays intact" if path.exists() else "nothing was written"
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as error:
        _remove(tmp)
        raise OutputWriteError(
            f"could not write {path} ({type(error).__name__}: {error}); {path} is unchanged ({previous}). Free disk "
            "space or make the folder writable, then run the same command again (--resume continues a run)."
        ) from error
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def load_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """``torch.load`` of a file that may come from anyone: tensors and plain data only
    (``weights_only=True``); anything else is refused with `UntrustedFileError`, and nothing runs."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # torch names the object it refused
        detail = f"it references {found.group(1)}" if found else "it needs more than tensors and plain data"
        raise UntrustedFileError(
            f"refusing to load {path}: {detail}, and unpickling such a file can run code. denoiserep never writes "
            "such files; if this one is yours, re-save it as a plain state_dict (torch.save(model.state_dict(), "
            "path)) or as .safetensors."
        ) from None
    except Exception as error:  # truncated archives, text files, …: whatever torch's reader raised
        raise ValueError(f"{path} is not a readable torch file ({type(error).__name__}: {error}); it is truncated "
                         "or in another format") from None


def save_converted(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save a converted model's full state (backbone + denoisers + the conversion plan).

    ``extra`` (optimizer state, epoch, …) is stored alongside for resuming: tensors and plain
    data (dicts, lists, numbers, strings), since `load_converted` reads nothing else.
    """
    model = unwrap(model)
    payload = {
        "format": CONVERTED_FORMAT,
        "conversion": conversion_state(model).to_dict(),
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_converted(model: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Convert a freshly built original ``model`` as the checkpoint says and load its state.

    Returns the checkpoint's ``extra`` dict.
    """
    model = unwrap(model)
    payload = load_torch_file(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != CONVERTED_FORMAT:
        raise ValueError(
            f"{path} is not a denoiserep converted checkpoint (expected format {CONVERTED_FORMAT!r}). "
            "Fused weights are .safetensors files: load them with denoiserep.load_fused()."
        )
    if is_converted(model):
        raise RuntimeError("load_converted() needs a freshly built, unconverted model")
    apply_plan(model, ConversionState.from_dict(payload["conversion"]))
    load_state_dict_checked(model, payload["state_dict"], path)
    return payload["extra"]


def save_fused(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None,
               added_biases: list[str] | None = None) -> Path:
    """Save a fused (plain) model's weights as safetensors; tied tensors are stored once.

    ``added_biases``: the layers that gained a bias at fusion (`FuseReport.added_biases`); stored
    with the weights so that `load_fused` gives a freshly built model those biases."""
    model = unwrap(model)
    if is_converted(model):
        raise ValueError("this model still has denoisers; call denoiserep.fuse(model) before save_fused()")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state = _dedupe_shared(state)
    metadata = {**(metadata or {}), **({"added_biases": list(added_biases)} if added_biases else {})}
    meta = {"format": FUSED_FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors, or a ValueError that names the file when it is not one."""
    with _reading_safetensors(path):
        return load_file(str(path), device=str(device))


@contextlib.contextmanager
def _reading_safetensors(path: str | os.PathLike):
    """Turn safetensors' errors about ``path`` into one that names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        yield
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable .safetensors file ({error}): it is truncated or in another format. Pass the "
            "model.safetensors a run wrote (denoiserep.save_fused); a .pt/.pth state_dict goes to --init instead."
        ) from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A .safetensors file's metadata (its header only), or a ValueError that names the file."""
    with _reading_safetensors(path), safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def read_fused_metadata(path: str | os.PathLike) -> dict:
    """The metadata `save_fused` stored with the weights (values decoded), {} for other safetensors files."""
    raw = read_safetensors_metadata(path)
    if raw.get("format") != FUSED_FORMAT:
        return {}
    decoded = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value) if key != "format" else value
        except json.JSONDecodeError:
            raise ValueError(f"{path}: its metadata {key!r} is not the JSON denoiserep writes") from None
    return decoded


def load_fused(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load fused weights into a freshly built original model (strict key, shape and dtype check).

    Layers that gained a bias at fusion (`FuseReport.added_biases`, which `save_fused` stores with
    the weights when given as ``added_biases``) get one before loading."""
    model = unwrap(model)
    state = read_safetensors(path, device)
    _add_fusion_biases(model, read_fused_metadata(path).get("added_biases", []), state, path)
    shared = {k: v for k, v in model.state_dict().items() if k not in state}
    for key, tensor in list(shared.items()):
        # keys dropped by _dedupe_shared point at the same storage as a kept key
        twin = next((k for k, v in model.state_dict().items() if k in state and v.data_ptr() == tensor.data_ptr()), None)
        if twin is not None:
            state[key] = state[twin]
    load_state_dict_checked(model, state, path)
    return model


def _add_fusion_biases(model: nn.Module, names: list, state: dict, path) -> None:
    """Give the layers ``names`` (bias-free in the original architecture) the zero bias that fusion
    added to them, so that the file's ``<name>.bias`` has a place to load into."""
    modules = dict(model.named_modules())
    for name in names:
        layer = modules.get(name) if isinstance(name, str) else None
        if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) or f"{name}.bias" not in state:
            raise ValueError(f"{path} says fusion added a bias to layer {name!r}, which this model has no such "
                             "Linear/Conv layer for (or the file has no bias for); build the architecture the "
                             "run was fused from")
        if layer.bias is None:
            weight = layer.weight
            layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                      requires_grad=weight.requires_grad)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A user's weights file: .safetensors, or a torch file holding a state_dict, possibly
    nested under "state_dict" / "model" / "state_dict_ema" / "module" (common training scripts)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (nothing is downloaded: pass a local file)")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = load_torch_file(path)
    for key in ("state_dict", "model", "state_dict_ema", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tensor.numel())
        if tensor.numel() and ident in seen:
            continue
        seen[ident] = key
        out[key] = tensor
    return out


def _align_prefix(state: dict, own_keys: list[str]) -> dict:
    """``state`` with one leading prefix added or removed when that makes its keys the model's exactly."""
    if not state or set(state) & set(own_keys):
        return state
    first = next(iter(state))
    for own in own_keys:
        if own.endswith(first) and own != first:  # the model's keys carry a prefix the file lacks
            prefix = own[: -len(first)]
            if {prefix + key for key in state} == set(own_keys):
                return {prefix + key: value for key, value in state.items()}
        if first.endswith(own):  # the file's keys carry a prefix the model lacks
            prefix = first[: -len(own)]
            if all(key.startswith(prefix) for key in state) and {k[len(prefix):] for k in state} == set(own_keys):
                return {key[len(prefix):]: value for key, value in state.items()}
    return state


def load_state_dict_checked(
    model: nn.Module,
    state: dict,
    path: str | os.PathLike,
    fix: str = "Build the same architecture (name and kwargs, e.g. num_classes) that the checkpoint was saved from.",
) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what differs and says ``fix``.

    A file of the same network saved with or without one wrapper prefix (``module.`` of DDP, ``net.``
    of `SegmentationModel` around a torchvision / Hugging Face network) is matched up first."""
    own = model.state_dict()
    state = _align_prefix(state, list(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    # load_state_dict casts silently: int64 or bool values would become "weights" (every one wrong).
    wrong_kind = [
        f"{k}: checkpoint {str(v.dtype).removeprefix('torch.')} vs model {str(own[k].dtype).removeprefix('torch.')}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and _dtype_kind(v.dtype) != _dtype_kind(own[k].dtype)
    ]
    if missing or unexpected or mismatched or not_tensors or wrong_kind:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if mismatched:
            parts.append(f"shape mismatch: {mismatched[:5]}{' …' if len(mismatched) > 5 else ''}")
        if not_tensors:
            parts.append(f"not tensors: {not_tensors[:5]}{' …' if len(not_tensors) > 5 else ''}")
        if wrong_kind:
            parts.append(f"dtype mismatch (integer or bool values for floating-point tensors, or the reverse): "
                         f"{wrong_kind[:5]}{' …' if len(wrong_kind) > 5 else ''}")
        if not (missing or unexpected or mismatched):
            fix = "Its values were changed after it was written (cast or replaced); use the file as it was saved."
        raise ValueError(
            f"checkpoint {path} does not match this model's layers ({'; '.join(parts)}). {fix}"
        )
    model.load_state_dict(state, strict=True)


def _dtype_kind(dtype: torch.dtype) -> str:
    """Floating point, complex, bool or integer: a file's tensor may change precision, not kind."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"
