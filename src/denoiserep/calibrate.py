"""`calibrate`: set every layer denoiser to the best linear denoiser of its own noise loss.

Layer i's noise loss (L2 form) is ``E ‖ε − A X_t − c‖²`` with ``X_t = √ᾱ X + √(1−ᾱ) ε``; its exact
minimiser follows from the mean and covariance of the layer's input (`denoiserep.optimum`;
derivation in ``docs/calibration.md``). One no-grad, eval-mode forward over the user's batches
accumulates those moments for every converted layer (`denoiserep.moments`, merged exactly across
torch.distributed ranks).

A denoiser fitted to a sample is judged on rows it did not see: by default every 8th batch (the
2nd, 10th, …) is held out. The held-out rows choose how far the covariance is shrunk toward its
diagonal (few rows per channel otherwise overfit it), decide whether the fit beats the denoiser the
layer already has, and, after a second forward over them with every layer calibrated, give the
report: the loss each layer reaches on inputs it did not fit, as the calibrated model produces
them. `calibrate` never leaves a layer above its starting loss on those rows: it raises
`CalibrationError` and restores the model instead.
"""

from __future__ import annotations

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
from .moments import InputStatistics, Moments, NonFiniteMoments, collective_device
from .optimum import (
    HeldOutCurve,
    LinearDenoiser,
    Spectrum,
    analytic_shrinkage,
    cholesky_factor,
    expected_l2,
    full_rank_optimum,
    low_rank_optimum,
    optimal_l2,
)

# Below this many input rows per channel (of a group) a layer's covariance is poorly determined.
FEW_ROWS_PER_CHANNEL = 10
HOLDOUT_EVERY = 8
MAX_AUTO_PASSES = 3  # passes="auto": refit while a layer ends above its starting loss, at most this often


class CalibrationError(ValueError):
    """The calibration batches could not be used, or calibration would leave a layer worse than it
    was; the model was left unchanged."""


@dataclass
class LayerNoiseLoss:
    """One layer's noise loss against its optimum on some rows, for the denoiser as it is then."""

    name: str
    timestep: int
    samples: int  # input rows measured
    l2: float  # expected L2 noise loss over ε (exact, given the rows' μ and Σ)
    l2_optimum: float  # the minimum of that expectation over linear denoisers, on the same rows
    l1: float | None  # L1 noise loss, sampled with a seeded ε (None when not measured)
    weight_change: float  # ‖W′ − W‖ / ‖W‖: how far the fused weight is from the original
    rows_per_channel: float  # samples per channel of a group: below ~10 the optimum on these rows is optimistic

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
class LayerFit:
    """How one layer was fitted in the last pass."""

    name: str
    fit_rows: int  # rows the denoiser was fitted to
    rows_per_channel: float
    shrinkage: float  # ρ: Σ_ρ = (1 − ρ) Σ + ρ diag(Σ)
    kept: bool  # the fit was worse than the layer's denoiser on the held-out rows: the latter was kept


