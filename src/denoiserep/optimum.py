"""The best linear denoiser of one layer, from the moments of its input (`denoiserep.moments`).

Per conv group (d channels; s = √ᾱ_t, n = √(1−ᾱ_t)), with K = s² Σ + n² I, the L2 noise loss of the
denoiser ``ε̂ = A x_t + c`` on inputs of mean μ and covariance Σ is (docs/calibration.md)

    C · L(A, c) = ‖I − n A‖²_F + s² tr(A Σ Aᵀ) + ‖s A μ + c‖²  =  d − 2n tr A + tr(A K Aᵀ) + ‖s A μ + c‖²,

minimised by c = −s A μ and A* = n K⁻¹; any A exceeds the minimum by tr((A − A*) K (A − A*)ᵀ).

Σ is estimated from finitely many rows. With few rows per channel its small eigenvalues are
underestimated (zero below one row per channel) and A* = n K⁻¹ amplifies exactly those directions,
so the fitted denoiser is far worse on new inputs than on its own. `calibrate.fit_layer` therefore solves
with ``Σ_ρ = (1 − ρ) Σ + ρ diag(Σ)`` (shrinkage toward the diagonal) and picks ρ by the loss on
held-out rows. Every ρ shares one eigendecomposition: with Y = diag(K) (> 0),

    K_ρ = (1 − ρ) K + ρ Y = Y^½ V diag((1 − ρ) θ + ρ) Vᵀ Y^½,     V diag(θ) Vᵀ = Y^-½ K Y^-½,

so the held-out loss of A_ρ = n K_ρ⁻¹ is a cheap function of ρ (`HeldOutCurve`). Without held-out
rows ρ comes from a Gaussian estimate of Σ's sampling error (`analytic_shrinkage`).

The low-rank form ``A = diag(a) + U V`` has no closed form; `low_rank_optimum` minimises the same
excess ``‖(A − A*) F‖²_F`` (K = F Fᵀ) over the diagonal, with the best rank-r term for each
diagonal in closed form, from several starts, and never returns worse than the denoisers it is
given (the current one, the identity start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .moments import InputStatistics


@dataclass
class LinearDenoiser:
    """A layer denoiser's affine map ε̂ = A x + c in float64: A as full (groups, d, d) blocks, or as
    ``diag(diag) + U V`` (U: (groups, d, r), V: (groups, r, d))."""

    constant: torch.Tensor  # (channels,)
    matrix: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        return self.matrix if self.matrix is not None else torch.diag_embed(self.diag) + self.U @ self.V

    def times(self, vectors: torch.Tensor) -> torch.Tensor:
        """A v per group for v of shape (groups, d, k)."""
        if self.matrix is not None:
            return self.matrix @ vectors
        return self.diag.unsqueeze(-1) * vectors + self.U @ (self.V @ vectors)

    def times_covariance(self, covariance: torch.Tensor) -> torch.Tensor:
        """A Σ per group: d³ for a dense A, d² r for diagonal + low rank (d² for a diagonal A)."""
        if self.matrix is None:
            return self.diag.unsqueeze(-1) * covariance + self.U @ (self.V @ covariance)
        diagonal = torch.diagonal(self.matrix, dim1=-2, dim2=-1)
        if torch.equal(self.matrix, torch.diag_embed(diagonal)):  # e.g. the identity start
            return diagonal.unsqueeze(-1) * covariance
        return self.matrix @ covariance


def expected_l2(denoiser: LinearDenoiser, stats: InputStatistics, s: float, n: float,
                product_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``E_{x,ε} mean ‖ε − A x_t − c‖²`` over inputs with ``stats``' mean and covariance (exact; a 0-dim
    tensor, differentiable in the denoiser's tensors). ``product_dtype``: of the one d³ product,
    A Σ (float32 for a float32 denoiser's reports: its rounding is far below what they show)."""
    covariance = stats.covariance
    groups, d = covariance.shape[0], covariance.shape[-1]
    dense = denoiser.dense().to(covariance)
    residual = -n * dense
    residual.diagonal(dim1=-2, dim2=-1).add_(1.0)
    noise_part = residual.square().sum()
    if product_dtype == covariance.dtype or not bool(covariance.abs().amax() < 1e30):  # float32 would overflow
        spread = denoiser.times_covariance(covariance) * dense
    else:
        cast = LinearDenoiser(denoiser.constant, *(None if t is None else t.to(product_dtype)
                                                   for t in (denoiser.matrix, denoiser.diag, denoiser.U, denoiser.V)))
        spread = cast.times_covariance(covariance.to(product_dtype)) * dense.to(product_dtype)
    spread_part = s * s * spread.sum(dtype=torch.float64)
    mean_term = s * denoiser.times(stats.mean.reshape(groups, d, 1)).reshape(-1) + denoiser.constant.to(covariance)
    return (noise_part + spread_part + mean_term.square().sum()) / stats.channels


