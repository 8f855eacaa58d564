"""The fused training step computes exactly the method's training forward and its gradients.

Specification: for every layer shape, denoiser form, estimator, loss, training path, token fraction,
label-aug and label-free steps, sampled posterior noise and a trainable backbone, one converted
layer's outputs, noise loss and the gradients of every parameter (and of the layer's input) equal
those of a plain autograd computation of the same formulas (W′ = W (c3 I − c1 A) per group, b′ = b +
W u, the noise loss on the detached input with the same ε), to float64 rounding.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import denoiserep as dr


LAYERS = {
    "linear on tokens": (lambda: nn.Linear(6, 5), (3, 4, 6)),
    "linear on rows": (lambda: nn.Linear(5, 7), (9, 5)),
    "linear, fewer rows than channels": (lambda: nn.Linear(8, 3), (3, 8)),  # expected L2 per position, not by Gram
    "conv 3x3, zero padding, no bias": (lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False), (2, 4, 5, 5)),
    "conv 1x1": (lambda: nn.Conv2d(5, 3, 1), (2, 5, 4, 4)),
    "conv stride 2, reflect, dilation": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2,
                                                           padding_mode="reflect"), (2, 3, 7, 7)),
    "conv groups 2": (lambda: nn.Conv2d(6, 4, 3, padding=1, groups=2), (2, 6, 5, 5)),
    "conv 3x3, more inputs than W has rows": (lambda: nn.Conv2d(12, 1, 3, padding=1), (2, 12, 4, 4)),  # low rank: d > out · k
    "depthwise conv1d": (lambda: nn.Conv1d(4, 4, 3, padding=1, groups=4, bias=False), (3, 4, 9)),
    "conv3d": (lambda: nn.Conv3d(3, 2, 2), (2, 3, 3, 3, 3)),
}

SETTINGS = {  # (estimator, loss, path)
    "sampled l1 (the paper)": ("sampled", "l1", "weight"),
    "sampled l2": ("sampled", "l2", "weight"),
    "sampled l1+l2": ("sampled", "l1+l2", "weight"),
    "expected l1": ("expected", "l1", "weight"),
    "expected l2": ("expected", "l2", "weight"),
    "expected l1+l2": ("expected", "l1+l2", "weight"),
    "expected l1, input path": ("expected", "l1", "input"),
    "expected l2, input path": ("expected", "l2", "input"),
    "expected l1+l2, input path": ("expected", "l1+l2", "input"),
}


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# -- the reference: the formulas, by plain autograd ---------------------------------------------------


def dense_matrix(denoiser):
    return denoiser.A if denoiser.form == "full" else torch.diag_embed(denoiser.A_diag) + denoiser.U @ denoiser.V


def per_group(rows, matrix):
    """(A x) for rows (M, C), A as (groups, d, d) blocks."""
    g, d = matrix.shape[0], matrix.shape[-1]
    return torch.einsum("mgi,gji->mgj", rows.reshape(len(rows), g, d), matrix).reshape(rows.shape)


def reference_layer(layer, x, weight, bias, denoiser, matrix):
    """The layer with W′ = W (c3 I − c1 A) and b′ = b + Σ_k W[:, :, k] u, u = −c1 (A e + a) + σ z."""
    g = denoiser.groups
    out, d = weight.shape[0], weight.shape[1]
    w = weight.reshape(g, out // g, d, -1)
    step = denoiser.c3 * torch.eye(d) - denoiser.c1 * matrix  # (g, d, d)
    fused = torch.einsum("goik,gij->gojk", w, step).reshape(weight.shape)
    constant = per_group(denoiser.e[None], matrix)[0] + denoiser.a
    u = -denoiser.c1 * constant + (denoiser.noise if denoiser.sample_noise else 0)
    shift = torch.einsum("goik,gi->go", w, u.reshape(g, d)).reshape(out)
    fused_bias = shift if bias is None else bias + shift
    if isinstance(layer, nn.Linear):
        return F.linear(x, fused, fused_bias)
    return layer._conv_forward(x, fused, fused_bias)


def reference_loss(denoiser, x, matrix, seed):
    """The noise loss on x.detach(), drawing its positions and ε as the library does (same seed)."""
    torch.manual_seed(seed)
    channels = denoiser.channels
    rows = denoiser.input_rows(x)
    layout_shape = x.shape if denoiser.spatial_dims else rows.shape
    if x.ndim == denoiser.spatial_dims + 1:
        layout_shape = (1, *x.shape)
    if denoiser.loss_token_fraction < 1.0:
        keep = max(1, int(len(rows) * denoiser.loss_token_fraction))
        rows = rows[torch.randint(len(rows), (keep,))]
        layout_shape = rows.shape if denoiser.groups == 1 else (1, channels, keep)
    s, r = denoiser.sqrt_alpha_bar, denoiser.sqrt_one_minus_alpha_bar
    constant = per_group(denoiser.e[None], matrix)[0] + denoiser.a
    if denoiser.estimator == "sampled":
        eps = torch.normal(0.0, r, layout_shape) / r
        if len(layout_shape) > 2 or denoiser.groups > 1 and denoiser.loss_token_fraction < 1.0:
            eps = eps.movedim(1, -1).reshape(-1, channels)
        predicted = per_group(s * rows + r * eps, matrix) + constant
        l1, l2 = (eps - predicted).abs().mean(), (eps - predicted).square().mean()
    else:
        mean = s * per_group(rows, matrix) + constant
        residual = torch.eye(matrix.shape[-1]) - r * matrix
        variance = residual.square().sum(-1).reshape(-1)
        sigma = variance.sqrt()
        l1 = (sigma * math.sqrt(2 / math.pi) * torch.exp(-mean.square() / (2 * variance))
              + mean * torch.erf(mean / (sigma * math.sqrt(2)))).mean()
        l2 = variance.mean() + mean.square().mean()
    return {"l1": l1, "l2": l2, "l1+l2": l1 + l2}[denoiser.loss_type]


# -- one step of the library and of the reference -----------------------------------------------------


def converted(kind, **config):
    build, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(build())
    x = torch.randn(*shape) * 1.5 + 0.5
    dr.convert(model, dr.DenoiseConfig(init="random", keep_state_dict_keys=False, exclude_classifier=False,
                                       schedule="ddpm", timestep_range=(200, 200), **config), example_inputs=x[:1])
    return model, x


def step(model, x, *, label_free: bool, backbone: bool, seed: int = 5):
    """(output, noise loss, gradients by name) of one step: 0.5 · mean(y²) + noise loss (label-aug),
    or the noise loss alone under noise_loss_only (label-free)."""
    dr.set_trainable(model, denoisers=True, backbone=backbone)
    model.train()
    x = x.clone().requires_grad_(not label_free)
    torch.manual_seed(seed)
    if label_free:
        with dr.noise_loss_only(model):
            out = model(x)
        noise = dr.denoise_loss(model)
        total = noise
    else:
        out = model(x)
        noise = dr.denoise_loss(model)
        total = 0.5 * out.square().mean() + noise
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if x.grad is not None:
        grads["input"] = x.grad.clone()
    for p in model.parameters():
        p.grad = None
    return out.detach(), noise.detach(), grads


def reference_step(model, x, *, label_free: bool, backbone: bool, seed: int = 5):
    layer = model[0]
    denoiser = dr.layer_denoisers(model).__next__()[2]
    weight, bias = layer.parametrizations.weight.original, layer.bias
    names = dict(model.named_parameters())
    x = x.clone().requires_grad_(not label_free)
    matrix = dense_matrix(denoiser)
    noise = reference_loss(denoiser, x, matrix, seed)
    if label_free:
        with torch.no_grad():
            out = reference_layer(layer, x, weight, bias, denoiser, matrix)
        total = noise
    else:
        out = reference_layer(layer, x, weight, bias, denoiser, matrix)
        total = 0.5 * out.square().mean() + noise
    wanted = [n for n, p in names.items() if p.requires_grad]
    inputs = [names[n] for n in wanted] + ([x] if not label_free else [])
    values = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = {n: g for n, g in zip(wanted + ["input"], values) if g is not None}
    return out.detach(), noise.detach(), grads


def assert_same_step(model, x, **kwargs):
    ours, expected = step(model, x, **kwargs), reference_step(model, x, **kwargs)
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[1], expected[1], rtol=1e-10, atol=1e-12)
    assert set(ours[2]) == set(expected[2]), (set(ours[2]), set(expected[2]))
    for name, grad in expected[2].items():
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-9, atol=1e-11, msg=name)


# -- the specification ----------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_full_rank_label_aug_step_equals_the_formulas(kind, setting):
    estimator, loss, path = SETTINGS[setting]
    model, x = converted(kind, loss_estimator=estimator, loss=loss, training_path=path)
    assert_same_step(model, x, label_free=False, backbone=False)


@pytest.mark.parametrize("setting", ["sampled l1 (the paper)", "sampled l1+l2", "expected l1", "expected l2"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_low_rank_step_equals_the_formulas(kind, setting):
    estimator, loss, _ = SETTINGS[setting]
    model, x = converted(kind, denoiser="low_rank", rank=2, loss_estimator=estimator, loss=loss)
    assert_same_step(model, x, label_free=False, backbone=False)


@pytest.mark.parametrize("form", ["full", "low_rank"])
@pytest.mark.parametrize("setting", ["sampled l1 (the paper)", "expected l1", "expected l2"])
@pytest.mark.parametrize("kind", ["linear on tokens", "conv 3x3, zero padding, no bias", "conv groups 2"])
def test_label_free_step_equals_the_formulas(kind, setting, form):
    estimator, loss, _ = SETTINGS[setting]
    model, x = converted(kind, denoiser=form, rank=2, loss_estimator=estimator, loss=loss)
    assert_same_step(model, x, label_free=True, backbone=False)


@pytest.mark.parametrize("label_free", [False, True], ids=["label-aug", "label-free"])
@pytest.mark.parametrize("setting", ["sampled l1 (the paper)", "expected l2", "expected l1, input path"])
@pytest.mark.parametrize("kind", ["linear on tokens", "conv 1x1", "conv 3x3, zero padding, no bias", "conv groups 2"])
def test_a_token_fraction_draws_the_same_positions_and_noise_as_the_formulas(kind, setting, label_free):
    estimator, loss, path = SETTINGS[setting]
    model, x = converted(kind, loss_estimator=estimator, loss=loss, training_path=path, loss_token_fraction=0.4)
    assert_same_step(model, x, label_free=label_free, backbone=False)


@pytest.mark.parametrize("label_free", [False, True], ids=["label-aug", "label-free"])
@pytest.mark.parametrize("setting", ["sampled l1 (the paper)", "expected l2"])
@pytest.mark.parametrize("kind", ["linear on tokens", "conv 1x1", "conv 3x3, zero padding, no bias", "conv groups 2"])
def test_a_low_rank_denoiser_on_a_token_fraction_gets_the_formulas_gradients(kind, setting, label_free):
    estimator, loss, _ = SETTINGS[setting]
    model, x = converted(kind, denoiser="low_rank", rank=2, loss_estimator=estimator, loss=loss,
                         loss_token_fraction=0.4)
    assert_same_step(model, x, label_free=label_free, backbone=False)


@pytest.mark.parametrize("form", ["full", "low_rank"])
@pytest.mark.parametrize("kind", ["linear on tokens", "conv 1x1", "conv 3x3, zero padding, no bias", "conv groups 2"])
def test_a_backbone_that_trains_with_the_denoisers_gets_the_formulas_gradients(kind, form):
    model, x = converted(kind, denoiser=form, rank=2)
    assert_same_step(model, x, label_free=False, backbone=True)


@pytest.mark.parametrize("kind", ["linear on tokens", "conv 3x3, zero padding, no bias"])
def test_sampled_posterior_noise_rides_in_the_bias_as_in_the_formulas(kind):
    model, x = converted(kind, sample_noise=True, noise_seed=3)
    assert_same_step(model, x, label_free=False, backbone=False)


def test_a_low_rank_a_no_larger_than_w_steps_as_one_dense_block_and_a_wider_one_through_its_factors():
    # Both routes are held to the formulas by the tests above; these layers are the ones that take each.
    def dense(kind):
        return next(dr.layer_denoisers(converted(kind, denoiser="low_rank", rank=2)[0]))[2].dense_low_rank

    assert dense("linear on rows") and dense("conv 3x3, zero padding, no bias")  # d ≤ out · k
    assert not dense("linear on tokens") and not dense("conv 1x1") and not dense("conv 3x3, more inputs than W has rows")
    assert not dense("conv groups 2")  # d > out · k, or groups


@pytest.mark.parametrize("form", ["full", "low_rank"])
def test_the_step_trains_w_prime_which_the_parametrization_and_fuse_then_use_bit_for_bit(form):
    model, x = converted("conv 3x3, zero padding, no bias", denoiser=form, rank=2)
    layer = model[0]
    dr.set_trainable(model)
    model.train()
    captured = {}
    original = nn.Conv2d._conv_forward

    def spy(self, inputs, weight, bias):
        captured["weight"] = weight.detach().clone()
        return original(self, inputs, weight, bias)

    nn.Conv2d._conv_forward = spy
    try:
        model(x)
    finally:
        nn.Conv2d._conv_forward = original
    dr.denoise_loss(model)
    assert torch.equal(captured["weight"], layer.weight.detach())  # what eval and `fuse` use
    fused = dr.fuse(model.eval())
    assert torch.equal(fused[0].weight.detach(), captured["weight"])
