"""`calibrate`: set every layer denoiser to the closed-form optimum of its own noise loss.

Layer i's noise loss (L2 form) is ``E ‖ε − A X_t − c‖²`` with ``X_t = √ᾱ X + √(1−ᾱ) ε``,
``ε ~ N(0, I)`` independent of the layer input X, and ``c = A e + a``. With the mean μ and the
covariance Σ of X over the positions the loss sees, its exact minimiser is (per conv group)::

    A* = √(1−ᾱ) (ᾱ Σ + (1−ᾱ) I)⁻¹           c* = −√ᾱ A* μ     (we store e = −√ᾱ μ, a = 0)

and its minimum is ``(1/C) Σ_groups tr(I − (1−ᾱ)(ᾱ Σ + (1−ᾱ) I)⁻¹)``. The derivation, the low-rank
form and what the fused layer becomes are in ``docs/calibration.md``.

One no-grad, eval-mode forward over the user's batches accumulates, for every converted layer,
the count, the sum and the per-group Gram matrix of its input rows (float64 sums of float32
per-batch products of rows shifted by the first batch's mean, so that a large mean does not
cancel the variance). Under torch.distributed the moments are merged across ranks exactly.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from .convert import call_model, layer_denoisers, to_device, unwrap
from .layers import LayerDenoiser


class CalibrationError(ValueError):
    """The calibration batches could not be used; the model was left unchanged."""


@dataclass
class InputStatistics:
    """Mean and covariance of one layer's input channels over the positions its noise loss sees."""

    count: int  # rows (tokens / pixels) seen
    mean: torch.Tensor  # (channels,) float64
    covariance: torch.Tensor  # (groups, d, d) float64: the within-group blocks (population covariance)
    precision: torch.dtype = torch.float64  # dtype the per-batch products were formed in

    @functools.cached_property
    def min_eigenvalue(self) -> float:
        """Σ's smallest eigenvalue over groups, computed to the statistics' own precision (directions
        the input never uses give 0 up to about 1e-7 · λ_max with float32 products, either sign)."""
        return float(torch.linalg.eigvalsh(self.covariance.to(self.precision)).min())


@dataclass
class LayerNoiseLoss:
    """One layer's noise loss against its optimum, for the denoiser as it is now."""

    name: str
    timestep: int
    samples: int
    l2: float  # expected L2 noise loss over ε (exact, given the batches' μ and Σ)
    l2_optimum: float  # the minimum of that expectation over linear denoisers (closed form)
    l1: float | None  # L1 noise loss, sampled with a seeded ε (None when not measured)
    weight_change: float  # ‖W′ − W‖ / ‖W‖: how far the fused weight is from the original
    min_eigenvalue: float  # smallest eigenvalue of Σ (0: directions the input never uses)

    @property
    def l2_gap(self) -> float:
        return self.l2 - self.l2_optimum


