"""Calibration: every layer denoiser set to the closed-form optimum of its own noise loss."""

import copy
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import denoiserep as dr
from denoiserep import DenoiseConfig
from denoiserep.calibrate import CalibrationError
from denoiserep.moments import GRAM_BLOCK, InputStatistics, Moments
from denoiserep.optimum import LinearDenoiser, expected_l2, full_rank_optimum, optimal_l2

from conftest import free_port, gloo_group, relative_error

DDPM_MID = DenoiseConfig(schedule="ddpm", timestep_range=(150, 150))  # ᾱ ≈ 0.5: neither term dominates
# The exact optimum of the rows calibrated on: no hold-out, no shrinkage (what the closed form states).
IN_SAMPLE = {"holdout_every": None, "shrinkage": 0.0}


def structured_inputs(n: int, d: int, rank: int = 2, offset: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    """Rows with a nonzero mean and a covariance far from isotropic (rank ``rank`` plus a little noise)."""
    g = torch.Generator().manual_seed(1)
    low = torch.randn(n, rank, generator=g, dtype=dtype) @ torch.randn(rank, d, generator=g, dtype=dtype)
    return low + 0.05 * torch.randn(n, d, generator=g, dtype=dtype) + offset


def white_noise_orthogonal_to(x: torch.Tensor) -> torch.Tensor:
    """ε with (1/M) Σ εεᵀ = I exactly and Σ ε [x, 1]ᵀ = 0 exactly: the in-sample version of
    'ε ~ N(0, I), independent of X', so the empirical loss *is* the expected loss."""
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    basis = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    eps = eps - basis @ torch.linalg.lstsq(basis, eps).solution
    cov = eps.T @ eps / len(eps)
    values, vectors = torch.linalg.eigh(cov)
    return eps @ (vectors @ torch.diag(values.rsqrt()) @ vectors.T)


def only_denoiser(model):
    return next(d for _, _, d in dr.layer_denoisers(model))


def denoiser_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- the closed form ----------------------------------------------------------------------------


def test_the_closed_form_is_the_minimiser_that_a_long_lbfgs_run_finds_on_the_layers_own_l2_loss():
    x = structured_inputs(512, 4)
    eps = white_noise_orthogonal_to(x)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    dr.convert(model, DDPM_MID, example_inputs=x[:2])
    fitted = copy.deepcopy(model)
    denoiser = only_denoiser(fitted)

    # The objective the trainer minimises (L2 form), on a fixed in-sample noise draw.
    noisy = denoiser.sqrt_alpha_bar * x + denoiser.sqrt_one_minus_alpha_bar * eps
    params = [denoiser.A, denoiser.a, denoiser.e]
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(denoiser.apply_matrix(noisy) + denoiser.constant(), eps)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    report = dr.calibrate(model, [x[:200], x[200:]], progress=False, **IN_SAMPLE)
    calibrated = only_denoiser(model)

    # Tolerance: LBFGS converges to ~1e-10 in float64; the closed form is exact.
    torch.testing.assert_close(calibrated.matrix(), denoiser.matrix().detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(calibrated.constant(), denoiser.constant().detach(), rtol=1e-6, atol=1e-6)
    assert report.after.l2 == pytest.approx(closure().item(), rel=1e-9)
    assert report.after.l2 == pytest.approx(report.after.l2_optimum, rel=1e-9)


def random_statistics(d: int, groups: int = 1, rank: int | None = None) -> InputStatistics:
    g = torch.Generator().manual_seed(d + groups)
    factor = torch.randn(groups, d, rank or d, generator=g, dtype=torch.float64)
    return InputStatistics(1000, torch.randn(groups * d, generator=g, dtype=torch.float64),
                           factor @ factor.mT / d)


def coefficients(denoiser):
    return denoiser.sqrt_alpha_bar, denoiser.sqrt_one_minus_alpha_bar


def optimum_of(stats, denoiser) -> LinearDenoiser:
    s, n = coefficients(denoiser)
    matrix = full_rank_optimum(stats, s, n)
    return LinearDenoiser(-s * (matrix @ stats.mean.reshape(stats.groups, -1, 1)).reshape(-1), matrix=matrix)


@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-deficient"])
def test_the_gradient_of_the_expected_l2_loss_vanishes_at_the_optimum_and_nowhere_near_it(rank):
    model = nn.Sequential(nn.Linear(6, 2))
    dr.convert(model, DDPM_MID, example_inputs=torch.randn(2, 6))
    denoiser = only_denoiser(model)
    s, n = coefficients(denoiser)
    stats = random_statistics(6, rank=rank)
    optimum = optimum_of(stats, denoiser)
    matrix, constant = optimum.matrix.requires_grad_(True), optimum.constant.requires_grad_(True)
    loss = expected_l2(LinearDenoiser(constant, matrix=matrix), stats, s, n)
    grad_matrix, grad_constant = torch.autograd.grad(loss, [matrix, constant])
    assert grad_matrix.abs().max() < 1e-12 and grad_constant.abs().max() < 1e-12
    assert loss.item() == pytest.approx(optimal_l2(stats, s, n), rel=1e-12)
    values = torch.linalg.eigvalsh(stats.covariance)  # the minimum in the eigenbasis of Σ
    assert loss.item() == pytest.approx(float((s**2 * values / (s**2 * values + n**2)).sum()) / 6, rel=1e-10)
    nudged = LinearDenoiser(constant.detach(), matrix=matrix.detach() + 1e-3 * torch.randn_like(matrix))
    assert expected_l2(nudged, stats, s, n) > loss


def test_a_covariance_that_rounding_left_slightly_indefinite_still_gets_a_finite_optimum():
    model = nn.Sequential(nn.Linear(3, 2))
    dr.convert(model, DenoiseConfig(), example_inputs=torch.randn(2, 3))  # t = 1: 1 − ᾱ = β_1 = 1e-4
    s, n = coefficients(only_denoiser(model))
    vectors = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64)).Q
    covariance = vectors @ torch.diag(torch.tensor([-1e-3, 0.0, 2.0], dtype=torch.float64)) @ vectors.T
    matrix = full_rank_optimum(InputStatistics(10, torch.zeros(3, dtype=torch.float64), covariance[None]), s, n)
    clamped = vectors @ torch.diag(torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)) @ vectors.T
    expected = full_rank_optimum(InputStatistics(10, torch.zeros(3, dtype=torch.float64), clamped[None]), s, n)
    torch.testing.assert_close(matrix, expected)