@dataclass
class CalibrationReport:
    """What `calibrate` did: each layer's noise loss before and after, how it was fitted, the cost.

    With held-out batches (the default), ``before`` is measured on them with the model as it was
    and ``after`` on them again with every layer calibrated: losses on rows no denoiser was fitted
    to. Without (``holdout_every=None``, or a single batch), both are in-sample: ``after`` then comes
    from the statistics each layer was fitted to, before the layers upstream of it changed.
    """

    before: NoiseLossReport
    after: NoiseLossReport
    fits: list[LayerFit]
    held_out: bool
    batches: int  # batches of a pass (the held-out ones included)
    passes: int = 1
    # For each pass after the first: how much refitting lowered the total loss on the pass's
    # held-out rows (fitting rows without a hold-out). Near 0: more passes do not matter.
    refit_gaps: list[float] = field(default_factory=list)
    seconds: float = 0.0
    statistics_seconds: float = 0.0  # of which the forward passes that accumulate the moments
    peak_statistics_bytes: int = 0  # float64 moments held at once

    def table(self) -> str:
        """Markdown: one row per layer."""
        where = "held-out" if self.held_out else "in-sample"
        header = (f"| layer | t | fit rows / channel | shrinkage ρ | L2 before ({where}) | L2 after ({where}) "
                  "| L2 optimum | L1 before | L1 after | ‖W′−W‖/‖W‖ |\n|---|---|---|---|---|---|---|---|---|---|")
        fits = {fit.name: fit for fit in self.fits}
        rows = []
        for old, new in zip(self.before.layers, self.after.layers):
            fit = fits[new.name]
            l1 = [f"{v:.4f}" if v is not None else "—" for v in (old.l1, new.l1)]
            rho = "kept its denoiser" if fit.kept else f"{fit.shrinkage:.3g}"
            rows.append(f"| {new.name} | {new.timestep} | {fit.rows_per_channel:.3g} | {rho} | {old.l2:.4f} | "
                        f"{new.l2:.4f} | {new.l2_optimum:.4f} | {l1[0]} | {l1[1]} | {new.weight_change:.3g} |")
        return "\n".join([header, *rows])

    def to_dict(self) -> dict:
        return {"before": self.before.to_dict(), "after": self.after.to_dict(),
                "fits": [asdict(fit) for fit in self.fits], "held_out": self.held_out, "batches": self.batches,
                "passes": self.passes,
                "refit_gaps": self.refit_gaps, "seconds": self.seconds, "statistics_seconds": self.statistics_seconds,
                "peak_statistics_bytes": self.peak_statistics_bytes}


# -- one layer ------------------------------------------------------------------------------------


def linear_denoiser(denoiser: LayerDenoiser, parameters: dict[str, torch.Tensor] | None = None) -> LinearDenoiser:
    """The denoiser's affine map ε̂ = A x + c in float64, from its parameters (or from ``parameters``,
    by name, e.g. a snapshot)."""
    values = {name: p.detach().double() for name, p in denoiser.named_parameters()}
    values.update({name: p.detach().double() for name, p in (parameters or {}).items()})
    g, d = denoiser.groups, denoiser.group_channels
    if denoiser.form == "low_rank":
        linear = LinearDenoiser(values["a"], diag=values["A_diag"], U=values["U"], V=values["V"])
    else:  # a diagonal A (the identity start) stays cheap: `LinearDenoiser.times_covariance` checks
        linear = LinearDenoiser(values["a"], matrix=values["A"])
    linear.constant = linear.times(values["e"].reshape(g, d, 1)).reshape(-1) + values["a"]  # A e + a
    return linear


def fit_layer(denoiser: LayerDenoiser, fit: InputStatistics, heldout: InputStatistics | None,
              shrinkage: str | float) -> tuple[LinearDenoiser, float]:
    """The best linear denoiser for ``fit``'s rows, Σ shrunk by ρ chosen on ``heldout``'s rows
    (``shrinkage="auto"``; without held-out rows, by `analytic_shrinkage`) or given; returns it and ρ."""
    s, n = denoiser.sqrt_alpha_bar, denoiser.sqrt_one_minus_alpha_bar
    spectrum = None
    if shrinkage == "auto" and heldout is not None:
        spectrum = Spectrum.of(fit, s, n)
        rho, _ = HeldOutCurve(spectrum, heldout, fit.mean, s, n).minimise()
    else:
        rho = analytic_shrinkage(fit) if shrinkage == "auto" else float(shrinkage)
    if denoiser.form == "full":
        matrix = spectrum.optimum(n, rho) if spectrum is not None else full_rank_optimum(fit, s, n, rho)
        fitted = LinearDenoiser(torch.empty(0), matrix=matrix)
    else:
        factor, inverse_transpose = cholesky_factor(fit, s, n, rho)
        current = linear_denoiser(denoiser)
        identity = torch.full_like(current.diag, (denoiser.c3 - 1.0) / denoiser.c1)
        candidates = [(current.diag, current.U, current.V), (identity, torch.zeros_like(current.U), current.V)]
        diag, u, v = low_rank_optimum(factor, inverse_transpose, n, current.U.shape[-1], candidates)
        fitted = LinearDenoiser(torch.empty(0), diag=diag, U=u, V=v)
    # The optimal constant for this A: c = −s A μ (stored as e = −s μ, a = 0; see `assign`).
    fitted.constant = -s * fitted.times(fit.mean.reshape(fit.groups, -1, 1)).reshape(-1)
    return fitted, rho


