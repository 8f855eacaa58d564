"""Benchmark suite (tracker issue 4): what DenoiseRep costs at inference and in training.

    python -m denoiserep.bench                       # full CPU run, rewrites BENCHMARKS.md
    python -m denoiserep.bench --quick --output /tmp/b.md
    python -m denoiserep.bench --device cuda --dtype bf16 --batch 32 --output BENCHMARKS_GPU.md

Sections: ``inference`` (params, FLOPs and latency of baseline / converted / fused /
DenoiseRep⁻), ``training`` (step time, peak memory and parameter count of the denoiser
phase against plain fine-tuning) and ``accuracy`` (``denoiserep.bench_accuracy``: several
seeds on the embedded datasets, paired against a control).

Latency on a shared machine drifts, so every comparison is timed interleaved (A B A B …,
the order rotated each round) and reported as the median of per-round ratios, never as a
ratio of absolute times taken at different moments.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import denoiserep as dr
from denoiserep.config import DenoiseConfig
from denoiserep.fuse import _eval_outputs, _relative_error
from denoiserep.models import HeadedClassifier, feature_dim
from denoiserep.timing import Timing, cpu_clock, cuda_clock, forward_flops, time_interleaved

SECTIONS = ("inference", "training", "accuracy", "calibration")
SECTION_TITLES = {"inference": "## 1. Inference cost", "training": "## 2. Training cost", "accuracy": "## 3. Accuracy",
                  "calibration": "## 4. Calibration"}
DENOISE_MINUS_SWEEP = (1, 10, 50, 100)
PAPER_DENOISE_MINUS_OVERHEAD = 0.15  # TransReID-SSL, +15% inference time (the paper's table)
REFERENCE_STEP_RATIO = 1.58  # the authors' released code, ViT-S, batch 8, 2 CPU threads
REFERENCE_DENOISER_PARAMS = (133e6, 22e6)  # the authors' code: denoiser vs ViT-S backbone parameters
TARGET_FUSED_LATENCY = (0.98, 1.02)
TARGET_STEP_RATIO = 1.3
TARGET_MEMORY_RATIO = 1.5
TARGET_PARAMS_FULL = 1.0
TARGET_PARAMS_LOW_RANK = 0.1
TARGET_FUSE_SECONDS = ("vit_base_patch16_224", 2.0)  # CPU target
MIB = 2**20


# -- settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on; the defaults per device are chosen in `settings_from_args`."""

    device: str = "cpu"
    dtype: str = "float32"
    quick: bool = False
    infer_batch: int = 1
    train_batch: int = 8
    precise_rounds: int = 30  # baseline vs fused vs DenoiseRep⁻ at the matched step count
    dense_precise_rounds: int = 10  # the same for detection / segmentation (long calls)
    sweep_rounds: int = 5  # baseline vs unfused vs the DenoiseRep⁻ step sweep
    dense_sweep_rounds: int = 3
    train_rounds: int = 4
    warmup: int = 2
    train_warmup: int = 0  # the FLOP-counted step before the timed ones is the warm-up
    step_sweep: tuple[int, ...] = DENOISE_MINUS_SWEEP
    profile_training: bool = True
    threads: int | None = None  # torch CPU threads; None keeps torch's default


def apply_threads(settings: Settings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """CPU: batch 1 at inference and 8 in training (the reference measurement's batch);
    CUDA: the given batch everywhere and more rounds, since calls are short."""
    if args.device == "cuda":
        batch = args.batch or 32
        base = Settings(device="cuda", infer_batch=batch, train_batch=batch, precise_rounds=50,
                        dense_precise_rounds=30, sweep_rounds=10, dense_sweep_rounds=5, train_rounds=10, warmup=5)
    else:
        base = Settings(infer_batch=args.batch or 1, train_batch=args.batch or 8)
    if args.quick:
        base = replace(base, infer_batch=args.batch or 1, train_batch=args.batch or 2, precise_rounds=3,
                       dense_precise_rounds=2, sweep_rounds=2, dense_sweep_rounds=1, train_rounds=2, warmup=1,
                       step_sweep=(1, 10), profile_training=False)
    return replace(base, dtype=args.dtype, quick=args.quick, threads=args.threads)


def autocast(settings: Settings) -> contextlib.AbstractContextManager:
    """bf16 runs under autocast (weights stay float32, as a user would deploy them)."""
    if settings.dtype == "bf16":
        return torch.autocast(settings.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def clock_for(settings: Settings) -> Callable[[Callable[[], object]], float]:
    return cuda_clock if settings.device == "cuda" else cpu_clock


# -- models --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked architecture. ``kind`` decides the inputs, what gets converted and
    where the DenoiseRep⁻ head goes; ``init`` is the denoisers' initialisation."""

    name: str  # the timm / torchvision constructor
    kind: str  # "classification" | "detection" | "segmentation"
    image_size: int
    cpu_image_size: int | None = None
    timm_kwargs: tuple[tuple[str, Any], ...] = ()
    init: str = "random"

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.timm_kwargs if k != "img_size")
        return f"{self.name} ({extra})" if extra else self.name

    def size(self, settings: Settings) -> int:
        return self.cpu_image_size if settings.device == "cpu" and self.cpu_image_size else self.image_size

    def build(self, settings: Settings) -> nn.Module:
        if self.kind == "classification":
            return timm.create_model(self.name, **dict(self.timm_kwargs))
        if self.kind == "detection":
            size = self.size(settings)
            return torchvision.models.detection.fasterrcnn_resnet50_fpn(
                weights=None, weights_backbone=None, min_size=size, max_size=size
            )
        return torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False)


