"""`convert`: select a model's embedding layers, order them by execution, attach denoisers.

Also the training-time API that works on a converted model: `denoise_loss`,
`noise_loss_only`, `set_trainable`, `denoiser_parameters`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import re
import warnings
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.utils._pytree import tree_flatten, tree_map

from . import hf
from .config import DenoiseConfig
from .layers import TREE, LayerDenoiser, attach, denoiser_of
from .task_heads import task_heads

logger = logging.getLogger(__name__)

# Subclasses of the supported layers whose forward still computes ``W x + b`` with the
# stored weight (so the fusion stays exact) although they override `forward`.
_SAFE_FORWARD_SUBCLASSES = ("timm.layers.linear.Linear", "timm.layers.conv2d_same.Conv2dSame")
_BASE_FORWARDS = {nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}

STATE_ATTR = "_denoiserep_state"
# Why `keep_state_dict_keys` leaves a layer out (`fuse`'s report lists these layers as skipped).
WOULD_GAIN_A_BIAS = "bias-free with no BatchNorm that can absorb its constant: it would gain a bias (keep_state_dict_keys=True)"


@dataclass
class LayerPlan:
    """Where one denoiser goes: the layer's name, its timestep, and a BatchNorm that
    directly consumes its output (where a bias-free layer's constant term can be folded)."""

    name: str
    timestep: int
    following_norm: str | None = None


@dataclass
class LeftOut:
    """A layer of the configured types that got no denoiser, and why."""

    name: str
    reason: str


@dataclass
class ConversionState:
    """Stored on the converted root module (not in its state_dict)."""

    config: DenoiseConfig
    plan: list[LayerPlan]
    left_out: list[LeftOut] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "plan": [asdict(p) for p in self.plan],
                "left_out": [asdict(entry) for entry in self.left_out]}

    @classmethod
    def from_dict(cls, values: dict) -> "ConversionState":
        """The state `to_dict` wrote; a ValueError saying what is wrong for anything else (a file's
        plan is untrusted input)."""
        try:
            plan = [LayerPlan(**p) for p in values["plan"]]
            bad = [p for p in plan if not (isinstance(p.name, str) and isinstance(p.timestep, int)
                                           and isinstance(p.following_norm, (str, type(None))))]
            if bad:
                raise ValueError(f"layer entry {asdict(bad[0])} has fields of the wrong type")
            left_out = [LeftOut(**entry) for entry in values.get("left_out", [])]
            return cls(DenoiseConfig.from_dict(values["config"]), plan, left_out)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a conversion plan that denoiserep wrote ({type(error).__name__}: {error})") from None

    def summary(self, max_names: int = 12) -> str:
        """What was converted (execution order, with timesteps) and what was left out, and why."""
        names = [f"{p.name} (t={p.timestep})" for p in self.plan]
        shown = ", ".join(names[:max_names]) + (f" and {len(names) - max_names} more" if len(names) > max_names else "")
        lines = [f"DenoiseRep converted {len(self.plan)} layers: {shown}"]
        if self.left_out:
            lines.append(f"left out {len(self.left_out)}:")
            lines += [f"  {entry.name}: {entry.reason}" for entry in self.left_out]
        else:
            lines.append("left out: none")
        return "\n".join(lines)


def convert(model: nn.Module, config: DenoiseConfig | None = None, example_inputs: Any = None, *,
            return_report: bool = False) -> nn.Module | tuple[nn.Module, ConversionState]:
    """Wrap the selected embedding layers of ``model`` in place with DenoiseRep denoisers.

    ``example_inputs`` (a tensor, a tuple of positional arguments, or a dict of keyword
    arguments) is run once, in eval mode and without gradients, to order the layers by
    execution, to find layers that never run, and to find BatchNorms fed directly by
    bias-free layers. Returns ``model``; with ``return_report``, also the conversion's record
    (`ConversionState`: its ``summary()`` says what was converted and what was left out, and why;
    `conversion_summary(model)` gives the same text later).
    """
    config = config or DenoiseConfig()
    model = unwrap(model)
    if is_converted(model):
        raise RuntimeError(
            "this model already has DenoiseRep denoisers; converting twice would stack them. "
            "Keep training the converted model, or call denoiserep.fuse(model) first."
        )
    candidates, left_out = select_layers(model, config)
    plan, unplanned = plan_layers(model, candidates, config, example_inputs)
    state = ConversionState(config, plan, left_out + unplanned)
    apply_plan(model, state)
    logger.info("%s", state.summary())
    return (model, state) if return_report else model


