"""Fused layer == unfused denoised reference (relative error ≤ 1e-5 in float32).

The reference is written independently of the library: pad the input as the layer would,
apply the denoiser pointwise ("pad, then denoise"), then run the original layer unpadded. The
library's own step-by-step reference (`denoiserep.layers.reference_forward`, which the benchmarks
use) must agree with it.
"""

import copy
import warnings

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import denoiserep as dr
from denoiserep import DenoiseConfig
from denoiserep.layers import reference_forward
from conftest import relative_error

TOLERANCE = 1e-5
CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}


def denoise_channels(x: torch.Tensor, denoiser, channel_axis: int) -> torch.Tensor:
    """X̂ = c3 X − c1 (A (X + e) + a) + σz at every position, with A built as dense blocks."""
    rows = x.movedim(channel_axis, -1)
    blocks = copy.deepcopy(denoiser).double().matrix()  # diag + U V formed in float64, as the rest
    dense = torch.block_diag(*blocks)
    predicted = (rows + denoiser.e.double()) @ dense.T + denoiser.a.double()
    out = denoiser.c3 * rows - denoiser.c1 * predicted + denoiser.noise.double()
    return out.movedim(-1, channel_axis)


def reference_conv(original: nn.Module, x: torch.Tensor, denoiser) -> torch.Tensor:
    nd = len(original.kernel_size)
    mode = "constant" if original.padding_mode == "zeros" else original.padding_mode
    padded = F.pad(x.double(), original._reversed_padding_repeated_twice, mode=mode)
    denoised = denoise_channels(padded, denoiser, channel_axis=1)
    bias = None if original.bias is None else original.bias.double()
    return CONV[nd][1](denoised, original.weight.double(), bias, original.stride, 0, original.dilation, original.groups)


def convert_single(layer: nn.Module, **config) -> tuple[nn.Module, nn.Module]:
    """(the original layer, the converted copy) — converted inside a container so names exist."""
    original = layer
    holder = nn.Sequential(copy.deepcopy(layer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no example_inputs: registration order is fine for one layer
        dr.convert(holder, DenoiseConfig(layer_types=(type(layer),), init="random", keep_state_dict_keys=False, **config))
    return original, holder


schedules = st.sampled_from([("linear", None), ("ddpm", (1, 1000)), ("cosine", (300, 900))])


@settings(max_examples=30, deadline=None)
@given(
    in_features=st.integers(1, 24),
    out_features=st.integers(1, 24),
    bias=st.booleans(),
    leading=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    form=st.sampled_from(["full", "low_rank"]),
    schedule=schedules,
    seed=st.integers(0, 2**16),
)
def test_linear_fusion_is_exact(in_features, out_features, bias, leading, form, schedule, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    name, timestep_range = schedule
    original, holder = convert_single(
        layer, denoiser=form, rank=3, schedule=name, timestep_range=timestep_range, init_seed=seed
    )
    denoiser = dr.layer_denoisers(holder).__next__()[2]
    x = torch.randn(*leading, in_features)
    with torch.no_grad():
        expected = F.linear(denoise_channels(x.double(), denoiser, -1), original.weight.double(),
                            None if original.bias is None else original.bias.double())
        assert relative_error(reference_forward(holder[0], x), expected) <= 1e-7  # the package's own (float64) reference
        holder.eval()
        unfused = holder(x)
        dr.fuse(holder)
        fused = holder(x)
    assert type(holder[0]) is nn.Linear
    assert relative_error(fused.double(), expected) <= TOLERANCE
    assert relative_error(unfused.double(), expected) <= TOLERANCE


@st.composite
def conv_layers(draw):
    nd = draw(st.sampled_from([1, 2, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans())
    in_per_group = 1 if depthwise else draw(st.integers(1, 4))
    in_channels = groups * in_per_group
    out_channels = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    use_same = draw(st.booleans()) and stride == (1,) * nd
    padding = "same" if use_same else tuple(draw(st.integers(0, 2)) for _ in range(nd))
    bias = draw(st.booleans())
    layer = CONV[nd][0](in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                        groups=groups, bias=bias, padding_mode=padding_mode)
    size = tuple(draw(st.integers(5, 9)) for _ in range(nd))
    return layer, size


@settings(max_examples=60, deadline=None)
@given(conv=conv_layers(), form=st.sampled_from(["full", "low_rank"]), schedule=schedules,
       sample_noise=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_fusion_is_exact_for_every_stride_dilation_group_and_padding_mode(conv, form, schedule, sample_noise, seed):
    torch.manual_seed(seed)
    layer, size = conv
    name, timestep_range = schedule
    original, holder = convert_single(layer, denoiser=form, rank=2, schedule=name, timestep_range=timestep_range,
                                      sample_noise=sample_noise, init_seed=seed, noise_seed=seed)
    denoiser = next(dr.layer_denoisers(holder))[2]
    x = torch.randn(2, layer.in_channels, *size)
    with torch.no_grad():
        expected = reference_conv(original, x, denoiser)
        assert relative_error(reference_forward(holder[0], x), expected) <= 1e-7  # the package's own (float64) reference
        holder.eval()
        unfused = holder(x)
        dr.fuse(holder)
        fused = holder(x)
    assert type(holder[0]) is type(original)
    assert holder[0].weight.shape == original.weight.shape
    assert relative_error(fused.double(), expected) <= TOLERANCE
    assert relative_error(unfused.double(), expected) <= TOLERANCE


def test_depthwise_conv_gets_a_diagonal_denoiser():
    layer = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    _, holder = convert_single(layer)
    denoiser = next(dr.layer_denoisers(holder))[2]
    assert denoiser.matrix().shape == (8, 1, 1)


def test_grouped_conv_gets_a_block_diagonal_denoiser():
    layer = nn.Conv2d(6, 4, 3, padding=1, groups=2)
    _, holder = convert_single(layer)
    assert next(dr.layer_denoisers(holder))[2].matrix().shape == (2, 3, 3)


def test_unbatched_conv_input_is_denoised_like_a_batch_of_one():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    _, holder = convert_single(layer)
    holder.eval()
    x = torch.randn(3, 7, 7)
    with torch.no_grad():
        assert torch.allclose(holder(x), holder(x[None])[0], atol=1e-6)