CLASSIFIERS = [ModelSpec(n, "classification", 224) for n in (
    "vit_small_patch16_224", "vit_base_patch16_224", "swinv2_cr_tiny_ns_224", "resnet50", "convnext_tiny")]
# Random proposals make the detector's cost depend on its weights; identity-initialised
# denoisers keep the fused detector's proposals, hence its FLOPs, comparable to the baseline's.
DETECTOR = ModelSpec("fasterrcnn_resnet50_fpn", "detection", 512, cpu_image_size=256, init="identity")
SEGMENTER = ModelSpec("fcn_resnet50", "segmentation", 512, cpu_image_size=160)
# Quick mode: a 2-block ViT-Ti at 64 px, so that the smoke test stays well under a minute.
QUICK_VIT = ModelSpec("vit_tiny_patch16_224", "classification", 64, timm_kwargs=(("img_size", 64), ("depth", 2)))


def inference_specs(settings: Settings) -> list[ModelSpec]:
    return [QUICK_VIT] if settings.quick else [*CLASSIFIERS, DETECTOR, SEGMENTER]


def training_specs(settings: Settings) -> list[ModelSpec]:
    return [QUICK_VIT] if settings.quick else [CLASSIFIERS[0], CLASSIFIERS[3]]


def model_inputs(spec: ModelSpec, batch: int, settings: Settings) -> tuple:
    """Positional arguments of ``model(...)``: a tensor, or a list of images for detection."""
    size, device = spec.size(settings), settings.device
    if spec.kind == "detection":
        return ([torch.rand(3, size, size, device=device) for _ in range(batch)],)
    return (torch.randn(batch, 3, size, size, device=device),)


def conversion_root(spec: ModelSpec, model: nn.Module) -> nn.Module:
    """Detection converts its backbone (ResNet-50 body + FPN), as issue 4 asks; RPN and RoI
    heads stay plain. The other models are converted whole (timm's classifier excluded)."""
    return model.backbone if spec.kind == "detection" else model


def root_example(spec: ModelSpec, settings: Settings) -> torch.Tensor:
    size = spec.size(settings)
    return torch.randn(1, 3, size, size, device=settings.device)


def benchmark_config(spec: ModelSpec, **overrides: Any) -> DenoiseConfig:
    """keep_state_dict_keys: the fused model must load into the original architecture (Swin's
    bias-free patch-merging ``reduction`` layers are left out for that)."""
    return DenoiseConfig(init=spec.init, keep_state_dict_keys=True, **overrides)


def convert_quietly(root: nn.Module, config: DenoiseConfig, example: torch.Tensor) -> None:
    """The skipped layers are reported in the conversion table, not as warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dr.convert(root, config, example_inputs=example)


# -- DenoiseRep⁻ ---------------------------------------------------------------------------


class PerLocationHead(nn.Module):
    """DenoiseRep⁻ for dense models: the head denoises every RoI feature (N, C) or every
    pixel of a feature map (B, C, H, W), since there is no single feature vector per image."""

    def __init__(self, head: dr.DenoiseHead):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return self.head(x)
        b, c, h, w = x.shape
        rows = self.head(x.permute(0, 2, 3, 1).reshape(-1, c))
        return rows.reshape(b, h, w, c).permute(0, 3, 1, 2)


def denoise_minus_model(spec: ModelSpec, baseline: nn.Module, steps: int) -> nn.Module:
    """Detection: the head on each RoI's box-head feature (1024-d), before the box predictor.
    Segmentation: on each pixel of the backbone's output map (2048-d), before the FCN head."""
    if spec.kind == "classification":
        # Shares the baseline's modules (it adds only the head): no copy of the backbone.
        model = HeadedClassifier(baseline, dr.DenoiseHead(feature_dim(baseline), steps=steps))
    elif spec.kind == "detection":
        model = copy.deepcopy(baseline)
        box_head = model.roi_heads.box_head
        model.roi_heads.box_head = nn.Sequential(box_head, PerLocationHead(dr.DenoiseHead(box_head.fc7.out_features, steps=steps)))
    else:
        model = copy.deepcopy(baseline)
        model.classifier = nn.Sequential(PerLocationHead(dr.DenoiseHead(model.classifier[0].in_channels, steps=steps)), model.classifier)
    return model.to(next(baseline.parameters()).device).eval()


# -- inference -----------------------------------------------------------------------------


@dataclass
class ConversionInfo:
    model: str
    scope: str
    image_size: int
    converted: int
    candidates: int
    skipped: str
    backbone_params: int
    denoiser_params: int
    fuse_s: float
    fuse_flops: int
    added_biases: int
    relative_error: float
    keys_equal: bool


@dataclass
class VariantRow:
    model: str
    variant: str
    params: int
    flops: int
    timing: Timing


@dataclass
class InferenceResult:
    conversions: list[ConversionInfo] = field(default_factory=list)
    rows: list[VariantRow] = field(default_factory=list)
    matched: dict[str, int] = field(default_factory=dict)


