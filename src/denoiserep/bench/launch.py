"""Section 2b: what a training step dispatches. On a GPU at common batches a step is launch-bound:
each non-view operator is one kernel with a fixed launch cost, whatever its size, so their number
is what the step costs there, and it is the same on any machine.

- Operators per step (forward + backward + foreach AdamW, a `TorchDispatchMode` counting every aten
  operator, and those that are not views ≈ kernels): ViT-S/16 and ResNet-50 at 64 px, batch 2,
  plain fine-tuning against every denoiser setting; and per converted layer (a Linear on tokens, an
  ungrouped 1 × 1 and a 3 × 3 convolution), forward and backward.
- An overhead-bound stand-in for a GPU step, on the CPU: a 12-block ViT of width 32 on 5 tokens at
  batch 1, one thread, per-thread CPU time, interleaved rounds: every operator's fixed cost
  dominates, as launches do on a GPU. Eager, and compiled (`torch.compile`, inductor on the CPU).
- The DenoiseRep⁻ head's sampler (T reverse steps): operators and latency per call, eager (the
  sampler as written, and its former step-by-step form) and compiled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import timm
import torch
from torch import nn

import denoiserep as dr

from ..timing import cpu_clock, time_interleaved
from .dispatch import OperatorCount, count_operators
from .models import convert_quietly
from .tables import ci_text, met, table, verdict
from .training import optimizer_step

# (label, DenoiseConfig fields, λ); None: plain fine-tuning.
SETTINGS: tuple[tuple[str, dict | None, float], ...] = (
    ("plain fine-tuning", None, 0.0),
    ("default: sampled L1, W′", {}, 0.5),
    ("expected L1, auto path", {"loss_estimator": "expected"}, 0.5),
    ("expected L2, auto path", {"loss": "l2", "loss_estimator": "expected"}, 0.5),
    ("low rank (r=8), fraction 0.1", {"denoiser": "low_rank", "loss_token_fraction": 0.1}, 0.5),
    ("label-free, fraction 0.1", {"loss_token_fraction": 0.1}, 1.0),
)
# The measurement of the former implementation (per-call hooks, einsum, a loss per layer).
BEFORE = {("vit_small_patch16_224", "plain fine-tuning"): (1476, 707),
          ("vit_small_patch16_224", "default: sampled L1, W′"): (9600, 2519),
          ("vit_small_patch16_224", "expected L2, auto path"): (11400, 3544),
          ("resnet50", "plain fine-tuning"): (1067, 743),
          ("resnet50", "default: sampled L1, W′"): (10045, 2850),
          ("resnet50", "expected L2, auto path"): (12221, 4015)}
TARGET_DISPATCHED = 2.0  # default and expected L2, ViT-S and ResNet-50
TARGETS_STAND_IN = {"default: sampled L1, W′": 1.7, "label-free, fraction 0.1": 1.4}  # the others: 2.0
OPERATOR_MODELS = ("vit_small_patch16_224", "resnet50")


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: dict | None, lam: float,
                  forward: Callable | None = None, *, fused: bool = False,
                  autocast: torch.dtype | None = None) -> Callable[[], None]:
    """One AdamW step of plain fine-tuning (``config`` None) or of the denoiser phase: foreach AdamW
    (torch's default on the CPU) or ``fused`` (torch's one-kernel CUDA AdamW), under ``autocast`` if
    given. ``forward`` may be the model's torch.compile, made before the conversion (it compiles lazily)."""
    if config is None:
        params = list(model.parameters())
    else:
        convert_quietly(model, dr.DenoiseConfig(keep_state_dict_keys=False, **config), x[:1])
        dr.set_trainable(model)
        params = list(dr.denoiser_parameters(model))
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {"foreach": True}))
    return optimizer_step(model, x, y, None if config is None else lam, optimizer,
                          lambda: torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None), forward)


@dataclass
class OperatorRow:
    model: str
    setting: str
    dispatched: int
    kernels: int


