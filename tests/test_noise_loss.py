"""The noise loss's two estimators and the two training paths through a layer.

Specification: the "expected" estimator is the exact expectation over ε of the paper's sampled
loss (value and gradient); the input path computes what the weight path computes (outputs, noise
loss, gradients) and never changes what anything outside the layer's own call sees.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import denoiserep as dr
from denoiserep.layer_step import LossStep, Matrices, Pointwise, _gram
from denoiserep.layers import LayerDenoiser, denoiser_of
from denoiserep.schedule import make_schedule

STEP = make_schedule("ddpm", 1000).step(300)  # ᾱ ≈ 0.35: the noise matters, A is far from identity


def make_denoiser(estimator: str, loss: str, *, channels: int = 6, groups: int = 1, form: str = "full") -> LayerDenoiser:
    layer = nn.Conv1d(channels, 4, 1, groups=groups, dtype=torch.float64) if groups > 1 else nn.Linear(channels, 4, dtype=torch.float64)
    return LayerDenoiser(layer, STEP, form=form, rank=2, init="random", init_seed=3, estimator=estimator, loss=loss)


def rows_with_offset(count: int = 40, channels: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, channels, generator=generator, dtype=torch.float64) * 2 + 3


def sampled_mean_and_error(denoiser: LayerDenoiser, rows: torch.Tensor, draws: int):
    """Monte Carlo mean of the sampled loss and of its gradient, with standard errors."""
    torch.manual_seed(0)
    values, grads = [], []
    for _ in range(draws):
        loss = denoiser.noise_loss(rows)
        grads.append(torch.autograd.grad(loss, denoiser.A)[0].reshape(-1))
        values.append(loss.detach())
    values, grads = torch.stack(values), torch.stack(grads)
    return values.mean(), values.std() / draws**0.5, grads.mean(0), grads.std(0) / draws**0.5


@pytest.mark.parametrize("loss", ["l1", "l2", "l1+l2"])
def test_expected_loss_is_the_mean_of_the_sampled_loss_value_and_gradient(loss):
    rows = rows_with_offset()
    sampled = make_denoiser("sampled", loss)
    expected = make_denoiser("expected", loss)
    expected.load_state_dict(sampled.state_dict())
    mean, error, grad_mean, grad_error = sampled_mean_and_error(sampled, rows, draws=3000)
    value = expected.noise_loss(rows)
    (grad,) = torch.autograd.grad(value, expected.A)
    # Within 4 standard errors of the Monte Carlo mean: a wrong constant would be off by far more.
    assert abs(value.item() - mean.item()) < 4 * error.item()
    assert ((grad.reshape(-1) - grad_mean).abs() <= 4 * grad_error + 1e-9).float().mean() > 0.98
    assert (grad.reshape(-1) - grad_mean).abs().max() < 6 * grad_error.max()


def test_expected_loss_has_no_sampling_noise():
    rows = rows_with_offset()
    denoiser = make_denoiser("expected", "l1")
    torch.manual_seed(0)
    first = denoiser.noise_loss(rows)
    torch.manual_seed(1)
    assert denoiser.noise_loss(rows).item() == first.item()


def test_expected_l1_matches_the_folded_normal_by_numerical_integration():
    denoiser = LayerDenoiser(nn.Linear(3, 2, dtype=torch.float64), STEP, estimator="expected", loss="l1")
    s, r = STEP.sqrt_alpha_bar, STEP.sqrt_one_minus_alpha_bar
    with torch.no_grad():  # a diagonal A: channel j's residual has mean −(s A_jj x_j + a_j), variance (1 − r A_jj)²
        denoiser.A.copy_(torch.diag(torch.tensor([0.3, 1.0, 1 / r], dtype=torch.float64))[None])
        denoiser.a.copy_(torch.tensor([-2.0, 0.0, 0.3], dtype=torch.float64))
    rows = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    mean = -(s * torch.diagonal(denoiser.A[0]) * rows[0] + denoiser.a)
    sigma = (1 - r * torch.diagonal(denoiser.A[0])).abs()
    grid = torch.linspace(-40, 40, 400001, dtype=torch.float64)
    values = []
    for m, sd in zip(mean, sigma):
        if sd < 1e-9:  # σ → 0 (calibration's null directions): the loss of a deterministic residual, |m|
            values.append(m.abs())
            continue
        density = torch.exp(-0.5 * ((grid - m) / sd) ** 2) / (sd * (2 * torch.pi) ** 0.5)
        values.append(torch.trapezoid(grid.abs() * density, grid))
    assert denoiser.noise_loss(rows).item() == pytest.approx(torch.stack(values).mean().item(), abs=1e-6)


@pytest.mark.parametrize("estimator, loss", [("expected", "l1"), ("expected", "l2"), ("expected", "l1+l2"),
                                             ("sampled", "l1+l2")])
@pytest.mark.parametrize("form", ["full", "low_rank"])
def test_the_noise_losss_written_out_gradient_matches_finite_differences(estimator, loss, form):
    denoiser = make_denoiser(estimator, loss, form=form)
    rows = rows_with_offset(count=5)  # 5 rows for 6 channels: the per-position form (the Gram one: test_training_step)
    params = [p.detach().clone().requires_grad_() for p in denoiser.matrix_parameters()]

    def value(e, a, *matrix):
        torch.manual_seed(0)  # the same ε at every evaluation
        return LossStep.apply(denoiser, rows, e, a, *matrix)

    inputs = (denoiser.e.detach().clone().requires_grad_(), denoiser.a.detach().clone().requires_grad_(), *params)
    assert torch.autograd.gradcheck(value, inputs)


def test_gram_form_stays_exact_in_float32_when_the_constant_cancels_a_large_mean():
    """At the calibrated optimum c = −√ᾱ A μ: an uncentred Gram would cancel ‖μ‖² ≫ the spread."""
    rows = torch.randn(500, 8, dtype=torch.float64) * 0.01 + 100.0
    matrix = torch.randn(1, 8, 8, dtype=torch.float64)
    constant = -STEP.sqrt_alpha_bar * (matrix[0] @ rows.mean(0))
    args = (STEP.sqrt_alpha_bar, STEP.sqrt_one_minus_alpha_bar)
    exact = _gram(Pointwise(1, 8, 0), Matrices("full", [matrix]), constant, rows, *args)[0]
    single = _gram(Pointwise(1, 8, 0), Matrices("full", [matrix.float()]), constant.float(), rows.float(), *args)[0]
    assert single.item() == pytest.approx(exact.item(), rel=1e-5)


# -- the input path -------------------------------------------------------------------------

def two_path_models(build, config: dict, example):
    models = {}
    for path in ("weight", "input"):
        torch.manual_seed(0)
        model = build()
        config = {"loss_estimator": "expected", **config}
        dr.convert(model, dr.DenoiseConfig(init="random", training_path=path, exclude_classifier=False, **config), example)
        dr.set_trainable(model, denoisers=True, backbone=False)
        models[path] = model.train()
    return models


def step_results(model, x, seed=0):
    torch.manual_seed(seed)
    out = model(x)
    noise = dr.denoise_loss(model)
    (out.square().mean() + noise).backward()
    return out.detach(), noise.detach(), [p.grad.clone() for p in dr.denoiser_parameters(model)]


LAYER_CASES = {
    "linear on tokens": (lambda: nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 5)), (3, 7, 6)),
    "conv zero padding, bias-free, BatchNorm": (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 1)),
        (2, 4, 7, 7)),
    "conv reflect padding, stride, groups": (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
                              nn.Conv2d(6, 6, 3, padding=1, groups=3)), (2, 4, 8, 8)),
    "depthwise conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 4, 5, padding=2, groups=4), nn.ReLU(), nn.Conv1d(4, 2, 1)), (3, 4, 9)),
}


@pytest.mark.parametrize("loss", ["l1", "l2"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_input_path_equals_the_weight_path_outputs_losses_and_gradients(case, loss):
    build, shape = LAYER_CASES[case]
    x = torch.randn(*shape)
    models = two_path_models(build, {"loss": loss}, x[:1])
    (out_w, loss_w, grads_w), (out_i, loss_i, grads_i) = (step_results(models[p], x) for p in ("weight", "input"))
    torch.testing.assert_close(out_i, out_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_i, loss_w, rtol=1e-5, atol=1e-6)
    for grad_i, grad_w in zip(grads_i, grads_w):
        torch.testing.assert_close(grad_i, grad_w, rtol=1e-4, atol=1e-5)


def test_input_path_with_a_token_fraction_draws_the_same_positions():
    build, shape = LAYER_CASES["linear on tokens"]
    x = torch.randn(*shape)
    models = two_path_models(build, {"loss_token_fraction": 0.3}, x[:1])
    losses = [step_results(models[p], x, seed=5)[1] for p in ("weight", "input")]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_noise_loss_gradient_on_the_input_path_does_not_reach_earlier_layers():
    """As on the weight path, the noise loss sees the layer's *detached* input."""
    build, shape = LAYER_CASES["linear on tokens"]
    x = torch.randn(*shape)
    for path, model in two_path_models(build, {}, x[:1]).items():
        model(x)
        dr.denoise_loss(model).backward()
        first, second = model[0], model[2]
        noise_only_first = denoiser_of(first).A.grad.clone()
        for p in dr.denoiser_parameters(model):
            p.grad = None
        model(x)
        losses = [loss for layer in (first, second) for loss in denoiser_of(layer).pop_losses()]
        losses[0].backward()  # the first layer's own noise loss alone
        torch.testing.assert_close(denoiser_of(first).A.grad, noise_only_first, msg=path)