def count_flops(model: nn.Module, inputs: tuple, settings: Settings) -> int:
    """FLOPs of one forward, under the run's precision."""
    with autocast(settings):
        return forward_flops(model, *inputs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_fn(model: nn.Module, inputs: tuple, settings: Settings) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad(), autocast(settings):
            return model(*inputs)

    return run


def skipped_layers(root: nn.Module, converted_root: nn.Module, config: DenoiseConfig) -> tuple[int, str]:
    """How many layers of the configured types there are, and which kinds were left out
    (grouped by their last name component, e.g. ``head ×1, reduction ×3``)."""
    typed = [n for n, m in root.named_modules() if n and isinstance(m, tuple(config.layer_types))]
    converted = {name for name, _, _ in dr.layer_denoisers(converted_root)}
    left_out = Counter(name.split(".")[-1] for name in typed if name not in converted)
    return len(typed), ", ".join(f"{k} ×{v}" for k, v in sorted(left_out.items())) or "none"


@dataclass
class FuseCheck:
    fused: nn.Module
    seconds: float
    flops: int
    added_biases: int
    relative_error: float
    keys_equal: bool


def fuse_and_check(spec: ModelSpec, converted: nn.Module, baseline: nn.Module, inputs: tuple) -> FuseCheck:
    """Fuse a copy of the converted model (timed, and its FLOPs counted: the counter's
    overhead is per operator, negligible next to the products), then check it against the
    unfused model and against the original architecture's state_dict keys."""
    fused = copy.deepcopy(converted)
    counter = FlopCounterMode(display=False)
    start = time.perf_counter()
    with counter:
        _, report = dr.fuse(conversion_root(spec, fused), return_report=True)
    seconds = time.perf_counter() - start
    error = _relative_error(_eval_outputs(converted, inputs), _eval_outputs(fused, inputs))
    keys_equal = list(fused.state_dict()) == list(baseline.state_dict())
    return FuseCheck(fused.eval(), seconds, counter.get_total_flops(), len(report.added_biases), error, keys_equal)


def convert_and_fuse(spec: ModelSpec, baseline: nn.Module, inputs: tuple, settings: Settings) -> tuple[nn.Module, FuseCheck, ConversionInfo]:
    """The converted (unfused) model, its fused copy, and what the conversion did."""
    config = benchmark_config(spec)
    converted = copy.deepcopy(baseline)
    convert_quietly(conversion_root(spec, converted), config, root_example(spec, settings))
    converted.eval()
    check = fuse_and_check(spec, converted, baseline, inputs)
    candidates, skipped = skipped_layers(conversion_root(spec, baseline), conversion_root(spec, converted), config)
    info = ConversionInfo(
        spec.label, "backbone (body + FPN)" if spec.kind == "detection" else "whole model", spec.size(settings),
        sum(1 for _ in dr.layer_denoisers(converted)), candidates, skipped, count_params(baseline),
        sum(p.numel() for p in dr.denoiser_parameters(converted)), check.seconds, check.flops, check.added_biases,
        check.relative_error, check.keys_equal)
    return converted, check, info


def denoise_minus_variants(spec: ModelSpec, baseline: nn.Module, matched: int, settings: Settings) -> dict[str, nn.Module]:
    """DenoiseRep⁻ at the matched step count and over the sweep. Dense models run the head
    once per RoI / pixel: too slow to time at N steps on a CPU, so they get one step, which
    gives the per-step cost (FLOPs are linear in T)."""
    if spec.kind != "classification":
        return {"DenoiseRep⁻ T=1": denoise_minus_model(spec, baseline, 1)}
    variants = {f"DenoiseRep⁻ T={matched} (matched)": denoise_minus_model(spec, baseline, matched)}
    variants.update({f"DenoiseRep⁻ T={t}": denoise_minus_model(spec, baseline, t) for t in settings.step_sweep if t != matched})
    return variants


def time_variants(spec: ModelSpec, variants: dict[str, nn.Module], precise: list[str], inputs: tuple, settings: Settings) -> dict[str, Timing]:
    """Two interleaved groups, each with its own baseline: ``precise`` (many rounds: the ±2%
    question) and the rest (the unfused model and the sweep: large effects, few rounds)."""
    run = {label: forward_fn(model, inputs, settings) for label, model in variants.items()}
    dense = spec.kind != "classification"
    clock = clock_for(settings)
    timings = time_interleaved({k: run[k] for k in precise}, "baseline",
                               settings.dense_precise_rounds if dense else settings.precise_rounds,
                               settings.warmup, clock, f"{spec.label} baseline/fused")
    rest = ["baseline"] + [k for k in variants if k not in precise]
    sweep = time_interleaved({k: run[k] for k in rest}, "baseline",
                             settings.dense_sweep_rounds if dense else settings.sweep_rounds, 1, clock, f"{spec.label} sweep")
    timings.update({k: v for k, v in sweep.items() if k != "baseline"})
    return timings


def benchmark_model(spec: ModelSpec, settings: Settings, result: InferenceResult) -> None:
    """Convert, fuse, count and time one architecture; appends its rows to ``result``."""
    torch.manual_seed(0)
    baseline = spec.build(settings).to(settings.device).eval()
    inputs = model_inputs(spec, settings.infer_batch, settings)
    converted, check, info = convert_and_fuse(spec, baseline, inputs, settings)
    result.conversions.append(info)
    # DenoiseRep runs the reverse chain t = N … 1 across the N denoised layers; the matched
    # DenoiseRep⁻ runs the same chain, N steps, on the final feature.
    result.matched[spec.label] = info.converted
    minus = denoise_minus_variants(spec, baseline, info.converted, settings)
    variants = {"baseline": baseline, "converted (unfused)": converted, "fused": check.fused, **minus}

    flops = {label: count_flops(model, inputs, settings) for label, model in variants.items()}
    if flops["fused"] != flops["baseline"]:
        raise AssertionError(f"{spec.label}: fused FLOPs {flops['fused']} != baseline FLOPs {flops['baseline']}")
    precise = ["baseline", "fused"] + [k for k in minus if k.endswith("(matched)")]
    timings = time_variants(spec, variants, precise, inputs, settings)
    for label, model in variants.items():
        result.rows.append(VariantRow(spec.label, label, count_params(model), flops[label], timings[label]))


def run_inference(settings: Settings) -> InferenceResult:
    result = InferenceResult()
    for spec in tqdm(inference_specs(settings), desc="inference", file=sys.stderr):
        benchmark_model(spec, settings, result)
    return result


# -- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainVariant:
    """``denoiser=None`` is plain fine-tuning: every parameter trains on cross-entropy."""

    label: str
    denoiser: str | None = None
    loss_token_fraction: float = 1.0
    lam: float = 0.5  # 0.5: label-aug (task + noise loss); 1.0: label-free (noise loss only)


TRAIN_VARIANTS = (
    TrainVariant("plain fine-tuning"),
    TrainVariant("denoisers, full rank, λ 0.5, fraction 1.0", "full", 1.0),
    TrainVariant("denoisers, full rank, λ 0.5, fraction 0.1", "full", 0.1),
    TrainVariant("denoisers, full rank, label-free, fraction 0.1", "full", 0.1, lam=1.0),
    TrainVariant("denoisers, low rank (r=8), λ 0.5, fraction 0.1", "low_rank", 0.1),
    TrainVariant("denoisers, low rank (r=8), label-free, fraction 0.1", "low_rank", 0.1, lam=1.0),
)


@dataclass
class TrainInfo:
    trainable: int
    denoiser: int
    backbone: int


def build_training_step(spec: ModelSpec, variant: TrainVariant, settings: Settings) -> tuple[Callable[[], None], TrainInfo]:
    """One optimizer step of either phase, at the same batch and with the same optimizer (AdamW).

    Denoiser phase: converted model, only the denoisers train, loss = 0.5·CE + 0.5·denoise_loss
    (label-aug) or denoise_loss alone under `noise_loss_only` (label-free, as the trainer runs it).
    """
    torch.manual_seed(0)
    model = spec.build(settings).to(settings.device).train()
    (x,) = model_inputs(spec, settings.train_batch, settings)
    y = torch.randint(0, model.num_classes, (settings.train_batch,), device=settings.device)
    backbone = count_params(model)
    if variant.denoiser is None:
        params = list(model.parameters())
        info = TrainInfo(sum(p.numel() for p in params), 0, backbone)

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(x), y)
    else:
        config = benchmark_config(spec, denoiser=variant.denoiser, loss_token_fraction=variant.loss_token_fraction)
        convert_quietly(model, config, x[:1])
        counts = dr.set_trainable(model, denoisers=True, backbone=False)
        params = list(dr.denoiser_parameters(model))
        info = TrainInfo(counts["denoisers"], counts["denoisers"], backbone)

        def loss_fn() -> torch.Tensor:
            if variant.lam == 1.0:
                with dr.noise_loss_only(model):
                    model(x)
                return dr.denoise_loss(model)
            return (1 - variant.lam) * F.cross_entropy(model(x), y) + variant.lam * dr.denoise_loss(model)

    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(settings):
            loss = loss_fn()
        loss.backward()
        optimizer.step()

    return step, info


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure_training_memory(spec: ModelSpec, variant: TrainVariant, settings: Settings, steps: int = 2) -> int:
    """Peak bytes a few training steps need, in a fresh process (see `peak_training_memory`).

    CPU: resident-set high-water mark (VmHWM) minus the RSS before the model was built, so
    it counts weights, denoisers, gradients, optimizer state and activations, but not the
    interpreter and libraries. CUDA: ``torch.cuda.max_memory_allocated``.
    """
    apply_threads(settings)
    if settings.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step, _ = build_training_step(spec, variant, settings)
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step, _ = build_training_step(spec, variant, settings)
    for _ in range(steps):
        step()
    return (_proc_status_kib("VmHWM") - before) * 1024


