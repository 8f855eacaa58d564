"""The per-layer noise-prediction loss, sampled or in closed form over the noise.

A layer's denoiser D(x_t) = A x_t + u (u = A e + a) predicts ε from x_t = s x + r ε, with
s = √ᾱ_t and r = √(1−ᾱ_t). At one position the residual

    ε − D(x_t) = (I − r A) ε − (s A x + u)

is Gaussian in ε: channel j has mean m_j = −(s A x + u)_j and variance v_j = ‖row j of (I − r A)‖².
So the loss's expectation over ε is known exactly:

    L2:  E (ε_j − D_j)² = v_j + m_j²
    L1:  E |ε_j − D_j|  = σ_j √(2/π) exp(−m_j² / 2v_j) + m_j erf(m_j / (σ_j √2))      (folded normal)

``estimator="sampled"`` draws one ε per position (the paper); ``"expected"`` takes the expectation
above: the same loss in expectation, the gradient without sampling noise, no ε to draw or keep.
For L2 over many positions the expectation only needs the positions' Gram matrix S = Σ x xᵀ:
Σ_t ‖s A x_t + u‖² = s² ⟨A, A S_c⟩ + M ‖s A x̄ + u‖² (S_c centred on the batch mean x̄, which
keeps float32 exact when u cancels the mean, as it does at the optimum), so one Gram (M d²) and
one A S_c (d³) replace A x_t and its backward (2 M d²).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ESTIMATORS = ("sampled", "expected")


def noise_prediction_loss(predicted: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The sampled loss: mean over elements of |target − predicted| (l1), its square (l2), or both."""
    if loss_type == "l1":
        return F.l1_loss(predicted, target)
    if loss_type == "l2":
        return F.mse_loss(predicted, target)
    if loss_type == "l1+l2":
        return F.l1_loss(predicted, target) + F.mse_loss(predicted, target)
    raise ValueError(f"unknown loss {loss_type!r}; choose 'l1', 'l2' or 'l1+l2'")


def residual_variance(matrix: torch.Tensor, r: float) -> torch.Tensor:
    """v_j = ‖row j of (I − r A)‖² per group block: shape (groups, d), flattened to (channels,)."""
    residual = -r * matrix.to(_loss_dtype(matrix))
    residual.diagonal(dim1=-2, dim2=-1).add_(1.0)  # I − r A without a d × d identity per forward
    return residual.pow(2).sum(-1).reshape(-1)


def _loss_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half-precision models (as the sampled loss), float64 kept for float64 ones."""
    return torch.promote_types(tensor.dtype, torch.float32)


def expected_loss(residual_mean: torch.Tensor, variance: torch.Tensor, loss_type: str) -> torch.Tensor:
    """E over ε of the loss, mean over elements; ``residual_mean`` (M, channels), ``variance`` (channels,).

    Both losses are even in the mean, so ``s A x + u`` may be passed for its negative."""
    mean, variance = residual_mean.to(_loss_dtype(residual_mean)), variance.to(_loss_dtype(residual_mean))
    if loss_type == "l2":
        return variance.mean() + mean.pow(2).mean()
    if loss_type == "l1":
        return _FoldedNormalMean.apply(mean, variance)
    if loss_type == "l1+l2":
        return _FoldedNormalMean.apply(mean, variance) + variance.mean() + mean.pow(2).mean()
    raise ValueError(f"unknown loss {loss_type!r}; choose 'l1', 'l2' or 'l1+l2'")


class _FoldedNormalMean(torch.autograd.Function):
    """mean over elements of E|N(m, σ_j²)| = σ √(2/π) exp(−z²/2) + m erf(z/√2), z = m/σ, σ² = v_j, with
    its gradient written out (∂/∂m = erf(z/√2), ∂/∂σ = √(2/π) exp(−z²/2)): a few passes over the
    (M, channels) elements instead of autograd's dozen, which dominate this loss on a CPU.

    v_j = 0 is reached: calibration sets the rows of A that face null input directions to I/r. There
    the loss is |m| (exp → 0, erf → sign m); σ is floored at 1e-6 so that ∂/∂v = (∂/∂σ) / 2σ stays finite."""

    @staticmethod
    def forward(ctx, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        sigma = variance.clamp_min(1e-12).sqrt()
        gauss, erf = _folded_normal_terms(mean, sigma)
        value = (math.sqrt(2 / math.pi) * (gauss.sum(0) * sigma).sum() + torch.dot(mean.reshape(-1), erf.reshape(-1)))
        # Only the mean is kept for the backward (recomputing its two terms there costs four passes
        # over the elements; keeping them would cost two more (M, channels) tensors per layer).
        ctx.save_for_backward(mean, sigma)
        return value / mean.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mean, sigma = ctx.saved_tensors
        gauss, erf = _folded_normal_terms(mean, sigma)
        scale = grad / mean.numel()
        grad_mean = erf.mul_(scale) if ctx.needs_input_grad[0] else None
        grad_variance = None
        if ctx.needs_input_grad[1]:
            grad_variance = gauss.sum(0) * (scale * math.sqrt(2 / math.pi)) / (2 * sigma)
        return grad_mean, grad_variance


def _folded_normal_terms(mean: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(−z²/2) and erf(z/√2) for z = m/σ, in two fresh tensors."""
    z = mean / sigma
    gauss = z.square().mul_(-0.5).exp_()
    return gauss, z.mul_(math.sqrt(0.5)).erf_()