@dataclass
class NoiseLossReport:
    """Every converted layer's noise loss next to its closed-form optimum (sums over layers, as
    `denoise_loss` sums them)."""

    layers: list[LayerNoiseLoss]
    batches: int

    @property
    def l2(self) -> float:
        return sum(layer.l2 for layer in self.layers)

    @property
    def l2_optimum(self) -> float:
        return sum(layer.l2_optimum for layer in self.layers)

    @property
    def l2_gap(self) -> float:
        return self.l2 - self.l2_optimum

    @property
    def l1(self) -> float | None:
        values = [layer.l1 for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    def summary(self) -> dict[str, float | None]:
        return {"l1": self.l1, "l2": self.l2, "l2_optimum": self.l2_optimum, "l2_gap": self.l2_gap}

    def to_dict(self) -> dict:
        return {**self.summary(), "batches": self.batches, "layers": [asdict(layer) for layer in self.layers]}


@dataclass
class CalibrationReport:
    """What `calibrate` did: the noise loss per layer before and after, and the cost."""

    before: NoiseLossReport
    after: NoiseLossReport
    passes: int = 1
    # For each pass after the first: how far the previous pass's denoisers were from the optimum
    # of the statistics the refit measured (total expected L2). Near 0: more passes do not matter.
    refit_gaps: list[float] = field(default_factory=list)
    seconds: float = 0.0
    statistics_seconds: float = 0.0  # of which the forward passes that accumulate the moments
    peak_statistics_bytes: int = 0  # float64 moments held at once

    def table(self) -> str:
        """Markdown: one row per layer."""
        header = ("| layer | t | samples | L2 before | L2 after | L2 optimum | L1 before | L1 after "
                  "| ‖W′−W‖/‖W‖ | λ_min(Σ) |\n|---|---|---|---|---|---|---|---|---|---|")
        rows = []
        for old, new in zip(self.before.layers, self.after.layers):
            l1 = [f"{v:.4f}" if v is not None else "—" for v in (old.l1, new.l1)]
            rows.append(f"| {new.name} | {new.timestep} | {new.samples:,} | {old.l2:.4f} | {new.l2:.4f} | "
                        f"{new.l2_optimum:.4f} | {l1[0]} | {l1[1]} | {new.weight_change:.3g} | {new.min_eigenvalue:.3g} |")
        return "\n".join([header, *rows])

    def to_dict(self) -> dict:
        return {"before": self.before.to_dict(), "after": self.after.to_dict(), "passes": self.passes,
                "refit_gaps": self.refit_gaps, "seconds": self.seconds, "statistics_seconds": self.statistics_seconds,
                "peak_statistics_bytes": self.peak_statistics_bytes}


# -- the closed form ------------------------------------------------------------------------------


def optimal_denoiser(stats: InputStatistics, denoiser: LayerDenoiser) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A*, c*)``: A* as (groups, d, d) float64 blocks, c* = −√ᾱ A* μ as (channels,)."""
    # ᾱ Σ + (1 − ᾱ) I is SPD because 1 − ᾱ_t ≥ β_1 > 0, so its Cholesky factor exists, unless
    # rounding made some eigenvalue of Σ more negative than −(1 − ᾱ)/ᾱ: then clamp the spectrum.
    factor, info = torch.linalg.cholesky_ex(_shrink_matrix(stats, denoiser))
    if bool((info == 0).all()):
        inverse = torch.cholesky_inverse(factor)
    else:
        values, vectors = torch.linalg.eigh(stats.covariance)
        inverse = (vectors / _shrink_denominator(values.clamp_min(0.0), denoiser).unsqueeze(-2)) @ vectors.mT
    matrix = denoiser.sqrt_one_minus_alpha_bar * inverse
    return matrix, -denoiser.sqrt_alpha_bar * _grouped_matvec(matrix, stats.mean)


def optimal_l2_loss(optimal_matrix: torch.Tensor, denoiser: LayerDenoiser) -> float:
    """The smallest expected L2 noise loss, from A*: ``(1/C) tr(I − (1−ᾱ)(ᾱΣ + (1−ᾱ)I)⁻¹)
    = (1/C) (C − √(1−ᾱ) tr A*) = (1/C) Σ_k ᾱλ_k / (ᾱλ_k + 1 − ᾱ)`` (λ_k: the eigenvalues of Σ)."""
    trace = float(torch.diagonal(optimal_matrix, dim1=-2, dim2=-1).sum())
    return 1.0 - denoiser.sqrt_one_minus_alpha_bar * trace / denoiser.channels


def expected_l2_loss(matrix: torch.Tensor, constant: torch.Tensor, stats: InputStatistics,
                     denoiser: LayerDenoiser) -> torch.Tensor:
    """``E_{X,ε} mean‖ε − A X_t − c‖²`` for a denoiser (A as (groups, d, d), c as (channels,)).

    ``= (1/C) [‖I − √(1−ᾱ) A‖²_F + ᾱ tr(A Σ Aᵀ) + ‖√ᾱ A μ + c‖²]``: the noise and the input's
    spread and offset contribute independently because ε is independent of X and zero-mean.
    Computed in ``matrix``'s dtype; differentiable in ``matrix`` and ``constant`` (the tests check
    the optimum's gradient).
    """
    s, n = denoiser.sqrt_alpha_bar, denoiser.sqrt_one_minus_alpha_bar
    covariance, mean = stats.covariance.to(matrix.dtype), stats.mean.to(matrix.dtype)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    noise_part = (eye - n * matrix).square().sum()
    spread_part = s**2 * ((matrix @ covariance) * matrix).sum()
    offset_part = (s * _grouped_matvec(matrix, mean) + constant).square().sum()
    return (noise_part + spread_part + offset_part) / denoiser.channels


def _shrink_matrix(stats: InputStatistics, denoiser: LayerDenoiser) -> torch.Tensor:
    """ᾱ Σ + (1 − ᾱ) I per group."""
    eye = torch.eye(stats.covariance.shape[-1], dtype=torch.float64, device=stats.covariance.device)
    return denoiser.sqrt_alpha_bar**2 * stats.covariance + denoiser.sqrt_one_minus_alpha_bar**2 * eye


def _shrink_denominator(eigenvalues: torch.Tensor, denoiser: LayerDenoiser) -> torch.Tensor:
    return denoiser.sqrt_alpha_bar**2 * eigenvalues + denoiser.sqrt_one_minus_alpha_bar**2


def _shrinkage(eigenvalues: torch.Tensor, denoiser: LayerDenoiser) -> torch.Tensor:
    """w = ᾱλ / (ᾱλ + 1 − ᾱ) ∈ [0, 1): how much of each eigen-direction the optimum predicts away."""
    return denoiser.sqrt_alpha_bar**2 * eigenvalues / _shrink_denominator(eigenvalues, denoiser)


def _grouped_matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    groups, d = matrix.shape[0], matrix.shape[-1]
    return (matrix @ vector.reshape(groups, d, 1)).reshape(-1)


def set_optimal(denoiser: LayerDenoiser, stats: InputStatistics, optimal_matrix: torch.Tensor) -> None:
    """Write the optimum (``optimal_matrix``: A* from `optimal_denoiser`) into the denoiser's
    parameters, in place, in their own dtype.

    Full form: A ← A*. Low-rank form (A = diag + U V): A* = (1/√(1−ᾱ)) (I − Q diag(w) Qᵀ) with
    Σ = Q diag(λ) Qᵀ and w = ᾱλ / (ᾱλ + 1 − ᾱ); the diagonal takes the identity part and U V the
    r leading eigen-directions (those with the largest w); the others' shrinkage is lost.
    Both: e ← −√ᾱ μ and a ← 0, so ``A e + a = −√ᾱ A μ``, the optimal constant for that A.
    """
    with torch.no_grad():
        if denoiser.form == "full":
            denoiser.A.copy_(optimal_matrix)
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(stats.covariance)  # ascending
            n = denoiser.sqrt_one_minus_alpha_bar
            weights = _shrinkage(eigenvalues.clamp_min(0.0), denoiser)
            rank = denoiser.U.shape[-1]
            leading, leading_weights = eigenvectors[..., -rank:], weights[..., -rank:]
            denoiser.A_diag.fill_(1.0 / n)
            denoiser.U.copy_(-(leading * leading_weights.unsqueeze(-2)) / n)
            denoiser.V.copy_(leading.mT)
        denoiser.e.copy_(-denoiser.sqrt_alpha_bar * stats.mean)
        denoiser.a.zero_()


# -- accumulating the moments ---------------------------------------------------------------------


class _Moments:
    """Running float64 sums of one layer's input rows: count, Σ (x − shift), Σ (x − shift)(x − shift)ᵀ
    per group, with the shift = the first batch's mean (the shifted-data algorithm)."""

    def __init__(self, denoiser: LayerDenoiser, precision: torch.dtype):
        self.groups, self.group_channels = denoiser.groups, denoiser.group_channels
        self.precision = precision
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> bool:
        """Add rows (M, channels); False if they hold NaN or inf (nothing is added then)."""
        rows = rows.to(torch.promote_types(rows.dtype, self.precision))
        self.precision = rows.dtype  # a float64 model's rows stay float64
        if self.shift is None:
            self.shift = rows.mean(dim=0)
        centred = rows - self.shift
        row_sum = centred.sum(dim=0).double()  # centred: small values, a float32 sum is accurate
        if not bool(torch.isfinite(row_sum).all()):
            return False
        if self.sum is None:
            self.sum = torch.zeros_like(row_sum)
            shape = (self.groups, self.group_channels, self.group_channels)
            self.gram = torch.zeros(shape, dtype=torch.float64, device=row_sum.device)
        self.sum += row_sum
        per_group = centred.reshape(-1, self.groups, self.group_channels)
        if self.groups == 1:
            _add_upper_gram(self.gram[0], centred)
        elif self.group_channels == 1:  # depthwise: one variance per channel
            self.gram += per_group.square().sum(dim=0).unsqueeze(-1).double()
        else:
            self.gram += torch.einsum("mgi,mgj->gij", per_group, per_group).double()
        self.count += rows.shape[0]
        return True

    def _symmetric_gram(self) -> torch.Tensor:
        if self.groups > 1:
            return self.gram
        upper = torch.triu(self.gram[0])  # `_add_upper_gram` filled the upper block rows only
        return (upper + torch.triu(upper, 1).T).unsqueeze(0)

    @property
    def nbytes(self) -> int:
        return 0 if self.gram is None else (self.gram.numel() + self.sum.numel()) * 8

    def statistics(self) -> InputStatistics | None:
        """Mean and covariance, merged over torch.distributed ranks (None if no rank saw a row)."""
        count = self.count
        if count:
            local_mean = self.shift.double() + self.sum / count
            sums = self.sum.reshape(self.groups, self.group_channels)
            scatter = self._symmetric_gram() - sums.unsqueeze(-1) * sums.unsqueeze(-2) / count
        if not (dist.is_available() and dist.is_initialized()):
            if not count:
                return None
            return InputStatistics(count, local_mean, scatter / count, self.precision)
        return self._merged(count, local_mean if count else None, scatter if count else None)

    def _merged(self, count: int, local_mean, scatter) -> InputStatistics | None:
        # Chan et al.'s parallel merge: exact, whatever shift each rank used.
        device = self.gram.device if self.gram is not None else _collective_device()
        channels = self.groups * self.group_channels
        totals = torch.zeros(channels + 1, dtype=torch.float64, device=device)
        if count:
            totals[0], totals[1:] = count, count * local_mean
        dist.all_reduce(totals)
        total = int(totals[0].item())
        shape = (self.groups, self.group_channels, self.group_channels)
        merged = torch.zeros(shape, dtype=torch.float64, device=device)
        if count:
            mean = totals[1:] / total
            offset = (local_mean - mean).reshape(self.groups, self.group_channels)
            merged = scatter + count * offset.unsqueeze(-1) * offset.unsqueeze(-2)
        dist.all_reduce(merged)
        if not total:
            return None
        return InputStatistics(total, totals[1:] / total, merged / total, self.precision)