def optimal_l2(stats: InputStatistics, s: float, n: float) -> float:
    """The minimum of `expected_l2` over linear denoisers: ``(1/C) Σ_groups (d − n² tr K⁻¹)``, with
    tr K⁻¹ = ‖F⁻ᵀ‖²_F for K = F Fᵀ (`cholesky_factor`)."""
    _, inverse_transpose = cholesky_factor(stats, s, n)
    return float((stats.channels - n * n * inverse_transpose.square().sum()) / stats.channels)


def _k_matrix(covariance: torch.Tensor, s: float, n: float) -> torch.Tensor:
    """K = s² Σ + n² I per group."""
    k = s * s * covariance
    k.diagonal(dim1=-2, dim2=-1).add_(n * n)
    return k


def shrunk_covariance(covariance: torch.Tensor, rho: float) -> torch.Tensor:
    """Σ_ρ = (1 − ρ) Σ + ρ diag(Σ): the diagonal kept, the off-diagonal scaled by 1 − ρ."""
    if rho == 0.0:
        return covariance
    shrunk = (1.0 - rho) * covariance
    shrunk.diagonal(dim1=-2, dim2=-1).copy_(torch.diagonal(covariance, dim1=-2, dim2=-1))
    return shrunk


def analytic_shrinkage(stats: InputStatistics) -> float:
    """ρ for Σ's estimation error when no rows are held out: Σ_{i≠j} Var(σ̂_ij) / Σ_{i≠j} σ̂_ij², with
    the Gaussian (Wishart) variance Var(σ̂_ij) ≈ (σ_ij² + σ_ii σ_jj) / M (Schäfer & Strimmer's
    intensity for the diagonal target, its fourth moments replaced by their Gaussian values)."""
    covariance = stats.covariance
    variances = torch.diagonal(covariance, dim1=-2, dim2=-1)
    off_squares = covariance.square().sum() - variances.square().sum()
    off_products = variances.sum(-1).square().sum() - variances.square().sum()
    if float(off_squares) <= 0.0:
        return 0.0  # no off-diagonal structure to shrink (e.g. depthwise)
    return min(1.0, float((off_squares + off_products) / off_squares) / max(stats.count, 1))


# -- full rank ------------------------------------------------------------------------------------


def full_rank_optimum(stats: InputStatistics, s: float, n: float, rho: float = 0.0) -> torch.Tensor:
    """A = n K_ρ⁻¹ per group (float64), by a Cholesky solve."""
    covariance = shrunk_covariance(stats.covariance, rho)
    factor, info = torch.linalg.cholesky_ex(_k_matrix(covariance, s, n))
    if bool((info == 0).all()):
        return n * torch.cholesky_inverse(factor)
    values, vectors = torch.linalg.eigh(covariance)
    return n * (vectors / (s * s * values.clamp_min(0.0) + n * n).unsqueeze(-2)) @ vectors.mT