def conversion_summary(model: nn.Module) -> str:
    """The converted layers (with their timesteps) and the layers left out, with the reason for each."""
    return conversion_state(model).summary()


def apply_plan(model: nn.Module, state: ConversionState) -> nn.Module:
    """Attach denoisers exactly as ``state`` says (used by `convert` and to reload checkpoints)."""
    config, schedule = state.config, state.config.make_schedule()
    names = dict(model.named_modules())
    missing = [p.name for p in state.plan if p.name not in names]
    if missing:
        raise ValueError(
            f"the conversion plan names layers this model does not have: {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}. The checkpoint was made from another architecture; "
            "build the same model it was converted from."
        )
    for index, layer_plan in enumerate(state.plan):
        layer = names[layer_plan.name]
        denoiser = LayerDenoiser(
            layer,
            schedule.step(layer_plan.timestep),
            form=config.denoiser,
            rank=config.rank,
            init=config.init,
            init_seed=config.init_seed + index,
            sample_noise=config.sample_noise,
            noise_seed=config.noise_seed + index,
            loss=config.loss,
            loss_token_fraction=config.loss_token_fraction,
            estimator=config.loss_estimator,
            path=config.training_path,
        )
        denoiser.following_norm = layer_plan.following_norm
        attach(layer, denoiser)
    setattr(model, STATE_ATTR, state)
    hf.install(model)  # save_pretrained that reloads right (see denoiserep.hf)
    logger.info("DenoiseRep: attached %d denoisers", len(state.plan))
    return model


# -- layer selection ----------------------------------------------------------------------