def peak_training_memory(spec: ModelSpec, variant: TrainVariant, settings: Settings) -> int:
    """One fresh process per measurement: allocators keep freed memory, so measuring several
    variants in one process would let each inherit the previous one's heap. The forkserver
    has the heavy libraries imported already (cheap start) and never ran a parallel op (safe
    to fork). Not `denoiserep.bench` itself: children re-run the main module by name, and a
    preloaded copy of it would make runpy warn."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["denoiserep", "timm", "torchvision"])
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure_training_memory, spec, variant, settings).result()


@dataclass
class TrainRow:
    model: str
    variant: TrainVariant
    info: TrainInfo
    flops: int
    timing: Timing
    peak_bytes: int


@dataclass
class TrainingResult:
    rows: list[TrainRow] = field(default_factory=list)
    profile: list[tuple[str, float, int]] = field(default_factory=list)  # (op, share of step, calls)
    profile_total_s: float = 0.0


def count_step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one training step, forward and backward (the optimizer's elementwise update is
    not counted): the machine-independent counterpart of the step-time ratio."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def profile_step(step: Callable[[], None], top: int = 8) -> tuple[list[tuple[str, float, int]], float]:
    """Top operators by self time in one step (torch.profiler), as shares of the step's total."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / total, e.count) for e in events[:top]], total / 1e6