# Gram matrices are accumulated by block rows of this many channels, upper blocks only: xᵀx is
# symmetric, so this skips almost half the products of a wide layer (fc2 of ViT-S: 62%).
GRAM_BLOCK = 256


def _add_upper_gram(accumulator: torch.Tensor, rows: torch.Tensor) -> None:
    """``accumulator[i, j] += Σ_m rows[m, i] rows[m, j]`` on and above the diagonal blocks (float64)."""
    channels = rows.shape[1]
    for start in range(0, channels, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, channels)
        accumulator[start:stop, start:] += (rows[:, start:stop].T @ rows[:, start:]).double()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# -- forward passes -------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _run_batches(model: nn.Module, batches: Iterable, max_batches: int | None,
                 on_input: dict[nn.Module, Callable[[torch.Tensor], None]], progress: bool, desc: str) -> int:
    """One eval-mode, no-grad pass; ``on_input[layer](x)`` sees every call's input. Returns #batches."""
    handles = [layer.register_forward_pre_hook(lambda module, args, fn=fn: fn(args[0]))
               for layer, fn in on_input.items()]
    training = {m: m.training for m in model.modules()}
    device = _model_device(model)
    count = 0
    try:
        model.eval()
        total = max_batches if max_batches is not None else _length(batches)
        # W′ does not change during a pass: compute each layer's once (parametrize's cache).
        with torch.no_grad(), parametrize.cached():
            for batch in tqdm(batches, desc=desc, total=total, leave=False, disable=None if progress else True):
                batch = to_device(batch, device)
                try:
                    call_model(model, batch)
                except _NonFiniteInput as error:
                    raise CalibrationError(
                        f"layer {error.layer} receives NaN or inf on calibration batch {count}: the model or the "
                        "data produce non-finite activations (check the inputs' normalisation and the weights). "
                        "The model was left unchanged."
                    ) from None
                except Exception as error:
                    raise CalibrationError(_rejected_message(count, batch, error)) from error
                count += 1
                if count == max_batches:
                    break  # before the loader reads one batch more
    finally:
        for handle in handles:
            handle.remove()
        for module, was_training in training.items():
            module.training = was_training
    if count == 0:
        raise CalibrationError(
            "calibrate() got no batches: the iterable is empty (or was already consumed). Pass inputs the "
            "model accepts, e.g. (x for x, _ in train_loader), or a list of tensors. The model was left unchanged."
        )
    return count