def test_the_expected_l2_loss_is_what_sampling_the_training_noise_loss_converges_to():
    x = structured_inputs(4096, 5, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(5, 2))
    dr.convert(model, DenoiseConfig(init="random", loss="l2", schedule="ddpm", timestep_range=(300, 300)),
               example_inputs=x[:2])
    denoiser = only_denoiser(model)
    mean, centred = x.double().mean(0), x.double() - x.double().mean(0)
    stats = InputStatistics(len(x), mean, (centred.T @ centred / len(x)).unsqueeze(0))
    with torch.no_grad():
        expected = expected_l2(LinearDenoiser(denoiser.constant().double(), matrix=denoiser.matrix().double()), stats,
                               *coefficients(denoiser))
        sampled = torch.stack([denoiser.noise_loss(x) for _ in range(50)]).mean()
    assert sampled.item() == pytest.approx(expected.item(), rel=0.01)


def test_moments_read_between_batches_stay_exact_and_symmetric():
    # Wider than a Gram block: statistics() mirrors the accumulated upper blocks in place, and later
    # batches must still add up as if it had never been called.
    x = structured_inputs(600, GRAM_BLOCK + 44, rank=5)
    moments = Moments(1, x.shape[1], torch.float64)
    moments.add(x[:250])
    moments.statistics()
    moments.add(x[250:])
    covariance = moments.statistics().covariance[0]
    torch.testing.assert_close(covariance, torch.cov(x.T, correction=0), rtol=1e-10, atol=1e-12)
    assert torch.equal(covariance, covariance.T)