def run_training(settings: Settings) -> TrainingResult:
    result = TrainingResult()
    for spec in tqdm(training_specs(settings), desc="training", file=sys.stderr):
        steps, infos = {}, {}
        for variant in TRAIN_VARIANTS:
            steps[variant.label], infos[variant.label] = build_training_step(spec, variant, settings)
        flops = {label: count_step_flops(step) for label, step in steps.items()}
        timings = time_interleaved(steps, TRAIN_VARIANTS[0].label, settings.train_rounds, settings.train_warmup,
                                   clock_for(settings), f"{spec.label} training steps")
        if settings.profile_training and spec == CLASSIFIERS[0]:
            result.profile, result.profile_total_s = profile_step(steps[TRAIN_VARIANTS[1].label])
        del steps
        for variant in TRAIN_VARIANTS:
            peak = peak_training_memory(spec, variant, settings)
            result.rows.append(TrainRow(spec.label, variant, infos[variant.label], flops[variant.label],
                                        timings[variant.label], peak))
    return result


# -- accuracy ------------------------------------------------------------------------------


def accuracy_section(quick: bool) -> str:
    from denoiserep.bench_accuracy import run_accuracy

    return run_accuracy(quick)


def calibration_section(settings: Settings, output: Path) -> str:
    from denoiserep.bench_calibration import run_calibration

    plot = output.parent / ("" if settings.quick else "benchmarks") / "calibration_vs_training.png"
    with tempfile.TemporaryDirectory(prefix="denoiserep-calibration-") as runs:
        return run_calibration(settings.quick, output=Path(runs), plot=plot, device=torch.device(settings.device),
                               clock=clock_for(settings))


# -- markdown ------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def verdict(ci: tuple[float, float], low: float, high: float) -> str:
    """Target [low, high] against a 95% interval: met or missed only where the interval says so."""
    if low <= ci[0] and ci[1] <= high:
        return "met"
    if ci[1] < low or ci[0] > high:
        return "**missed**"
    return "not resolved (the 95% interval straddles the target)"