def fitted_parameters(denoiser: LayerDenoiser, fitted: LinearDenoiser, fit_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fitted denoiser as the layer's parameters, by name, in their own dtype: A (or its diagonal and
    factors), e = −√ᾱ μ and a = 0, so that A e + a = −√ᾱ A μ is optimal for that A and stays so if A
    trains further."""
    own = dict(denoiser.named_parameters())
    values = {"A": fitted.matrix} if denoiser.form == "full" else {"A_diag": fitted.diag, "U": fitted.U, "V": fitted.V}
    values.update(e=-denoiser.sqrt_alpha_bar * fit_mean, a=torch.zeros_like(own["a"]))
    return {name: value.to(own[name]) for name, value in values.items()}


def assign(denoiser: LayerDenoiser, parameters: dict[str, torch.Tensor]) -> None:
    """Write `fitted_parameters` into the layer's parameters, in place."""
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            p.copy_(parameters[name])


def _optimum_of_fit(denoiser: LayerDenoiser, fitted: LinearDenoiser, fit: InputStatistics,
                    measured: InputStatistics, rho: float) -> float | None:
    """`optimal_l2` of ``measured`` without another Cholesky factorisation where the fit is that
    optimum (in-sample, ρ = 0, full rank): A* = n K⁻¹, so C · L* = C − n tr A*. None otherwise."""
    if measured is not fit or rho != 0.0 or fitted.matrix is None:
        return None
    n = denoiser.sqrt_one_minus_alpha_bar
    trace = torch.diagonal(fitted.matrix, dim1=-2, dim2=-1).sum()
    return float((fit.channels - n * trace) / fit.channels)


def _product_dtype(denoiser: LayerDenoiser) -> torch.dtype:
    """The dtype of a report's d³ product: the denoiser's own precision, float32 at least."""
    return torch.promote_types(denoiser.a.dtype, torch.float32)


def _layer_loss(name: str, layer: nn.Module, denoiser: LayerDenoiser, stats: InputStatistics,
                l1: float | None = None, l2: float | None = None, l2_optimum: float | None = None) -> LayerNoiseLoss:
    """The layer's report row on ``stats``; ``l2`` / ``l2_optimum`` where the caller has them already."""
    s, n = denoiser.sqrt_alpha_bar, denoiser.sqrt_one_minus_alpha_bar
    if l2 is None:
        l2 = float(expected_l2(linear_denoiser(denoiser), stats, s, n, _product_dtype(denoiser)))
    with torch.no_grad():
        weight = layer.parametrizations.weight.original.to(_product_dtype(denoiser))
        change = torch.linalg.vector_norm(denoiser(weight) - weight) / torch.linalg.vector_norm(weight).clamp_min(1e-30)
    return LayerNoiseLoss(name=name, timestep=denoiser.timestep, samples=stats.count, l2=l2,
                          l2_optimum=optimal_l2(stats, s, n) if l2_optimum is None else l2_optimum, l1=l1,
                          weight_change=float(change),
                          rows_per_channel=stats.rows_per_channel)