def test_a_module_called_twice_and_a_direct_weight_read_see_the_denoised_layer():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            inside = self.fc(self.fc(x))
            bypass = F.linear(x, self.fc.weight, self.fc.bias)  # reads W′, not through fc.forward
            return inside + bypass

    x = torch.randn(4, 5)
    models = two_path_models(Twice, {}, x[:1])
    (out_w, loss_w, grads_w), (out_i, loss_i, grads_i) = (step_results(models[p], x) for p in ("weight", "input"))
    torch.testing.assert_close(out_i, out_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_i, loss_w)
    for grad_i, grad_w in zip(grads_i, grads_w):
        torch.testing.assert_close(grad_i, grad_w, rtol=1e-4, atol=1e-6)


def test_a_failing_forward_on_the_input_path_leaves_the_weight_denoised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    config = dr.DenoiseConfig(init="random", loss_estimator="expected", training_path="input", exclude_classifier=False)
    dr.convert(model, config, torch.randn(1, 6))
    model.train()
    fused_weight = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 6).to(torch.float64))  # the layer's F.linear refuses float64 input
    dr.denoise_loss(model)
    torch.testing.assert_close(model[0].weight.detach(), fused_weight)


def test_auto_path_picks_the_cheaper_computation():
    denoiser = LayerDenoiser(nn.Linear(512, 2048), STEP, estimator="expected")
    weight = torch.empty(2048, 512)
    few_tokens = torch.randn(16, 512, requires_grad=True)
    many_tokens = torch.randn(8192, 512, requires_grad=True)
    trained_weight = weight.clone().requires_grad_()  # a backbone that trains too
    # Weight path: W′ and its backward, 2 · 2048 · 512², plus the L1 loss's A x and backward, 2 M 512².
    # Input path: A x, its backward to A and to x, 3 M 512², the loss included. So: input iff M < 4096.
    assert denoiser.prefers_input_path(few_tokens, trained_weight)
    assert not denoiser.prefers_input_path(many_tokens, trained_weight)
    # Without a gradient to the input (a first layer) the input path never costs more.
    assert denoiser.prefers_input_path(many_tokens.detach(), trained_weight)
    # With a frozen W the input path also skips the layer's weight gradient, M · 2048 · 512.
    assert denoiser.prefers_input_path(many_tokens, weight)
    wide_input = LayerDenoiser(nn.Linear(2048, 512), STEP, estimator="expected", loss="l2")
    assert not wide_input.prefers_input_path(torch.randn(8192, 2048, requires_grad=True), torch.empty(512, 2048))
    denoiser.estimator = "sampled"  # the input path computes only the expected loss
    assert not denoiser.prefers_input_path(few_tokens, weight)


