"""DenoiseRep⁻: a denoiser after the backbone, run for ``steps`` reverse DDPM steps.

Unlike the per-layer denoisers, this one cannot be fused (it is non-linear and iterated),
so it costs extra inference time: that is the paper's point of comparison.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layer_step import axpy
from .noise_loss import noise_prediction_loss
from .schedule import make_schedule


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return nn.functional.pad(embedding, (0, dim % 2))


class DenoiseHead(nn.Module):
    """An MLP noise predictor ``D(F_t, t)`` on a feature vector, with a sinusoidal→MLP
    timestep embedding, and its ``steps``-step deterministic DDPM sampler.

    In train mode (with gradients on) each forward also accumulates the noise-prediction
    loss on its detached input at a random ``t ∈ [1, steps]``; `denoiserep.denoise_loss`
    collects it. Inference treats the features as ``F_{steps}`` and returns ``F_0``.
    """

    def __init__(
        self,
        dim: int,
        steps: int = 10,
        *,
        hidden_dim: int | None = None,
        time_embed_dim: int = 128,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        loss: str = "l1",
        sample_noise: bool = False,
        noise_seed: int = 0,
    ):
        super().__init__()
        if not 1 <= steps <= num_timesteps:
            raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
        self.dim, self.steps, self.loss_type = dim, steps, loss
        self.sample_noise, self.noise_seed = sample_noise, noise_seed
        self.time_embed_dim = time_embed_dim
        hidden_dim = hidden_dim or dim
        sched = make_schedule(schedule, num_timesteps, beta_start, beta_end)
        coefficients = [sched.step(t) for t in range(1, steps + 1)]
        for field in ("c1", "c3", "sigma", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar"):
            values = torch.tensor([getattr(c, field) for c in coefficients], dtype=torch.float32)
            self.register_buffer(field, values, persistent=False)
        # The sampler's per-step scalars as Python floats: reading them from the device each step would wait.
        self.step_scalars = {field: getattr(self, field).tolist() for field in ("c1", "c3", "sigma")}
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.input_proj = nn.Linear(dim, hidden_dim)
        self.output = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, dim)
        )
        self._pending_losses: list[torch.Tensor] = []

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ = D(x, t) for features (B, dim) and 1-based timesteps (B,)."""
        time = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(x.dtype))
        return self.output(self.input_proj(x) + time)

    def noise_loss(self, features: torch.Tensor) -> torch.Tensor:
        x = features.detach()
        t = torch.randint(1, self.steps + 1, (x.shape[0],), device=x.device)
        eps = torch.randn_like(x)
        idx = t - 1
        noisy = self.sqrt_alpha_bar[idx, None] * x + self.sqrt_one_minus_alpha_bar[idx, None] * eps
        return noise_prediction_loss(self.predict_noise(noisy, t).float(), eps.float(), self.loss_type)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            self._pending_losses.append(self.noise_loss(features))
        return self.sample(features)

    def sample(self, features: torch.Tensor) -> torch.Tensor:
        """F_0 from F_steps = ``features``: ``steps`` reverse steps F_{t−1} = c3 F_t − c1 D(F_t, t) (+ σ z).

        The timestep's contribution to D is the same for every sample: the time MLP runs once for
        all t, and each step's is folded into the input projection's bias, so that a step is four
        matrix products, two activations and one update (on a GPU these small steps are
        launch-bound; `torch.compile(head.sample)` fuses them further)."""
        t = torch.arange(1, self.steps + 1, device=features.device)
        time = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(features.dtype))
        biases = (time + self.input_proj.bias).unbind(0)  # per step: b + MLP(e(t))
        weight = self.input_proj.weight.t()
        c1, c3, sigma = (self.step_scalars[field] for field in ("c1", "c3", "sigma"))
        generator = torch.Generator(device=features.device).manual_seed(self.noise_seed) if self.sample_noise else None
        x = features
        for i in range(self.steps - 1, -1, -1):
            hidden = torch.addmm(biases[i], x.reshape(-1, self.dim), weight).reshape(*x.shape[:-1], -1)
            x = axpy(x * c3[i], self.output(hidden), -c1[i])
            if generator is not None and i > 0:
                x = x + sigma[i] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x

    def pop_weighted_losses(self) -> list[tuple[torch.Tensor, float]]:
        """(loss, scale) pairs as `LayerDenoiser.pop_weighted_losses` returns them (here: scale 1)."""
        return [(loss, 1.0) for loss in self.pop_losses()]

    def pop_losses(self) -> list[torch.Tensor]:
        losses, self._pending_losses = self._pending_losses, []
        return losses

    def extra_repr(self) -> str:
        return f"dim={self.dim}, steps={self.steps}"


class PerPositionHead(nn.Module):
    """DenoiseRep⁻ for dense outputs: ``head`` on every position — every pixel of a feature map
    (B, C, H, W), every token of (B, N, C), every row of (N, C) such as RoI features."""

    def __init__(self, head: DenoiseHead):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            return self.head(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        b, c, h, w = x.shape
        rows = self.head(x.permute(0, 2, 3, 1).reshape(-1, c))
        return rows.reshape(b, h, w, c).permute(0, 3, 1, 2)