def ci_text(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def inference_markdown(result: InferenceResult) -> str:
    conv = table(
        ["model", "input", "converted", "layers", "left out", "backbone params", "denoiser params (full)",
         "fuse (s)", "fuse GFLOPs", "biases added", "fused vs unfused rel. err", "state_dict keys = original"],
        [(c.model, f"{c.image_size}px", c.scope, f"{c.converted} of {c.candidates}", c.skipped, millions(c.backbone_params),
          millions(c.denoiser_params), f"{c.fuse_s:.2f}", f"{c.fuse_flops / 1e9:.0f}", c.added_biases, f"{c.relative_error:.1e}", "yes" if c.keys_equal else "no")
         for c in result.conversions])
    rows = table(
        ["model", "variant", "params", "GFLOPs", "latency median (ms)", "IQR (ms)", "ratio to baseline", "ratio IQR",
         "ratio 95% CI"],
        [(r.model, r.variant, millions(r.params), f"{r.flops / 1e9:.2f}", f"{r.timing.median_s * 1e3:.1f}",
          f"{r.timing.iqr_s * 1e3:.1f}", f"{r.timing.ratio:.3f}", f"{r.timing.ratio_iqr:.3f}", ci_text(r.timing.ratio_ci))
         for r in result.rows])
    return conv + "\n" + rows + "\n" + inference_findings(result)


def inference_findings(result: InferenceResult) -> str:
    """The 'what this shows' paragraph, computed from the numbers."""
    by = {(r.model, r.variant): r for r in result.rows}
    models = [c.model for c in result.conversions]
    fused = {m: by[(m, "fused")].timing for m in models}
    ratios = [t.ratio for t in fused.values()]
    lo, hi = TARGET_FUSED_LATENCY
    per_model = "; ".join(f"{m} {t.ratio:.3f} {ci_text(t.ratio_ci)}: {verdict(t.ratio_ci, lo, hi)}" for m, t in fused.items())
    unfused = [by[(m, "converted (unfused)")].timing.ratio for m in models]
    lines = [
        f"- **Fused FLOPs equal the baseline's** for all {len(models)} models (asserted by the run).",
        f"- **Fused / baseline latency** (median of per-round ratios, 95% interval; target {lo:.2f}–{hi:.2f}): "
        f"{min(ratios):.3f} – {max(ratios):.3f} over the models. {per_model}.",
        f"- **Converted but unfused** costs {min(unfused):.1f}× – {max(unfused):.1f}× the baseline: the parametrization "
        "recomputes every W′ = W (c3 I − c1 A) on each forward (out × d_in² per layer, independent of the batch). "
        "That is the training-time path; deploy the fused model.",
    ]
    for m in models:
        steps = result.matched[m]
        row = by.get((m, f"DenoiseRep⁻ T={steps} (matched)"))
        base = by[(m, "baseline")]
        if row is not None:
            lines.append(
                f"- **DenoiseRep⁻ on {m}** at the matched T={steps}: {(row.timing.ratio - 1) * 100:+.0f}% latency, "
                f"{(row.flops / base.flops - 1) * 100:+.1f}% FLOPs (paper: +{PAPER_DENOISE_MINUS_OVERHEAD * 100:.0f}% on "
                f"TransReID-SSL)." + per_step_cost(by, m))
        else:
            one = by[(m, "DenoiseRep⁻ T=1")]
            per_step = one.flops - base.flops
            lines.append(
                f"- **DenoiseRep⁻ on {m}** (per RoI / per pixel): one step costs {(one.timing.ratio - 1) * 100:+.0f}% "
                f"latency and adds {per_step / 1e9:.2f} GFLOPs ({per_step / base.flops * 100:.1f}% of the model); the "
                f"matched T={steps} would add {steps * per_step / base.flops * 100:.0f}% FLOPs, so only T = 1 was timed.")
    target_model, target_s = TARGET_FUSE_SECONDS
    for c in result.conversions:
        if c.model == target_model:
            lines.append(
                f"- **fuse time** {c.model}: {c.fuse_s:.2f} s (target < {target_s:.0f} s on CPU: {met(c.fuse_s < target_s)}; "
                f"one measurement) for {c.fuse_flops / 1e9:.0f} GFLOPs of float32 products W·A "
                f"({c.fuse_flops / 1e9 / c.fuse_s:.0f} GFLOP/s): the full-rank fusion costs out × d_in² per layer.")
    return "\n".join(lines) + "\n"


def per_step_cost(by: dict[tuple[str, str], VariantRow], model: str) -> str:
    """Cost of one DenoiseRep⁻ reverse step, from the two ends of the step sweep, against the
    backbone's own throughput: small per-step matmuls run far below the backbone's GFLOP/s."""
    ends = [by.get((model, f"DenoiseRep⁻ T={t}")) for t in (DENOISE_MINUS_SWEEP[0], DENOISE_MINUS_SWEEP[-1])]
    if None in ends:
        return ""
    first, last = ends
    steps = DENOISE_MINUS_SWEEP[-1] - DENOISE_MINUS_SWEEP[0]
    seconds = (last.timing.median_s - first.timing.median_s) / steps
    flops = (last.flops - first.flops) / steps
    base = by[(model, "baseline")]
    return (f" One reverse step: {seconds * 1e3:.2f} ms for {flops / 1e6:.1f} MFLOPs ({flops / seconds / 1e9:.1f} GFLOP/s "
            f"against the backbone's {base.flops / base.timing.median_s / 1e9:.0f} GFLOP/s).")


def training_markdown(result: TrainingResult) -> str:
    plain = {r.model: r for r in result.rows if r.variant.denoiser is None}
    rows = table(
        ["model", "phase", "trainable params", "denoiser / backbone params", "GFLOPs / step", "FLOPs ratio",
         "step median (ms)", "IQR (ms)", "step ratio to plain", "ratio IQR", "ratio 95% CI", "peak memory (MiB)",
         "memory ratio to plain"],
        [(r.model, r.variant.label, millions(r.info.trainable),
          f"{r.info.denoiser / r.info.backbone:.2f}" if r.variant.denoiser else "—",
          f"{r.flops / 1e9:.1f}", f"{r.flops / plain[r.model].flops:.2f}",
          f"{r.timing.median_s * 1e3:.0f}", f"{r.timing.iqr_s * 1e3:.0f}", f"{r.timing.ratio:.2f}",
          f"{r.timing.ratio_iqr:.2f}", ci_text(r.timing.ratio_ci), f"{r.peak_bytes / MIB:.0f}",
          f"{r.peak_bytes / plain[r.model].peak_bytes:.2f}")
         for r in result.rows])
    out = rows + "\n" + training_findings(result)
    if result.profile:
        out += ("\nWhere the time goes in one denoiser-phase step (ViT-S, full rank, λ 0.5, fraction 1.0; "
                f"torch.profiler, {result.profile_total_s:.2f} s of operator self time):\n\n")
        out += table(["operator", "share of self time", "calls"], [(k, f"{s * 100:.1f}%", n) for k, s, n in result.profile])
    return out


def training_findings(result: TrainingResult) -> str:
    lines = []
    plain = {r.model: r for r in result.rows if r.variant.denoiser is None}
    for r in result.rows:
        if r.variant.denoiser is None:
            continue
        memory = r.peak_bytes / plain[r.model].peak_bytes
        params = r.info.denoiser / r.info.backbone
        step = f"step {r.timing.ratio:.2f}× plain {ci_text(r.timing.ratio_ci)}"
        mem = f"memory {memory:.2f}×"
        if r.variant.denoiser == "full":  # the step and memory targets are set for the full-rank denoisers
            step += f" (≤ {TARGET_STEP_RATIO}: {verdict(r.timing.ratio_ci, 0.0, TARGET_STEP_RATIO)})"
            mem += f" (≤ {TARGET_MEMORY_RATIO}: {met(memory <= TARGET_MEMORY_RATIO)})"
        param_target = TARGET_PARAMS_FULL if r.variant.denoiser == "full" else TARGET_PARAMS_LOW_RANK
        parts = [step, f"FLOPs {r.flops / plain[r.model].flops:.2f}×", mem,
                 f"params {params:.2f}× backbone (≤ {param_target:g}: {met(params <= param_target)})"]
        lines.append(f"- **{r.model}, {r.variant.label}**: " + "; ".join(parts) + ".")
    lines.append(
        "- Why the label-aug denoiser phase costs more than plain fine-tuning: every forward forms each "
        "W′ = c3 W − c1 W A (out × d_in² multiply-adds per layer, whatever the batch) and the task loss "
        "back-propagates through it (as much again); the noise loss adds d_in² per sampled position, which "
        "`loss_token_fraction` scales down. Label-free steps (`noise_loss_only`) need no backward through the "
        "backbone, and the low-rank W′ costs out × d_in × r.")
    lines.append(
        "- Full-rank denoiser parameters exceed the backbone's where layers widen their input: A is d_in × d_in, "
        "so a ViT MLP's fc2 (1536 → 384) carries a 1536² = 2.4M-parameter denoiser for its own 0.6M weights. "
        "Convolutions have k² · out ≥ d_in weights per input channel, hence ResNet-50's 0.78×. The low-rank "
        "form (diag + rank r) is the one under 1×.")
    ref_denoiser, ref_backbone = REFERENCE_DENOISER_PARAMS
    lines.append(f"- Reference (the authors' released code, ViT-S, batch 8, 2 CPU threads): denoiser step "
                 f"{REFERENCE_STEP_RATIO}× plain fine-tuning, {ref_denoiser / 1e6:.0f}M denoiser parameters for a "
                 f"{ref_backbone / 1e6:.0f}M backbone ({ref_denoiser / ref_backbone:.1f}×).")
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())