@dataclass
class Spectrum:
    """K = s² Σ + n² I of the fitting rows as ``Y^½ V diag(θ) Vᵀ Y^½`` (Y = diag K), per group: every
    shrunk K_ρ = Y^½ V diag((1 − ρ) θ + ρ) Vᵀ Y^½ from one eigendecomposition."""

    scale: torch.Tensor  # Y^½, (groups, d)
    vectors: torch.Tensor  # V, (groups, d, d)
    values: torch.Tensor  # θ, (groups, d)

    @classmethod
    def of(cls, stats: InputStatistics, s: float, n: float, dtype: torch.dtype = torch.float64) -> "Spectrum":
        """In ``dtype`` (float64: in float32 the loss's flat minimum over ρ moves with the statistics'
        rounding, and with it ρ: one process and two would choose differently)."""
        k = _k_matrix(stats.covariance, s, n)
        scale = torch.diagonal(k, dim1=-2, dim2=-1).sqrt()
        values, vectors = torch.linalg.eigh((k / (scale.unsqueeze(-1) * scale.unsqueeze(-2))).to(dtype))
        scale = scale.to(dtype)
        # K ⪰ n² I, so θ ≥ n² / max Y: the clamp only undoes rounding.
        floor = (n * n / scale.square().amax(-1, keepdim=True))
        return cls(scale, vectors, torch.maximum(values, floor))

    def shrunk_values(self, rho: float) -> torch.Tensor:
        return (1.0 - rho) * self.values + rho

    def optimum(self, n: float, rho: float) -> torch.Tensor:
        """A_ρ = n K_ρ⁻¹ (one d³ product: cheaper than a new Cholesky inverse)."""
        inverse = (self.vectors / self.shrunk_values(rho).unsqueeze(-2)) @ self.vectors.mT
        return n * inverse / (self.scale.unsqueeze(-1) * self.scale.unsqueeze(-2))


class HeldOutCurve:
    """C · L(ρ): the held-out loss of A_ρ = n K_ρ⁻¹ with c = −s A_ρ μ_fit, for any ρ in O(d²).

    With M = n² I + s² S (S: the held-out rows' second moment about μ_fit, which carries the
    constant's error), C · L = Σ_groups [d − 2n² tr K_ρ⁻¹ + n² tr(K_ρ⁻¹ M K_ρ⁻¹)]; in the spectrum's
    basis, with λ = 1 / ((1 − ρ) θ + ρ), P = Vᵀ Y^-½ M Y^-½ V and Q = Vᵀ Y⁻¹ V:
    tr K_ρ⁻¹ = Σ λ_i Q_ii and tr(K_ρ⁻¹ M K_ρ⁻¹) = λᵀ (P ∘ Q) λ.
    """

    def __init__(self, spectrum: Spectrum, heldout: InputStatistics, fit_mean: torch.Tensor, s: float, n: float):
        self.spectrum, self.n = spectrum, n
        self.channels = heldout.channels
        whitened = spectrum.vectors / spectrum.scale.unsqueeze(-1)  # Y^-½ V
        m = _k_matrix(heldout.second_moment_about(fit_mean), s, n).to(whitened.dtype)
        p = whitened.mT @ m @ whitened
        q = whitened.mT @ whitened
        self.cross = p * q
        self.q_diagonal = torch.diagonal(q, dim1=-2, dim2=-1)

    def __call__(self, rho: float) -> float:
        lam = 1.0 / self.spectrum.shrunk_values(rho)
        n2 = self.n * self.n
        quadratic = (lam.unsqueeze(-2) @ self.cross @ lam.unsqueeze(-1)).sum()
        return float(self.channels - 2 * n2 * (lam * self.q_diagonal).sum() + n2 * quadratic) / self.channels

    def minimise(self) -> tuple[float, float]:
        """(ρ, loss) minimising the held-out loss over ρ ∈ [0, 1]: a log-spaced grid (small ρ matters
        when n² is tiny), then golden-section search between the best point's neighbours."""
        grid = [0.0] + [10.0**e for e in torch.linspace(-6, 0, 25).tolist()]
        losses = [self(rho) for rho in grid]
        best = min(range(len(grid)), key=losses.__getitem__)
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        ratio = (math.sqrt(5) - 1) / 2
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fa, fb = self(a), self(b)
        for _ in range(30):
            if fa < fb:
                hi, b, fb = b, a, fa
                a = hi - ratio * (hi - lo)
                fa = self(a)
            else:
                lo, a, fa = a, b, fb
                b = lo + ratio * (hi - lo)
                fb = self(b)
        candidates = [(grid[best], losses[best]), (a, fa), (b, fb)]
        return min(candidates, key=lambda pair: pair[1])