# -- forward passes -------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _run_batches(model: nn.Module, batches: Iterable, max_batches: int | None,
                 on_input: dict[nn.Module, Callable[[torch.Tensor], None]], progress: bool, desc: str, *,
                 before_batch: Callable[[int, Any], None] | None = None, allow_empty: bool = False) -> int:
    """One eval-mode, no-grad pass; ``on_input[layer](x)`` sees every call's input, ``before_batch(i,
    batch)`` every batch as it came. Returns the number of batches."""
    handles = [layer.register_forward_pre_hook(lambda module, args, fn=fn: fn(args[0]))
               for layer, fn in on_input.items()]
    training = {m: m.training for m in model.modules()}
    device = _model_device(model)
    count = 0
    try:
        model.eval()
        known = _length(batches)
        total = known if max_batches is None else (max_batches if known is None else min(known, max_batches))
        # W′ does not change during a pass: compute each layer's once (parametrize's cache).
        with torch.no_grad(), parametrize.cached():
            for batch in tqdm(batches, desc=desc, total=total, leave=False, disable=None if progress else True):
                if before_batch is not None:
                    before_batch(count, batch)
                moved = to_device(batch, device)
                try:
                    call_model(model, moved)
                except _NonFiniteInput as error:
                    raise CalibrationError(error.message(count)) from None
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
    if count == 0 and not allow_empty:
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
    def __init__(self, layer: str, overflow: bool, magnitude: float):
        super().__init__(layer)
        self.layer, self.overflow, self.magnitude = layer, overflow, magnitude

    def message(self, batch: int) -> str:
        if self.overflow:
            return (f"layer {self.layer} receives activations up to {self.magnitude:.3g} on calibration batch "
                    f"{batch}: their products x xᵀ overflow float32. Pass precision=torch.float64 to calibrate(), "
                    "or check the inputs' normalisation and the weights. The model was left unchanged.")
        return (f"layer {self.layer} receives NaN or inf on calibration batch {batch}: the model or the data "
                "produce non-finite activations (check the inputs' normalisation and the weights). "
                "The model was left unchanged.")


@dataclass
class _Collected:
    fit: dict[str, InputStatistics | None]
    heldout: dict[str, InputStatistics | None]
    batches: int
    peak_bytes: int

    @property
    def held_out(self) -> bool:
        return any(stats is not None for stats in self.heldout.values())


def _collect(model: nn.Module, layers: list[tuple[str, nn.Module, LayerDenoiser]], batches: Iterable,
             max_batches: int | None, progress: bool, precision: torch.dtype, *, holdout_every: int | None = None,
             cache: list | None = None, l1: "_L1Meter | None" = None, desc: str = "calibrate",
             allow_empty: bool = False) -> _Collected:
    """Each layer's input moments in one pass: batches ``1, 1 + k, 1 + 2k, …`` (k = ``holdout_every``)
    into the held-out moments (and, as they came, into ``cache``), the others into the fitting ones."""
    fit = {name: Moments(d.groups, d.group_channels, precision) for name, _, d in layers}
    heldout = {name: Moments(d.groups, d.group_channels, precision) for name, _, d in layers} if holdout_every else {}
    routing = {"heldout": False}

    def before_batch(index: int, batch: Any) -> None:
        routing["heldout"] = bool(holdout_every) and index % holdout_every == 1
        if routing["heldout"] and cache is not None:
            cache.append(batch)

    def observer(name: str, denoiser: LayerDenoiser) -> Callable[[torch.Tensor], None]:
        def observe(x: torch.Tensor) -> None:
            rows = denoiser.input_rows(x)
            try:
                (heldout if routing["heldout"] else fit)[name].add(rows)
            except NonFiniteMoments:
                finite = rows[torch.isfinite(rows)]
                overflow = finite.numel() == rows.numel()
                raise _NonFiniteInput(name, overflow, float(finite.abs().max()) if overflow else 0.0) from None
            if l1 is not None:
                l1.add(name, denoiser, rows)

        return observe

    hooks = {layer: observer(name, denoiser) for name, layer, denoiser in layers}
    count = _run_batches(model, batches, max_batches, hooks, progress, desc, before_batch=before_batch,
                         allow_empty=allow_empty)
    peak = sum(m.nbytes for m in [*fit.values(), *heldout.values()])
    # Under torch.distributed every rank merges every layer's moments, in the same order.
    fit_stats = {name: fit[name].statistics() for name, _, _ in layers}
    heldout_stats = {name: heldout[name].statistics() if heldout else None for name, _, _ in layers}
    return _Collected(fit_stats, heldout_stats, count, peak)


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
                                  device=collective_device()).reshape(-1, 2)
            dist.all_reduce(packed)
            sums = {n: float(packed[i, 0]) for i, n in enumerate(names)}
            counts = {n: float(packed[i, 1]) for i, n in enumerate(names)}
        return {name: sums[name] / counts[name] for name in counts if counts[name]}




