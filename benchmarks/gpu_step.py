"""The training step and the DenoiseRep⁻ sampler on a GPU, eager and compiled (issue 18).

    python benchmarks/gpu_step.py [--output FILE]      # run by benchmarks/gpu.sh

ViT-S/16 at 224 px, random weights and labels, bf16 autocast, torch's fused AdamW, CUDA-event timing
in interleaved rounds (`denoiserep.timing`): one optimizer step of plain fine-tuning against the
denoiser phase (label-aug with the default sampled L1, the expected L2 and low rank; label-free), at batch
8 and 32, eager and under ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs), as the
trainer's ``--compile`` does. Then the DenoiseRep⁻ sampler (T = 49) after the backbone at batch 32,
eager and compiled, against the backbone alone. Prints (and writes) one markdown section; a variant
that fails is reported in its row, the others still run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

import denoiserep as dr
from denoiserep.bench import launch
from denoiserep.timing import cuda_clock, time_interleaved

MODEL = "vit_small_patch16_224"
BATCHES = (8, 32)
ROUNDS = 30
# (label, DenoiseConfig fields, λ); None: plain fine-tuning.
SETTINGS = (
    ("plain fine-tuning", None, 0.0),
    ("label-aug, default (sampled L1, W′)", {}, 0.5),
    ("label-aug, expected L2, auto path", {"loss": "l2", "loss_estimator": "expected"}, 0.5),
    ("label-aug, low rank (r=8), fraction 0.1", {"denoiser": "low_rank", "loss_token_fraction": 0.1}, 0.5),
    ("label-free, default", {}, 1.0),
)
TARGET_COMPILED = 1.5  # label-aug default / plain at batch 32, compiled


def training_step(config: dict | None, lam: float, batch: int, compiled: bool):
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=1000).cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    forward = torch.compile(model, mode="reduce-overhead") if compiled else None  # traced at its first call
    step = launch.training_step(model, x, y, config, lam, forward, fused=True, autocast=torch.bfloat16)
    for _ in range(3):  # compile, capture, warm
        step()
    torch.cuda.synchronize()
    return step


def step_rows() -> list[str]:
    rows = []
    for batch in BATCHES:
        for compiled in (False, True):
            steps, failed = {}, {}
            for label, config, lam in SETTINGS:
                try:
                    steps[label] = training_step(config, lam, batch, compiled)
                except Exception as error:  # one failing variant must not lose the others' numbers
                    failed[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            if SETTINGS[0][0] not in steps:
                rows.append(f"| {batch} | {'compiled' if compiled else 'eager'} | plain fine-tuning | failed: "
                            f"{failed[SETTINGS[0][0]]} | — | — |")
                continue
            timings = time_interleaved(steps, SETTINGS[0][0], rounds=ROUNDS, warmup=2, clock=cuda_clock,
                                       desc=f"batch {batch}{' compiled' if compiled else ''}")
            for label, _, _ in SETTINGS:
                mode = "compiled" if compiled else "eager"
                if label in failed:
                    rows.append(f"| {batch} | {mode} | {label} | failed: {failed[label]} | — | — |")
                    continue
                timing = timings[label]
                rows.append(f"| {batch} | {mode} | {label} | {timing.median_s * 1e3:.2f} | {timing.ratio:.2f} | "
                            f"[{timing.ratio_ci[0]:.2f}, {timing.ratio_ci[1]:.2f}] |")
            del steps
            torch.cuda.empty_cache()
    return rows


def sampler_rows(batch: int = 32, steps: int = 49) -> list[str]:
    torch.manual_seed(0)
    backbone = timm.create_model(MODEL, num_classes=0).cuda().eval()
    head = dr.DenoiseHead(dim=backbone.num_features, steps=steps).cuda().eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    compiled = torch.compile(head.sample, mode="reduce-overhead")

    def run(sample):
        def forward() -> None:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                features = backbone(x)
                if sample is not None:
                    sample(features)
        return forward

    forms = {"backbone alone": run(None), "backbone + sampler (eager)": run(head.sample),
             "backbone + sampler (torch.compile)": run(compiled)}
    for fn in forms.values():
        fn(), fn(), fn()
    timings = time_interleaved(forms, "backbone alone", rounds=ROUNDS, warmup=2, clock=cuda_clock, desc="sampler")
    return [f"| {form} | {t.median_s * 1e3:.2f} | {t.ratio:.2f} | [{t.ratio_ci[0]:.2f}, {t.ratio_ci[1]:.2f}] |"
            for form, t in timings.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="also write the section to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step.py: torch sees no CUDA device", file=sys.stderr)
        return 2
    lines = [f"## GPU: the training step, eager and compiled ({torch.cuda.get_device_name()}, torch {torch.__version__})",
             "", f"{MODEL}, 224 px, bf16 autocast, fused AdamW, CUDA events, {ROUNDS} interleaved rounds; compiled: "
             "`torch.compile(model, mode=\"reduce-overhead\")`.", "",
             "| batch | mode | setting | step (ms) | ratio to plain (same batch and mode) | ratio 95% CI |",
             "|---|---|---|---|---|---|", *step_rows(), "",
             f"Goal: label-aug default ≤ {TARGET_COMPILED}× plain at batch 32, compiled.", "",
             "DenoiseRep⁻ sampler (T = 49) after the backbone, batch 32, eval:", "",
             "| form | latency (ms) | ratio to the backbone | ratio 95% CI |", "|---|---|---|---|", *sampler_rows()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