def test_eval_and_noise_loss_only_forwards_use_the_weight_path():
    build, shape = LAYER_CASES["linear on tokens"]
    x = torch.randn(*shape)
    model = two_path_models(build, {}, x[:1])["input"]
    with dr.noise_loss_only(model):
        model(x)
    assert dr.denoise_loss(model).requires_grad
    model.eval()
    reference = model(x)
    fused = dr.fuse(model)
    torch.testing.assert_close(fused(x), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    ({"loss_estimator": "mc"}, "loss_estimator"),
    ({"training_path": "both"}, "training_path"),
    ({"training_path": "input", "denoiser": "low_rank"}, "needs denoiser 'full'"),
    ({"training_path": "input", "loss_estimator": "sampled"}, "loss_estimator 'expected'"),
])
def test_config_rejects_unknown_estimators_and_impossible_paths(bad, message):
    with pytest.raises(ValueError, match=message):
        dr.DenoiseConfig(**bad)


def test_input_path_under_bf16_autocast_trains_like_the_weight_path():
    build, shape = LAYER_CASES["linear on tokens"]
    x = torch.randn(*shape)
    results = {}
    for path, model in two_path_models(build, {}, x[:1]).items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = out.float().square().mean() + dr.denoise_loss(model)
        loss.backward()
        results[path] = [p.grad for p in dr.denoiser_parameters(model)]
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in results[path])
    for grad_i, grad_w in zip(results["input"], results["weight"]):
        torch.testing.assert_close(grad_i, grad_w, rtol=0.05, atol=0.02)


def test_expected_l1_gradient_is_finite_at_a_calibrated_null_direction():
    """Calibration sets A's rows facing a null input direction to I/r: the residual has variance 0."""
    rows = torch.randn(50, 4)
    rows[:, 3] = 0.0  # a channel that never varies
    denoiser = LayerDenoiser(nn.Linear(4, 3), STEP, estimator="expected", loss="l1")
    with torch.no_grad():
        denoiser.A[0, 3] = 0.0
        denoiser.A[0, 3, 3] = 1 / STEP.sqrt_one_minus_alpha_bar
    loss = denoiser.noise_loss(rows)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(denoiser.A.grad).all() and torch.isfinite(denoiser.a.grad).all()