def _measure_l1(model: nn.Module, layers, batches: Iterable, seed: int, progress: bool) -> dict[str, float]:
    meter = _L1Meter(seed)
    hooks = {layer: (lambda x, name=name, denoiser=denoiser: meter.add(name, denoiser, denoiser.input_rows(x)))
             for name, layer, denoiser in layers}
    _run_batches(model, batches, None, hooks, progress, "noise loss (L1)")
    return meter.values()


def _converted_layers(model: nn.Module) -> list[tuple[str, nn.Module, LayerDenoiser]]:
    layers = list(layer_denoisers(model))
    if not layers:
        raise CalibrationError(
            "this model has no DenoiseRep denoisers to calibrate; call denoiserep.convert(model, ...) first"
        )
    return layers


# -- the public functions -------------------------------------------------------------------------


def noise_loss_report(model: nn.Module, batches: Iterable, *, max_batches: int | None = None, seed: int = 0,
                      precision: torch.dtype = torch.float32, progress: bool = False) -> NoiseLossReport:
    """Each converted layer's noise loss now (exact expected L2, and L1 sampled with a seeded ε)
    next to its closed-form optimum on the same batches; the model is not changed.

    ``batches`` holds model inputs only, as for `calibrate`. The optimum is that of these batches'
    own rows: with few rows per channel (``LayerNoiseLoss.rows_per_channel`` below ~10) it is lower
    than any denoiser could reach on new inputs, and the gap looks larger than it is.
    """
    model = unwrap(model)
    layers = _converted_layers(model)
    meter = _L1Meter(seed)
    collected = _collect(model, layers, batches, max_batches, progress, precision, l1=meter, desc="noise loss")
    l1 = meter.values()
    rows = [_layer_loss(name, layer, denoiser, collected.fit[name], l1=l1.get(name))
            for name, layer, denoiser in layers if collected.fit[name] is not None]
    return NoiseLossReport(rows, collected.batches)


