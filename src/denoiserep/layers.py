"""The per-layer denoiser and its exact fused form.

A layer ``Y = W X + b`` (Linear or ConvNd) gets a denoiser that acts on the layer's input
channels at a fixed timestep ``t``::

    D(X) = A (X + e) + a                     # A: block-diagonal per conv group, e: one learned vector
    X̂   = c3 · X − c1 · D(X) + σ z           # one DDPM reverse step (σ z = 0 unless sampled)
    Y    = W X̂ + b = W' X + b'
    W'   = W (c3 I − c1 A),   b' = b + W (−c1 (A e + a) + σ z)

`LayerDenoiser` is a ``torch.nn.utils.parametrize`` parametrization of the layer's ``weight`` (so
``layer.weight`` *is* W′, wherever it is read), and the converted layer's forward (`DenoisedForward`,
set on the layer instance) runs it on W′ and b′: in eval mode and whenever the denoiser does not
train from the parametrization, in training as one `denoiserep.layer_step.LayerStep`, which also
queues the layer's noise loss for `denoise_loss`.

Two exact ways to train through a layer (``path``), chosen once per input shape by their cost when
``"auto"``: "weight" forms W′ (out · k · d² multiply-adds, forward and backward again, whatever the
batch); "input" denoises the input instead, X ↦ c3 X − c1 A X, and runs the layer on W (M · d² for M
input positions, twice more backward), and then the noise loss reuses that same A X. When only the
noise loss trains (`noise_loss_only`) the layer runs on W′ and b′ without autograd.

Convolutions: the denoiser is applied pointwise to the **padded** input ("pad, then denoise").
For reflect/replicate/circular padding this equals "denoise, then pad"; for zero padding it
is the only exactly fusable choice (the constant term then also lands on padded pixels and
becomes a pure bias shift of ``Σ_{i,k} W[o, i, k] · u_i``).
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .schedule import StepCoefficients
from .layer_step import (
    LayerStep,
    LinearStep,
    LossStep,
    LowRankDense,
    Matrices,
    Pointwise,
    WeightViews,
    axpy,
    constant,
    form_of,
    fused_weight,
    kernel_sum,
    shifted_bias,
)


class StepCache:
    """The views a training step uses (`LayerDenoiser.step_operands`), with the keys that say they are
    still valid. Copies and pickles of a denoiser start empty: views belong to the tensors they view."""

    __slots__ = ("matrices_key", "matrices", "weight_key", "views")

    def __init__(self):
        self.matrices_key = self.matrices = self.weight_key = self.views = None

    def __deepcopy__(self, memo) -> "StepCache":
        return StepCache()

    def __reduce__(self):
        return StepCache, ()


class LayerDenoiser(nn.Module):
    """Denoiser of one embedding layer; as a parametrization it maps W to W′."""

    def __init__(
        self,
        layer: nn.Module,
        step: StepCoefficients,
        *,
        form: str = "full",
        rank: int = 8,
        init: str = "identity",
        init_seed: int = 0,
        sample_noise: bool = False,
        noise_seed: int = 0,
        loss: str = "l1",
        loss_token_fraction: float = 1.0,
        estimator: str = "sampled",
        path: str = "auto",
    ):
        super().__init__()
        is_linear = isinstance(layer, nn.Linear)
        self.channels = layer.in_features if is_linear else layer.in_channels
        self.groups = 1 if is_linear else layer.groups
        self.group_channels = self.channels // self.groups
        # Position of the channel axis in the layer's input: last for Linear, 1 (or 0 when
        # unbatched) for ConvNd, counted from the end so that both cases agree.
        self.spatial_dims = 0 if is_linear else len(layer.kernel_size)
        # Input positions per output position (the cost model's estimate of a conv's output size).
        self.stride_product = 1 if is_linear else math.prod(layer.stride)
        self.timestep = step.t
        self.c1, self.c3 = step.c1, step.c3
        self.sqrt_alpha_bar = step.sqrt_alpha_bar
        self.sqrt_one_minus_alpha_bar = step.sqrt_one_minus_alpha_bar
        self.form = form
        # A one-group low-rank A no larger than the layer's W (d ≤ out · k) steps as the full-rank A it
        # equals (`step_matrices`): d² r to form it, d² to keep it, no more than W′ itself costs, and the
        # step's operators of a full-rank layer instead of the factors' through every product.
        weight_rows = layer.weight.shape[0] * math.prod(layer.weight.shape[2:])
        self.dense_low_rank = form == "low_rank" and self.groups == 1 and self.group_channels <= weight_rows
        self.loss_type = loss
        self.loss_token_fraction = loss_token_fraction
        self.estimator = estimator
        self.path = path
        self.following_norm: str | None = None  # set by convert(): a BatchNorm fed by this layer
        self._pending_losses: list[torch.Tensor] = []
        self._warned_uncollected = False
        self._paths: dict[tuple, str] = {}  # the chosen path per (positions, input grad, weight grad)
        self._step_cache = StepCache()
        # Set by `convert.noise_loss_only`: the layer then runs on W′ and b′ without autograd (label-free
        # training needs no task gradient); only the noise loss is recorded.
        self.noise_loss_only = False
        # False inside `denoiserep.disable_adapter`: the layer computes its original W x + b.
        self.enabled = True

        weight = layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        g, d = self.groups, self.group_channels
        gen = torch.Generator().manual_seed(init_seed)

        def randn(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(**factory)

        # "identity" init: A = ((c3 − 1) / c1) I, a = e = 0 gives c3 I − c1 A = I, so the
        # converted model computes exactly the original one before any training.
        identity_scale = (self.c3 - 1.0) / self.c1
        random_init = init == "random"
        if form == "full":
            eye = torch.eye(d, **factory).expand(g, d, d)
            self.A = nn.Parameter(randn(g, d, d, std=d**-0.5) if random_init else identity_scale * eye.clone())
        elif form == "low_rank":
            r = min(rank, d)
            self.A_diag = nn.Parameter(randn(g, d, std=1.0) if random_init else torch.full((g, d), identity_scale, **factory))
            # LoRA-style: U starts at zero so the low-rank part is inert until trained.
            self.U = nn.Parameter(randn(g, d, r, std=r**-0.5) if random_init else torch.zeros(g, d, r, **factory))
            self.V = nn.Parameter(randn(g, r, d, std=d**-0.5))
        else:
            raise ValueError(f"unknown denoiser form {form!r}; choose 'full' or 'low_rank'")
        self.a = nn.Parameter(randn(self.channels, std=1.0) if random_init else torch.zeros(self.channels, **factory))
        # With a fixed timestep per layer, the timestep embedding e(t_i) is a single vector:
        # learning it directly avoids a sinusoidal→MLP stack per layer (the authors' code
        # spends 133M parameters on that for a 22M ViT-S).
        self.e = nn.Parameter(randn(self.channels, std=1.0) if random_init else torch.zeros(self.channels, **factory))
        noise = torch.zeros(self.channels, **factory)
        if sample_noise:
            z = torch.randn(self.channels, generator=torch.Generator().manual_seed(noise_seed), dtype=torch.float64)
            noise = (step.sigma * z).to(**factory)
        # σ z is part of the checkpoint, so that fusing the same checkpoint twice is bit-identical.
        self.register_buffer("noise", noise)
        self.sample_noise = sample_noise
        # How A meets the layer's input (rows, or channels-first convolutions), and positions as rows.
        self.pointwise = Pointwise(g, d, self.spatial_dims)
        # Positions as rows (one group), or as a (1, C, M) sequence for grouped 1 × 1 convolutions.
        self.rows_pointwise = Pointwise(g, d, 0) if g == 1 else Pointwise(g, d, 1)
        self.rows_layout = Pointwise(g, d, 0)  # sums and broadcasts over rows (no products)

    # -- the denoiser as a matrix ---------------------------------------------------------
    def matrix_parameters(self) -> tuple[torch.Tensor, ...]:
        own = self._parameters
        return (own["A"],) if self.form == "full" else (own["A_diag"], own["U"], own["V"])

    def step_matrices(self) -> tuple[torch.Tensor, ...]:
        """What the training step and W′ are computed from: `matrix_parameters`, or for
        `dense_low_rank` the one dense block diag(a) + U V (differentiable in the factors)."""
        if not self.dense_low_rank:
            return self.matrix_parameters()
        return (LowRankDense.apply(self.factor_views(), self.A_diag, self.U, self.V),)

    @property
    def steps_full_rank(self) -> bool:
        """Whether the training step runs on one full-rank A (full, or `dense_low_rank`)."""
        return self.form == "full" or self.dense_low_rank

    def factor_views(self) -> Matrices:
        """The low-rank factors' views, kept as every step's (`step_operands`: a `dense_low_rank`
        layer's own step runs on the dense block, which is never kept)."""
        return self.step_operands(self.matrix_parameters())[0]

    def matrix(self) -> torch.Tensor:
        """A as (groups, d, d) blocks; ``(A x)_j = Σ_i A[g, j, i] x_i`` within group g."""
        if self.form == "full":
            return self.A
        return torch.diag_embed(self.A_diag) + self.U @ self.V

    def constant(self) -> torch.Tensor:
        """``A e + a``: the part of D(x) = A (x + e) + a that does not depend on x."""
        return constant(Matrices(self.form, self.matrix_parameters()), self.e, self.a)

    def apply_matrix(self, rows: torch.Tensor) -> torch.Tensor:
        """``A x`` for rows of shape (M, channels), without forming A in the low-rank case."""
        t = rows if self.groups == 1 else rows.t().unsqueeze(0)
        out, _ = self.rows_pointwise.apply(Matrices(self.form, self.matrix_parameters()), t)
        return out if self.groups == 1 else out.squeeze(0).t()

    def denoise(self, rows: torch.Tensor) -> torch.Tensor:
        """The unfused reverse step on input rows (M, channels): ``c3 x − c1 D(x) + σ z``."""
        predicted = self.apply_matrix(rows) + self.constant()
        return self.c3 * rows - self.c1 * predicted + self.noise

    # -- fusion ---------------------------------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """W′ = W (c3 I − c1 A) = c3 W − c1 W A, per conv group; the training forward's own W′
        (`denoiserep.layer_step.fused_weight`), which `fuse` writes into the layer."""
        if not self.enabled:
            return weight
        params = self.step_matrices()
        return fused_weight(self.groups, weight, form_of(params), params, self.c1, self.c3)

    def bias_shift(self, weight: torch.Tensor) -> torch.Tensor:
        """``W u`` with ``u = −c1 (A e + a) + σ z``, summed over the kernel (shape: out_features)."""
        u = axpy(self.noise, self.constant(), -self.c1).to(weight.dtype)
        return shifted_bias(kernel_sum(weight), None, u, self.groups, 1.0)

    def shifted_bias(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """b′ = b + W u as the training forward forms it."""
        c = self.constant().to(weight.dtype)
        if self.sample_noise:
            return shifted_bias(kernel_sum(weight), bias, axpy(self.noise, c, -self.c1), self.groups, 1.0)
        return shifted_bias(kernel_sum(weight), bias, c, self.groups, -self.c1)

    # -- where the noise loss looks ----------------------------------------------------------
    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as rows (positions, channels): the positions the noise loss sees.

        Every token of a Linear input, every (unpadded) pixel of a conv input; the noise loss
        and `denoiserep.calibrate` both average over exactly these rows.
        """
        x = x.detach()
        if self.spatial_dims == 0:
            return x.reshape(-1, self.channels)
        # A conv's rows are a transposed view of a channels-first copy (C, positions): NCHW → (C, N·H·W)
        # is one copy, and `Moments` then forms its Gram along contiguous positions.
        channel_axis = x.ndim - 1 - self.spatial_dims
        return x.movedim(channel_axis, 0).reshape(self.channels, -1).T

    def layer_positions(self, x: torch.Tensor) -> torch.Tensor:
        """The input in the layout `pointwise` works in: rows for a Linear, the batch as it is for a
        conv (an unbatched conv input gains its batch axis)."""
        if self.spatial_dims == 0:
            return x.reshape(-1, self.channels)
        return x if x.ndim == self.spatial_dims + 2 else x.unsqueeze(0)

    def from_layer_positions(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t if t.shape == x.shape else t.reshape(x.shape)  # a batched conv's is already x's shape

    @property
    def loss_token_fraction(self) -> float:
        return self._loss_fraction[0] / self._loss_fraction[1]

    @loss_token_fraction.setter
    def loss_token_fraction(self, value: float) -> None:
        # Kept as a ratio of integers: torch.compile keeps a module's integers constant, but makes a
        # float that differs between compiled models symbolic, and a subset size derived from a
        # symbolic float breaks the compiled backward.
        ratio = Fraction(value).limit_denominator(1 << 20)
        self._loss_fraction = (ratio.numerator, ratio.denominator)

    @property
    def loss_fraction_is_one(self) -> bool:
        """The noise loss sees every position (no subset drawn)."""
        return self._loss_fraction[0] == self._loss_fraction[1]

    def loss_subset_size(self, positions: int) -> int:
        """How many of ``positions`` the noise loss draws: a ``loss_token_fraction`` of them, at least one."""
        numerator, denominator = self._loss_fraction
        return positions if numerator == denominator else max(1, positions * numerator // denominator)

    def _subset(self, count: int, device: torch.device) -> torch.Tensor:
        # The loss is an expectation over positions: a random subset estimates it unbiasedly.
        return torch.randint(count, (self.loss_subset_size(count),), device=device)

    def loss_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows (M, channels) the noise loss uses: all, or a random ``loss_token_fraction`` of them."""
        if self.loss_fraction_is_one:
            return rows
        return rows[self._subset(rows.shape[0], rows.device)]

    def loss_positions(self, x: torch.Tensor) -> tuple[torch.Tensor, Pointwise]:
        """The positions the noise loss uses (all, or a random ``loss_token_fraction``), with their layout."""
        t = self.layer_positions(x)
        if self.loss_fraction_is_one:
            return t, self.pointwise
        chosen = self.loss_rows(self.pointwise.to_rows(t))
        return (chosen, self.rows_pointwise) if self.groups == 1 else (chosen.t().unsqueeze(0), self.rows_pointwise)

    def loss_positions_of_product(self, product: torch.Tensor):
        """The input path's A x at the noise loss's positions: (values, layout, the chosen rows or None)."""
        if self.loss_fraction_is_one:
            return product, self.pointwise, None
        rows = self.pointwise.to_rows(product)
        index = self._subset(rows.shape[0], rows.device)
        return rows[index], self.rows_layout, index

    def product_grad_at_positions(self, grad: torch.Tensor, index: torch.Tensor | None, x: torch.Tensor):
        """∂/∂(A x) in the layer layout from its value at the loss's positions (zero elsewhere)."""
        if index is None:
            return grad
        t = self.layer_positions(x)
        full = grad.new_zeros(t.numel() // self.channels, self.channels).index_add_(0, index, grad)
        if self.spatial_dims == 0:
            return full
        shape = (t.shape[0], *t.shape[2:], self.channels)
        return full.view(shape).movedim(-1, 1)

    # -- training signal ------------------------------------------------------------------
    def noise_loss(self, x: torch.Tensor) -> torch.Tensor:
        """``|ε − D(√ᾱ x + √(1−ᾱ) ε)|`` on the layer's detached input (the layer's input layout, or
        rows), at this layer's t, averaged over its elements: one ε per position (``estimator=
        "sampled"``) or its exact expectation over ε (``"expected"``). Differentiable in the
        denoiser's parameters."""
        return LossStep.apply(self, x, self.e, self.a, *self.matrix_parameters()) / self.loss_elements(x)

    def loss_scale(self, x: torch.Tensor) -> float:
        """1 / `loss_elements`: the steps return their losses as sums."""
        return 1.0 / (self.loss_subset_size(x.numel() // self.channels) * self.channels)

    @property
    def linear_step(self) -> bool:
        """Whether an eager training forward with a frozen W and b can be the written-out `LinearStep`: a
        Linear, full-rank A, the sampled loss, no σ z."""
        return self.spatial_dims == 0 and self.steps_full_rank and self.estimator == "sampled" and not self.sample_noise

    def loss_elements(self, x: torch.Tensor) -> int:
        """Elements the noise loss averages over for input x: its positions (or the fraction of them
        it draws) times the channels."""
        return self.loss_subset_size(x.numel() // self.channels) * self.channels

    def prefers_input_path(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether denoising this call's input costs fewer multiply-adds than forming W′, each with
        its backward and the expected noise loss. On the input path the layer runs on the frozen W,
        so its own weight gradient (out · k · d per output position), which W′ needs, is not formed.
        The input path needs the full-rank A and the expected estimator, whose loss it computes from
        the task path's own A x. Decided once per input size and gradient setting."""
        if self.path == "weight" or not self.steps_full_rank or self.estimator != "expected":
            return False
        if self.path == "input":
            return True
        key = (x.numel(), x.requires_grad, weight.requires_grad)
        choice = self._paths.get(key)
        if choice is None:
            choice = self._paths[key] = "input" if self._input_path_cheaper(x, weight) else "weight"
        return choice == "input"

    def _input_path_cheaper(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        g, d = self.groups, self.group_channels
        positions = x.numel() // self.channels
        loss_positions = self.loss_subset_size(positions)
        weight_path = 2 * weight.shape[0] * weight[0, 0].numel() * d * d
        if self.loss_type == "l2" and d < loss_positions:
            weight_path += g * (loss_positions * d * d + d**3)  # Gram + A S
        else:
            weight_path += 2 * g * loss_positions * d * d  # A x and its backward
        input_path = (3 if x.requires_grad else 2) * g * positions * d * d
        if not weight.requires_grad:
            input_path -= (positions // self.stride_product) * weight.shape[0] * weight[0, 0].numel() * d
        return input_path < weight_path

    def queue_loss(self, loss: torch.Tensor, scale: float = 1.0) -> None:
        """Keep a forward's noise loss, ``scale`` · ``loss``, for `denoise_loss` (which sums all of a
        model's in one product: the scales are applied there, not here)."""
        if len(self._pending_losses) >= MAX_PENDING_LOSSES:
            self._pending_losses.pop(0)
            if not self._warned_uncollected:
                warnings.warn(
                    f"{MAX_PENDING_LOSSES} training forwards ran without denoiserep.denoise_loss(model) being "
                    "called; the oldest noise losses are being dropped. Call denoise_loss(model) after each "
                    "forward (or put the model in eval mode / freeze the denoisers when not training them).",
                    stacklevel=4,
                )
                self._warned_uncollected = True
        self._pending_losses.append((loss, scale))

    def pop_losses(self) -> list[torch.Tensor]:
        """The noise losses queued since the last call, each its layer's mean."""
        return [loss * scale for loss, scale in self.pop_weighted_losses()]

    def pop_weighted_losses(self) -> list[tuple[torch.Tensor, float]]:
        """(loss, scale) pairs queued since the last call: the losses are ``scale`` · ``loss``."""
        losses = self._pending_losses.copy()
        self._pending_losses.clear()  # not a new list: nn.Module's __setattr__ costs more than the rest
        return losses

    def step_operands(self, params, weight: torch.Tensor | None = None) -> tuple[Matrices, WeightViews | None]:
        """The views of the denoiser's matrices and of the layer's W that a training step uses, kept
        across steps: they stay valid while the tensors keep their storage (and a W its values, for
        its kernel sum), which is what the keys check. Inside torch.compile they are formed anew, and
        so are a `dense_low_rank` A's (a new tensor every step)."""
        compiling = torch.compiler.is_compiling()
        cache = self._step_cache
        if compiling or not isinstance(params[0], nn.Parameter):
            matrices = Matrices(form_of(params), params)
        else:
            key = (*(p.data_ptr() for p in params), params[0].dtype)
            if cache.matrices_key != key:
                cache.matrices_key, cache.matrices = key, Matrices(self.form, params)
            matrices = cache.matrices
        if weight is None:
            return matrices, None
        if compiling or weight.requires_grad:
            return matrices, WeightViews(weight, self.groups)
        weight_key = (weight.data_ptr(), weight._version, weight.dtype, weight.shape)
        if cache.weight_key != weight_key:
            cache.weight_key, cache.views = weight_key, WeightViews(weight, self.groups)
        return matrices, cache.views

    def trains(self) -> bool:
        """Train mode, gradients on and a trainable parameter: a forward then yields a noise loss."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        for p in self._parameters.values():
            if p.requires_grad:
                return True
        return False

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, t={self.timestep}, form={self.form}"


# -- the converted layer's forward ------------------------------------------------------------------


def run_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the layer's own forward computes, with the given weight and bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if type(layer).__name__ == "Conv2dSame":  # timm: pads by the input's size first ("same")
        from timm.layers.conv2d_same import conv2d_same

        return conv2d_same(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return layer._conv_forward(x, weight, bias)


class DenoisedForward:
    """A converted layer's forward, set on the layer instance (its class's forward is untouched and
    comes back with `detach`): the layer on W′ and b′, and in training its noise loss queued."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        # The registries themselves, not `layer.parametrizations.weight[0]`: attribute lookups through
        # nn.Module cost more per call than the rest of a small layer's step.
        parametrization = layer._modules["parametrizations"]._modules["weight"]
        denoiser: LayerDenoiser = parametrization._modules["0"]
        weight = parametrization._parameters["original"]
        bias = layer._parameters["bias"] if "bias" in layer._parameters else layer.bias
        if not denoiser.enabled:
            return run_layer(layer, x, weight, bias)
        if not denoiser.trains():
            # Eval, or frozen denoisers (the alternating schedule's backbone phase): W′ from the
            # parametrization (cached inside `parametrize.cached()`), with autograd where it is on.
            return run_layer(layer, x, layer.weight, denoiser.shifted_bias(weight, bias))
        # Under `noise_loss_only` only the noise loss carries gradients: W′ and b′ go in as constants.
        task = not denoiser.noise_loss_only
        params = denoiser.step_matrices()
        own = denoiser._parameters  # e and a without nn.Module's attribute lookup
        if (denoiser.linear_step and not weight.requires_grad and (bias is None or not bias.requires_grad)
                and not torch.compiler.is_compiling()):
            rows = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
            fused_t, fused_bias, loss = LinearStep.apply(denoiser, task, rows, weight, bias, own["e"], own["a"], *params)
            denoiser.queue_loss(loss, denoiser.loss_scale(x))
            out = torch.addmm(fused_bias, rows, fused_t)  # F.linear, with the rows and W′ᵀ the step formed
            return out if x.ndim == 2 else out.view(*x.shape[:-1], out.shape[-1])
        noise = denoiser.noise if denoiser.sample_noise else None
        path = "input" if task and denoiser.prefers_input_path(x, weight) else "weight"
        out, fused_bias, loss = LayerStep.apply(denoiser, path, task, x, weight, bias, noise, own["e"], own["a"], *params)
        denoiser.queue_loss(loss, denoiser.loss_scale(x))
        return run_layer(layer, out, weight, fused_bias) if path == "input" else run_layer(layer, x, out, fused_bias)


def reference_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A converted layer computed step by step in float64, without any fused weight: pad the input
    as the layer would, take the reverse step ``c3 x − c1 D(x) + σ z`` at every position ("pad, then
    denoise"), then run the original layer unpadded. Slow; it is what `fuse` must equal (the
    benchmarks' fusion-error table measures against it)."""
    denoiser = denoiser_of(layer)
    if denoiser is None:
        raise ValueError(f"{type(layer).__name__} has no DenoiseRep denoiser; convert the model first")
    exact = copy.deepcopy(denoiser).double()
    weight = layer.parametrizations.weight.original.double()
    bias = None if layer.bias is None else layer.bias.double()
    if isinstance(layer, nn.Linear):
        return F.linear(exact.denoise(x.double().reshape(-1, exact.channels)).reshape(x.shape), weight, bias)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(x.double(), layer._reversed_padding_repeated_twice, mode=mode)
    channels_last = padded.movedim(1, -1)
    denoised = exact.denoise(channels_last.reshape(-1, exact.channels)).reshape(channels_last.shape).movedim(-1, 1)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[exact.spatial_dims]
    return conv(denoised, weight, bias, layer.stride, 0, layer.dilation, layer.groups)


def denoiser_of(layer: nn.Module) -> LayerDenoiser | None:
    """The `LayerDenoiser` parametrizing ``layer.weight``, if any."""
    parametrizations = getattr(layer, "parametrizations", None)
    if parametrizations is None or "weight" not in parametrizations:
        return None
    for p in parametrizations["weight"]:
        if isinstance(p, LayerDenoiser):
            return p
    return None


# Forwards whose noise losses may wait for a `denoise_loss` call (gradient accumulation);
# beyond that the oldest are dropped, so a loop that never collects them cannot leak graphs.
MAX_PENDING_LOSSES = 64


# Changes of module trees: every registration of a submodule anywhere (torch's global registration
# hook) and every `detach` (which precedes removing a parametrization). `convert.loss_modules` caches
# a model's denoisers per generation, so a training step does not search the model for them.
TREE = {"generation": 0}


def _tree_changed(*_) -> None:
    TREE["generation"] += 1


torch.nn.modules.module.register_module_module_registration_hook(_tree_changed)


def attach(layer: nn.Module, denoiser: LayerDenoiser) -> None:
    """Make ``layer`` compute the denoised path (train) / the fused-equivalent path (eval)."""
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", denoiser)
    layer.forward = DenoisedForward(layer)


def detach(layer: nn.Module) -> None:
    """Give the layer back its class's forward (the parametrization is removed by the caller)."""
    if isinstance(layer.__dict__.get("forward"), DenoisedForward):
        del layer.forward
    _tree_changed()