def select_layers(model: nn.Module, config: DenoiseConfig) -> tuple[dict[str, nn.Module], list[LeftOut]]:
    """Layers of the configured types whose names pass the include/exclude patterns, and the
    layers of those types left out (with the reason)."""
    heads = _excluded_modules(model, config)
    typed = [(n, m) for n, m in model.named_modules() if isinstance(m, tuple(config.layer_types)) and n]
    owners = _parameter_owners(model)
    bypassed = _functionally_called_layers(model)
    selected: dict[str, nn.Module] = {}
    left_out: list[LeftOut] = []
    unsafe: list[str] = []
    skipped: list[LeftOut] = []  # also warned about
    for name, module in typed:
        if id(module) in heads:
            left_out.append(LeftOut(name, heads[id(module)]))
            continue
        if not _name_selected(name, config):
            left_out.append(LeftOut(name, "not selected by target_modules / exclude_modules"))
            continue
        if not _fusable_forward(module):
            unsafe.append(f"{name} ({type(module).__name__})")
            left_out.append(LeftOut(name, f"{type(module).__name__} transforms its weight in forward(): not exactly "
                                          "fusable"))
            continue
        shared = sorted({owner for p in module.parameters(recurse=False) for owner in owners[id(p)]} - {name})
        if name in bypassed or shared:
            # Shared: fusing would write W′ into the one shared tensor and change the other layers too.
            reason = (f"{bypassed[name]} uses its weight directly, bypassing its forward" if name in bypassed
                      else f"shares parameters with {', '.join(shared)}")
            skipped.append(LeftOut(name, reason))
            left_out.append(skipped[-1])
            continue
        selected[name] = module
    if unsafe:
        warnings.warn(
            "these layers override forward() in a way DenoiseRep cannot fuse exactly (e.g. weight "
            f"standardization) and get no denoiser: {', '.join(unsafe)}",
            stacklevel=3,
        )
    if skipped:
        warnings.warn(f"these layers get no denoiser: {'; '.join(f'{e.name} ({e.reason})' for e in skipped)}",
                      stacklevel=3)
    left_out += _unsupported(model, config, heads)
    if not selected:
        available = ", ".join(f"{n} ({type(m).__name__})" for n, m in typed[:20]) or "none"
        more = f" and {len(typed) - 20} more" if len(typed) > 20 else ""
        raise ValueError(
            f"no layer matched: layer_types={[t.__name__ for t in config.layer_types]}, "
            f"target_modules={config.target_modules!r}, exclude_modules={config.exclude_modules!r}. "
            f"Layers of those types in this model: {available}{more}"
            f"{' (the task head is left out by exclude_classifier=True)' if config.exclude_classifier else ''}. "
            "Fix target_modules/exclude_modules (names as in model.named_modules()) or layer_types."
        )
    return selected, left_out


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the names of every module that holds it (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None and name not in owners.setdefault(id(parameter), []):
                owners[id(parameter)].append(name)
    return owners


def _functionally_called_layers(model: nn.Module) -> dict[str, str]:
    """Layers whose parent reads their weight directly instead of calling them, so that hooks on
    the layer never run: ``nn.MultiheadAttention.out_proj`` (``F.multi_head_attention_forward``)."""
    return {f"{name}.out_proj" if name else "out_proj": f"{type(module).__name__} {name or '(root)'}"
            for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}


# Affine layers with weights that DenoiseRep cannot carry a denoiser on (named, not skipped silently).
_UNSUPPORTED_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NOT_SUPPORTED = ": not supported"


def _unsupported(model: nn.Module, config: DenoiseConfig, heads: dict[int, str]) -> list[LeftOut]:
    found = []
    for name, module in model.named_modules():
        if id(module) in heads or not name or not _name_selected(name, config):
            continue
        if isinstance(module, _UNSUPPORTED_LAYERS):
            found.append(LeftOut(name, f"{type(module).__name__}{_NOT_SUPPORTED}"))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            found.append(LeftOut(f"{name}.in_proj_weight", "MultiheadAttention's packed input projection, not a layer"))
    if found:
        named = ", ".join(f"{e.name} ({e.reason.removesuffix(_NOT_SUPPORTED)})" for e in found)
        warnings.warn(
            f"DenoiseRep cannot convert these and leaves them as they are (only Linear and Conv1d/2d/3d fuse exactly): "
            f"{named}",
            stacklevel=4,
        )
    return found


def _excluded_modules(model: nn.Module, config: DenoiseConfig) -> dict[int, str]:
    """id(module) -> why it gets no denoiser, for every module inside a DenoiseRep⁻ head or (with
    ``exclude_classifier``) inside the model's task head (`denoiserep.task_heads`)."""
    from .head import DenoiseHead

    roots = {f"{name or '(root)'}": (m, "inside a DenoiseRep⁻ head") for name, m in model.named_modules()
             if isinstance(m, DenoiseHead)}
    if config.exclude_classifier:
        for name, head in task_heads(model).items():
            roots.setdefault(name, (head, f"the task head `{name}` (exclude_classifier=True)"))
    return {id(m): reason for root, reason in roots.values() for m in root.modules()}


def _name_selected(name: str, config: DenoiseConfig) -> bool:
    included = config.target_modules is None or _matches(name, config.target_modules)
    return included and not (config.exclude_modules is not None and _matches(name, config.exclude_modules))


def _matches(name: str, patterns: str | Sequence[str]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _fusable_forward(module: nn.Module) -> bool:
    for cls in type(module).__mro__:
        if f"{cls.__module__}.{cls.__qualname__}" in _SAFE_FORWARD_SUBCLASSES:
            return True
        if "forward" in vars(cls):
            return vars(cls)["forward"] in _BASE_FORWARDS
    return False


# -- execution order ----------------------------------------------------------------------


def plan_layers(
    model: nn.Module, candidates: dict[str, nn.Module], config: DenoiseConfig, example_inputs: Any
) -> tuple[list[LayerPlan], list[LeftOut]]:
    """Order candidates by execution and assign timesteps (noisiest first); the candidates that
    get no denoiser after all (never ran, or would gain a bias under ``keep_state_dict_keys``)."""
    if example_inputs is None:
        warnings.warn(
            "convert() got no example_inputs, so layers are ordered by registration order, which can "
            "differ from execution order, and bias-free layers cannot be matched to the BatchNorm that "
            "follows them. Pass example_inputs=<a batch your model accepts> to order layers by one "
            "forward pass.",
            stacklevel=3,
        )
        order, following = list(candidates), {}
    else:
        order, following = _trace(model, candidates, example_inputs)
    left_out = [LeftOut(n, "never ran on example_inputs") for n in candidates if n not in order]
    if config.keep_state_dict_keys:
        unfoldable = [n for n in order if candidates[n].bias is None and n not in following]
        if unfoldable:
            warnings.warn(
                "keep_state_dict_keys=True (the default): these bias-free layers have no BatchNorm that can absorb "
                f"their constant and get no denoiser, so that the fused weights load into the original architecture: "
                f"{', '.join(unfoldable)}. keep_state_dict_keys=False (--no-keep-state-dict-keys) denoises them too; "
                "each then gains a bias parameter at fuse time.",
                stacklevel=3,
            )
        left_out += [LeftOut(n, WOULD_GAIN_A_BIAS) for n in unfoldable]
        order = [n for n in order if n not in unfoldable]
        if not order:
            raise ValueError("keep_state_dict_keys=True left no layer to denoise (every selected layer is bias-free "
                             "with no BatchNorm after it); pass example_inputs, or keep_state_dict_keys=False")
    if config.timestep_mapping == "authors-code":
        if len(order) > config.num_timesteps:
            raise ValueError(f"{len(order)} layers need t up to {len(order)}, but the schedule has only "
                             f"{config.num_timesteps} steps; raise num_timesteps")
        by_name = authors_code_timesteps(model, order)
        timesteps = [by_name[name] for name in order]
    else:
        timesteps = config.timesteps_for(len(order))
    return [LayerPlan(name, t, following.get(name)) for name, t in zip(order, timesteps)], left_out


def authors_code_timesteps(model: nn.Module, converted: Sequence[str]) -> dict[str, int]:
    """The timestep the authors' released code gives each of the ``converted`` layers
    (``convert_denoise_linear`` / ``convert_vit_denoise_linear`` / ``convert_denoise_conv2d`` in
    ``denoiserep_op``, RG12138/DenoiseRep@66e5609): a recursion over ``named_children()`` that starts
    at N = len(converted), gives a converted child the current counter and decrements it, and hands
    the current counter to each other child's own recursion, whose decrements are lost. Siblings in
    different sub-modules therefore share timesteps: every ViT block's ``mlp.fc1`` / ``mlp.fc2`` get
    N / N − 1."""
    targets = set(converted)
    found: dict[str, int] = {}

    def visit(module: nn.Module, prefix: str, counter: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full in targets:
                found[full] = counter
                counter -= 1
            else:
                visit(child, f"{full}.", counter)

    visit(model, "", len(targets))
    return found


def _trace(model: nn.Module, candidates: dict[str, nn.Module], example_inputs: Any) -> tuple[list[str], dict[str, str]]:
    """One forward on ``example_inputs``: the execution order, and for each bias-free layer the
    BatchNorm its constant term can be folded into (see `_foldable_norms`)."""
    calls: Counter[str] = Counter()
    norm_calls: Counter[str] = Counter()
    order: list[str] = []
    bias_free_outputs: dict[str, tuple[torch.Tensor, int]] = {}  # layer -> (output, its version then)
    pairs: dict[str, str] = {}  # bias-free layer -> the BatchNorm that took its output as input
    norm_outputs: dict[str, torch.Tensor] = {}
    handles = []

    def on_layer_call(name: str):
        def hook(module, args):
            if calls[name] == 0:
                order.append(name)
            calls[name] += 1

        return hook

    def on_layer_output(name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                bias_free_outputs[name] = (output, output._version)

        return hook

    def on_norm_call(norm_name: str):
        def hook(module, args):
            norm_calls[norm_name] += 1
            x = args[0] if args else None
            for layer_name, (output, version) in bias_free_outputs.items():
                # The very tensor the layer returned, not modified in place since (an in-place
                # activation in between returns the same tensor with a new version).
                if x is output and x._version == version:
                    running_mean = getattr(module, "running_mean", None)
                    if running_mean is not None and running_mean.numel() == _out_channels(candidates[layer_name]):
                        pairs.setdefault(layer_name, norm_name)

        return hook

    def on_norm_output(norm_name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                norm_outputs.setdefault(norm_name, output)

        return hook

    for name, module in candidates.items():
        handles.append(module.register_forward_pre_hook(on_layer_call(name)))
        if module.bias is None:
            handles.append(module.register_forward_hook(on_layer_output(name)))
    for name, module in model.named_modules():
        if _is_batch_norm(module):
            handles.append(module.register_forward_pre_hook(on_norm_call(name)))
            handles.append(module.register_forward_hook(on_norm_output(name)))

    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        # With gradients, so that the autograd graph shows every consumer of a layer's output.
        with torch.enable_grad():
            outputs = call_model(model, _requiring_grad(example_inputs))
    except Exception as error:
        raise ValueError(
            f"example_inputs failed to run the model ({type(error).__name__}: {error}). Pass what "
            "model(...) accepts: a tensor, a tuple of positional arguments, or a dict of keyword "
            "arguments, e.g. torch.randn(1, 3, 224, 224), on the model's device."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in was_training.items():
            module.training = training

    never_ran = [n for n in candidates if calls[n] == 0]
    if never_ran:
        warnings.warn(
            f"{len(never_ran)} selected layers never ran on example_inputs and get no denoiser: "
            f"{', '.join(never_ran[:10])}{' …' if len(never_ran) > 10 else ''}",
            stacklevel=4,
        )
    repeated = {n: c for n, c in calls.items() if c > 1}
    if repeated:
        warnings.warn(
            "these layers run more than once per forward; each gets one denoiser at the timestep of "
            f"its first call: {', '.join(f'{n} ({c}x)' for n, c in repeated.items())}",
            stacklevel=4,
        )
    if not order:
        raise ValueError("none of the selected layers ran on example_inputs; check the inputs and the patterns")
    following = _foldable_norms(pairs, calls, norm_calls, bias_free_outputs, norm_outputs, outputs)
    unproven = sorted(set(pairs) - set(following))
    if unproven:
        warnings.warn(
            "these bias-free layers feed a BatchNorm but their output is also used elsewhere (or the layer or "
            "the BatchNorm runs twice), so their constant cannot be folded into it exactly; they gain a bias "
            f"at fuse time instead: {', '.join(f'{n} → {pairs[n]}' for n in unproven)}",
            stacklevel=4,
        )
    return order, following


def _requiring_grad(inputs: Any) -> Any:
    """Copies of the floating-point input tensors that require grad (the graph then exists even
    when every parameter is frozen)."""
    return tree_map(lambda v: v.detach().clone().requires_grad_(True)
                    if isinstance(v, torch.Tensor) and v.is_floating_point() else v, inputs)


def _foldable_norms(pairs: dict[str, str], calls: Counter, norm_calls: Counter,
                    layer_outputs: dict[str, tuple[torch.Tensor, int]], norm_outputs: dict[str, torch.Tensor],
                    outputs: Any) -> dict[str, str]:
    """The (layer → BatchNorm) pairs where folding is exact: both run once, and the BatchNorm is
    the only consumer of the layer's output. Folding moves the constant into the BatchNorm's
    running mean, which is right only for the BatchNorm's own path: any other consumer (a residual,
    a second head) would see the output without it.

    Proof from the autograd graph: every node that consumes the layer's output must lie inside the
    BatchNorm's computation, i.e. on a path from the BatchNorm's output back to the layer's output."""
    leaves, _ = tree_flatten(outputs)
    roots = [t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    consumers: dict[Any, list[Any]] = {}
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                consumers.setdefault(child, []).append(node)
                stack.append(child)
    following = {}
    for layer, norm in pairs.items():
        layer_node = layer_outputs[layer][0].grad_fn
        norm_output = norm_outputs.get(norm)
        if (calls[layer] != 1 or norm_calls[norm] != 1 or layer_node is None or norm_output is None
                or norm_output.grad_fn is None):
            continue
        inside = _nodes_between(norm_output.grad_fn, layer_node)
        if consumers.get(layer_node) and all(node in inside for node in consumers[layer_node]):
            following[layer] = norm
    return following


def _nodes_between(top: Any, bottom: Any) -> set:
    """Autograd nodes on some path from ``top`` down to ``bottom`` (``bottom`` excluded)."""
    reaches: dict[Any, bool] = {bottom: True}
    stack = [(top, False)]
    while stack:  # iterative post-order: a node reaches ``bottom`` if one of its inputs does
        node, expanded = stack.pop()
        if node in reaches and not expanded:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in reaches)
        else:
            reaches[node] = any(reaches.get(child, False) for child in children)
    return {node for node, reached in reaches.items() if reached and node is not bottom}


def _is_batch_norm(module: nn.Module) -> bool:
    """BatchNorm with running statistics, including the frozen kinds that are not a ``_BatchNorm``
    but hold the same four per-channel tensors and compute the eval-mode formula with them:
    torchvision's and timm's ``FrozenBatchNorm2d``, Hugging Face's ``DetrFrozenBatchNorm2d`` and its
    relatives (Conditional / Deformable DETR, RT-DETR, Table Transformer, …)."""
    if isinstance(module, _BatchNorm):
        return True
    tensors = [getattr(module, key, None) for key in ("weight", "bias", "running_mean", "running_var")]
    return (all(isinstance(t, torch.Tensor) and t.ndim == 1 for t in tensors)
            and len({t.numel() for t in tensors}) == 1)


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a batch (nested in tuples, lists or dicts) on ``device``."""
    return tree_map(lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v, batch)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*args)`` for a tuple or list, ``model(**kwargs)`` for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# -- working with a converted model -------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def layer_denoisers(model: nn.Module) -> Iterator[tuple[str, nn.Module, LayerDenoiser]]:
    """(layer name, layer, denoiser) for every converted layer, in module order."""
    for name, module in unwrap(model).named_modules():
        denoiser = denoiser_of(module)
        if denoiser is not None:
            yield name, module, denoiser


def is_converted(model: nn.Module) -> bool:
    return any(True for _ in layer_denoisers(model))


def conversion_roots(model: nn.Module) -> list[tuple[str, nn.Module, ConversionState]]:
    """(prefix, module, plan) of every module under ``model`` that `convert` was called on, in module order."""
    return [(prefix, module, module.__dict__[STATE_ATTR]) for prefix, module in model.named_modules()
            if STATE_ATTR in module.__dict__]


def drop_conversion_state(model: nn.Module) -> None:
    """Forget every conversion plan under ``model`` (its denoisers were fused or removed)."""
    for module in model.modules():
        module.__dict__.pop(STATE_ATTR, None)


def conversion_state(model: nn.Module) -> ConversionState:
    model = unwrap(model)
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model was not converted by denoiserep.convert(); call convert(model, ...) first")
    return state


# The denoisers of a model, found once per module tree (`layers.TREE` counts its changes).
_LOSS_MODULES: "weakref.WeakKeyDictionary[nn.Module, tuple[int, list[nn.Module]]]" = weakref.WeakKeyDictionary()


def loss_modules(model: nn.Module, *, fresh: bool = False) -> list[nn.Module]:
    """The layer denoisers and DenoiseRep⁻ heads of ``model``, in module order (cached)."""
    from .head import DenoiseHead

    root = unwrap(model)
    cached = _LOSS_MODULES.get(root)
    if cached is not None and cached[0] == TREE["generation"] and not fresh:
        return cached[1]
    modules = [m for m in root.modules() if isinstance(m, (LayerDenoiser, DenoiseHead))]
    _LOSS_MODULES[root] = (TREE["generation"], modules)
    return modules


def denoise_loss(model: nn.Module) -> torch.Tensor:
    """Sum over layers of the noise-prediction losses accumulated since the last call.

    Resets the accumulators. A model with no trainable denoisers (not converted, or every
    denoiser frozen, as in the alternating schedule's backbone phase) gives a zero tensor. A model
    with trainable denoisers but nothing accumulated raises: its forward ran in eval mode or without
    gradients, and a zero loss would train nothing without a word.
    """
    losses = [pair for module in loss_modules(model) for pair in module.pop_weighted_losses()]
    if not losses:  # look again without the cache before concluding that nothing ran
        modules = loss_modules(model, fresh=True)
        losses = [pair for module in modules for pair in module.pop_weighted_losses()]
        if not losses and any(p.requires_grad for module in modules for p in module.parameters()):
            raise RuntimeError(
                "denoise_loss(model) has no noise loss to return: since the last call the model ran no forward in "
                "train mode with gradients enabled (model.eval(), torch.no_grad() and torch.inference_mode() turn "
                "the noise losses off). Call model.train() and run a forward with gradients first."
            )
    if not losses:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    # float32 at least (half-precision losses are summed in float32; a float64 model's stay float64).
    dtype = torch.float64 if any(loss.dtype == torch.float64 for loss, _ in losses) else torch.float32
    values = [loss if loss.dtype == dtype else loss.to(dtype) for loss, _ in losses]
    if len(values) == 1:
        return values[0] * losses[0][1]
    # One weighted sum for every layer's loss (each queued as a sum over its elements, with 1 / count).
    return _WeightedSum.apply(_scales(tuple(scale for _, scale in losses), values[0].device, dtype), *values)


class _WeightedSum(torch.autograd.Function):
    """``scales · stack(values)``, whose backward hands every layer its gradient in one ``unbind``
    (autograd's own backward of ``stack`` dispatches a ``select`` per layer)."""

    @staticmethod
    def forward(ctx, scales: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scales)
        return torch.dot(torch.stack(values), scales)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scales,) = ctx.saved_tensors
        return None, *torch.mul(scales, grad).unbind(0)


@functools.lru_cache(maxsize=64)
def _scales(scales: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The layers' loss scales as a tensor, made once per batch shape (a copy to a GPU each step would
    wait for it)."""
    return torch.tensor(scales, dtype=dtype, device=device)


@contextlib.contextmanager
def noise_loss_only(model: nn.Module) -> Iterator[None]:
    """Forwards inside train only through the noise losses: label-free training (λ = 1).

    The model still runs the denoised path (each layer sees the inputs the fused model will
    give it), but W′ and the bias shifts are computed without autograd, so no activation is
    kept and nothing is back-propagated through the backbone. `denoise_loss` and its
    gradients are exactly those of the same forward outside the context; the model's
    outputs carry no gradient (use it only when the task loss is not needed).
    """
    with denoiser_flag([module for module in loss_modules(model) if isinstance(module, LayerDenoiser)],
                       "noise_loss_only", True):
        yield


@contextlib.contextmanager
def denoiser_flag(denoisers: list[LayerDenoiser], name: str, value: bool) -> Iterator[None]:
    """Set a flag (``noise_loss_only``, ``enabled``) on ``denoisers`` inside the block, restored after it."""
    previous = [getattr(denoiser, name) for denoiser in denoisers]
    for denoiser in denoisers:
        setattr(denoiser, name, value)
    try:
        yield
    finally:
        for denoiser, before in zip(denoisers, previous):
            setattr(denoiser, name, before)


def denoiser_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of the layer denoisers and DenoiseRep⁻ heads (what the paper trains)."""
    yield from (p for _, p in _named_parameters_by_role(model)[0])


def set_trainable(model: nn.Module, denoisers: bool = True, backbone: bool = False,
                  norm_statistics: bool | None = None) -> dict[str, int]:
    """Set ``requires_grad``: the paper trains only the denoisers (the default); the authors'
    alternating option trains the backbone through the fused weights in other phases.

    A frozen backbone includes its normalisation statistics: with ``norm_statistics`` False (the
    default when ``backbone`` is False) every BatchNorm (and InstanceNorm) that tracks running
    statistics keeps them while the model trains — it runs in eval mode even after ``model.train()``,
    so training sees exactly the statistics inference will use — as long as its own parameters stay
    frozen. ``norm_statistics=True`` lets them update in train mode as usual (the default when
    ``backbone`` is True). Returns the number of trainable parameters per role.
    """
    denoiser_params, backbone_params = _named_parameters_by_role(model)
    for _, p in denoiser_params:
        p.requires_grad_(denoisers)
    for _, p in backbone_params:
        p.requires_grad_(backbone)
    hold = not (backbone if norm_statistics is None else norm_statistics)
    for module in unwrap(model).modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            _hold_statistics(module, hold)
    return {
        "denoisers": sum(p.numel() for _, p in denoiser_params) if denoisers else 0,
        "backbone": sum(p.numel() for _, p in backbone_params) if backbone else 0,
    }


def _hold_statistics(norm: nn.Module, hold: bool) -> None:
    for key in [k for k, hook in norm._forward_pre_hooks.items() if hook is _keep_running_statistics]:
        del norm._forward_pre_hooks[key]
    if hold:
        norm.register_forward_pre_hook(_keep_running_statistics)


def _keep_running_statistics(norm: nn.Module, args: tuple) -> None:
    """Run a frozen norm in eval mode, whatever ``model.train()`` set (a hook on the norm itself: it
    holds however the model is called, through DDP or from a submodule's own method)."""
    if norm.training and not any(p.requires_grad for p in norm.parameters(recurse=False)):
        norm.training = False


def norm_statistics_held(model: nn.Module) -> list[str]:
    """The norms whose running statistics `set_trainable` froze (and that still have frozen parameters)."""
    return [name for name, module in unwrap(model).named_modules()
            if _keep_running_statistics in module._forward_pre_hooks.values()
            and not any(p.requires_grad for p in module.parameters(recurse=False))]


def _named_parameters_by_role(model: nn.Module):
    from .head import DenoiseHead

    model = unwrap(model)
    denoiser_ids = {
        id(p) for m in model.modules() if isinstance(m, (LayerDenoiser, DenoiseHead)) for p in m.parameters()
    }
    named = list(model.named_parameters())
    return [(n, p) for n, p in named if id(p) in denoiser_ids], [(n, p) for n, p in named if id(p) not in denoiser_ids]