def _length(batches: Iterable) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _rejected_message(index: int, batch: Any, error: Exception) -> str:
    hint = ""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        hint = (" It is a pair: if it is (inputs, targets) from a DataLoader, pass the inputs only, "
                "e.g. calibrate(model, (x for x, _ in loader)).")
    return (f"calibration batch {index} was rejected by the model ({type(error).__name__}: {error}).{hint} "
            "Batches hold model inputs as for example_inputs: a tensor, a tuple of positional arguments or a "
            "dict of keyword arguments. The model was left unchanged.")


class _NonFiniteInput(Exception):
    def __init__(self, layer: str):
        super().__init__(layer)
        self.layer = layer


def _collect_statistics(model: nn.Module, layers: list[tuple[str, nn.Module, LayerDenoiser]], batches: Iterable,
                        max_batches: int | None, progress: bool, precision: torch.dtype, desc: str = "calibrate",
                        l1: "_L1Meter | None" = None) -> tuple[dict[str, InputStatistics | None], int, int]:
    """Statistics of each layer's input (and, with ``l1``, the sampled L1 loss) in one pass."""
    moments = {name: _Moments(denoiser, precision) for name, _, denoiser in layers}

    def observer(name: str, denoiser: LayerDenoiser) -> Callable[[torch.Tensor], None]:
        def observe(x: torch.Tensor) -> None:
            rows = denoiser.input_rows(x)
            if not moments[name].add(rows):
                raise _NonFiniteInput(name)
            if l1 is not None:
                l1.add(name, denoiser, rows)

        return observe

    hooks = {layer: observer(name, denoiser) for name, layer, denoiser in layers}
    count = _run_batches(model, batches, max_batches, hooks, progress, desc)
    peak = sum(m.nbytes for m in moments.values())
    return {name: m.statistics() for name, m in moments.items()}, count, peak


