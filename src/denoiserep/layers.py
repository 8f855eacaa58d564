"""The per-layer denoiser and its exact fused form.

A layer ``Y = W X + b`` (Linear or ConvNd) gets a denoiser that acts on the layer's input
channels at a fixed timestep ``t``::

    D(X) = A (X + e) + a                     # A: block-diagonal per conv group, e: one learned vector
    X̂   = c3 · X − c1 · D(X) + σ z           # one DDPM reverse step (σ z = 0 unless sampled)
    Y    = W X̂ + b = W' X + b'
    W'   = W (c3 I − c1 A),   b' = b + W (−c1 (A e + a) + σ z)

`LayerDenoiser` is registered as a ``torch.nn.utils.parametrize`` parametrization of the
layer's ``weight`` (so ``layer.weight`` *is* W′ and the task path trains A through it), and
two hooks on the layer add the bias shift and accumulate the noise-prediction loss.

Two exact ways to train through a layer (``path``), chosen per call by their cost when ``"auto"``:
"weight" forms W′ (out · k · d² multiply-adds, forward and backward again, whatever the batch);
"input" denoises the input instead, X ↦ c3 X − c1 A X, and runs the layer on W (M · d² for M
input positions, twice more backward) — and then the noise loss reuses that same A X. Outside
training, and when only the noise loss trains (`noise_loss_only`), it is always "weight".

Convolutions: the denoiser is applied pointwise to the **padded** input ("pad, then denoise").
For reflect/replicate/circular padding this equals "denoise, then pad"; for zero padding it
is the only exactly fusable choice (the constant term then also lands on padded pixels and
becomes a pure bias shift of ``Σ_{i,k} W[o, i, k] · u_i``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .noise_loss import SharedProduct, expected_l2_from_gram, expected_loss, noise_prediction_loss, residual_variance
from .schedule import StepCoefficients


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
        self.loss_type = loss
        self.loss_token_fraction = loss_token_fraction
        self.estimator = estimator
        self.path = path
        # True only inside this layer's own forward call when the input path runs: the layer then
        # reads W, since its input is already denoised. Any other read of ``layer.weight`` gets W′.
        self._input_path_call = False
        self.following_norm: str | None = None  # set by convert(): a BatchNorm fed by this layer
        self._pending_losses: list[torch.Tensor] = []
        self._warned_uncollected = False
        # Set by `convert.noise_loss_only`: the forward then computes W′ and the bias shift
        # without recording them for autograd (label-free training needs no task gradient).
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

    # -- the denoiser as a matrix ---------------------------------------------------------
    def matrix(self) -> torch.Tensor:
        """A as (groups, d, d) blocks; ``(A x)_j = Σ_i A[g, j, i] x_i`` within group g."""
        if self.form == "full":
            return self.A
        return torch.diag_embed(self.A_diag) + self.U @ self.V

    def constant(self) -> torch.Tensor:
        """``A e + a``: the part of D(x) = A (x + e) + a that does not depend on x."""
        return self.apply_matrix(self.e.unsqueeze(0)).squeeze(0) + self.a

    def apply_matrix(self, rows: torch.Tensor) -> torch.Tensor:
        """``A x`` for rows of shape (M, channels), without forming A in the low-rank case."""
        x = rows.reshape(rows.shape[0], self.groups, self.group_channels)
        if self.form == "full":
            y = torch.einsum("mgi,gji->mgj", x, self.A)
        else:
            y = x * self.A_diag + torch.einsum("mgr,gjr->mgj", torch.einsum("mgi,gri->mgr", x, self.V), self.U)
        return y.reshape(rows.shape)

    def denoise(self, rows: torch.Tensor) -> torch.Tensor:
        """The unfused reverse step on input rows (M, channels): ``c3 x − c1 D(x) + σ z``."""
        predicted = self.apply_matrix(rows) + self.constant()
        return self.c3 * rows - self.c1 * predicted + self.noise

    # -- fusion ---------------------------------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """W′ = W (c3 I − c1 A) = c3 W − c1 W A, per conv group; once per forward, batch-independent.

        Written as one fused multiply-add on the weight's rows (no identity matrix); the
        low-rank form never builds the dense d × d matrix: W′ = W diag(c3 − c1 a) − c1 (W U) V.
        `fuse` calls this same function, so fused weights are the ones the training forward used.
        """
        if self._input_path_call or not self.enabled:
            return weight
        with torch.no_grad() if self.noise_loss_only else contextlib.nullcontext():
            return self._fused_weight(weight)

    def _fused_weight(self, weight: torch.Tensor) -> torch.Tensor:
        rows = _weight_rows(weight, self.groups)  # (groups, out/groups · kernel, d)
        if self.form == "full":
            fused = torch.baddbmm(rows, rows, self.A.to(rows.dtype), beta=self.c3, alpha=-self.c1)
        else:
            scaled = rows * (self.c3 - self.c1 * self.A_diag.to(rows.dtype)).unsqueeze(1)
            fused = torch.baddbmm(scaled, rows @ self.U.to(rows.dtype), self.V.to(rows.dtype), alpha=-self.c1)
        return _weight_from_rows(fused, weight.shape, self.groups)

    def bias_shift(self, weight: torch.Tensor) -> torch.Tensor:
        """``W u`` with ``u = −c1 (A e + a) + σ z``, summed over the kernel (shape: out_features)."""
        u = (-self.c1 * self.constant() + self.noise).reshape(self.groups, self.group_channels)
        kernel_sum = weight.sum(dim=tuple(range(2, weight.ndim))) if weight.ndim > 2 else weight
        per_group = kernel_sum.reshape(self.groups, -1, self.group_channels)
        return torch.einsum("goi,gi->go", per_group, u.to(per_group.dtype)).reshape(-1)

    # -- training signal ------------------------------------------------------------------
    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as rows (positions, channels): the positions the noise loss sees.

        Every token of a Linear input, every (unpadded) pixel of a conv input; the noise loss
        and `denoiserep.calibrate` both average over exactly these rows.
        """
        channel_axis = x.ndim - 1 - self.spatial_dims
        return x.detach().movedim(channel_axis, -1).reshape(-1, self.channels)

    def noise_loss(self, x: torch.Tensor) -> torch.Tensor:
        """``|ε − D(√ᾱ x + √(1−ᾱ) ε)|`` on the layer's detached input, at this layer's t: one ε per
        position (``estimator="sampled"``) or its exact expectation over ε (``"expected"``)."""
        rows = self._loss_rows(self.input_rows(x).to(self.a.dtype))
        s, r = self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar
        if self.estimator == "expected":
            if self.form == "full" and self.loss_type == "l2" and self.group_channels < rows.shape[0]:
                return expected_l2_from_gram(rows, self.A, self.constant(), s, r)
            mean = torch.add(self.constant(), self.apply_matrix(rows), alpha=s)  # the residual's mean, negated
            return expected_loss(mean, residual_variance(self.matrix(), r), self.loss_type)
        eps = torch.randn_like(rows)
        noisy = s * rows + r * eps
        # A (x + e) + a with A applied to the rows and to e separately: the constant A e + a is
        # then one vector, and no (rows × channels) sum is materialised for autograd.
        predicted = self.apply_matrix(noisy) + self.constant()
        return noise_prediction_loss(predicted.float(), eps.float(), self.loss_type)

    def _loss_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.loss_token_fraction < 1.0:
            # The loss is an expectation over positions: a random subset estimates it unbiasedly.
            keep = max(1, int(rows.shape[0] * self.loss_token_fraction))
            rows = rows[torch.randint(rows.shape[0], (keep,), device=rows.device)]
        return rows

    # -- the input path -------------------------------------------------------------------
    def prefers_input_path(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether denoising this call's input costs fewer multiply-adds than forming W′, each with
        its backward and the expected noise loss. On the input path the layer runs on the frozen W,
        so its own weight gradient (out · k · d per output position), which W′ needs, is not formed.
        The input path needs the full-rank A and the expected estimator, whose loss it computes from
        the task path's own A x."""
        if self.path == "weight" or self.form != "full" or self.estimator != "expected":
            return False
        if self.path == "input":
            return True
        g, d = self.groups, self.group_channels
        positions = x.numel() // self.channels
        loss_positions = positions * self.loss_token_fraction
        weight_path = 2 * weight.shape[0] * weight[0, 0].numel() * d * d
        if self.loss_type == "l2" and d < loss_positions:
            weight_path += g * (loss_positions * d * d + d**3)  # Gram + A S
        else:
            weight_path += 2 * g * loss_positions * d * d  # A x and its backward
        input_path = (3 if x.requires_grad else 2) * g * positions * d * d
        if not weight.requires_grad:
            input_path -= (positions // self.stride_product) * weight.shape[0] * weight[0, 0].numel() * d
        return input_path < weight_path

    def denoise_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input path: ``c3 x − c1 A x`` (the bias shift is added after the layer, as in the
        weight path), and the expected noise loss from the same ``A x``, queued for `denoise_loss`."""
        channel_axis = x.ndim - 1 - self.spatial_dims
        channels_last = x.movedim(channel_axis, -1)
        rows = channels_last.reshape(-1, self.groups, self.group_channels).to(self.A.dtype)
        product, detached_product = SharedProduct.apply(rows, self.A)
        denoised = (self.c3 * rows - self.c1 * product).to(x.dtype)
        s, r = self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar
        mean = torch.add(self.constant(), self._loss_rows(detached_product.reshape(-1, self.channels)), alpha=s)
        self._queue_loss(expected_loss(mean, residual_variance(self.A, r), self.loss_type))
        return denoised.reshape(channels_last.shape).movedim(-1, channel_axis)

    def _queue_loss(self, loss: torch.Tensor) -> None:
        if len(self._pending_losses) >= MAX_PENDING_LOSSES:
            self._pending_losses.pop(0)
            if not self._warned_uncollected:
                warnings.warn(
                    f"{MAX_PENDING_LOSSES} training forwards ran without denoiserep.denoise_loss(model) being "
                    "called; the oldest noise losses are being dropped. Call denoise_loss(model) after each "
                    "forward (or put the model in eval mode / freeze the denoisers when not training them).",
                    stacklevel=3,
                )
                self._warned_uncollected = True
        self._pending_losses.append(loss)

    def pop_losses(self) -> list[torch.Tensor]:
        losses, self._pending_losses = self._pending_losses, []
        return losses

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, t={self.timestep}, form={self.form}"


def _weight_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A Linear (out, in) or ConvNd (out, in/groups, *k) weight as rows (groups, out/groups · k, in/groups)."""
    out, d = weight.shape[0], weight.shape[1]
    kernel = weight[0, 0].numel()
    per_group = weight.reshape(groups, out // groups, d, kernel)
    return per_group.transpose(2, 3).reshape(groups, -1, d)


def _weight_from_rows(rows: torch.Tensor, shape: torch.Size, groups: int) -> torch.Tensor:
    out, d = shape[0], shape[1]
    per_group = rows.reshape(groups, out // groups, -1, d)
    return per_group.transpose(2, 3).reshape(shape)


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


def denoise_pre_hook(layer: nn.Module, args: tuple) -> tuple | None:
    """While the denoiser trains (train mode, grads on): queue the noise loss, and on the input
    path hand the layer its denoised input."""
    denoiser = denoiser_of(layer)
    if not (denoiser.enabled and denoiser.training and torch.is_grad_enabled()
            and any(p.requires_grad for p in denoiser.parameters())):
        return None
    x = args[0]
    if not denoiser.noise_loss_only and denoiser.prefers_input_path(x, layer.parametrizations.weight.original):
        denoised = denoiser.denoise_input(x)
        denoiser._input_path_call = True
        return (denoised, *args[1:])
    denoiser._queue_loss(denoiser.noise_loss(x))
    return None


def bias_shift_hook(layer: nn.Module, args: tuple, output: torch.Tensor | None) -> torch.Tensor | None:
    """Add the denoiser's constant term; ``W′`` (or the denoised input) did the rest. Runs even when
    the layer's forward raised (``output`` is then None), to end an input-path call."""
    denoiser = denoiser_of(layer)
    denoiser._input_path_call = False
    if output is None or not denoiser.enabled:
        return None
    with torch.no_grad() if denoiser.noise_loss_only else contextlib.nullcontext():
        shift = denoiser.bias_shift(layer.parametrizations.weight.original)
    return output + shift.reshape(-1, *([1] * denoiser.spatial_dims)).to(output.dtype)


def attach(layer: nn.Module, denoiser: LayerDenoiser) -> None:
    """Make ``layer`` compute the denoised path (train) / the fused-equivalent path (eval)."""
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", denoiser)
    layer.register_forward_pre_hook(denoise_pre_hook)
    layer.register_forward_hook(bias_shift_hook, always_call=True)


def detach(layer: nn.Module) -> None:
    """Remove the hooks that `attach` registered (the parametrization is removed by the caller)."""
    for hooks, hook in ((layer._forward_pre_hooks, denoise_pre_hook), (layer._forward_hooks, bias_shift_hook)):
        for key in [k for k, fn in hooks.items() if fn is hook]:
            del hooks[key]
            layer._forward_hooks_always_called.pop(key, None)