# -- every layer type -------------------------------------------------------------------------------


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (16, 3, 6)),
    "linear-wider-than-a-gram-block": (lambda: nn.Linear(300, 2), (128, 300)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (4, 4, 9)),
    "conv2d-stride-dilation": (lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, bias=False), (4, 4, 9, 9)),
    "conv2d-reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (4, 4, 7, 7)),
    "conv2d-circular": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (4, 4, 7, 7)),
    "conv2d-groups": (lambda: nn.Conv2d(6, 4, 3, padding=1, groups=2), (4, 6, 7, 7)),
    "conv2d-depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (4, 6, 7, 7)),
    "conv2d-wider-than-a-gram-block": (lambda: nn.Conv2d(150, 3, 1), (4, 150, 10, 10)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 2), (2, 3, 4, 4, 4)),
}


def layer_inputs(shape, channel_axis):
    """Inputs whose channels are correlated and offset, in the layer's layout."""
    channels = shape[channel_axis]
    rows = structured_inputs(int(torch.Size(shape).numel() // channels), channels, dtype=torch.float32)
    moved = list(shape)
    moved.append(moved.pop(channel_axis))
    return rows.reshape(moved).movedim(-1, channel_axis).contiguous()


def reference_statistics(layer, x):
    """μ and per-group Σ of the layer input, computed directly in float64 (independently of calibrate)."""
    channel_axis = -1 if isinstance(layer, nn.Linear) else 1
    rows = x.movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis]).double()
    groups = getattr(layer, "groups", 1)
    per_group = rows.reshape(len(rows), groups, -1).transpose(0, 1)
    centred = per_group - per_group.mean(1, keepdim=True)
    return rows.mean(0), centred.mT @ centred / len(rows)


def leading_directions_loss(covariance, mean, denoiser, rank) -> float:
    """The loss of the identity start with the r leading eigen-directions of Σ set to their optimum:
    what 'keeping only the leading directions' reaches (the bound the low-rank fit must meet)."""
    s, n = coefficients(denoiser)
    values, vectors = torch.linalg.eigh(covariance)
    kappa = (denoiser.c3 - 1.0) / denoiser.c1
    lead, lead_values = vectors[..., -rank:], values[..., -rank:]
    best = n / (s**2 * lead_values + n**2)
    eye = torch.eye(covariance.shape[-1], dtype=torch.float64)
    matrix = kappa * eye + (lead * (best - kappa).unsqueeze(-2)) @ lead.mT
    stats = InputStatistics(1, mean, covariance)
    constant = -s * (matrix @ mean.reshape(covariance.shape[0], -1, 1)).reshape(-1)
    return float(expected_l2(LinearDenoiser(constant, matrix=matrix), stats, s, n))