# -- diagonal + low rank ----------------------------------------------------------------------------


def low_rank_optimum(factor: torch.Tensor, inverse_transpose: torch.Tensor, n: float, rank: int,
                     candidates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *,
                     iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(diag, U, V)`` minimising the excess ``‖(diag(a) + U V − A*) F‖²_F`` per group (A* = n F⁻ᵀ F⁻¹).

    For a fixed diagonal the best ``U V F`` is the rank-r truncation of B = n F⁻ᵀ − diag(a) F, so
    the excess is g(a) = ‖B − B_r‖², with gradient ∂g/∂a_i = −2 ((B − B_r) Fᵀ)_ii (the truncation is
    optimal, so its own change does not count). g is not convex: L-BFGS descends it from several
    diagonals (diag A*, the identity part 1/n, and each candidate's), and the result is the best of
    those descents and of the ``candidates`` themselves (e.g. the current and the identity denoiser),
    so it is never worse than any candidate. (Alternating the diagonal and the truncation converges
    to the same points, but orders of magnitude more slowly.)
    """
    groups, d = factor.shape[0], factor.shape[-1]
    target = n * inverse_transpose
    rank = min(rank, d)
    if rank == d:  # every A is diag + rank d: the optimum itself
        optimum = target @ inverse_transpose.mT
        diag = torch.diagonal(optimum, dim1=-2, dim2=-1).clone()
        return diag, *_balanced_factors(optimum - torch.diag_embed(diag), rank)
    starts = [torch.diagonal(target @ inverse_transpose.mT, dim1=-2, dim2=-1)]
    for diag, _, _ in candidates:
        if not any(torch.equal(diag.to(factor), start) for start in starts):
            starts.append(diag.to(factor))
    # All descents at once, as a batch of (start, group) problems: g is a sum over them.
    count = len(starts)
    tiled_factor, tiled_target = factor.repeat(count, 1, 1), target.repeat(count, 1, 1)
    reached, basis = _descend(tiled_factor, tiled_target, torch.cat(starts), rank, iterations)
    descended = _with_best_rank(reached, basis, tiled_factor, tiled_target, inverse_transpose.repeat(count, 1, 1), rank)
    results = [(diag.to(factor), u.to(factor), v.to(factor)) for diag, u, v in candidates]
    results += [tuple(part[k * groups:(k + 1) * groups] for part in descended) for k in range(count)]
    excesses = torch.stack([_low_rank_excess(result, factor, target) for result in results])  # (results, groups)
    best = excesses.argmin(0)
    return tuple(torch.stack([result[k] for result in results])[best, torch.arange(groups)] for k in range(3))


def _low_rank_excess(denoiser: tuple[torch.Tensor, torch.Tensor, torch.Tensor], factor: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
    diag, u, v = denoiser
    return (diag.unsqueeze(-1) * factor + u @ (v @ factor) - target).square().sum((-2, -1))


def _descend(factor: torch.Tensor, target: torch.Tensor, start: torch.Tensor, rank: int,
             iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS on g(a) = Σ_groups ‖B − B_r‖² from the diagonals ``start``; returns, per group, the best
    diagonal it evaluated and the leading subspace there. (With subspace iteration an evaluation is an
    upper bound of g, so the best evaluated point is at least as good as it looked; a line search that
    runs off to non-finite values ends the descent.)"""
    diag = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([diag], lr=1, max_iter=iterations, history_size=20, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")
    best_loss = torch.full(start.shape[:1], math.inf, dtype=start.dtype, device=start.device)
    best_diag, best_basis = start.clone(), None
    warm: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        nonlocal best_diag, best_basis
        with torch.no_grad():
            residual = target - diag.unsqueeze(-1) * factor
            if not bool(torch.isfinite(residual).all()):
                raise _RanOff
            basis = _leading_subspace(residual, rank, warm[0] if warm else None)
            warm[:] = [basis]
            tail = residual - basis @ (basis.mT @ residual)
            losses = tail.square().sum((-2, -1))
            better = losses < best_loss
            best_loss.copy_(torch.where(better, losses, best_loss))
            best_diag = torch.where(better.unsqueeze(-1), diag.detach(), best_diag)
            best_basis = basis if best_basis is None else torch.where(better.reshape(-1, 1, 1), basis, best_basis)
            diag.grad = -2 * (tail * factor).sum(-1)
            return losses.sum()

    try:
        optimizer.step(closure)
    except _RanOff:
        pass
    return best_diag, best_basis


class _RanOff(Exception):
    pass


def _with_best_rank(diag: torch.Tensor, basis: torch.Tensor | None, factor: torch.Tensor, target: torch.Tensor,
                    inverse_transpose: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(diag, U, V) with U V F = B_r, the best rank-r term for this diagonal: U V = B_r F⁻¹."""
    residual = target - diag.unsqueeze(-1) * factor
    basis = _leading_subspace(residual, rank, basis)
    return diag, *_balanced_factors(basis @ ((basis.mT @ residual) @ inverse_transpose.mT), rank)


def _balanced_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U (d × r), V (r × d) with U V = matrix (of rank ≤ r) and equal singular values in each."""
    u, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = singular[..., :rank].sqrt()
    return u[..., :rank] * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :rank, :]


def _leading_subspace(matrix: torch.Tensor, rank: int, warm: torch.Tensor | None) -> torch.Tensor:
    """An orthonormal basis (groups, d, r) of the r leading left singular vectors: exact for small d,
    else subspace iteration from ``warm`` (the previous call's basis) plus a few fixed random columns."""
    d = matrix.shape[-1]
    if d <= EXACT_SVD_CHANNELS:
        return torch.linalg.svd(matrix).U[..., :rank]
    generator = torch.Generator().manual_seed(0)
    columns = min(8, d - rank) if warm is not None else min(rank + 8, d)
    extra = torch.randn(matrix.shape[0], d, columns, generator=generator, dtype=matrix.dtype).to(matrix.device)
    start = extra if warm is None else torch.cat([warm, extra], dim=-1)
    basis = torch.linalg.qr(matrix @ (matrix.mT @ start)).Q
    for _ in range((SUBSPACE_ITERATIONS if warm is None else WARM_SUBSPACE_ITERATIONS) - 1):
        basis = torch.linalg.qr(matrix @ (matrix.mT @ basis)).Q
    ritz = torch.linalg.svd(basis.mT @ matrix, full_matrices=False).U[..., :rank]
    return basis @ ritz


EXACT_SVD_CHANNELS = 64
SUBSPACE_ITERATIONS = 6  # from random columns
WARM_SUBSPACE_ITERATIONS = 2  # from the previous evaluation's basis (L-BFGS moves the diagonal little)


def cholesky_factor(stats: InputStatistics, s: float, n: float, rho: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, F⁻ᵀ) with F Fᵀ = K_ρ: the Cholesky factor, or the spectral one if rounding left K_ρ indefinite."""
    covariance = shrunk_covariance(stats.covariance, rho)
    factor, info = torch.linalg.cholesky_ex(_k_matrix(covariance, s, n))
    if not bool((info == 0).all()):
        values, vectors = torch.linalg.eigh(covariance)
        root = (s * s * values.clamp_min(0.0) + n * n).sqrt().unsqueeze(-2)
        return vectors * root, vectors / root
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device).expand_as(factor)
    return factor, torch.linalg.solve_triangular(factor, eye, upper=False).mT