class _L1Meter:
    """The L1 noise loss of each layer's current denoiser, with ε from one seeded generator (so that
    two passes over the same batches use the same noise and compare exactly)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, denoiser: LayerDenoiser, rows: torch.Tensor) -> None:
        if rows.device not in self.generators:
            self.generators[rows.device] = torch.Generator(rows.device).manual_seed(self.seed)
        rows = rows.to(denoiser.a.dtype)
        eps = torch.randn(rows.shape, generator=self.generators[rows.device], dtype=rows.dtype, device=rows.device)
        noisy = denoiser.sqrt_alpha_bar * rows + denoiser.sqrt_one_minus_alpha_bar * eps
        predicted = denoiser.apply_matrix(noisy) + denoiser.constant()
        self.sums[name] = self.sums.get(name, 0.0) + float((predicted.float() - eps.float()).abs().sum(dtype=torch.float64))
        self.counts[name] = self.counts.get(name, 0) + eps.numel()

    def values(self) -> dict[str, float]:
        sums = {name: self.sums.get(name, 0.0) for name in self.counts}
        counts = dict(self.counts)
        if dist.is_available() and dist.is_initialized():
            names = sorted(counts)
            packed = torch.tensor([[sums[n], counts[n]] for n in names], dtype=torch.float64,
                                  device=_collective_device()).reshape(-1, 2)
            dist.all_reduce(packed)
            sums = {n: float(packed[i, 0]) for i, n in enumerate(names)}
            counts = {n: float(packed[i, 1]) for i, n in enumerate(names)}
        return {name: sums[name] / counts[name] for name in counts if counts[name]}


def _measure_l1(model: nn.Module, layers, batches: Iterable, max_batches: int | None, seed: int,
                progress: bool) -> dict[str, float]:
    meter = _L1Meter(seed)
    hooks = {layer: (lambda x, name=name, denoiser=denoiser: meter.add(name, denoiser, denoiser.input_rows(x)))
             for name, layer, denoiser in layers}
    _run_batches(model, batches, max_batches, hooks, progress, "noise loss (L1)")
    return meter.values()


# -- reports ---------------------------------------------------------------------------------------


def _layer_report(name: str, layer: nn.Module, denoiser: LayerDenoiser, stats: InputStatistics,
                  optimal_matrix: torch.Tensor, l1: float | None) -> LayerNoiseLoss:
    with torch.no_grad():
        # The denoiser's own precision (float32 at least): the reported losses need no more.
        dtype = torch.promote_types(denoiser.a.dtype, torch.float32)
        l2 = expected_l2_loss(denoiser.matrix().to(dtype), denoiser.constant().to(dtype), stats, denoiser)
        weight = layer.parametrizations.weight.original.to(dtype)
        change = torch.linalg.vector_norm(denoiser(weight) - weight) / torch.linalg.vector_norm(weight).clamp_min(1e-30)
    return LayerNoiseLoss(
        name=name, timestep=denoiser.timestep, samples=stats.count, l2=float(l2),
        l2_optimum=optimal_l2_loss(optimal_matrix, denoiser), l1=l1, weight_change=float(change),
        min_eigenvalue=stats.min_eigenvalue,
    )


def _optima(layers, statistics: dict[str, InputStatistics | None]) -> dict[str, torch.Tensor]:
    """A* of every layer that has statistics (one float64 Cholesky solve each)."""
    return {name: optimal_denoiser(statistics[name], denoiser)[0]
            for name, _, denoiser in layers if statistics[name] is not None}


def _report(layers, statistics: dict[str, InputStatistics | None], optima: dict[str, torch.Tensor],
            l1: dict[str, float] | None, batches: int) -> NoiseLossReport:
    rows = [_layer_report(name, layer, denoiser, statistics[name], optima[name],
                          None if l1 is None else l1.get(name))
            for name, layer, denoiser in layers if statistics[name] is not None]
    return NoiseLossReport(rows, batches)


def _converted_layers(model: nn.Module) -> list[tuple[str, nn.Module, LayerDenoiser]]:
    layers = list(layer_denoisers(model))
    if not layers:
        raise CalibrationError(
            "this model has no DenoiseRep denoisers to calibrate; call denoiserep.convert(model, ...) first"
        )
    return layers


def _warn_unseen(statistics: dict[str, InputStatistics | None]) -> None:
    unseen = [name for name, stats in statistics.items() if stats is None]
    if unseen:
        warnings.warn(
            f"{len(unseen)} converted layers never ran on the calibration batches and keep their denoisers: "
            f"{', '.join(unseen[:10])}{' …' if len(unseen) > 10 else ''}",
            stacklevel=3,
        )


def noise_loss_report(model: nn.Module, batches: Iterable, *, max_batches: int | None = None, seed: int = 0,
                      precision: torch.dtype = torch.float32, progress: bool = False) -> NoiseLossReport:
    """Each converted layer's noise loss now (exact expected L2, and L1 sampled with a seeded ε)
    next to its closed-form optimum on the same batches; the model is not changed.

    ``batches`` holds model inputs only, as for `calibrate`.
    """
    model = unwrap(model)
    layers = _converted_layers(model)
    meter = _L1Meter(seed)
    statistics, count, _ = _collect_statistics(model, layers, batches, max_batches, progress, precision,
                                               "noise loss", meter)
    return _report(layers, statistics, _optima(layers, statistics), meter.values(), count)


def calibrate(model: nn.Module, batches: Iterable, *, max_batches: int | None = None, passes: int = 1,
              layers_per_pass: int | None = None, eval_batches: Iterable | None = None,
              precision: torch.dtype = torch.float32, progress: bool = True) -> CalibrationReport:
    """Set every layer denoiser of a converted model to the closed-form optimum of its noise loss.

    ``batches`` yields model inputs only: a tensor, a tuple of positional arguments or a dict of
    keyword arguments per batch, as ``example_inputs``. For a DataLoader of ``(x, y)`` pairs pass
    ``(x for x, _ in loader)``. Tensors are moved to the model's device. The forward runs in eval
    mode without gradients (BatchNorm statistics and dropout as at inference; the model's train /
    eval flags are restored), so no label is needed: this is label-free DenoiseRep at its optimum.

    - ``max_batches``: stop after this many batches.
    - ``passes``: refit every layer this many times; each later pass measures the layers' inputs
      with the earlier layers already calibrated. ``CalibrationReport.refit_gaps`` says how much
      that changed.
    - ``layers_per_pass``: bound the memory (one float64 d × d per group and layer) by calibrating
      this many layers per pass, in execution order (each group sees the ones before it calibrated).
    - ``eval_batches``: also measure the L1 noise loss before and after on these batches.
    - ``precision``: dtype of the per-batch products x xᵀ (sums are always float64). float32 is
      fast; it resolves input directions down to about 1e-7 of the largest variance, which is what
      the optimum needs unless t is tiny and the activations huge. float64 is exact and on CPU
      about twice as slow. Half-precision models are measured in float32 at least.

    ``passes > 1`` and ``layers_per_pass`` iterate ``batches`` several times: pass a DataLoader or a
    list, not a one-shot generator. Any error leaves the model unchanged.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    if layers_per_pass is not None and layers_per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1 or None, got {layers_per_pass}")
    model = unwrap(model)
    layers = _converted_layers(model)
    chunk = layers_per_pass or len(layers)
    chunks = [layers[i:i + chunk] for i in range(0, len(layers), chunk)]
    if (passes > 1 or len(chunks) > 1) and iter(batches) is batches:
        raise ValueError(
            "passes > 1 and layers_per_pass go over the batches several times, but batches is a one-shot "
            "iterator (e.g. a generator); pass a DataLoader or a list of inputs"
        )
    start = time.perf_counter()
    l1_before = _measure_l1(model, layers, eval_batches, None, 0, progress) if eval_batches is not None else None
    # Later passes and chunks change parameters before the last statistics are in: keep a copy to
    # restore if anything fails. (One pass over all layers assigns only after every check passed.)
    snapshot = {id(p): p.detach().clone() for _, _, d in layers for p in d.parameters()} \
        if passes > 1 or len(chunks) > 1 else None
    before: list[LayerNoiseLoss] = []
    after_stats: dict[str, InputStatistics | None] = {}
    after_optima: dict[str, torch.Tensor] = {}
    refit_gaps: list[float] = []
    peak = count = 0
    statistics_seconds = 0.0
    try:
        for pass_index in range(passes):
            refit_gap = 0.0
            for group in chunks:
                pass_start = time.perf_counter()
                statistics, count, nbytes = _collect_statistics(model, group, batches, max_batches, progress,
                                                                precision)
                statistics_seconds += time.perf_counter() - pass_start
                peak = max(peak, nbytes)
                optima = _optima(group, statistics)
                report = _report(group, statistics, optima, l1_before if pass_index == 0 else None, count)
                if pass_index == 0:
                    before += report.layers
                else:
                    refit_gap += report.l2_gap
                for name, _, denoiser in group:
                    if statistics[name] is not None:
                        set_optimal(denoiser, statistics[name], optima[name])
                after_stats.update(statistics)
                after_optima.update(optima)
            if pass_index > 0:
                refit_gaps.append(refit_gap)
    except BaseException:
        if snapshot is not None:
            with torch.no_grad():
                for _, _, denoiser in layers:
                    for p in denoiser.parameters():
                        p.copy_(snapshot[id(p)])
        raise
    _warn_unseen(after_stats)
    l1_after = _measure_l1(model, layers, eval_batches, None, 0, progress) if eval_batches is not None else None
    after = _report(layers, after_stats, after_optima, l1_after, count)
    return CalibrationReport(NoiseLossReport(before, count), after, passes, refit_gaps,
                             time.perf_counter() - start, statistics_seconds, peak)
