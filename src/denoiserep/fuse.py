"""`fuse`: replace every denoised layer by the plain layer with W′ and b′ (PEFT's merge_and_unload)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from .convert import WOULD_GAIN_A_BIAS, call_model, conversion_roots, drop_conversion_state, layer_denoisers, unwrap
from .finite import max_abs_difference, non_finite, within, worst
from .layers import detach

logger = logging.getLogger(__name__)


class FusionError(RuntimeError):
    """The fused model does not compute what the converted one did (beyond rounding)."""


@dataclass
class FusedLayer:
    name: str
    timestep: int
    bias: str  # "merged" into the layer's bias, "folded into <norm>", or "added" (new parameter)


@dataclass
class FuseReport:
    layers: list[FusedLayer] = field(default_factory=list)
    max_relative_error: float | None = None  # measured on example_inputs, when given
    # Layers `convert` gave no denoiser because they would have gained a bias (keep_state_dict_keys).
    skipped: list[str] = field(default_factory=list)

    @property
    def added_biases(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.bias == "added"]

    def summary(self) -> str:
        """How many layers were fused and where their constants went; which gained a bias and which
        were skipped so that none would (``keep_state_dict_keys``)."""
        merged = sum(layer.bias == "merged" for layer in self.layers)
        folded = sum(layer.bias.startswith("folded") for layer in self.layers)
        lines = [f"fused {len(self.layers)} layers: {merged} into their own bias, {folded} folded into the BatchNorm "
                 f"after them, {len(self.added_biases)} gained a bias"
                 + (f" ({', '.join(self.added_biases)}: the fused state_dict has these '.bias' keys the original lacks)"
                    if self.added_biases else "")]
        if self.skipped:
            lines.append(f"skipped (no denoiser, so that no layer gains a bias; keep_state_dict_keys=True): "
                         f"{', '.join(self.skipped)}")
        if self.max_relative_error is not None:
            lines.append(f"fused == unfused on example_inputs: max relative error {self.max_relative_error:.1e}")
        return "\n".join(lines)


def fuse(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    tolerance: float | None = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, FuseReport]:
    """Fuse every denoiser into its layer, in place; afterwards the model is plain PyTorch.

    Module types, parameter shapes and ``state_dict`` keys become the original model's. A
    bias-free layer's constant term is folded into the running mean of the BatchNorm that
    directly consumes its output (exact in eval mode; in train mode BatchNorm removes it
    anyway); where there is none, the layer gains a bias, and the report and a warning say so.

    W′ is computed by the same function as the training forward (so fused weights are the
    weights training saw) and the bias shift in float64; fusion is deterministic: the same
    checkpoint always gives bit-identical weights on a given machine. With ``example_inputs``, the eval-mode outputs before and after
    fusion are compared and a RuntimeError is raised if their relative error exceeds
    ``tolerance`` (`FusionError`; default: 1e-4, or 4 × the rounding unit of the model's lowest floating-point
    precision, e.g. 0.031 for bfloat16, where rounding W′ alone moves outputs by about 1e-2).
    Non-finite values (in a denoised layer's or its denoiser's tensors, a NaN output before fusion,
    a fused weight, a NaN or new infinity in the fused outputs) are a `FusionError` naming them;
    the model is left unfused when they are found before fusion.
    """
    model = unwrap(model)
    dtype = _lowest_precision(model)
    if tolerance is None:
        tolerance = max(1e-4, 4 * torch.finfo(dtype).eps)
    layers = _with_following_norms(model)
    if not layers:
        raise ValueError(
            "nothing to fuse: this model has no DenoiseRep denoisers. Call denoiserep.convert(model) "
            "first, or load a converted checkpoint with denoiserep.load_converted()."
        )
    _check_finite_before_fusion(layers)
    reference = eval_outputs(model, example_inputs) if example_inputs is not None else None
    if reference is not None and any(output.isnan().any() for output in reference):
        raise FusionError(
            "the converted model outputs NaN on example_inputs before any fusion (outputs "
            f"{[i for i, output in enumerate(reference) if output.isnan().any()]}); nothing was fused. Its weights "
            "are finite, so the inputs or the network's own arithmetic overflow: check example_inputs and the model "
            "in float32."
        )
    report = FuseReport(skipped=_skipped_for_keys(model))
    overflowed = []
    with torch.no_grad():
        for name, layer, denoiser, norm_name, norm in layers:
            weight = layer.parametrizations.weight.original
            # The weight exactly as the training forward computed it (float32 at least: half-
            # precision weights are fused in float32 and rounded once); the bias in float64.
            compute_dtype = torch.promote_types(weight.dtype, torch.float32)
            new_weight = denoiser(weight.detach().to(compute_dtype))
            shift = denoiser.bias_shift(weight.detach().double()).to(weight.dtype)
            if non_finite({"weight": new_weight.to(weight.dtype), "bias": shift}):
                overflowed.append(name)
            detach(layer)
            _remove_weight_parametrization(layer)
            layer.weight.copy_(new_weight.to(weight.dtype))
            if layer.bias is not None:
                layer.bias.add_(shift)
                how = "merged"
            elif norm is not None:
                # BN(y + s) with running mean m equals BN(y) with running mean m − s.
                norm.running_mean.sub_(shift.to(norm.running_mean.dtype))
                how = f"folded into {norm_name}"
            else:
                layer.bias = nn.Parameter(shift, requires_grad=weight.requires_grad)
                how = "added"
            report.layers.append(FusedLayer(name, denoiser.timestep, how))
    drop_conversion_state(model)
    if overflowed:
        raise FusionError(
            f"the fused weights of {len(overflowed)} layers overflowed to NaN or infinity in their dtype: "
            f"{', '.join(overflowed[:5])}{' …' if len(overflowed) > 5 else ''}. The denoisers' values are too large "
            "for the layers' precision; the model is unusable: reload the checkpoint (in float32) and fuse again."
        )
    if report.added_biases:
        logger.warning(
            "fuse: %d bias-free layers had no BatchNorm that could absorb their constant exactly and gained a bias "
            "parameter "
            "(their state_dict now has a '.bias' key the original lacks): %s",
            len(report.added_biases),
            ", ".join(report.added_biases),
        )
    if reference is not None:
        fused_outputs = eval_outputs(model, example_inputs)
        # (an infinity the unfused model returns too, e.g. a -inf attention mask, is no error)
        broken = [i for i, (ref, out) in enumerate(zip(reference, fused_outputs))
                  if ref.shape == out.shape and (out.isnan().any() or (out.isinf() & (out != ref)).any())]
        if broken:
            raise FusionError(
                f"the fused model outputs NaN or infinite values on example_inputs (outputs {broken}) where the "
                "unfused model's are finite; do not use these weights. Report this model; meanwhile exclude the "
                "layers involved (exclude_modules)."
            )
        report.max_relative_error = max_relative_error(reference, fused_outputs)
        if not within(report.max_relative_error, tolerance):
            raise FusionError(
                f"fused outputs differ from the unfused model by a relative error of {report.max_relative_error:.3g} "
                f"> {tolerance:g} (the tolerance for a {str(dtype).removeprefix('torch.')} model). Rounding cannot "
                "explain that much: the model computes something the conversion did not see (a module that reads "
                "a converted layer's weight directly, or a forward that differs from the one example_inputs "
                "traced). Report this model; meanwhile exclude the layers involved (exclude_modules) and convert "
                "again. If the difference is the precision you expect, pass a larger tolerance."
            )
    return (model, report) if return_report else model


def _check_finite_before_fusion(layers: list[tuple]) -> None:
    """A `FusionError` naming every denoised layer whose weight, bias or denoiser holds NaN or an infinity."""
    broken = []
    for name, layer, denoiser, _, _ in layers:
        tensors = {f"{name}.weight": layer.parametrizations.weight.original}
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
        tensors.update({f"{name} denoiser {key}": value for key, value in denoiser.state_dict().items()})
        broken += non_finite(tensors)
    if broken:
        raise FusionError(
            f"{len(broken)} tensors hold NaN or infinite values, so the fused weights would too: "
            f"{', '.join(broken[:5])}{' …' if len(broken) > 5 else ''}. Nothing was fused. Training diverged before "
            "this checkpoint was written, or the file is damaged: use an earlier checkpoint."
        )


def _lowest_precision(model: nn.Module) -> torch.dtype:
    """The least precise floating-point dtype among the model's parameters (float32 if none)."""
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point} or {torch.float32}
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)