def machine_markdown(settings: Settings, argv: Sequence[str], minutes: dict[str, float], load: tuple[float, float],
                     carried: Sequence[str]) -> str:
    cpu = cpu_model()
    device = torch.cuda.get_device_name() if settings.device == "cuda" else f"CPU ({cpu})"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return table(["", ""], [
        ("device", device),
        ("CPU", f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                f"{torch.backends.cpu.get_cpu_capability()}, {ram:.0f} GiB RAM"),
        ("versions", f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
                     f"torchvision {torchvision.__version__}, denoiserep {dr.__version__}"),
        ("precision / batch", f"{settings.dtype}; inference batch {settings.infer_batch}, training batch {settings.train_batch}"),
        ("load average (1 min) at start / end", f"{load[0]:.2f} / {load[1]:.2f} (other jobs share this machine)"),
        ("wall time per section", ", ".join(f"{k} {v:.1f} min" for k, v in minutes.items()) or "—"),
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("command", f"`python -m denoiserep.bench {' '.join(argv)}`".replace("  ", " ")),
        ("sections kept from the previous file", ", ".join(carried) or "none"),
    ])


INFERENCE_SETUP = """\
Rows per model: the original model (**baseline**), the **converted** model before fusion (denoisers
attached, the training-time path), the **fused** model, and **DenoiseRep⁻** (the baseline with a
`DenoiseHead` of T reverse steps between its final feature and its classifier; random weights).
Classifiers (timm) take `forward_features → forward_head(pre_logits=True) → DenoiseHead → get_classifier()`;
Faster R-CNN is converted in its backbone (ResNet-50 body + FPN, `model.backbone`) and its DenoiseRep⁻
denoises every RoI's 1024-d box-head feature; FCN is converted whole and its DenoiseRep⁻ denoises
every pixel of the backbone's 2048-d output map. Detection and segmentation run at a smaller image
size on CPU (table below); every model uses random weights (nothing is downloaded).

**Step count of DenoiseRep⁻.** The paper does not state T for DenoiseRep⁻; it reports +15% inference
time on TransReID-SSL. DenoiseRep itself runs the reverse chain t = N … 1 once, one step per
denoised embedding layer (t_i = N − i + 1). The matched DenoiseRep⁻ runs that same chain, N steps,
on the final feature: **T = N, the number of converted layers of the model** (e.g. 49 for ViT-S).
The sweep (T = 1, 10, 50, 100) shows how the cost scales. Detection and segmentation run the head
once per RoI / pixel, so there only T = 1 is timed: it gives the per-step cost.

**Timing.** Latency is the median over interleaved rounds (each round calls every variant once,
the order rotating), after warm-up; each ratio is the median of per-round ratios to the baseline
timed in the same rounds, with its interquartile range. Baseline / fused / matched DenoiseRep⁻ are
timed together with many rounds (the ±2% question needs them); the unfused model and the step sweep
in a second, shorter interleaved group with its own baseline. FLOPs: `torch.utils.flop_counter`
(matmuls and convolutions). Denoisers are randomly initialised (as after training), except in the
detector: its proposals, hence its FLOPs, depend on its weights, so it uses the identity init.
"""

TRAINING_SETUP = """\
One optimizer step (AdamW, lr 1e-4) at the same batch, 224 px, random labels: **plain fine-tuning**
(every parameter trains, cross-entropy) against the **denoiser phase** (converted model,
`set_trainable(denoisers=True, backbone=False)`), label-aug (loss = 0.5·CE + 0.5·`denoise_loss`) or
label-free (loss = `denoise_loss`, forward under `noise_loss_only`: nothing is back-propagated through
the backbone), with full-rank and low-rank (rank 8) denoisers and with the noise loss on all positions
(`loss_token_fraction` 1.0) or on a random 10%. Step time as in the inference section (interleaved, per-round ratios); FLOPs per
step (forward + backward, `FlopCounterMode`) are the machine-independent counterpart of the step ratio.
Forming W′ costs the same at any batch, so the ratios fall as the batch grows:
`python benchmarks/training_batch_scaling.py --batches 8 32` measures ViT-S at both (not part of this run).

**Peak memory**, one fresh process per measurement (allocators keep freed memory, so variants must
not share a process): on CPU the resident-set high-water mark (`VmHWM`) over two steps (the second is the steady state: weights, gradients, optimizer state and activations at once) minus the
RSS just before the model was built, i.e. weights, denoisers, gradients, optimizer state and
activations, without the interpreter and libraries; on CUDA `torch.cuda.max_memory_allocated`.
"""