@pytest.mark.parametrize("form", ["full", "low_rank"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_every_layer_type_reaches_its_closed_form_optimum_and_still_fuses_exactly(kind, form):
    build, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = build()
    linear = isinstance(layer, nn.Linear)
    x = layer_inputs(shape, -1 if linear else 1)
    model = nn.Sequential(layer)
    dr.convert(model, DenoiseConfig(schedule="ddpm", timestep_range=(150, 150), denoiser=form, rank=2,
                                    keep_state_dict_keys=False), example_inputs=x[:1])
    report = dr.calibrate(model, [x[:2], x[2:]], progress=False, **IN_SAMPLE)
    denoiser = only_denoiser(model)

    mean, covariance = reference_statistics(layer, x)
    s, n = coefficients(denoiser)
    eye = torch.eye(covariance.shape[-1], dtype=torch.float64)
    optimum = n * torch.linalg.inv(s**2 * covariance + n**2 * eye)
    if form == "full" or denoiser.U.shape[-1] == covariance.shape[-1]:
        torch.testing.assert_close(denoiser.matrix().double(), optimum, rtol=2e-4, atol=2e-4 / n)
        assert report.after.l2 == pytest.approx(report.after.l2_optimum, rel=1e-4, abs=1e-6)
    else:  # never worse than keeping only the r leading directions (nor than the identity start)
        assert report.after.l2 <= leading_directions_loss(covariance, mean, denoiser, 2) + 1e-6
    c = -s * (denoiser.matrix().double() @ mean.reshape(covariance.shape[0], -1, 1)).reshape(-1)
    torch.testing.assert_close(denoiser.constant().double(), c, rtol=2e-4, atol=2e-4 / n)
    assert report.after.l2 < report.before.l2
    assert report.after.l2 >= report.after.l2_optimum - 1e-6
    assert report.after.layers[0].samples == x.numel() // x.shape[-1 if linear else 1]

    with torch.no_grad():
        unfused = model.eval()(x)
    fused = dr.fuse(model)
    with torch.no_grad():
        assert relative_error(fused(x), unfused) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_calibrate_from_float64_statistics(dtype):
    x = structured_inputs(256, 8, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    dr.convert(model, DDPM_MID, example_inputs=x[:2].to(dtype))
    report = dr.calibrate(model, [x[:128].to(dtype), x[128:].to(dtype)], progress=False, **IN_SAMPLE)
    first = next(d for name, _, d in dr.layer_denoisers(model) if name == "0")
    assert first.A.dtype == dtype
    reference = x.to(dtype).double()
    centred = reference - reference.mean(0)
    stats = InputStatistics(len(x), reference.mean(0), (centred.T @ centred / len(x)).unsqueeze(0))
    expected = full_rank_optimum(stats, *coefficients(first))
    # Statistics are exact (float32 products of half inputs, float64 sums); A is then rounded to `dtype`.
    torch.testing.assert_close(first.A.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    assert report.after.l2 < report.before.l2
    # The report's loss is that of the parameters rounded to `dtype` (bfloat16: 5e-4 above the optimum
    # they round), as a fresh measurement of the model gives it.
    fresh = dr.noise_loss_report(model, [x[:128].to(dtype), x[128:].to(dtype)]).layers[0]
    assert report.after.layers[0].l2 == pytest.approx(fresh.l2, rel=1e-9)


# -- what calibration leaves alone, and what it reports ----------------------------------------------


def cnn_with_batchnorm():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout(0.5), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def test_calibration_runs_in_eval_mode_restores_the_mode_and_never_touches_the_backbone():
    model = cnn_with_batchnorm()
    x = torch.randn(8, 3, 6, 6) + 1
    dr.convert(model, DDPM_MID, example_inputs=x[:2])
    model.train()
    backbone = {n: t.clone() for n, t in model.state_dict().items() if "parametrizations" not in n
                or n.endswith("original")}
    report = dr.calibrate(model, [x[:4], x[4:]], progress=False)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in backbone.items())  # incl. BatchNorm running stats
    assert all(layer.weight_change < 1e-6 for layer in report.before.layers)  # identity init: W′ = W
    assert all(layer.weight_change > 0 for layer in report.after.layers)


def test_the_reported_weight_change_is_the_fused_weight_change():
    model = cnn_with_batchnorm()
    x = torch.randn(8, 3, 6, 6) + 1
    dr.convert(model, DDPM_MID, example_inputs=x[:2])
    original = model[4].parametrizations.weight.original.detach().clone()
    report = dr.calibrate(model, [x], progress=False, **IN_SAMPLE)
    dr.fuse(model.eval())
    change = float((model[4].weight.detach() - original).norm() / original.norm())
    assert next(layer for layer in report.after.layers if layer.name == "4").weight_change == pytest.approx(change, rel=1e-5)


def test_a_layer_called_twice_per_forward_is_calibrated_on_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(x)))

    model = Twice()
    x = structured_inputs(32, 4, dtype=torch.float32)
    with pytest.warns(UserWarning, match="more than once"):
        dr.convert(model, DDPM_MID, example_inputs=x[:2])
    report = dr.calibrate(model, [x], progress=False, **IN_SAMPLE)
    assert report.after.layers[0].samples == 2 * len(x)


def test_noise_loss_report_measures_without_changing_the_model_and_agrees_with_calibrate():
    model = cnn_with_batchnorm()
    x = torch.randn(8, 3, 6, 6) + 1
    dr.convert(model, DDPM_MID, example_inputs=x[:2])
    state = denoiser_state(model)
    measured = dr.noise_loss_report(model, [x])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    report = dr.calibrate(model, [x], eval_batches=[x], progress=False, **IN_SAMPLE)
    assert measured.l2 == pytest.approx(report.before.l2, rel=1e-6)
    assert measured.l2_optimum == pytest.approx(report.before.l2_optimum, rel=1e-6)
    assert measured.l1 == pytest.approx(report.before.l1, rel=1e-6)  # the same seeded noise
    assert report.after.l1 < report.before.l1
    # The first layer's inputs did not change with calibration: its in-sample "after" is the model's own.
    again = dr.noise_loss_report(model, [x]).layers[0]
    assert report.after.layers[0].l2 == pytest.approx(again.l2, rel=1e-6)
    assert report.after.layers[0].l2_optimum == pytest.approx(again.l2_optimum, rel=1e-6)


def test_calibrating_layer_by_layer_leaves_every_layer_at_the_optimum_of_its_final_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
    x = structured_inputs(256, 8, dtype=torch.float32)
    config = DenoiseConfig(schedule="ddpm", timestep_range=(1, 20))  # small t: strong shrinkage upstream
    at_once, one_by_one = copy.deepcopy(model), copy.deepcopy(model)
    dr.convert(at_once, config, example_inputs=x[:2])
    dr.convert(one_by_one, config, example_inputs=x[:2])
    dr.calibrate(at_once, [x], progress=False, **IN_SAMPLE)
    report = dr.calibrate(one_by_one, [x], layers_per_pass=1, progress=False, **IN_SAMPLE)
    assert report.peak_statistics_bytes == 16 * 16 * 8 + 16 * 8  # one layer's moments at a time
    stale = dr.noise_loss_report(at_once, [x])
    fresh = dr.noise_loss_report(one_by_one, [x])
    assert stale.layers[0].l2_gap == pytest.approx(0, abs=1e-6)  # nothing upstream of layer 0
    assert max(layer.l2_gap for layer in fresh.layers) < 1e-5
    assert max(layer.l2_gap for layer in stale.layers) > 10 * max(layer.l2_gap for layer in fresh.layers)

    refit = copy.deepcopy(model)
    dr.convert(refit, config, example_inputs=x[:2])
    report = dr.calibrate(refit, [x], passes=2, progress=False, **IN_SAMPLE)
    assert len(report.refit_gaps) == 1
    assert report.refit_gaps[0] == pytest.approx(stale.l2_gap, rel=1e-3)


# -- bad input ---------------------------------------------------------------------------------------


def converted_cnn():
    model = cnn_with_batchnorm()
    dr.convert(model, DDPM_MID, example_inputs=torch.randn(2, 3, 6, 6))
    return model


@pytest.mark.parametrize(
    "batches, message",
    [
        ([], "got no batches"),
        ([(torch.randn(4, 3, 6, 6), torch.zeros(4, dtype=torch.long))], r"\(x for x, _ in loader\)"),
        ([torch.randn(4, 5)], "rejected by the model"),
        ([torch.randn(4, 3, 6, 6), torch.full((4, 3, 6, 6), float("nan"))], "layer 0 receives NaN or inf on calibration batch 1"),
    ],
    ids=["empty", "input-target-pairs", "wrong-shape", "nan"],
)
def test_bad_batches_give_a_named_error_and_leave_the_model_unchanged(batches, message):
    model = converted_cnn()
    state = denoiser_state(model)
    with pytest.raises(CalibrationError, match=message):
        dr.calibrate(model, batches, passes=2, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_failure_in_a_later_pass_restores_the_denoisers():
    model = converted_cnn()
    state = denoiser_state(model)

    class FailsSecondTime:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            value = float("nan") if self.calls > 1 else 1.0
            return iter([torch.full((2, 3, 6, 6), value) + torch.randn(2, 3, 6, 6)])

    with pytest.raises(CalibrationError, match="NaN"):
        dr.calibrate(model, FailsSecondTime(), passes=2, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_max_batches_stops_before_the_loader_reads_one_batch_more():
    def two_then_broken():
        yield torch.randn(2, 3, 6, 6)
        yield torch.randn(2, 3, 6, 6)
        raise AssertionError("a third batch was read")

    report = dr.calibrate(converted_cnn(), two_then_broken(), max_batches=2, progress=False)
    assert report.batches == 2 and report.after.batches == 1  # the second batch is held out


def test_a_model_without_denoisers_and_a_one_shot_iterator_for_several_passes_are_refused():
    with pytest.raises(CalibrationError, match="no DenoiseRep denoisers"):
        dr.calibrate(cnn_with_batchnorm(), [torch.randn(2, 3, 6, 6)], progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        dr.calibrate(converted_cnn(), (x for x in [torch.randn(2, 3, 6, 6)]), passes=2, progress=False)


# -- torch.distributed -------------------------------------------------------------------------------


def ddp_batches():
    x = structured_inputs(96, 3 * 6 * 6, dtype=torch.float32).reshape(96, 3, 6, 6)
    return [x[:40], x[40:56], x[56:]]  # uneven: rank 0 gets batches 0 and 2, rank 1 batch 1


def step_batches(rank: int | None = None) -> list[torch.Tensor]:
    """Two steps of two ranks' batches (rank's own, or both concatenated: what one process sees)."""
    x = structured_inputs(64, 3 * 6 * 6, dtype=torch.float32).reshape(64, 3, 6, 6)
    steps = [(x[:12], x[12:32]), (x[32:40], x[40:])]  # uneven shards
    return [step[rank] if rank is not None else torch.cat(step) for step in steps]


def _calibrate_worker(rank, world_size, port, result_file):
    with gloo_group(rank, world_size, port):
        torch.manual_seed(0)
        in_sample, held_out = converted_cnn(), converted_cnn()
        dr.calibrate(in_sample, ddp_batches()[rank::world_size], progress=False, **IN_SAMPLE)
        report = dr.calibrate(held_out, step_batches(rank), progress=False)
        if rank == 0:
            torch.save({"in_sample": denoiser_state(in_sample), "held_out": denoiser_state(held_out),
                        "after": torch.tensor(report.after.l2)}, result_file)


def test_two_gloo_processes_calibrate_exactly_as_one_process_on_all_the_batches(tmp_path):
    port = free_port()
    result = tmp_path / "state.pt"
    mp.spawn(_calibrate_worker, args=(2, port, str(result)), nprocs=2, join=True)
    distributed = torch.load(result, weights_only=True)
    torch.manual_seed(0)
    in_sample, held_out = converted_cnn(), converted_cnn()
    dr.calibrate(in_sample, ddp_batches(), progress=False, **IN_SAMPLE)
    # Each rank holds out its own batch of step 1: together, one process's step 1.
    report = dr.calibrate(held_out, step_batches(), progress=False)
    for key, model in (("in_sample", in_sample), ("held_out", held_out)):
        for name, value in model.state_dict().items():
            torch.testing.assert_close(distributed[key][name], value, rtol=1e-5, atol=1e-5 * value.abs().max().item())
    assert float(distributed["after"]) == pytest.approx(report.after.l2, rel=1e-5)


# -- the low-rank form: no closed form, never worse than where it starts ---------------------------


def numerical_low_rank_optimum(stats: InputStatistics, s: float, n: float, rank: int, starts: int = 3) -> float:
    """The lowest expected L2 that L-BFGS finds for diag + U V (with its optimal constant −s A μ) from
    random starts: a numerical optimum of the same parametrization."""
    groups, d = stats.groups, stats.covariance.shape[-1]
    best = float("inf")
    for seed in range(starts):
        g = torch.Generator().manual_seed(seed)
        params = [torch.randn(groups, d, generator=g, dtype=torch.float64).requires_grad_(),
                  (0.3 * torch.randn(groups, d, rank, generator=g, dtype=torch.float64)).requires_grad_(),
                  (0.3 * torch.randn(groups, rank, d, generator=g, dtype=torch.float64)).requires_grad_()]
        optimizer = torch.optim.LBFGS(params, lr=1, max_iter=1000, tolerance_grad=1e-13, tolerance_change=1e-15,
                                      history_size=50, line_search_fn="strong_wolfe")

        def loss():
            denoiser = LinearDenoiser(torch.zeros(stats.channels, dtype=torch.float64), diag=params[0], U=params[1],
                                      V=params[2])
            denoiser.constant = -s * denoiser.times(stats.mean.reshape(groups, d, 1)).reshape(-1)
            return expected_l2(denoiser, stats, s, n)

        def closure():
            optimizer.zero_grad()
            value = loss()
            value.backward()
            return value

        for _ in range(3):
            optimizer.step(closure)
        best = min(best, float(loss()))
    return best


def spread_inputs(n: int, d: int, seed: int = 3) -> torch.Tensor:
    """Correlated rows whose channels have standard deviations from 0.5 to 3 and a nonzero mean."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    return (torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d)) @ mixing + 1.0


@pytest.mark.parametrize("kind", ["linear", "conv2d-groups"])
def test_low_rank_calibration_reaches_a_numerical_optimum_of_its_own_parametrization(kind):
    if kind == "linear":
        layer, x = nn.Linear(6, 5), spread_inputs(400, 6)
    else:  # 2 groups of 4 channels
        layer = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        x = spread_inputs(16 * 36, 8).reshape(16, 6, 6, 8).movedim(-1, 1).contiguous()
    model = nn.Sequential(layer)
    dr.convert(model, DenoiseConfig(schedule="ddpm", timestep_range=(40, 40), denoiser="low_rank", rank=2),
               example_inputs=x[:2])
    report = dr.calibrate(model, [x], progress=False, **IN_SAMPLE)
    mean, covariance = reference_statistics(layer, x)
    denoiser = only_denoiser(model)
    s, n = coefficients(denoiser)
    numerical = numerical_low_rank_optimum(InputStatistics(len(x), mean, covariance), s, n, rank=2)
    assert report.after.l2 <= numerical * (1 + 1e-5)
    assert report.after.l2 < report.before.l2
    assert report.after.l2 <= leading_directions_loss(covariance, mean, denoiser, 2) + 1e-6


def test_low_rank_calibration_of_inputs_with_many_strong_directions_stays_below_the_identity_start():
    # The reported case: 8 channels of spread 0.5–3, rank 4, the authors' schedule (t = 1, β = 1e-4):
    # the old form gave the 4 directions outside the rank 1/√(1−ᾱ) and took the loss from 1.0 to 6385.
    model = nn.Sequential(nn.Linear(8, 16))
    x = spread_inputs(512, 8)
    dr.convert(model, DenoiseConfig(denoiser="low_rank", rank=4), example_inputs=x[:2])
    before = dr.noise_loss_report(model, [x]).l2
    dr.calibrate(model, [x], progress=False, **IN_SAMPLE)
    after = dr.noise_loss_report(model, [x])
    assert after.l2 < before and after.l2 - after.l2_optimum < 0.5 * (before - after.l2_optimum)


# -- held-out rows: shrinkage, keeping a better denoiser, the report ------------------------------


def few_rows_model():
    model = nn.Sequential(nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 4))
    dr.convert(model, DenoiseConfig(schedule="ddpm", timestep_range=(20, 20)), example_inputs=torch.randn(2, 48))
    return model


def correlated_batches(count: int, rows: int, d: int = 48, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(-1.5, 0.5, d)
    return [(torch.randn(rows, d, generator=torch.Generator().manual_seed(seed + 1 + i)) * scales) @ mixing
            for i in range(count)]


def test_the_report_is_the_held_out_batches_measured_again_through_the_calibrated_model():
    model = few_rows_model()
    batches = correlated_batches(16, 64)
    report = dr.calibrate(model, batches, progress=False)
    assert report.held_out and report.after.batches == 2  # batches 1 and 9
    measured = dr.noise_loss_report(model, [batches[1], batches[9]])
    for reported, again in zip(report.after.layers, measured.layers):
        assert reported.l2 == pytest.approx(again.l2, rel=1e-6)
        assert reported.l2_optimum == pytest.approx(again.l2_optimum, rel=1e-6)


def test_few_rows_per_channel_are_shrunk_by_the_held_out_loss_and_generalise_better_than_the_exact_fit():
    batches = correlated_batches(8, 10)  # 70 fitting rows for 48 channels
    fresh = correlated_batches(4, 500, seed=100)  # new inputs from the same distribution
    shrunk, exact = few_rows_model(), few_rows_model()
    with pytest.warns(UserWarning, match="fewer than 10 input rows per channel"):
        report = dr.calibrate(shrunk, batches, progress=False)
    dr.calibrate(exact, batches, progress=False, shrinkage=0.0)
    assert report.fits[0].shrinkage > 0
    assert report.after.layers[0].l2 < report.before.layers[0].l2
    first = [dr.noise_loss_report(model, fresh).layers[0].l2 for model in (shrunk, exact)]
    assert first[0] < 0.9 * first[1]


def test_a_layer_keeps_its_denoiser_when_the_fit_is_worse_on_the_held_out_rows():
    model = few_rows_model()
    state = denoiser_state(model)
    batches = correlated_batches(4, 64)
    batches[1] = 50 * torch.randn(64, 48)  # held out, and nothing like what is fitted
    with pytest.warns(UserWarning, match="kept their denoiser"):
        report = dr.calibrate(model, batches, progress=False)
    assert report.fits[0].kept
    first = model[0].parametrizations.weight[0]
    assert all(torch.equal(p, state[f"0.parametrizations.weight.0.{k}"]) for k, p in first.named_parameters())


def test_calibrate_refuses_to_leave_a_layer_above_its_starting_loss_and_restores_the_model():
    class ShrinksInTheSecondPass:  # the last pass fits inputs unlike the held-out ones the report re-measures
        def __init__(self):
            self.passes = 0

        def __iter__(self):  # counts a pass when its first batch is read
            self.passes += 1
            scale = 1.0 if self.passes == 1 else 1e-3
            yield from (scale * batch for batch in correlated_batches(4, 64))

    model = few_rows_model()
    state = denoiser_state(model)
    with pytest.raises(CalibrationError, match=r"above their starting noise loss.*0: .*model was left unchanged"):
        dr.calibrate(model, ShrinksInTheSecondPass(), passes=2, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_activations_too_large_for_float32_products_are_named_and_calibrate_in_float64():
    model = nn.Sequential(nn.Linear(4, 4))
    x = 1e20 * spread_inputs(64, 4)
    dr.convert(model, DDPM_MID, example_inputs=x[:2])
    with pytest.raises(CalibrationError, match=r"layer 0 receives activations up to .*e\+20.*precision=torch.float64"):
        dr.calibrate(model, [x[:32], x[32:]], progress=False)
    report = dr.calibrate(model, [x[:32], x[32:]], progress=False, precision=torch.float64)
    assert all(torch.isfinite(p).all() for p in only_denoiser(model).parameters())
    assert report.after.l2 <= report.before.l2


def test_the_progress_bar_counts_the_batches_there_are(monkeypatch):
    totals = []
    module = sys.modules["denoiserep.calibrate"]  # the attribute `denoiserep.calibrate` is the function

    def recording_tqdm(iterable, **kwargs):
        totals.append(kwargs["total"])
        return iterable

    monkeypatch.setattr(module, "tqdm", recording_tqdm)
    dr.calibrate(converted_cnn(), [torch.randn(2, 3, 6, 6) for _ in range(3)], max_batches=100)
    assert totals[0] == 3


class GateOpenedByCalibration(nn.Module):
    """Passes channel 0 on, and channel 0 again where channel 1 exceeds ``threshold``: a channel that is
    dead on the original inputs (channel 1 is constant −1) and alive once the layer before it is
    calibrated (which moves the constant to −g, g < 1)."""

    def __init__(self, threshold: float, opening: float):
        super().__init__()
        self.threshold, self.opening = threshold, opening

    def forward(self, z):
        return torch.stack([z[:, 0], z[:, 0] * torch.relu(z[:, 1] + self.threshold) / self.opening], dim=1)


def cascading_model():
    first, last = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
    model = nn.Sequential(first, GateOpenedByCalibration(0.0, 1.0), last)
    x = torch.stack([torch.randn(256), -torch.ones(256)], dim=1)
    dr.convert(model, DenoiseConfig(schedule="ddpm", timestep_range=(1, 500)), example_inputs=x[:2])
    step = dr.layer_denoisers(model).__next__()[2]  # the first layer, t = 500
    s, n = coefficients(step)
    g = step.c3 - step.c1 * (1 - s) / n  # a calibrated constant input channel μ becomes g μ
    model[1].threshold, model[1].opening = (1 + g) / 2, (1 - g) / 2
    return model, list(x.split(64))


def test_a_layer_whose_inputs_the_layers_before_it_change_is_refit_in_another_pass():
    model, batches = cascading_model()
    state = denoiser_state(model)
    with pytest.raises(CalibrationError, match=r"leave 1 layer\(s\) above.*2: .*After 1 pass"):
        dr.calibrate(model, batches, passes=1, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    report = dr.calibrate(model, batches, progress=False)  # passes="auto"
    assert report.passes == 2
    assert report.after.layers[-1].l2 < report.before.layers[-1].l2