def expected_l2_from_gram(rows: torch.Tensor, matrix: torch.Tensor, constant: torch.Tensor, s: float, r: float) -> torch.Tensor:
    """Expected L2 loss of a full-rank denoiser on ``rows`` (M, channels) through their Gram matrix.

    Equals ``expected_loss(s A x + u, v, "l2")`` at M d² + d³ instead of 2 M d² multiply-adds
    (forward and backward), the better choice when the rows outnumber the channels per group.
    """
    with torch.autocast(rows.device.type, enabled=False):  # a loss, summed over many rows: not in bf16
        return _expected_l2_from_gram(rows, matrix, constant, s, r)


def _expected_l2_from_gram(rows: torch.Tensor, matrix: torch.Tensor, constant: torch.Tensor, s: float, r: float) -> torch.Tensor:
    groups, d = matrix.shape[0], matrix.shape[-1]
    count = rows.shape[0]
    dtype = _loss_dtype(rows)
    x = rows.to(dtype).reshape(count, groups, d)
    batch_mean = x.mean(0)  # (g, d)
    centred = (x - batch_mean).transpose(0, 1)  # (g, M, d)
    gram = centred.transpose(1, 2) @ centred  # (g, d, d), symmetric
    A = matrix.to(dtype)
    mean_term = s * torch.einsum("gji,gi->gj", A, batch_mean).reshape(-1) + constant.to(dtype)
    spread = _QuadraticForm.apply(A, gram)  # Σ_t ‖A (x_t − x̄)‖²
    channels = groups * d
    return residual_variance(A, r).mean() + (s * s * spread + count * mean_term.pow(2).sum()) / (count * channels)


class _QuadraticForm(torch.autograd.Function):
    """⟨A, A S⟩ for symmetric S (per group), with the gradient 2 A S from the forward's own product:
    autograd through ``(A * (A @ S)).sum()`` would spend two more d³ products."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        product = matrix @ gram
        ctx.save_for_backward(product)
        return (matrix * product).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (product,) = ctx.saved_tensors
        return 2 * grad * product, None


class SharedProduct(torch.autograd.Function):
    """``A x`` on rows (M, groups, d), returned twice: for the task path and for the noise loss.

    The noise loss is computed on the layer's *detached* input, the task path on the input itself;
    one product serves both, and the backward sends the task gradient to x and A but the noise
    loss's gradient to A only (as if it had been computed on ``x.detach()``).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, matrix: torch.Tensor):
        product = torch.einsum("mgi,gji->mgj", rows, matrix)
        ctx.save_for_backward(rows, matrix)
        # The backward's products run under the forward's autocast state (as the weight path's
        # baddbmm backward would): bf16 on a GPU under AMP, with the inputs' dtypes reconciled.
        device = rows.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return product, product.detach().clone()

    @staticmethod
    def backward(ctx, grad_task: torch.Tensor | None, grad_noise: torch.Tensor | None):
        rows, matrix = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        grad_rows = grad_matrix = None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            if ctx.needs_input_grad[0] and grad_task is not None:
                grad_rows = torch.einsum("mgj,gji->mgi", grad_task.to(matrix.dtype), matrix)
            if ctx.needs_input_grad[1]:
                total = sum(grad for grad in (grad_task, grad_noise) if grad is not None)
                grad_matrix = torch.einsum("mgj,mgi->gji", total.to(rows.dtype), rows)
        return grad_rows, grad_matrix
