"""Max relative error of fused layers vs the step-by-step float64 reference
(`denoiserep.layers.reference_forward`: pad, denoise every position, run the original layer; the
exactness tests check it against their own independent reference).

Run: python benchmarks/fusion_error_table.py   (prints a markdown table, one row per layer type)
"""
import copy
import logging

import torch
from torch import nn

import denoiserep as dr
from denoiserep.layers import reference_forward

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
        for schedule, timestep_range in (("linear", None), ("ddpm", (1, 1000))):
            torch.manual_seed(seed)
            layer = make()
            model = nn.Sequential(copy.deepcopy(layer))
            config = dr.DenoiseConfig(layer_types=(type(layer),), init="random", schedule=schedule,
                                      timestep_range=timestep_range, init_seed=seed)
            nd = 0 if isinstance(layer, nn.Linear) else len(layer.kernel_size)
            x = torch.randn(4, 5, layer.in_features) if nd == 0 else torch.randn(2, layer.in_channels, *([9] * nd))
            dr.convert(model, config, example_inputs=x)
            with torch.no_grad():
                expected = reference_forward(model[0], x)
                dr.fuse(model.eval())
                out = model(x).double()
            worst = max(worst, float((out - expected).abs().max() / expected.abs().max()))
    print(f"| {name} | {worst:.2e} |")
