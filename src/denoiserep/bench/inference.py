"""Section 1: what DenoiseRep costs at inference: params, FLOPs and interleaved latency of the
baseline, the converted (unfused) model, the fused model and DenoiseRep⁻."""

from __future__ import annotations

import copy
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import denoiserep as dr
from denoiserep.config import DenoiseConfig
from denoiserep.fuse import eval_outputs, max_relative_error
from denoiserep.timing import Timing, forward_flops, time_interleaved

from .models import ModelSpec, benchmark_config, convert_quietly, count_params, inference_specs
from .settings import DENOISE_MINUS_SWEEP, Settings, autocast, clock_for
from .tables import ci_text, met, millions, table, verdict

PAPER_DENOISE_MINUS_OVERHEAD = 0.15  # TransReID-SSL, +15% inference time (the paper's table)
TARGET_FUSED_LATENCY = (0.98, 1.02)
TARGET_FUSE_SECONDS = ("vit_base_patch16_224", 2.0)  # CPU target

SETUP = """\
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
    # Detectors whose fused FLOPs differ from the baseline's: relative difference (see benchmark_model).
    proposal_flops: dict[str, float] = field(default_factory=dict)


def count_flops(model: nn.Module, inputs: tuple, settings: Settings) -> int:
    """FLOPs of one forward, under the run's precision."""
    with autocast(settings):
        return forward_flops(model, *inputs)


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
        _, report = dr.fuse(spec.kind.conversion_root(fused), return_report=True)
    seconds = time.perf_counter() - start
    error = max_relative_error(eval_outputs(converted, inputs), eval_outputs(fused, inputs))
    keys_equal = list(fused.state_dict()) == list(baseline.state_dict())
    return FuseCheck(fused.eval(), seconds, counter.get_total_flops(), len(report.added_biases), error, keys_equal)


def convert_and_fuse(spec: ModelSpec, baseline: nn.Module, inputs: tuple, settings: Settings) -> tuple[nn.Module, FuseCheck, ConversionInfo]:
    """The converted (unfused) model, its fused copy, and what the conversion did."""
    config = benchmark_config(spec)
    converted = copy.deepcopy(baseline)
    convert_quietly(spec.kind.conversion_root(converted), config, spec.root_example(settings))
    converted.eval()
    check = fuse_and_check(spec, converted, baseline, inputs)
    candidates, skipped = skipped_layers(spec.kind.conversion_root(baseline), spec.kind.conversion_root(converted), config)
    info = ConversionInfo(
        spec.label, spec.kind.scope, spec.size(settings),
        sum(1 for _ in dr.layer_denoisers(converted)), candidates, skipped, count_params(baseline),
        sum(p.numel() for p in dr.denoiser_parameters(converted)), check.seconds, check.flops, check.added_biases,
        check.relative_error, check.keys_equal)
    return converted, check, info


def denoise_minus_variants(spec: ModelSpec, baseline: nn.Module, matched: int, settings: Settings) -> dict[str, nn.Module]:
    """DenoiseRep⁻ at the matched step count and over the sweep. Dense models run the head
    once per RoI / pixel: too slow to time at N steps on a CPU, so they get one step, which
    gives the per-step cost (FLOPs are linear in T)."""
    if spec.kind.dense:
        return {"DenoiseRep⁻ T=1": spec.denoise_minus(baseline, 1)}
    variants = {f"DenoiseRep⁻ T={matched} (matched)": spec.denoise_minus(baseline, matched)}
    variants.update({f"DenoiseRep⁻ T={t}": spec.denoise_minus(baseline, t) for t in settings.step_sweep if t != matched})
    return variants


def time_variants(spec: ModelSpec, variants: dict[str, nn.Module], precise: list[str], inputs: tuple, settings: Settings) -> dict[str, Timing]:
    """Two interleaved groups, each with its own baseline: ``precise`` (many rounds: the ±2%
    question) and the rest (the unfused model and the sweep: large effects, few rounds)."""
    run = {label: forward_fn(model, inputs, settings) for label, model in variants.items()}
    dense = spec.kind.dense
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
    inputs = spec.inputs(settings.infer_batch, settings)
    converted, check, info = convert_and_fuse(spec, baseline, inputs, settings)
    result.conversions.append(info)
    # DenoiseRep runs the reverse chain t = N … 1 across the N denoised layers; the matched
    # DenoiseRep⁻ runs the same chain, N steps, on the final feature.
    result.matched[spec.label] = info.converted
    minus = denoise_minus_variants(spec, baseline, info.converted, settings)
    variants = {"baseline": baseline, "converted (unfused)": converted, "fused": check.fused, **minus}

    flops = {label: count_flops(model, inputs, settings) for label, model in variants.items()}
    if flops["fused"] != flops["baseline"]:
        # A detector's FLOPs depend on how many proposals survive NMS, which one rounding flip of a
        # score can change (seen under bf16 on CUDA); its fused layers are the original ones all the same.
        difference = abs(flops["fused"] - flops["baseline"]) / flops["baseline"]
        if not spec.kind.output_dependent_flops or difference > 1e-3:
            raise AssertionError(f"{spec.label}: fused FLOPs {flops['fused']} != baseline FLOPs {flops['baseline']}")
        result.proposal_flops[spec.label] = difference
    precise = ["baseline", "fused"] + [k for k in minus if k.endswith("(matched)")]
    timings = time_variants(spec, variants, precise, inputs, settings)
    for label, model in variants.items():
        result.rows.append(VariantRow(spec.label, label, count_params(model), flops[label], timings[label]))


def run(settings: Settings) -> InferenceResult:
    result = InferenceResult()
    for spec in tqdm(inference_specs(settings), desc="inference", file=sys.stderr):
        benchmark_model(spec, settings, result)
    return result


def markdown(result: InferenceResult) -> str:
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
    return conv + "\n" + rows + "\n" + findings(result)


def findings(result: InferenceResult) -> str:
    """The 'what this shows' paragraph, computed from the numbers."""
    by = {(r.model, r.variant): r for r in result.rows}
    models = [c.model for c in result.conversions]
    fused = {m: by[(m, "fused")].timing for m in models}
    ratios = [t.ratio for t in fused.values()]
    lo, hi = TARGET_FUSED_LATENCY
    per_model = "; ".join(f"{m} {t.ratio:.3f} {ci_text(t.ratio_ci)}: {verdict(t.ratio_ci, lo, hi)}" for m, t in fused.items())
    unfused = [by[(m, "converted (unfused)")].timing.ratio for m in models]
    lines = [
        f"- **Fused FLOPs equal the baseline's** for all {len(models) - len(result.proposal_flops)} models "
        "(asserted by the run)" + "".join(
            f"; {m}: within {d:.1e} (the number of proposals after NMS changed with the fused weights' rounding)"
            for m, d in result.proposal_flops.items()) + ".",
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
