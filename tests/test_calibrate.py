"""Calibration: every layer denoiser set to the closed-form optimum of its own noise loss."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import denoiserep as dr
from denoiserep import DenoiseConfig
from denoiserep.calibrate import (
    CalibrationError,
    InputStatistics,
    expected_l2_loss,
    optimal_denoiser,
    optimal_l2_loss,
)

from conftest import free_port, relative_error

DDPM_MID = DenoiseConfig(schedule="ddpm", timestep_range=(150, 150))  # ᾱ ≈ 0.5: neither term dominates


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
    report = dr.calibrate(model, [x[:200], x[200:]], progress=False)
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


@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-deficient"])
def test_the_gradient_of_the_expected_l2_loss_vanishes_at_the_optimum_and_nowhere_near_it(rank):
    model = nn.Sequential(nn.Linear(6, 2))
    dr.convert(model, DDPM_MID, example_inputs=torch.randn(2, 6))
    denoiser = only_denoiser(model)
    stats = random_statistics(6, rank=rank)
    matrix, constant = optimal_denoiser(stats, denoiser)
    matrix.requires_grad_(True)
    constant.requires_grad_(True)
    loss = expected_l2_loss(matrix, constant, stats, denoiser)
    grad_matrix, grad_constant = torch.autograd.grad(loss, [matrix, constant])
    assert grad_matrix.abs().max() < 1e-12 and grad_constant.abs().max() < 1e-12
    assert loss.item() == pytest.approx(optimal_l2_loss(matrix.detach(), denoiser), rel=1e-12)
    values = torch.linalg.eigvalsh(stats.covariance)  # the minimum in the eigenbasis of Σ
    s2, n2 = denoiser.sqrt_alpha_bar**2, denoiser.sqrt_one_minus_alpha_bar**2
    assert loss.item() == pytest.approx(float((s2 * values / (s2 * values + n2)).sum()) / 6, rel=1e-10)
    nudged = expected_l2_loss(matrix.detach() + 1e-3 * torch.randn_like(matrix), constant.detach(), stats, denoiser)
    assert nudged > loss


def test_a_covariance_that_rounding_left_slightly_indefinite_still_gets_a_finite_optimum():
    model = nn.Sequential(nn.Linear(3, 2))
    dr.convert(model, DenoiseConfig(), example_inputs=torch.randn(2, 3))  # t = 1: 1 − ᾱ = β_1 = 1e-4
    denoiser = only_denoiser(model)
    vectors = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64)).Q
    covariance = vectors @ torch.diag(torch.tensor([-1e-3, 0.0, 2.0], dtype=torch.float64)) @ vectors.T
    matrix, _ = optimal_denoiser(InputStatistics(10, torch.zeros(3, dtype=torch.float64), covariance[None]), denoiser)
    clamped = vectors @ torch.diag(torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)) @ vectors.T
    expected, _ = optimal_denoiser(InputStatistics(10, torch.zeros(3, dtype=torch.float64), clamped[None]), denoiser)
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
        expected = expected_l2_loss(denoiser.matrix().double(), denoiser.constant().double(), stats, denoiser)
        sampled = torch.stack([denoiser.noise_loss(x) for _ in range(50)]).mean()
    assert sampled.item() == pytest.approx(expected.item(), rel=0.01)


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
    report = dr.calibrate(model, [x[:2], x[2:]], progress=False)
    denoiser = only_denoiser(model)

    mean, covariance = reference_statistics(layer, x)
    s2, n = denoiser.sqrt_alpha_bar**2, denoiser.sqrt_one_minus_alpha_bar
    eye = torch.eye(covariance.shape[-1], dtype=torch.float64)
    optimum = n * torch.linalg.inv(s2 * covariance + n**2 * eye)
    if form == "full" or denoiser.U.shape[-1] == covariance.shape[-1]:
        expected = optimum
    else:  # identity part + the r leading eigen-directions of the shrinkage
        values, vectors = torch.linalg.eigh(covariance)
        weights = s2 * values / (s2 * values + n**2)
        lead, lead_w = vectors[..., -2:], weights[..., -2:]
        expected = (eye - (lead * lead_w.unsqueeze(-2)) @ lead.mT) / n
    torch.testing.assert_close(denoiser.matrix().double(), expected, rtol=2e-4, atol=2e-4 / n)
    c = -(s2**0.5) * (denoiser.matrix().double() @ mean.reshape(covariance.shape[0], -1, 1)).reshape(-1)
    torch.testing.assert_close(denoiser.constant().double(), c, rtol=2e-4, atol=2e-4 / n)

    assert report.after.l2 < report.before.l2
    assert report.after.l2 >= report.after.l2_optimum - 1e-6
    if form == "full":
        assert report.after.l2 == pytest.approx(report.after.l2_optimum, rel=1e-4, abs=1e-6)
    else:  # what the low-rank form loses: the shrinkage of the directions past the r leading ones
        values = torch.linalg.eigvalsh(covariance)[..., :-2]
        lost = ((s2 * values) ** 2 / (n**2 * (s2 * values + n**2))).sum() / x.shape[-1 if linear else 1]
        assert report.after.l2 - report.after.l2_optimum == pytest.approx(float(lost), rel=1e-3, abs=1e-6)
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
    report = dr.calibrate(model, [x[:128].to(dtype), x[128:].to(dtype)], progress=False)
    first = next(d for name, _, d in dr.layer_denoisers(model) if name == "0")
    assert first.A.dtype == dtype
    reference = x.to(dtype).double()
    centred = reference - reference.mean(0)
    stats = InputStatistics(len(x), reference.mean(0), (centred.T @ centred / len(x)).unsqueeze(0))
    expected, _ = optimal_denoiser(stats, first)
    # Statistics are exact (float32 products of half inputs, float64 sums); A is then rounded to `dtype`.
    torch.testing.assert_close(first.A.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    assert report.after.l2 < report.before.l2


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
    report = dr.calibrate(model, [x], progress=False)
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
    report = dr.calibrate(model, [x], progress=False)
    assert report.after.layers[0].samples == 2 * len(x)


def test_noise_loss_report_measures_without_changing_the_model_and_agrees_with_calibrate():
    model = cnn_with_batchnorm()
    x = torch.randn(8, 3, 6, 6) + 1
    dr.convert(model, DDPM_MID, example_inputs=x[:2])
    state = denoiser_state(model)
    measured = dr.noise_loss_report(model, [x])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    report = dr.calibrate(model, [x], eval_batches=[x], progress=False)
    assert measured.l2 == pytest.approx(report.before.l2, rel=1e-6)
    assert measured.l2_optimum == pytest.approx(report.before.l2_optimum, rel=1e-6)
    assert measured.l1 == pytest.approx(report.before.l1, rel=1e-6)  # the same seeded noise
    assert report.after.l1 < report.before.l1


def test_calibrating_layer_by_layer_leaves_every_layer_at_the_optimum_of_its_final_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
    x = structured_inputs(256, 8, dtype=torch.float32)
    config = DenoiseConfig(schedule="ddpm", timestep_range=(1, 20))  # small t: strong shrinkage upstream
    at_once, one_by_one = copy.deepcopy(model), copy.deepcopy(model)
    dr.convert(at_once, config, example_inputs=x[:2])
    dr.convert(one_by_one, config, example_inputs=x[:2])
    dr.calibrate(at_once, [x], progress=False)
    report = dr.calibrate(one_by_one, [x], layers_per_pass=1, progress=False)
    assert report.peak_statistics_bytes == 16 * 16 * 8 + 16 * 8  # one layer's moments at a time
    stale = dr.noise_loss_report(at_once, [x])
    fresh = dr.noise_loss_report(one_by_one, [x])
    assert stale.layers[0].l2_gap == pytest.approx(0, abs=1e-6)  # nothing upstream of layer 0
    assert max(layer.l2_gap for layer in fresh.layers) < 1e-5
    assert max(layer.l2_gap for layer in stale.layers) > 10 * max(layer.l2_gap for layer in fresh.layers)

    refit = copy.deepcopy(model)
    dr.convert(refit, config, example_inputs=x[:2])
    report = dr.calibrate(refit, [x], passes=2, progress=False)
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
    assert report.after.batches == 2


def test_a_model_without_denoisers_and_a_one_shot_iterator_for_several_passes_are_refused():
    with pytest.raises(CalibrationError, match="no DenoiseRep denoisers"):
        dr.calibrate(cnn_with_batchnorm(), [torch.randn(2, 3, 6, 6)], progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        dr.calibrate(converted_cnn(), (x for x in [torch.randn(2, 3, 6, 6)]), passes=2, progress=False)


# -- torch.distributed -------------------------------------------------------------------------------


def ddp_batches():
    x = structured_inputs(96, 3 * 6 * 6, dtype=torch.float32).reshape(96, 3, 6, 6)
    return [x[:40], x[40:56], x[56:]]  # uneven: rank 0 gets batches 0 and 2, rank 1 batch 1


def _calibrate_worker(rank, world_size, port, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = converted_cnn()
        dr.calibrate(model, ddp_batches()[rank::world_size], progress=False)
        if rank == 0:
            torch.save(denoiser_state(model), result_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_calibrate_exactly_as_one_process_on_all_the_batches(tmp_path):
    port = free_port()
    result = tmp_path / "state.pt"
    mp.spawn(_calibrate_worker, args=(2, port, str(result)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = converted_cnn()
    dr.calibrate(single, ddp_batches(), progress=False)
    distributed = torch.load(result, weights_only=True)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-5, atol=1e-5 * value.abs().max().item())