def calibrate(model: nn.Module, batches: Iterable, *, max_batches: int | None = None, passes: int | str = "auto",
              layers_per_pass: int | None = None, holdout_every: int | None = HOLDOUT_EVERY,
              shrinkage: str | float = "auto", eval_batches: Iterable | None = None,
              precision: torch.dtype = torch.float32, progress: bool = True) -> CalibrationReport:
    """Set every layer denoiser of a converted model to the best linear denoiser of its noise loss.

    ``batches`` yields model inputs only: a tensor, a tuple of positional arguments or a dict of
    keyword arguments per batch, as ``example_inputs``. For a DataLoader of ``(x, y)`` pairs pass
    ``(x for x, _ in loader)``. Tensors are moved to the model's device. The forward runs in eval
    mode without gradients (BatchNorm statistics and dropout as at inference; the model's train /
    eval flags are restored), so no label is needed: this is label-free DenoiseRep at its optimum.

    - ``holdout_every``: batches 1, 1 + k, 1 + 2k, … (0-based, k = ``holdout_every``) are held out:
      not fitted to, but used to choose the shrinkage, to keep a layer's denoiser where the fit is
      worse, and for the report, measured on them again once every layer is calibrated (they are
      kept in memory for that second pass). ``None``: fit every batch, report in-sample.
    - ``shrinkage``: ``"auto"`` shrinks each layer's covariance toward its diagonal by the ρ that
      minimises the held-out loss (without held-out rows: a Gaussian estimate of the sampling
      error); a number in [0, 1] fixes ρ (0: the exact optimum of the fitting rows).
    - ``max_batches``: stop after this many batches.
    - ``passes``: fit every layer this many times; each later pass measures the layers' inputs with
      the earlier layers already calibrated (``CalibrationReport.refit_gaps`` says how much that
      changed). ``"auto"``: one pass, and another while some layer ends above its starting loss on
      the held-out batches because the layers before it changed its inputs (at most 3).
    - ``layers_per_pass``: bound the memory (float64 d × d per group and layer, twice with a
      hold-out) by calibrating this many layers per pass, in execution order.
    - ``eval_batches``: also measure the L1 noise loss before and after on these batches.
    - ``precision``: dtype of the per-batch products x xᵀ (sums are always float64). float32 is
      fast and resolves input directions down to about 1e-7 of the largest variance; float64 is
      exact, needed for activations beyond ~1e19, and on a CPU about twice as slow.

    Raises `CalibrationError` (the model unchanged) on unusable batches, and when a calibrated layer
    would end above its starting loss on the held-out rows. More than one pass and ``layers_per_pass``
    go over ``batches`` several times: a DataLoader or a list can, a one-shot generator cannot.
    """
    if passes != "auto" and (isinstance(passes, bool) or not isinstance(passes, int) or passes < 1):
        raise ValueError(f"passes must be 'auto' or an integer >= 1, got {passes!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    if layers_per_pass is not None and layers_per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1 or None, got {layers_per_pass}")
    if holdout_every is not None and (isinstance(holdout_every, bool) or not isinstance(holdout_every, int)
                                      or holdout_every < 2):
        raise ValueError(f"holdout_every must be an integer >= 2 (every k-th batch held out) or None, got {holdout_every!r}")
    if shrinkage != "auto" and not (isinstance(shrinkage, (int, float)) and 0.0 <= float(shrinkage) <= 1.0):
        raise ValueError(f"shrinkage must be 'auto' or a number in [0, 1], got {shrinkage!r}")
    model = unwrap(model)
    layers = _converted_layers(model)
    chunk = layers_per_pass or len(layers)
    chunks = [layers[i:i + chunk] for i in range(0, len(layers), chunk)]
    one_shot = iter(batches) is batches
    if ((passes != "auto" and passes > 1) or len(chunks) > 1) and one_shot:
        raise ValueError(
            "passes > 1 and layers_per_pass go over the batches several times, but batches is a one-shot "
            "iterator (e.g. a generator); pass a DataLoader or a list of inputs"
        )
    start = time.perf_counter()
    l1_before = _measure_l1(model, layers, eval_batches, 0, progress) if eval_batches is not None else {}
    # Every change is undone if anything fails, including the final check against the start.
    snapshot = {name: {k: p.detach().clone() for k, p in denoiser.named_parameters()} for name, _, denoiser in layers}
    before: dict[str, LayerNoiseLoss] = {}
    measured_on: dict[str, InputStatistics] = {}  # the statistics `before` was measured on
    fits: dict[str, LayerFit] = {}
    fitted_on: dict[str, InputStatistics] = {}
    heldout_batches: list = []
    refit_gaps: list[float] = []
    final_l2: dict[str, tuple[InputStatistics, float]] = {}  # each layer's last loss and the rows it is on
    peak = count = 0
    statistics_seconds = 0.0
    held_out = False
    try:
        pass_index = 0
        while True:
            refit_gap = 0.0
            for chunk_index, group in enumerate(chunks):
                pass_start = time.perf_counter()
                collected = _collect(model, group, batches, max_batches, progress, precision,
                                     holdout_every=holdout_every,
                                     cache=heldout_batches if pass_index == chunk_index == 0 else None)
                statistics_seconds += time.perf_counter() - pass_start
                peak, count, held_out = max(peak, collected.peak_bytes), collected.batches, collected.held_out
                for name, layer, denoiser in group:
                    fit, heldout = collected.fit[name], collected.heldout[name]
                    if fit is None:
                        continue
                    measured = heldout if heldout is not None else fit
                    s, n = denoiser.sqrt_alpha_bar, denoiser.sqrt_one_minus_alpha_bar
                    current_l2 = float(expected_l2(linear_denoiser(denoiser), measured, s, n, _product_dtype(denoiser)))
                    fitted, rho = fit_layer(denoiser, fit, heldout, shrinkage)
                    optimum = _optimum_of_fit(denoiser, fitted, fit, measured, rho)
                    if pass_index == 0:
                        before[name] = _layer_loss(name, layer, denoiser, measured, l1_before.get(name), current_l2,
                                                   optimum)
                        measured_on[name] = measured
                    # The fitted loss with the parameters in their own dtype, as the model will have them (the
                    # report reuses it). Where the fit is the optimum of the rows it is measured on and the
                    # parameters are float32 or float64, that is the optimum: rounding a minimiser's
                    # parameters moves its loss only to second order (half precision is measured).
                    candidate = fitted_parameters(denoiser, fitted, fit.mean)
                    if optimum is not None and denoiser.a.dtype in (torch.float32, torch.float64):
                        fitted_l2 = optimum
                    else:
                        fitted_l2 = float(expected_l2(linear_denoiser(denoiser, candidate), measured, s, n,
                                                      _product_dtype(denoiser)))
                    kept = fitted_l2 > current_l2
                    if not kept:
                        assign(denoiser, candidate)
                    fits[name] = LayerFit(name, fit.count, fit.rows_per_channel, rho, kept)
                    fitted_on[name] = fit
                    final_l2[name] = (measured, current_l2 if kept else fitted_l2)
                    refit_gap += current_l2 - min(fitted_l2, current_l2)
            if pass_index > 0:
                refit_gaps.append(refit_gap)
            pass_index += 1
            if passes != "auto" and pass_index < passes:
                continue
            after, worse = _after(model, chunks, snapshot, fitted_on, before, measured_on, final_l2,
                                  heldout_batches if held_out else None,
                                  progress, precision)
            if not worse:
                break
            if passes != "auto" or pass_index == MAX_AUTO_PASSES or one_shot:
                raise CalibrationError(_worse_message(worse, held_out, pass_index, one_shot))
    except BaseException:
        with torch.no_grad():
            for name, _, denoiser in layers:
                for key, p in denoiser.named_parameters():
                    p.copy_(snapshot[name][key])
        raise
    _warn_about_fits(layers, fits, fitted_on, holdout_every, held_out, count)
    if eval_batches is not None:
        l1_after = _measure_l1(model, layers, eval_batches, 0, progress)
        for layer in after:
            layer.l1 = l1_after.get(layer.name)
    order = [name for name, _, _ in layers if name in fits]
    measured = len(heldout_batches) if held_out else count
    return CalibrationReport(NoiseLossReport([before[n] for n in order], measured), NoiseLossReport(after, measured),
                             [fits[n] for n in order], held_out, count, pass_index, refit_gaps,
                             time.perf_counter() - start, statistics_seconds, peak)


