"""Fifteen real architectures (issue 21's fourteen and timm's resnet18), built without downloads: convert with the default DenoiseConfig (random
denoisers, so that fusion has something to prove), fuse, and check what a user needs afterwards.

    PYTHONPATH=src python benchmarks/architecture_table.py [--only NAME ...]

Columns: layers converted; layers left out (and why, grouped); fused vs unfused max relative error on
the example batch; strict load of the fused state_dict into a freshly built original model; export of the
fused model (torch.export, torch.jit.trace, ONNX run in onnxruntime, each compared with the eager output).
Needs the [hf] and [export] extras (transformers; onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import time
import warnings

import timm
import torch
import torchvision

import denoiserep as dr
from denoiserep import DenoiseConfig
from denoiserep.convert import WOULD_GAIN_A_BIAS


def _hf(name: str):
    import transformers as t

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, num_labels=10)
    if name == "vit":
        return t.ViTForImageClassification(t.ViTConfig(image_size=64, patch_size=16, **small))
    if name == "convnext":
        return t.ConvNextForImageClassification(t.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                                 num_labels=10))
    if name == "dinov2":
        return t.Dinov2ForImageClassification(t.Dinov2Config(image_size=64, patch_size=16, **small))
    if name == "segformer":
        return t.SegformerForSemanticSegmentation(t.SegformerConfig(num_labels=10))
    if name == "detr":
        return t.DetrForObjectDetection(t.DetrConfig(use_timm_backbone=True, backbone="resnet18",
                                                     use_pretrained_backbone=False, num_labels=10, num_queries=20))
    raise KeyError(name)


def _random_head(model):
    """torchvision's ViT starts its head at zero: every output would be 0 and any fusion error invisible."""
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


# name -> (builder, input size, keyword input name or None for a positional tensor)
ARCHITECTURES = {
    "timm convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), 64, None),
    "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), 64, None),
    "timm vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10), 64,
                                  None),
    "timm swinv2_cr_tiny_ns_224": (lambda: timm.create_model("swinv2_cr_tiny_ns_224", img_size=(128, 128),
                                                             window_size=4, num_classes=10), 128, None),
    "timm mobilenetv3_large_100": (lambda: timm.create_model("mobilenetv3_large_100", num_classes=10), 64, None),
    "timm resnet18": (lambda: timm.create_model("resnet18", num_classes=10), 64, None),
    "torchvision resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64, None),
    "torchvision mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 64, None),
    "torchvision vit_b_16": (lambda: _random_head(torchvision.models.vit_b_16(num_classes=10, image_size=64)), 64,
                             None),
    "torchvision convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), 64, None),
    "HF ViT": (lambda: _hf("vit"), 64, "pixel_values"),
    "HF ConvNeXt": (lambda: _hf("convnext"), 64, "pixel_values"),
    "HF Dinov2": (lambda: _hf("dinov2"), 64, "pixel_values"),
    "HF SegFormer": (lambda: _hf("segformer"), 64, "pixel_values"),
    "HF DETR": (lambda: _hf("detr"), 64, "pixel_values"),
}


def _call(model, x, keyword):
    return model(**{keyword: x}) if keyword else model(x)


def _leaves(output) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(output.to_tuple() if hasattr(output, "to_tuple") else output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def _close(actual, expected, tolerance=1e-4) -> bool:
    actual, expected = _leaves(actual), _leaves(expected)
    return len(actual) == len(expected) and all(
        a.shape == e.shape and float((a - e).abs().max() / e.abs().max().clamp_min(1e-12)) <= tolerance
        for a, e in zip(actual, expected))


class _Positional(torch.nn.Module):
    """model(pixel_values=x) as model(x), returning plain tensors: what the exporters take."""

    def __init__(self, model, keyword):
        super().__init__()
        self.model, self.keyword = model, keyword

    def forward(self, x):
        return tuple(_leaves(_call(self.model, x, self.keyword)))


def _exports(model, x, keyword) -> str:
    module = _Positional(model, keyword).eval()
    with torch.no_grad():
        expected = module(x)
    results = []
    try:
        exported = torch.export.export(module, (x,))
        with torch.no_grad():
            results.append("export ✓" if _close(exported.module()(x), expected) else "export ≠")
    except Exception as error:  # noqa: BLE001 - the table reports what failed
        results.append(f"export ✗ ({type(error).__name__})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, (x,), check_trace=False, strict=False)
        with torch.no_grad():
            results.append("jit ✓" if _close(traced(x), expected) else "jit ≠")
    except Exception as error:  # noqa: BLE001
        results.append(f"jit ✗ ({type(error).__name__})")
    try:
        import onnxruntime

        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
        program.save(buffer)
        session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        results.append("onnx ✓" if _close([torch.from_numpy(o) for o in outputs], expected) else "onnx ≠")
    except Exception as error:  # noqa: BLE001
        results.append(f"onnx ✗ ({type(error).__name__}: {str(error)[:60]})")
    return ", ".join(results)


def row(name: str) -> list[str]:
    build, size, keyword = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = build().eval()
    original_keys = list(model.state_dict())
    x = torch.randn(1, 3, size, size)
    example = {keyword: x} if keyword else x
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary below says the same
        _, state = dr.convert(model, DenoiseConfig(init="random", schedule="ddpm", timestep_range=(1, 1000)),
                              example_inputs=example, return_report=True)
    reasons = collections.Counter(_kind(e) for e in state.left_out)
    left_out = "; ".join(f"{count} {reason}" for reason, count in reasons.items()) or "none"
    with torch.no_grad():
        finite = all(t.isfinite().all() for t in _leaves(_call(model, x, keyword)))
    _, report = dr.fuse(model, example_inputs=example, return_report=True)
    fresh = build()
    try:
        fresh.load_state_dict(model.state_dict(), strict=True)
        strict = "yes" if list(model.state_dict()) == original_keys else "yes (keys reordered)"
    except RuntimeError as error:
        strict = f"NO ({str(error).splitlines()[0][:60]})"
    exports = _exports(model, x, keyword)
    seconds = time.perf_counter() - start
    error = f"{report.max_relative_error:.1e}" if finite else "outputs not finite"
    return [name, str(len(state.plan)), left_out, error, strict, exports, f"{seconds:.0f}"]


def _kind(entry) -> str:
    """A left-out layer's reason, without the layer's own name (so that the table can count them)."""
    if "task head" in entry.reason:
        return entry.reason.split(" (")[0]
    if "bypassing its forward" in entry.reason:
        return "MultiheadAttention out_proj (its weight is read directly)"
    if "packed input projection" in entry.reason:
        return "MultiheadAttention in_proj (packed, not a layer)"
    if entry.reason == WOULD_GAIN_A_BIAS:
        return f"would gain a bias ({entry.name.rsplit('.', 1)[-1]}; keep_state_dict_keys)"
    return entry.reason


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(ARCHITECTURES), help="these rows only")
    args = parser.parse_args(argv)
    header = ["architecture", "converted", "left out", "fused error", "strict load", "export", "s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.only or ARCHITECTURES:
        print("| " + " | ".join(row(name)) + " |", flush=True)


if __name__ == "__main__":
    main()
