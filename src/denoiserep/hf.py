"""Hugging Face models: `save_pretrained` of a converted model writes a checkpoint that reloads right.

Plain ``save_pretrained`` of a converted model stores each converted layer's weight as
``….parametrizations.weight.original``; ``from_pretrained`` then reports those weights missing and
re-initialises them at random, with nothing but a log line. `convert` therefore gives a converted
``PreTrainedModel`` its own ``save_pretrained``, which writes:

- ``model.safetensors`` with every backbone weight under its original key, named as the model names its
  modules (``from_pretrained`` rebuilds
  the original model exactly) and the denoisers' tensors beside them (``from_pretrained`` lists those as
  unexpected and leaves them out; ``Trainer(resume_from_checkpoint=…)`` loads them back into the
  converted model, whose ``load_state_dict`` accepts the original weight keys);
- ``denoiserep_adapter.safetensors``: the denoisers and the conversion plan (`denoiserep.load_adapter`).

So a Trainer checkpoint resumes training exactly, and a fresh model gets its denoisers back with
``denoiserep.load_adapter(Model.from_pretrained(path), path)``. A fused model is plain again and saves
as usual. Nothing here imports ``transformers``.
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

from torch import nn

ORIGINAL_KEY = "parametrizations.weight.original"


def is_pretrained_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def install(model: nn.Module) -> None:
    """Give a converted Hugging Face model the `save_pretrained` and key handling described above."""
    if not is_pretrained_model(model) or "save_pretrained" in model.__dict__:
        return
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    model._register_load_state_dict_pre_hook(_accept_original_keys, with_module=True)


def original_keys(model: nn.Module, state_dict: dict) -> dict:
    """``model``'s state_dict with each converted layer's W under the layer's own ``weight`` key
    (other parametrizations, such as weight norm, keep theirs)."""
    from .convert import layer_denoisers

    converted = {f"{name}.{ORIGINAL_KEY}" for name, _, _ in layer_denoisers(model)}
    return {key.removesuffix(ORIGINAL_KEY) + "weight" if key in converted else key: value
            for key, value in state_dict.items()}


def _save_pretrained(self: nn.Module, save_directory, *args, state_dict: dict | None = None,
                     is_main_process: bool = True, **kwargs):
    from .adapter import ADAPTER_FILE, save_adapter
    from .convert import is_converted

    save = type(self).save_pretrained
    if not is_converted(self):
        return save(self, save_directory, *args, state_dict=state_dict, is_main_process=is_main_process, **kwargs)
    state = original_keys(self, self.state_dict() if state_dict is None else state_dict)
    if "save_original_format" in inspect.signature(save).parameters:
        # Keys as the model names its modules (transformers 5 would otherwise rename them to an older
        # layout that `Trainer(resume_from_checkpoint=…)` loads with load_state_dict and cannot match).
        kwargs.setdefault("save_original_format", False)
    result = save(self, save_directory, *args, state_dict=state, is_main_process=is_main_process, **kwargs)
    if is_main_process:
        save_adapter(self, Path(save_directory) / ADAPTER_FILE)
    return result


def _accept_original_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load a converted layer's W from its original ``weight`` key when the converted key is absent."""
    from .convert import layer_denoisers

    for name, _, _ in layer_denoisers(module):
        plain, converted = f"{prefix}{name}.weight", f"{prefix}{name}.{ORIGINAL_KEY}"
        if plain in state_dict and converted not in state_dict:
            state_dict[converted] = state_dict.pop(plain)
