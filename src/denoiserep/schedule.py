"""Noise schedules (β/α tables) and the DDPM reverse-step coefficients.

Timesteps are 1-based, as in the DDPM paper: ``t ∈ [1, T]`` and ``β_t = betas[t - 1]``.
Tables are computed in float64 so that the coefficients used for fusion do not depend on
the order of float32 products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "ddpm", "cosine")

# Default β range per named schedule. "linear" is the one the authors' released code uses;
# "ddpm" is the standard DDPM range (Ho et al. 2020).
_DEFAULT_BETA_RANGE = {"linear": (1e-4, 2e-3), "ddpm": (1e-4, 2e-2)}


@dataclass(frozen=True)
class StepCoefficients:
    """Coefficients of one reverse step at timestep t.

    ``x̂ = c3 · x − c1 · D(x, t) + sigma · z`` is the DDPM posterior step; the forward
    diffusion is ``x_t = sqrt_alpha_bar · x + sqrt_one_minus_alpha_bar · ε``.
    """

    t: int
    beta: float
    alpha_bar: float
    c1: float  # β_t / (√α_t · √(1 − ᾱ_t))
    c3: float  # 1 / √α_t
    sigma: float  # √β̃_t, the posterior standard deviation (used only for sampled noise)

    @property
    def sqrt_alpha_bar(self) -> float:
        return math.sqrt(self.alpha_bar)

    @property
    def sqrt_one_minus_alpha_bar(self) -> float:
        return math.sqrt(1.0 - self.alpha_bar)


class NoiseSchedule:
    """β_1..β_T with α_t = 1 − β_t and ᾱ_t = Π_{s≤t} α_s."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1); check beta_start/beta_end")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def step(self, t: int) -> StepCoefficients:
        if not 1 <= t <= self.num_timesteps:
            raise ValueError(f"timestep {t} is outside [1, {self.num_timesteps}]")
        beta = float(self.betas[t - 1])
        alpha = 1.0 - beta
        alpha_bar = float(self.alpha_bars[t - 1])
        alpha_bar_prev = float(self.alpha_bars[t - 2]) if t > 1 else 1.0
        posterior_var = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        return StepCoefficients(
            t=t,
            beta=beta,
            alpha_bar=alpha_bar,
            c1=beta / (math.sqrt(alpha) * math.sqrt(1.0 - alpha_bar)),
            c3=1.0 / math.sqrt(alpha),
            sigma=math.sqrt(posterior_var),
        )

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.num_timesteps}, beta_1={float(self.betas[0]):.3g}, "
            f"beta_T={float(self.betas[-1]):.3g})"
        )


def make_schedule(
    name: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> NoiseSchedule:
    """Build a named schedule.

    - ``linear``: β linear from 1e-4 to 2e-3 (the authors' released code).
    - ``ddpm``: β linear from 1e-4 to 0.02 (the standard DDPM schedule).
    - ``cosine``: Nichol & Dhariwal (2021), ᾱ_t = cos²(((t/T)+s)/(1+s) · π/2), β clipped at 0.999.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name in _DEFAULT_BETA_RANGE:
        default_start, default_end = _DEFAULT_BETA_RANGE[name]
        start = default_start if beta_start is None else beta_start
        end = default_end if beta_end is None else beta_end
        return NoiseSchedule(torch.linspace(start, end, num_timesteps, dtype=torch.float64))
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule has no beta_start/beta_end; leave them unset")
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bars = f / f[0]
        betas = (1 - alpha_bars[1:] / alpha_bars[:-1]).clamp(max=0.999)
        return NoiseSchedule(betas)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