def _after(model: nn.Module, chunks, snapshot: dict, fitted_on: dict[str, InputStatistics],
           before: dict[str, LayerNoiseLoss], measured_on: dict[str, InputStatistics],
           final_l2: dict[str, tuple[InputStatistics, float]], heldout_batches: list | None,
           progress: bool, precision: torch.dtype) -> tuple[list[LayerNoiseLoss], list[tuple[str, float, float]]]:
    """Every calibrated layer's loss on the held-out batches run again through the calibrated model
    (without a hold-out: on the statistics it was fitted to), and the layers that end above the loss
    their starting denoiser has on the same rows. Where those rows are the ones `before` was measured
    on (in-sample, one pass), its starting loss and optimum are reused, not computed again, and so is
    the loss the fit measured there (``final_l2``)."""
    after: dict[str, LayerNoiseLoss] = {}
    worse: list[tuple[str, float, float]] = []
    for group in chunks:
        if heldout_batches is not None:
            # Some ranks may hold no held-out batch; they still take part in merging the moments.
            stats = _collect(model, group, heldout_batches, None, progress, precision, desc="calibrate (held-out)",
                             allow_empty=True).fit
        else:
            stats = fitted_on
        for name, layer, denoiser in group:
            if name not in fitted_on or stats.get(name) is None:
                continue
            s, n = denoiser.sqrt_alpha_bar, denoiser.sqrt_one_minus_alpha_bar
            if measured_on.get(name) is stats[name]:
                rows, l2 = final_l2[name]
                after[name] = _layer_loss(name, layer, denoiser, stats[name], l2=l2 if rows is stats[name] else None,
                                          l2_optimum=before[name].l2_optimum)
                start_l2 = before[name].l2
            else:
                after[name] = _layer_loss(name, layer, denoiser, stats[name])
                start_l2 = float(expected_l2(linear_denoiser(denoiser, snapshot[name]), stats[name], s, n,
                                             _product_dtype(denoiser)))
            # Float32 parameters round the float64 fit: a relative 1e-6 is rounding, not a worse fit.
            if after[name].l2 > start_l2 + 1e-6 * abs(start_l2) + 1e-12:
                worse.append((name, start_l2, after[name].l2))
    order = [name for group in chunks for name, _, _ in group if name in after]
    return [after[name] for name in order], worse