def _skipped_for_keys(model: nn.Module) -> list[str]:
    """The layers every `convert` under ``model`` left out so that none would gain a bias."""
    return [f"{prefix}.{e.name}" if prefix else e.name for prefix, _, state in conversion_roots(model)
            for e in state.left_out if e.reason == WOULD_GAIN_A_BIAS]


def _remove_weight_parametrization(layer: nn.Module) -> None:
    """Give ``layer`` back its plain class and its original ``weight`` Parameter.

    torch's ``remove_parametrizations`` deletes the property from the parametrized class,
    which ``copy.deepcopy`` shares between copies (an EMA copy, say), so fusing one copy
    would break the other; this leaves the class alone when only ``weight`` is parametrized.
    """
    if len(layer.parametrizations) > 1:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    else:
        original = layer.parametrizations["weight"].original
        del layer._modules["parametrizations"]
        layer.__class__ = type(layer).__bases__[0]
        layer._parameters["weight"] = original
    # Put `weight` first again so that the fused state_dict lists keys in the original order.
    params = layer._parameters
    for key in [k for k in params if k != "weight"]:
        params[key] = params.pop(key)


def _with_following_norms(model: nn.Module) -> list[tuple]:
    """(layer name, layer, denoiser, BatchNorm name, BatchNorm or None) for every denoised layer.

    A plan's BatchNorm names are relative to the module `convert` was called on, which may be
    a submodule of ``model`` (``convert(detector.backbone)``, then ``fuse(detector)``).
    """
    roots = [(prefix, module) for prefix, module, _ in conversion_roots(model)]
    found, seen = [], set()
    # Innermost roots first (reversed pre-order): a layer belongs to the nearest convert() call.
    for prefix, root in reversed(roots or [("", model)]):
        modules = dict(root.named_modules())
        qualify = (lambda name, prefix=prefix: f"{prefix}.{name}") if prefix else (lambda name: name)
        for name, layer, denoiser in layer_denoisers(root):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            norm_name, norm = denoiser.following_norm, None
            if norm_name is not None:
                norm = modules.get(norm_name)
                if norm is None or getattr(norm, "running_mean", None) is None:
                    raise ValueError(
                        f"layer {qualify(name)} should fold its constant into BatchNorm {qualify(norm_name)}, which "
                        "this model lacks or which tracks no running statistics; the model changed after convert()"
                    )
                norm_name = qualify(norm_name)
            found.append((qualify(name), layer, denoiser, norm_name, norm))
    return found


def eval_outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """Every floating-point tensor ``model(inputs)`` returns (nested outputs flattened), in eval mode
    without gradients, as float32 copies; the model's train/eval flags are restored."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            leaves, _ = tree_flatten(call_model(model, inputs))
    finally:
        for module, training in was_training.items():
            module.training = training
    return [t.detach().float().clone() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def max_relative_error(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """The worst ``max |actual − reference| / max |reference|`` over matching tensors, the scale over
    the reference's finite entries (an infinity it shares, e.g. a −inf attention mask, must not make
    every other difference vanish); NaN when a NaN is in either (`denoiserep.finite`: a NaN error
    never passes a tolerance)."""
    if len(reference) != len(actual):
        raise RuntimeError("the fused model returns a different number of tensors than the unfused one")
    errors = []
    for ref, out in zip(reference, actual):
        if ref.shape != out.shape:
            raise RuntimeError(f"fused output shape {tuple(out.shape)} differs from unfused {tuple(ref.shape)}")
        if ref.numel():
            finite = ref[torch.isfinite(ref)]
            scale = float(finite.abs().max().double().clamp_min(1e-12)) if finite.numel() else 1e-12
            errors.append(max_abs_difference(ref, out) / scale)
    return worst(errors)