ACCURACY_SETUP = """\
`denoiserep.bench_accuracy.run_accuracy`: per dataset and seed (0–4), the pipeline's baseline,
control (the baseline trained for the same extra steps with the same optimizer and learning rate,
whole backbone), DenoiseRep⁻, and four DenoiseRep rows under two settings: `authors` = β linear
1e-4→2e-3 with t_i = N − i + 1 (the library default, the authors' code) and `ddpm-spread` = β
linear 1e-4→0.02 with the layers spread over t ∈ [1, 1000]. The rows: `calibrated` (every denoiser
at the closed-form optimum of its noise loss, no training: label-free DenoiseRep at its optimum),
`calibrated-label-aug` (calibrated, then the extra epochs at λ = 0.5), and the paper's identity
start trained label-free (λ = 1) or label-aug (λ = 0.5). DenoiseRep rows are evaluated after
fusion. Each reports the noise loss its denoisers reached at the end (L1, as trained; and the
exact expected L2) next to the closed-form L2 optimum of the same layer inputs, all summed over
layers on the first four validation batches with fixed noise. Δ are paired per seed, with 95%
t-intervals. The two datasets run side by side, one process and one thread each. Nothing is tuned
on the validation split.
"""


def existing_sections(path: Path) -> dict[str, str]:
    """The numbered sections of an existing BENCHMARKS file, heading included (a title may go
    on after its number, e.g. "## 3. Accuracy (embedded datasets, 5 seeds)")."""
    if not path.exists():
        return {}
    chunks = re.split(r"(?m)^(?=## )", path.read_text(encoding="utf-8"))
    numbered = {title.split(".")[0]: name for name, title in SECTION_TITLES.items()}
    return {numbered[c.split(".")[0]]: c.rstrip() + "\n" for c in chunks if c.split(".")[0] in numbered}


def render(settings: Settings, argv: Sequence[str], parts: dict[str, str], minutes: dict[str, float],
           load: tuple[float, float], kept: dict[str, str]) -> str:
    """The whole file. Sections not run this time are ``kept`` verbatim from the previous file
    (so one section can be refreshed, e.g. by its owner, without discarding the others)."""
    mode = "quick mode (tiny model, few repetitions: a smoke test, not a measurement)" if settings.quick else "full run"
    carried = [name for name in SECTIONS if name not in parts and name in kept]
    out = [f"# Benchmarks\n\nGenerated by `denoiserep.bench` ({mode}); rerun to refresh. Tracker issue 4.\n",
           "## Machine and command\n", machine_markdown(settings, argv, minutes, load, carried)]
    from denoiserep.bench_calibration import __doc__ as calibration_setup

    setups = {"inference": INFERENCE_SETUP, "training": TRAINING_SETUP, "accuracy": ACCURACY_SETUP,
              "calibration": calibration_setup}
    for section in SECTIONS:
        if section in parts:
            out.append(f"{SECTION_TITLES[section]}\n\n{setups[section]}\n{parts[section]}")
        elif section in kept:
            out.append(kept[section])
        else:
            out.append(f"{SECTION_TITLES[section]}\n\nNot run (not in `--sections`).\n")
    out.append("## GPU\n")
    out.append(gpu_markdown(settings))
    return "\n".join(out)


def gpu_markdown(settings: Settings) -> str:
    if settings.device == "cuda":
        return f"Measured on {torch.cuda.get_device_name()} (this file).\n"
    state = "a CUDA device was available but not used" if torch.cuda.is_available() else "this machine has no CUDA device"
    return (f"Not measured in this run ({state}). On a CUDA machine, `bash benchmarks/gpu.sh` runs sections 1–2 "
            "with CUDA-event timing, bf16 autocast and batch 32, and writes `BENCHMARKS_GPU.md`.\n")


# -- entry point ---------------------------------------------------------------------------


def run(settings: Settings, sections: Sequence[str] = SECTIONS, argv: Sequence[str] = (),
        kept: dict[str, str] | None = None, output: Path = Path("BENCHMARKS.md")) -> str:
    """Run the requested sections and return the whole BENCHMARKS markdown; ``kept`` holds
    the previous file's sections, used for those not run."""
    apply_threads(settings)
    load_start = os.getloadavg()[0]
    runners = {
        "inference": lambda: inference_markdown(run_inference(settings)),
        "training": lambda: training_markdown(run_training(settings)),
        "accuracy": lambda: accuracy_section(settings.quick),
        "calibration": lambda: calibration_section(settings, output),
    }
    parts: dict[str, str] = {}
    minutes: dict[str, float] = {}
    for section in (s for s in SECTIONS if s in sections):
        start = time.perf_counter()
        parts[section] = runners[section]()
        minutes[section] = (time.perf_counter() - start) / 60
    return render(settings, argv, parts, minutes, (load_start, os.getloadavg()[0]), kept or {})


def write_atomically(path: Path, text: str) -> None:
    """A reader never sees a half-written file: write a temp file beside it, then rename.
    The temp file is private (0600); the result gets the old file's mode, or 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
    os.chmod(tmp.name, mode)
    os.replace(tmp.name, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m denoiserep.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repetitions (< 60 s): a smoke test")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bf16"), default="float32", help="bf16 = autocast")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch for both sections (default: CPU 1 at inference, 8 in training; CUDA 32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core); 1 suffers least from other jobs")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    text = run(settings_from_args(args), args.sections, argv, existing_sections(args.output), args.output)
    write_atomically(args.output, text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Run the importable module's main, so that what the memory probes pickle is
    # `denoiserep.bench.X`, which their fresh processes can import (not `__main__.X`).
    from denoiserep.bench import main as _main

    sys.exit(_main())
