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

The training step computes all of these inside one layer's autograd Function
(`denoiserep.layer_step`: ``_sampled``, ``_per_position``, ``_gram``); this module holds the
estimators' names and the sampled loss of the DenoiseRep⁻ head.
"""

from __future__ import annotations


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
