"""Max relative error of fused layers vs the independent reference of tests/test_exactness.py.

Run: python benchmarks/fusion_error_table.py   (prints a markdown table, one row per layer type)
"""
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import denoiserep as dr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the exactness tests own the reference
from conftest import relative_error  # noqa: E402
from test_exactness import convert_single, denoise_channels, reference_conv  # noqa: E402

logging.disable(logging.WARNING)  # fuse() reports the biases it adds to bias-free layers: expected here
torch.manual_seed(0)
cases = {
 "Linear": lambda: nn.Linear(24, 16),
 "Linear (no bias)": lambda: nn.Linear(24, 16, bias=False),
 "Conv1d k5 s2": lambda: nn.Conv1d(6, 8, 5, stride=2, padding=2),
 "Conv2d 3x3 zeros": lambda: nn.Conv2d(6, 8, 3, padding=1),
 "Conv2d stride 2 dilation 2": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2),
 "Conv2d groups=3": lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3),
 "Conv2d depthwise": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),
 "Conv2d reflect": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
 "Conv2d replicate": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="replicate"),
 "Conv2d circular": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="circular"),
 "Conv2d same, no bias": lambda: nn.Conv2d(6, 8, 3, padding="same", bias=False),
 "Conv3d": lambda: nn.Conv3d(4, 6, 3, padding=1),
}
print("| layer | max relative error (fused vs reference, 20 seeds × {authors, ddpm-spread}) |\n|---|---|")
for name, make in cases.items():
    worst = 0.0
    for seed in range(20):
        for sched, rng in (("linear", None), ("ddpm", (1, 1000))):
            torch.manual_seed(seed)
            layer = make()
            orig, holder = convert_single(layer, schedule=sched, timestep_range=rng, init_seed=seed)
            d = next(dr.layer_denoisers(holder))[2]
            if isinstance(layer, nn.Linear):
                x = torch.randn(4, 5, layer.in_features)
                exp = F.linear(denoise_channels(x.double(), d, -1), orig.weight.double(), None if orig.bias is None else orig.bias.double())
            else:
                nd = len(layer.kernel_size)
                x = torch.randn(2, layer.in_channels, *([9] * nd))
                exp = reference_conv(orig, x, d)
            with torch.no_grad():
                dr.fuse(holder.eval())
                out = holder(x)
            worst = max(worst, relative_error(out.double(), exp))
    print(f"| {name} | {worst:.2e} |")