def _worse_message(worse: list[tuple[str, float, float]], held_out: bool, passes: int, one_shot: bool) -> str:
    where = "on the held-out batches" if held_out else "on the calibration batches"
    listed = "; ".join(f"{name}: {start:.6g} -> {end:.6g}" for name, start, end in worse[:10])
    if one_shot:
        fix = ("The layers upstream changed these layers' inputs after they were fitted; another pass would refit "
               "them, but the batches are a one-shot iterator: pass a DataLoader or a list of inputs")
    else:
        fix = (f"After {passes} pass(es) the layers upstream still change these layers' inputs after they are fitted: "
               "pass more batches, or passes=N for more refits")
    return (f"calibration would leave {len(worse)} layer(s) above their starting noise loss (expected L2 {where}): "
            f"{listed}{' …' if len(worse) > 10 else ''}. {fix}. The model was left unchanged.")


def _warn_about_fits(layers, fits: dict[str, LayerFit], fitted_on: dict[str, InputStatistics],
                     holdout_every: int | None, held_out: bool, batches: int) -> None:
    unseen = [name for name, _, _ in layers if name not in fits]
    if unseen:
        warnings.warn(f"{len(unseen)} converted layers never ran on the calibration batches and keep their "
                      f"denoisers: {', '.join(unseen[:10])}{' …' if len(unseen) > 10 else ''}", stacklevel=3)
    if holdout_every and not held_out:
        warnings.warn(f"calibrate() got {batches} batch(es), so none was held out: the shrinkage was estimated "
                      "analytically and the report is in-sample. Pass at least 2 batches (or holdout_every=None "
                      "to silence this).", stacklevel=3)
    few = [f"{name} ({fit.rows_per_channel:.2g}, ρ {fit.shrinkage:.2g})" for name, fit in fits.items()
           if fit.rows_per_channel < FEW_ROWS_PER_CHANNEL]
    if few:
        warnings.warn(f"{len(few)} layer(s) saw fewer than {FEW_ROWS_PER_CHANNEL} input rows per channel, so their "
                      f"input covariance is poorly determined (rows per channel, the shrinkage toward its diagonal "
                      f"that was used): {', '.join(few[:10])}{' …' if len(few) > 10 else ''}. More images (or "
                      "augmented copies) calibrate them better.", stacklevel=3)
    kept = [name for name, fit in fits.items() if fit.kept]
    if kept:
        warnings.warn(f"{len(kept)} layer(s) kept their denoiser, which beat the fit on the held-out rows: "
                      f"{', '.join(kept[:10])}{' …' if len(kept) > 10 else ''}", stacklevel=3)