def operator_rows() -> list[OperatorRow]:
    rows = []
    for name in OPERATOR_MODELS:
        for label, config, lam in SETTINGS:
            torch.manual_seed(0)
            model = timm.create_model(name, num_classes=10, **({"img_size": 64} if "vit" in name else {}))
            x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
            step = training_step(model, x, y, config, lam)
            step()  # the first step forms the views a step keeps
            count = count_operators(step)
            rows.append(OperatorRow(name, label, count.dispatched, count.kernels))
    return rows


LAYERS = {
    "Linear(384, 384) on 2 × 17 tokens": (lambda: nn.Linear(384, 384), (2, 17, 384)),
    "Conv2d 1 × 1, 256 → 64, no bias, 16 × 16": (lambda: nn.Conv2d(256, 64, 1, bias=False), (2, 256, 16, 16)),
    "Conv2d 3 × 3, 64 → 64, no bias, 16 × 16": (lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (2, 64, 16, 16)),
}


def layer_budget() -> list[tuple[str, str, int, int]]:
    """(layer, setting, forward, backward) operators one converted layer adds to a step (plain: the
    layer with a trainable weight, the same loss)."""
    rows = []
    for layer_name, (build, shape) in LAYERS.items():
        counts = {}
        for label, config, lam in SETTINGS[:5]:
            torch.manual_seed(0)
            model = nn.Sequential(build())
            x = torch.randn(*shape, requires_grad=True)
            if config is not None:
                convert_quietly(model, dr.DenoiseConfig(keep_state_dict_keys=False, exclude_classifier=False, **config),
                                x[:1])
                dr.set_trainable(model)
            model.train()

            def forward():
                out = model(x)
                return out.square().mean() + (dr.denoise_loss(model) if config is not None else 0)

            forward().backward()  # warm: the views a step keeps
            model.zero_grad(set_to_none=True)  # as a step's optimizer does: no accumulation into .grad
            x.grad = None
            with OperatorCount() as ahead:
                loss = forward()
            with OperatorCount() as back:
                loss.backward()
            counts[label] = (ahead.dispatched, back.dispatched)
        plain = counts["plain fine-tuning"]
        for label, (ahead, back) in counts.items():
            if label != "plain fine-tuning":
                rows.append((layer_name, label, ahead - plain[0], back - plain[1]))
    return rows


def stand_in_model() -> nn.Module:
    """12 blocks of width 32 on 5 tokens (a 16 px image in 8 px patches and the class token)."""
    return timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, in_chans=1, num_classes=10,
                                                            embed_dim=32, depth=12, num_heads=2)


def per_thread_clock(fn: Callable[[], object]) -> float:
    """CPU time of this thread: what the step itself spends, whatever else runs on the machine."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def stand_in(rounds: int, compiled: bool = False) -> dict[str, object]:
    """Step timings of every setting on the stand-in, interleaved; ``compiled``: each step's model
    under torch.compile (inductor)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = {}
        for label, config, lam in SETTINGS:
            torch.manual_seed(0)
            model = stand_in_model()
            x, y = torch.randn(1, 1, 16, 16), torch.randint(0, 10, (1,))
            forward = torch.compile(model) if compiled else None
            steps[label] = training_step(model, x, y, config, lam, forward)
        return time_interleaved(steps, SETTINGS[0][0], rounds=rounds, warmup=3 if compiled else 2,
                                clock=per_thread_clock, desc="stand-in steps" + (" (compiled)" if compiled else ""))
    finally:
        torch.set_num_threads(previous)


def head_rows(steps: int, repeats: int) -> list[tuple[str, int, int, float]]:
    """(form, dispatched, kernels, median ms per call) of the DenoiseRep⁻ sampler, batch 32 of ViT-S
    features, eval."""
    torch.manual_seed(0)
    head = dr.DenoiseHead(dim=384, steps=steps, hidden_dim=384).eval()
    features = torch.randn(32, 384)

    def former() -> torch.Tensor:  # the step-by-step loop the sampler replaced
        x = features
        for t in range(steps, 0, -1):
            predicted = head.predict_noise(x, torch.full((x.shape[0],), t, dtype=torch.long))
            x = head.c3[t - 1] * x - head.c1[t - 1] * predicted
        return x

    compiled = torch.compile(head.sample)
    forms = {"former step-by-step loop": former, "sampler (eager)": lambda: head.sample(features),
             "sampler (torch.compile)": lambda: compiled(features)}
    rows = []
    with torch.no_grad():
        for form, fn in forms.items():
            fn(), fn()  # compile, warm
            count = count_operators(fn) if "compile" not in form else None
            times = sorted(cpu_clock(fn) for _ in range(repeats))
            rows.append((form, count.dispatched if count else 0, count.kernels if count else 0,
                         times[len(times) // 2] * 1e3))
    return rows


def run(quick: bool) -> str:
    lines = []
    operators = operator_rows()
    plain = {r.model: r for r in operators if r.setting == "plain fine-tuning"}
    lines.append("Operators per step (forward + backward + foreach AdamW; 64 px, batch 2):\n")
    lines.append(table(
        ["model", "setting", "dispatched", "ratio to plain", "kernels (non-view)", "ratio to plain",
         "before this change: dispatched / kernels"],
        [(r.model, r.setting, f"{r.dispatched:,}", f"{r.dispatched / plain[r.model].dispatched:.2f}", f"{r.kernels:,}",
          f"{r.kernels / plain[r.model].kernels:.2f}",
          "{:,} / {:,}".format(*BEFORE[r.model, r.setting]) if (r.model, r.setting) in BEFORE else "—")
         for r in operators]))
    for r in operators:
        if r.setting in ("default: sampled L1, W′", "expected L2, auto path"):
            ratio = r.dispatched / plain[r.model].dispatched
            lines.append(f"- {r.model}, {r.setting}: {ratio:.2f}× plain's dispatched operators "
                         f"(≤ {TARGET_DISPATCHED}: {met(ratio <= TARGET_DISPATCHED)}).")
    lines.append("\nPer converted layer, the operators it adds to a step over the same layer trained plainly "
                 "(its views formed in the first step are kept):\n")
    lines.append(table(["layer", "setting", "forward", "backward", "per step"],
                       [(layer, setting, a, b, a + b) for layer, setting, a, b in layer_budget()]))
    rounds = 5 if quick else 40
    for compiled in (False, True):
        timings = stand_in(rounds, compiled)
        lines.append(f"\nOverhead-bound stand-in ({'compiled' if compiled else 'eager'}; 12-block ViT of width 32, "
                     f"5 tokens, batch 1, one thread, per-thread CPU time, {rounds} interleaved rounds):\n")
        rows = []
        for label, timing in timings.items():
            target = TARGETS_STAND_IN.get(label, 2.0)
            check = "—" if label == "plain fine-tuning" or compiled else \
                f"≤ {target}: {verdict(timing.ratio_ci, 0.0, target)}"
            rows.append((label, f"{timing.median_s * 1e3:.1f}", f"{timing.ratio:.2f}", ci_text(timing.ratio_ci), check))
        lines.append(table(["setting", "step median (ms)", "ratio to plain", "ratio 95% CI", "target"], rows))
    lines.append("\nThe DenoiseRep⁻ sampler (dim 384, batch 32, eval), operators and median latency per call:\n")
    head = head_rows(steps=49, repeats=5 if quick else 30)
    lines.append(table(["form", "dispatched", "kernels", "median (ms)"],
                       [(form, f"{d:,}" if d else "(one compiled graph)", f"{k:,}" if k else "—", f"{ms:.2f}")
                        for form, d, k, ms in head]))
    return "\n".join(lines) + "\n"


SETUP = __doc__.split("\n\n", 1)[1]
