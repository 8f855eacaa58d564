"""One converted layer's training forward as a single autograd Function, its backward written out.

For a layer ``y = layer(x; W, b)`` with denoiser ``D(x) = A x + c`` (``c = A e + a``; A full, or
``diag + U V``) at timestep t (s = √ᾱ_t, r = √(1−ᾱ_t)), a training forward computes

    weight path:  W′ = c3 W − c1 W A,   b′ = b + W u   (u = −c1 c + σ z),   y = layer(x; W′, b′)
    input path:   x̂ = c3 x − c1 A x,    b′ as above,                        y = layer(x̂; W, b′)
    noise loss:   mean |ε − (A x_t + c)|  on x.detach(), x_t = s x + r ε   (L1, L2 or L1+L2;
                  one ε per position, or the exact expectation over ε: `denoiserep.noise_loss`)

`LayerStep` returns (W′ or x̂, b′, the noise loss); the layer then runs on them under autograd as
usual. Its backward forms each denoiser parameter's gradient once, accumulating the noise loss's,
the task path's (through W′ or x̂ and b′) and c's contributions in place, one product per
contribution and no einsum, so that a step dispatches few operators: on a GPU, where these small
operators are launch-bound, their number is what a step costs (docs/architecture.md gives the budget
per layer). `LossStep` is the noise loss alone (label-free training, `LayerDenoiser.noise_loss`).

Layouts: a Linear's input is handled as rows (positions × channels) and A as a matrix (``mm``); a
ConvNd's input stays channels-first and A acts as a 1 × 1 convolution with the layer's groups, whose
weight gradient is one ``convolution_backward``. The parametrization (`LayerDenoiser.forward`) uses
the same `fused_weight`, so eval and `fuse` use exactly the training forward's W′.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _lazy:
    """A property computed once per object and then read from the instance's ``__dict__`` (a
    non-data descriptor: later reads cost no call). ``functools.cached_property`` does the same but
    takes a lock on Python < 3.12, which torch.compile cannot trace."""

    def __init__(self, method):
        self.method, self.name, self.__doc__ = method, method.__name__, method.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = self.method(obj)
        if not torch.compiler.is_compiling():  # traced once anyway; a traced autograd.Function mutates nothing
            obj.__dict__[self.name] = value
        return value


# -- scaled products and sums, safe under torch.compile --------------------------------------------
# Eager, the fused forms (``torch.addmm(..., beta, alpha)``, ``add(..., alpha)``) save operators.
# Under torch.compile they are written out: inductor (torch 2.14) fuses ``add(x, mm(a, b), alpha)``
# into an addmm and drops the alpha (pytorch/pytorch#167313), and fuses the written-out form as well.


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where it is a no-op (a step makes a dozen per layer, and
    at a GPU's small batches a step's Python is time the device waits)."""
    return t if t.dtype == dtype else t.to(dtype)


def axpy(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """x + alpha · y."""
    return x + y * alpha if _compiling() else torch.add(x, y, alpha=alpha)


def axpy_(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """x += alpha · y, in place."""
    return x.add_(y * alpha) if _compiling() else x.add_(y, alpha=alpha)


def addmm(x, a, b, *, beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """beta · x + alpha · a b."""
    if _compiling():
        return x * beta + (a @ b) * alpha
    return torch.addmm(x, a, b, beta=beta, alpha=alpha)


def addmm_(x, a, b, *, alpha: float = 1.0) -> torch.Tensor:
    return x.add_((a @ b) * alpha) if _compiling() else x.addmm_(a, b, alpha=alpha)


def addmv(x, m, v, *, beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    if _compiling():
        return (m @ v) * alpha if beta == 0 else x * beta + (m @ v) * alpha
    return torch.addmv(x, m, v, beta=beta, alpha=alpha)


def addmv_(x, m, v, *, alpha: float = 1.0) -> torch.Tensor:
    return x.add_((m @ v) * alpha) if _compiling() else x.addmv_(m, v, alpha=alpha)


def addr(x, u, v, *, beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """beta · x + alpha · u vᵀ."""
    if _compiling():
        return x * beta + torch.outer(u, v) * alpha
    return torch.addr(x, u, v, beta=beta, alpha=alpha)


def addr_(x, u, v, *, alpha: float = 1.0) -> torch.Tensor:
    return x.add_(torch.outer(u, v) * alpha) if _compiling() else x.addr_(u, v, alpha=alpha)


def baddbmm(x, a, b, *, beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    if _compiling():
        return x * beta + torch.bmm(a, b) * alpha
    return torch.baddbmm(x, a, b, beta=beta, alpha=alpha)


def baddbmm_(x, a, b, *, alpha: float = 1.0) -> torch.Tensor:
    return x.add_(torch.bmm(a, b) * alpha) if _compiling() else x.baddbmm_(a, b, alpha=alpha)


def scaled_complement(x: torch.Tensor, c3: float, c1: float) -> torch.Tensor:
    """c3 − c1 x."""
    return c3 - c1 * x if _compiling() else torch.rsub(x, c3, alpha=c1)


def form_of(params) -> str:
    """The form of a denoiser's matrix tensors: one A ("full") or diag, U, V ("low_rank")."""
    return "full" if len(params) == 1 else "low_rank"


class Matrices:
    """The denoiser's matrix parameters and the views of them a step uses: A (groups, d, d), or diag
    (groups, d), U (groups, d, r), V (groups, r, d); with one group also as plain matrices, and as
    1 × 1 convolution kernels. Views are formed on first use; `LayerDenoiser.step_operands` keeps
    them across steps (they stay valid while the parameters keep their storage)."""

    def __init__(self, form: str, params):
        self.form, self.params = form, params
        self.groups = params[0].shape[0]
        self._kept: dict[tuple, object] = {}
        if form == "full":
            self.A = params[0]
        else:
            self.diag, self.U, self.V = params

    @_lazy
    def A2(self) -> torch.Tensor:
        return self.A.view(self.A.shape[1:])

    @_lazy
    def A2t(self) -> torch.Tensor:
        return self.A2.t()

    @_lazy
    def flat(self) -> torch.Tensor:
        return self.A.view(-1)

    def _keep(self, key: tuple, make):
        """``make()``, formed once per key and kept (views stay valid while the parameters keep their
        storage); inside torch.compile formed anew, as the traced graph keeps nothing."""
        if torch.compiler.is_compiling():
            return make()
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def block(self, index: int, transposed: bool = False) -> torch.Tensor:
        """Parameter ``index``'s one (2-D) block, or its transpose: with one group the products are
        plain ``mm`` / ``mv``."""
        return self._keep(("block", index, transposed),
                          lambda: self.params[index][0].t() if transposed else self.params[index][0])

    @_lazy
    def diag_flat(self) -> torch.Tensor:
        return self.diag.view(-1)

    def kernel(self, index: int, matrix: torch.Tensor, unit: list[int]) -> torch.Tensor:
        """(groups, out, in) blocks as a grouped 1 × 1 convolution weight."""
        return self._keep(("kernel", index, len(unit)), lambda: matrix.reshape(-1, matrix.shape[-1], *unit))

    def dense(self) -> torch.Tensor:
        return self.A if self.form == "full" else torch.diag_embed(self.diag) + self.U @ self.V

    def mixing_kernel(self, c1: float, c3: float, spatial_dims: int) -> torch.Tensor:
        """(c3 I − c1 A)ᵀ as a 1 × 1 convolution kernel (full rank, one group): over a conv's W as its
        input (batch: outputs, spatial: kernel), conv(W, K)[o, j, k] = Σ_i (c3 I − c1 A)[i, j] W[o, i, k]."""
        unit = [1] * spatial_dims
        eye, a_t = self._keep(("mixing", c3, spatial_dims), lambda: (self.eye.mul(c3).view(*self.eye.shape, *unit),
                                                                     self.A2t.reshape(*self.A2t.shape, *unit)))
        return axpy(eye, a_t, -c1)

    def input_path_kernels(self, s: float, c1: float, c3: float, r: float, unit: list[int]):
        """(s A, c3 I − c1 A, I − r A) as 1 × 1 convolution kernels (`plain`), from one addcmul: conv(x, ·)
        of the first is the loss's s A x, of the second the denoised input (its input gradient
        c3 g − c1 Aᵀ g); the third is the loss's residual."""
        def constants():
            d = self.eye.shape[0]
            base = torch.stack([torch.zeros_like(self.eye), self.eye * c3, self.eye]).view(3, d, d, *unit)
            scales = torch.tensor([s, -c1, -r], dtype=self.eye.dtype, device=self.eye.device).view(3, 1, 1, *unit)
            return base, scales, self.A2.view(1, d, d, *unit)

        base, scales, a = self._keep(("input path", s, c1, c3, r, len(unit)), constants)
        return torch.addcmul(base, scales, a).unbind(0)

    @_lazy
    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.params[0].dtype, device=self.params[0].device)

    @_lazy
    def eye(self) -> torch.Tensor:
        d = self.params[0].shape[1]
        return torch.eye(d, dtype=self.params[0].dtype, device=self.params[0].device)

    @property
    def plain(self) -> bool:
        """Full rank with one group: A and its gradient are handled as one (d, d) matrix."""
        return self.form == "full" and self.groups == 1

    def residual(self, r: float) -> torch.Tensor:
        """I − r A per group, (groups, d, d), or (d, d) for `plain`."""
        return axpy(self.eye, self.A2 if self.plain else self.dense(), -r)


class WeightViews:
    """The layer's W as a step uses it: one (out, d) matrix where it is one (a Linear, an ungrouped
    1 × 1 convolution), its sum over the kernel positions, and their transposes. A frozen W's are kept
    across steps (`LayerDenoiser.step_operands`), the kernel sum only while W is unchanged."""

    def __init__(self, weight: torch.Tensor, groups: int):
        self.weight, self.groups = weight, groups
        self.kernel_positions = math.prod(weight.shape[2:])
        self.one_matrix = groups == 1 and self.kernel_positions == 1
        out, d = weight.shape[0], weight.shape[1]
        self.matrix = (weight if weight.ndim == 2 else weight.view(out, d)) if self.one_matrix else None
        self.sum = self.matrix if self.one_matrix else kernel_sum(weight)

    @_lazy
    def matrix_t(self) -> torch.Tensor:
        return self.matrix.t()

    @_lazy
    def sum_t(self) -> torch.Tensor:
        return self.sum.t()


# -- A at every position of the layer's input -----------------------------------------------------


class Pointwise:
    """A (or its factors) applied at every position of a tensor: rows (M, C), or channels-first
    (N, C, *spatial) with A as a grouped 1 × 1 convolution."""

    def __init__(self, groups: int, group_channels: int, spatial_dims: int):
        self.groups, self.d = groups, group_channels
        self.channels = groups * group_channels
        self.spatial_dims = spatial_dims
        self.conv = _CONVOLUTIONS.get(spatial_dims)  # None: rows
        self.unit = [1] * spatial_dims

    def positions(self, t: torch.Tensor) -> int:
        return t.numel() // self.channels

    def sum_positions(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over positions: (channels,)."""
        return t.sum(0) if self.conv is None else t.sum(dim=[0, *range(2, t.ndim)])

    def broadcast(self, vector: torch.Tensor) -> torch.Tensor:
        """A (channels,) vector shaped to broadcast against this layout."""
        return vector if self.conv is None else vector.view(-1, *self.unit)

    def _product(self, mats: Matrices, index: int, matrix: torch.Tensor, t, bias=None, transposed=None):
        """matrix t (+ bias) per group; rows only with one group (``transposed``: matrixᵀ in 2-D)."""
        if self.conv is None:
            right = transposed if transposed is not None else mats.block(index, transposed=True)
            return torch.mm(t, right) if bias is None else torch.addmm(bias, t, right)
        return self.conv(t, mats.kernel(index, matrix, self.unit), bias, groups=self.groups)

    def _product_grad(self, mats: Matrices, index: int, matrix: torch.Tensor, grad: torch.Tensor, t,
                      need_input: bool, need_matrix: bool = True, plain=None, need_sum: bool = False):
        """For p = matrix t, from ∂/∂p: (∂/∂t or None, ∂/∂matrix (2-D for rows, else the kernel's shape)),
        and with ``need_sum`` (convolutions only) the sum of ∂/∂p over positions, from the same call."""
        if self.conv is None:
            grad_t = torch.mm(grad, plain if plain is not None else mats.block(index)) if need_input else None
            return grad_t, torch.mm(grad.t(), t) if need_matrix else None
        grad_t, grad_kernel, grad_sum = self._convolution_backward(grad, t, mats.kernel(index, matrix, self.unit),
                                                                   [need_input, need_matrix, need_sum])
        return (grad_t, grad_kernel, grad_sum) if need_sum else (grad_t, grad_kernel)

    def _convolution_backward(self, grad: torch.Tensor, t: torch.Tensor, kernel: torch.Tensor, mask: list[bool]):
        """(∂t, ∂kernel, Σ ∂ over positions) of conv(t, kernel) (1 × 1, this layout's groups), as ``mask`` asks."""
        n = self.spatial_dims
        dtype = self._backward_dtype(grad, t)
        return torch.ops.aten.convolution_backward(
            cast(grad, dtype), cast(t, dtype), cast(kernel, dtype), [self.channels] if mask[2] else None, [1] * n,
            [0] * n, [1] * n, False, [0] * n, self.groups, mask)

    @staticmethod
    def _backward_dtype(grad: torch.Tensor, t: torch.Tensor) -> torch.dtype:
        # convolution_backward is not an autocast op: run it in the dtype autocast gave the forward.
        device = grad.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else _wider(grad.dtype, t.dtype)

    def apply(self, mats: Matrices, t: torch.Tensor, bias: torch.Tensor | None = None):
        """(A t + bias, what `apply_grad` needs besides t)."""
        if mats.form == "full":
            return self._product(mats, 0, mats.A, t, bias, mats.A2t if self.conv is None else None), None
        projected = self._product(mats, 2, mats.V, t)  # V t
        out = self._product(mats, 1, mats.U, projected, bias)
        return out.addcmul_(t, self.broadcast(mats.diag_flat)), projected

    def apply_grad(self, mats: Matrices, t: torch.Tensor, saved, grad: torch.Tensor) -> list[torch.Tensor]:
        """The matrix parameters' gradients (in their shapes) from ∂/∂(A t)."""
        if mats.form == "full":
            grad_matrix = self._product_grad(mats, 0, mats.A, grad, t, False)[1]
            return [grad_matrix if self.conv is None else grad_matrix.view(mats.A2.shape if mats.plain else mats.A.shape)]
        grad_projected, grad_u = self._product_grad(mats, 1, mats.U, grad, saved, True)
        grad_v = self._product_grad(mats, 2, mats.V, grad_projected, t, False)[1]
        grad_diag = self.sum_positions(grad * t)
        if self.conv is None:  # one group: kept 2-D (the step views them into the parameters' shapes once)
            return [grad_diag, grad_u, grad_v]
        return [grad_diag.view(mats.diag.shape), grad_u.view(mats.U.shape), grad_v.view(mats.V.shape)]

    def mean_and_denoised(self, mats: Matrices, t: torch.Tensor, c: torch.Tensor, s: float, c1: float, c3: float,
                          r: float):
        """(s A t + c, c3 t − c1 A t, the convolution kernel of the latter, I − r A as a kernel) for a
        `plain` A: each one product with its scale and bias inside (two addmm, or two 1 × 1
        convolutions); a Linear's last two are None."""
        c = cast(c, t.dtype)
        if self.conv is None:
            return addmm(c, t, mats.A2t, alpha=s), addmm(t, t, mats.A2t, beta=c3, alpha=-c1), None, None
        scaled, kernel, residual = mats.input_path_kernels(s, c1, c3, r, self.unit)
        return self.conv(t, scaled, c), self.conv(t, kernel), kernel, residual

    def sum_and_apply_grad(self, mats: Matrices, t: torch.Tensor, saved, grad: torch.Tensor):
        """(Σ over positions of ∂(A t + c), `apply_grad`): for a full-rank A on a convolution's input both
        from one convolution_backward (its bias gradient is the sum), where it runs in ∂'s own dtype."""
        if self.conv is None or mats.form != "full" or self._backward_dtype(grad, t) != grad.dtype:
            return self.sum_positions(grad), self.apply_grad(mats, t, saved, grad)
        _, grad_matrix, grad_sum = self._product_grad(mats, 0, mats.A, grad, t, False, need_sum=True)
        return grad_sum, [grad_matrix.view(mats.A2.shape if mats.plain else mats.A.shape)]

    def add_apply_grad(self, mats: Matrices, t: torch.Tensor, grad: torch.Tensor, grads: list) -> None:
        """∂A += Σ over positions ∂(A t) tᵀ, in place; full rank."""
        if self.conv is None:
            grads[0].addmm_(grad.t(), t)
        else:
            grads[0].add_(self._product_grad(mats, 0, mats.A, grad, t, False)[1].view(grads[0].shape))

    def denoised_input_grad(self, mats: Matrices, grad: torch.Tensor, t: torch.Tensor, c1: float,
                            c3: float, kernel: torch.Tensor | None = None) -> torch.Tensor:
        """∂/∂t of c3 t − c1 A t applied to g: c3 g − c1 Aᵀ g (full rank). ``kernel``: c3 I − c1 A as the
        forward's convolution kernel (`mean_and_denoised`), whose input gradient this is in one call."""
        if self.conv is None:
            return addmm(grad, grad, mats.A2, beta=c3, alpha=-c1)
        if kernel is not None:
            return self._convolution_backward(grad, t, kernel, [True, False, False])[0]
        into = self._product_grad(mats, 0, mats.A, grad, t, True, need_matrix=False)[0]
        return axpy_(into.mul_(-c1), grad, c3)

    def gram(self, mats: Matrices, t: torch.Tensor) -> torch.Tensor:
        """Σ over positions of t tᵀ per group: (d, d) for a `plain` A, else (groups, d, d)."""
        if self.conv is None:
            return torch.mm(t.t(), t)
        return self._product_grad(mats, 0, mats.A, t, t, False)[1].view(mats.A2.shape if mats.plain else mats.A.shape)

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(M, C): positions as rows, channels last."""
        return t if self.conv is None else t.movedim(1, -1).reshape(-1, self.channels)


# -- the denoiser as a matrix: c = A e + a, Aᵀ v, I − r A ------------------------------------------


def _matrix_vector(mats: Matrices, vector: torch.Tensor, *, bias: torch.Tensor | None = None,
                   transpose: bool = False, scale: float = 1.0) -> torch.Tensor:
    """scale · A v + bias, or Aᵀ v, per group, for (channels,) vectors."""
    g = mats.groups
    if mats.form == "full":
        if g == 1:
            matrix = mats.A2t if transpose else mats.A2
            return torch.mv(matrix, vector) if bias is None else addmv(bias, matrix, vector, alpha=scale)
        matrix = mats.A.mT if transpose else mats.A
        column = vector.view(g, -1, 1)
        if bias is None:
            return torch.bmm(matrix, column).view(-1)
        return baddbmm(bias.view(g, -1, 1), matrix, column, alpha=scale).view(-1)
    # diag ∘ v + U (V v), with the bias and scale inside the outer product's addmv / baddbmm.
    if g == 1:
        if transpose:
            low = torch.mv(mats.block(2, transposed=True), torch.mv(mats.block(1, transposed=True), vector))
        elif bias is None:
            low = torch.mv(mats.block(1), torch.mv(mats.block(2), vector))
        else:
            low = addmv(bias, mats.block(1), torch.mv(mats.block(2), vector), alpha=scale)
    else:
        column = vector.view(g, -1, 1)
        if transpose:
            low = torch.bmm(mats.V.mT, torch.bmm(mats.U.mT, column)).view(-1)
        elif bias is None:
            low = torch.bmm(mats.U, torch.bmm(mats.V, column)).view(-1)
        else:
            low = baddbmm(bias.view(g, -1, 1), mats.U, torch.bmm(mats.V, column), alpha=scale).view(-1)
    return low.addcmul_(mats.diag_flat, vector, value=scale if bias is not None else 1.0)


def constant(mats: Matrices, e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """c = A e + a."""
    return _matrix_vector(mats, e, bias=a)


def add_constant_grad(mats: Matrices, e: torch.Tensor, grad_c: torch.Tensor, grads: list) -> torch.Tensor:
    """c = A e + a: ∂A (or its factors) += ∂c eᵀ in place; returns ∂e = Aᵀ ∂c (∂a is ∂c)."""
    g = mats.groups
    if mats.form == "full":
        if g == 1:
            grads[0].addr_(grad_c, e)
        else:
            grads[0].baddbmm_(grad_c.view(g, -1, 1), e.view(g, 1, -1))
    elif g == 1:
        dtype = grads[1].dtype  # the small products below may come out of autocast in bf16
        grads[0].addcmul_(grad_c, e)  # (1, d) or (d,) += (d,)
        _one_block(grads[1]).addr_(grad_c, torch.mv(mats.block(2), e).to(dtype))  # ∂U += ∂c (V e)ᵀ
        projected = torch.mv(mats.block(1, transposed=True), grad_c)  # Uᵀ ∂c
        _one_block(grads[2]).addr_(projected.to(dtype), e)  # ∂V += (Uᵀ ∂c) eᵀ
        return torch.mv(mats.block(2, transposed=True), projected).addcmul_(mats.diag_flat, grad_c)  # Aᵀ ∂c
    else:
        gc, ev = grad_c.view(g, -1, 1), e.view(g, 1, -1)
        dtype = grads[1].dtype
        grads[0].addcmul_(grad_c.view(mats.diag.shape), e.view(mats.diag.shape))
        grads[1].baddbmm_(gc, torch.bmm(mats.V, ev.mT).mT.to(dtype))
        grads[2].baddbmm_(torch.bmm(mats.U.mT, gc).to(dtype), ev)
    return _matrix_vector(mats, grad_c, transpose=True)


def _one_block(grad: torch.Tensor) -> torch.Tensor:
    """A one-group gradient as its 2-D block, whether kept 2-D or in the parameter's shape."""
    return grad if grad.ndim == 2 else grad[0]


def dense_grad(mats: Matrices, grad_dense: torch.Tensor) -> list[torch.Tensor]:
    """The matrix parameters' gradients from ∂/∂A (A dense, per group)."""
    if mats.form == "full":
        return [grad_dense]
    return [torch.diagonal(grad_dense, dim1=-2, dim2=-1).clone(), grad_dense @ mats.V.mT, mats.U.mT @ grad_dense]


# -- W′ = c3 W − c1 W A and b′ = b + W u ------------------------------------------------------------


def _weight_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A ConvNd (out, in/groups, *k) weight as rows (groups, out/groups · k, in/groups)."""
    out, d = weight.shape[0], weight.shape[1]
    return weight.reshape(groups, out // groups, d, -1).transpose(2, 3).reshape(groups, -1, d)


def _weight_from_rows(rows: torch.Tensor, shape: torch.Size, groups: int) -> torch.Tensor:
    out, d = shape[0], shape[1]
    return rows.reshape(groups, out // groups, -1, d).transpose(2, 3).reshape(shape)


def fused_weight(groups: int, weight: torch.Tensor, form: str, params, c1: float, c3: float,
                 mats: Matrices | None = None, views: WeightViews | None = None) -> torch.Tensor:
    """W′ = W (c3 I − c1 A) per conv group, in W's layout and dtype."""
    return fused_weight_and_kernel(groups, weight, form, params, c1, c3, mats, views)[0]


def fused_weight_and_kernel(groups: int, weight: torch.Tensor, form: str, params, c1: float, c3: float,
                            mats: Matrices | None = None,
                            views: WeightViews | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`fused_weight`, and the `Matrices.mixing_kernel` it convolved W with (None where it did not):
    its backward needs it."""
    if mats is None or params[0].dtype != weight.dtype:
        mats = Matrices(form, [p.to(weight.dtype) for p in params])
    views = views or WeightViews(weight, groups)
    if views.one_matrix:  # one matrix product
        rows = views.matrix
        if form == "full":
            fused = addmm(rows, rows, mats.A2, beta=c3, alpha=-c1)
        else:
            fused = addmm(rows * scaled_complement(mats.diag_flat, c3, c1), torch.mm(rows, mats.block(1)),
                          mats.block(2), alpha=-c1)
        return (fused if weight.ndim == 2 else fused.view(weight.shape)), None
    if groups == 1 and form == "full":
        # W's input channels contract with c3 I − c1 A as a 1 × 1 convolution over W itself. (A low-rank
        # A that is no larger than W steps as a full one, `LayerDenoiser.dense_low_rank`; a wider one
        # goes through W's rows, out · k of them, fewer than its d.)
        kernel = mats.mixing_kernel(c1, c3, weight.ndim - 2)
        return _CONVOLUTIONS[weight.ndim - 2](weight, kernel), kernel
    rows = _weight_rows(weight, groups)
    if form == "full":
        fused = baddbmm(rows, rows, mats.A, beta=c3, alpha=-c1)
    else:
        scaled = rows * scaled_complement(mats.diag, c3, c1).unsqueeze(1)
        fused = baddbmm(scaled, rows @ mats.U, mats.V, alpha=-c1)
    return _weight_from_rows(fused, weight.shape, groups), None


def add_fused_weight_grad(groups: int, weight: torch.Tensor, mats: Matrices, c1: float, c3: float,
                          grad: torch.Tensor, grads: list, need_weight: bool,
                          views: WeightViews, kernel: torch.Tensor | None = None) -> torch.Tensor | None:
    """From ∂/∂W′: the matrix parameters' gradients added in place (∂A += −c1 Wᵀ ∂W′ per group);
    returns ∂/∂W (c3 ∂W′ − c1 ∂W′ Aᵀ) when ``need_weight``. ``kernel``: the forward's mixing kernel."""
    grad = cast(grad, weight.dtype)
    if views.one_matrix:
        grad_rows = grad if grad.ndim == 2 else grad.view(views.matrix.shape)
        if mats.form == "full":
            addmm_(grads[0], views.matrix_t, grad_rows, alpha=-c1)
        else:  # ∂A = −c1 Wᵀ ∂W′ =: −c1 C: ∂diag = −c1 diag(C), ∂U = −c1 C Vᵀ, ∂V = −c1 Uᵀ C
            cross = torch.mm(views.matrix_t, grad_rows).to(grads[1].dtype)
            axpy_(grads[0], torch.diagonal(cross), -c1)
            addmm_(_one_block(grads[1]), cross, mats.block(2, transposed=True), alpha=-c1)
            addmm_(_one_block(grads[2]), mats.block(1, transposed=True), cross, alpha=-c1)
        if not need_weight:
            return None
        return addmm(grad_rows, grad_rows, mats.dense()[0].t(), beta=c3, alpha=-c1).view(weight.shape)
    if groups == 1 and mats.form == "full":
        n = weight.ndim - 2
        if kernel is None:
            kernel = mats.mixing_kernel(c1, c3, n)
        grad_weight, grad_kernel, _ = torch.ops.aten.convolution_backward(
            grad, weight, kernel, None, [1] * n, [0] * n, [1] * n, False, [0] * n, 1, [need_weight, True, False])
        axpy_(grads[0], grad_kernel.view(mats.A2.shape).t(), -c1)  # K = c3 I − c1 Aᵀ
        return grad_weight
    rows, grad_rows = _weight_rows(weight, groups), _weight_rows(grad, groups)
    if mats.form == "full":
        baddbmm_(grads[0], rows.mT, grad_rows, alpha=-c1)
    else:
        for index, value in enumerate(dense_grad(mats, torch.bmm(rows.mT, grad_rows).mul_(-c1))):
            into = grads[index]  # kept 2-D where the loss's rows gave one group's 2-D blocks
            into.add_((value if value.shape == into.shape else value.view(into.shape)).to(into.dtype))
    if not need_weight:
        return None
    return _weight_from_rows(baddbmm(grad_rows, grad_rows, mats.dense().mT, beta=c3, alpha=-c1), weight.shape,
                             groups)


def kernel_sum(weight: torch.Tensor) -> torch.Tensor:
    """W summed over its kernel positions: (out, d)."""
    if weight.ndim == 2:
        return weight
    if math.prod(weight.shape[2:]) == 1:
        return weight.view(weight.shape[0], weight.shape[1])
    return weight.sum(dim=list(range(2, weight.ndim)))


def shifted_bias(weight_sum: torch.Tensor, bias: torch.Tensor | None, vector: torch.Tensor, groups: int,
                 scale: float, zero: torch.Tensor | None = None) -> torch.Tensor:
    """b′ = b + scale · Σ_k W[:, :, k] v, per group (v: (channels,); ``zero``: a 0-dim zero to stand in
    for a missing b in one ``addmv``)."""
    vector = cast(vector, weight_sum.dtype)
    if groups == 1:
        if bias is None:
            if zero is not None and zero.dtype == weight_sum.dtype:
                return addmv(zero, weight_sum, vector, beta=0, alpha=scale)
            return torch.mv(weight_sum, vector).mul_(scale)
        return addmv(bias, weight_sum, vector, alpha=scale)
    out = weight_sum.shape[0]
    product = torch.bmm(weight_sum.view(groups, out // groups, -1), vector.view(groups, -1, 1)).view(out)
    return product.mul_(scale) if bias is None else axpy(bias, product, scale)


def add_shifted_bias_grad(views: WeightViews, grad: torch.Tensor, groups: int, scale: float,
                          grad_c: torch.Tensor | None) -> torch.Tensor:
    """grad_c + scale · Σ_k W[:, :, k]ᵀ ∂b′ per group (in place when grad_c is given)."""
    grad = cast(grad, views.sum.dtype)
    if groups == 1:
        if grad_c is None:
            return torch.mv(views.sum_t, grad).mul_(scale)
        return addmv_(grad_c, views.sum_t, cast(grad, grad_c.dtype), alpha=scale)
    out = views.sum.shape[0]
    product = torch.bmm(views.sum.view(groups, out // groups, -1).mT, grad.view(groups, -1, 1)).view(-1)
    return product.mul_(scale) if grad_c is None else axpy_(grad_c, product, scale)


# -- the noise losses: value and state, then (∂c, the parameters' gradients) -------------------------


def _wider(first: torch.dtype, second: torch.dtype) -> torch.dtype:
    """The more precise of two floating dtypes (without dispatching ``torch.promote_types``)."""
    if first == second:
        return first
    return max(first, second, key=lambda dtype: torch.finfo(dtype).bits + (dtype == torch.float16))


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """float32 at least for sums over many elements (bf16 / fp16 under autocast)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sampled(pointwise: Pointwise, mats: Matrices, c, rows, s: float, r: float, loss_type: str):
    scaled_noise = torch.normal(0.0, r, rows.shape, dtype=rows.dtype, device=rows.device)  # r ε
    noisy = axpy(scaled_noise, rows, s)  # x_t = s x + r ε
    predicted, saved = pointwise.apply(mats, noisy, cast(c, noisy.dtype))
    residuals = _as_float(axpy_(predicted, scaled_noise, -1.0 / r))  # A x_t + c − ε
    return _sampled_value(residuals, loss_type), ("sampled", residuals, noisy, saved)


def _sampled_value(residuals: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Σ |res| (L1), Σ res² (L2) or both."""
    if loss_type == "l1":
        return torch.linalg.vector_norm(residuals, 1)
    value = torch.linalg.vector_norm(residuals).square()
    return value + torch.linalg.vector_norm(residuals, 1) if loss_type == "l1+l2" else value


def _sampled_residual_grad(residuals: torch.Tensor, grad: torch.Tensor, loss_type: str) -> torch.Tensor:
    if loss_type == "l1":
        return torch.sign(residuals).mul_(grad)
    if loss_type == "l2":
        return residuals.mul(grad * 2)
    return axpy_(torch.sign(residuals), residuals, 2.0).mul_(grad)


def _sampled_grad(pointwise: Pointwise, mats: Matrices, state, grad: torch.Tensor, loss_type: str):
    _, residuals, noisy, saved = state
    grad_residuals = cast(_sampled_residual_grad(residuals, grad, loss_type), noisy.dtype)
    return pointwise.sum_and_apply_grad(mats, noisy, saved, grad_residuals)


def _per_position(pointwise: Pointwise, mats: Matrices, c, rows, s: float, r: float, loss_type: str, product=None,
                  mean=None, res=None):
    """Exact expectation over ε from each position's mean m = s A x + c and the channels' variance
    v_j = ‖row j of (I − r A)‖² (``product``: A x, or ``mean`` itself, when the input path has it already;
    ``res``: I − r A in any shape, for L2)."""
    saved = None
    if mean is None:
        if product is None:
            product, saved = pointwise.apply(mats, rows)
        mean = axpy(pointwise.broadcast(cast(c, product.dtype)), product, s)
    mean = _as_float(mean)
    if res is None or loss_type != "l2":
        res = mats.residual(r)
    count = mean.numel()
    positions = count // pointwise.channels
    state = {"kind": "per_position", "res": res, "count": count, "saved": saved, "rows": rows, "mean": mean}
    value = None
    if loss_type in ("l2", "l1+l2"):  # M Σ_j v_j + Σ m², with Σ_j v_j = ‖I − r A‖²_F
        norm_res, norm_mean = torch._foreach_norm([res, mean])  # both norms in one operator
        norm = cast(norm_res, mean.dtype)
        value = torch.addcmul(norm_mean.square(), norm, norm, value=positions)
    if loss_type in ("l1", "l1+l2"):
        # E|N(m, σ²)| = σ √(2/π) exp(−w²) + m erf(w), w = m / (σ √2); σ_j = ‖row j of I − r A‖ ≥ 1e-6.
        norms = torch.linalg.vector_norm(res, dim=-1)
        sigma = cast(norms if norms.ndim == 1 else norms.view(-1), mean.dtype).clamp_min_(1e-6)
        zero = mats.zero if mats.zero.dtype == mean.dtype else mean.new_zeros(())
        spread = pointwise.broadcast(sigma)
        w = torch.addcdiv(zero, mean, spread, value=math.sqrt(0.5))
        gauss = torch.addcmul(zero, w, w, value=-1.0).exp_()
        erf = w.erf_()
        gauss_sum = pointwise.sum_positions(gauss)
        l1 = torch.mul(mean, erf).addcmul_(gauss, spread, value=math.sqrt(2 / math.pi)).sum()  # Σ E|N(m, σ²)|
        value = l1 if value is None else value.add_(l1)
        # ∂/∂σ_j = √(2/π) Σ gauss, and σ_j² = Σ_i res_ji², ∂res/∂A = −r: ∂/∂A_ji = −r res_ji ∂σ_j / σ_j.
        per_row = torch.addcdiv(zero, gauss_sum, sigma, value=-r * math.sqrt(2 / math.pi))
        state.update(erf=erf, res_scale=cast(per_row.view(*res.shape[:-1], 1), res.dtype))
    return value, state


def _per_position_grad(pointwise: Pointwise, mats: Matrices, state, grad: torch.Tensor, s: float, r: float,
                       loss_type: str, product_grad: bool = False):
    """(∂c, the parameters' gradients, ∂/∂(A x) if ``product_grad`` (then not yet in the parameters'))."""
    count, res, mean = state["count"], state["res"], state["mean"]
    scale = grad
    groups = pointwise.groups
    if loss_type == "l2":
        grad_mean = mean.mul(scale * 2)
        grad_res = res.mul(scale * (-2 * r * (count // pointwise.channels)))  # −r ∂/∂res of M ‖res‖²
    else:
        grad_mean = state["erf"].mul(scale)
        grad_res = res.mul(state["res_scale"]).mul_(scale)
        if loss_type == "l1+l2":
            grad_mean.add_(mean.mul(scale * 2))
            grad_res.add_(res.mul(scale * (-2 * r * (count // pointwise.channels))))
    grads = dense_grad(mats, grad_res)
    grad_c = pointwise.sum_positions(grad_mean)
    grad_product = grad_mean.mul_(s)
    if product_grad:
        return grad_c, grads, grad_product
    rows = state["rows"]
    for index, value in enumerate(pointwise.apply_grad(mats, rows, state["saved"], cast(grad_product, rows.dtype))):
        grads[index] = grads[index].add_(cast(value, grads[index].dtype))
    return grad_c, grads, None


def _gram(pointwise: Pointwise, mats: Matrices, c, rows, s: float, r: float):
    """Expected L2 of a full-rank denoiser through the positions' centred Gram matrix S (float32 at
    least), M d² + d³ instead of 2 M d²: with P = s² A S + M r² A − 2 r M I (one addmm),
    M (‖I − rA‖² + ‖s A x̄ + c‖²) + s² ⟨A, A S⟩ = ⟨A, P⟩ + M ‖s A x̄ + c‖² + M · channels."""
    with torch.autocast(rows.device.type, enabled=False):
        rows = _as_float(rows)
        exact = mats if mats.A.dtype == rows.dtype else Matrices("full", [mats.A.to(rows.dtype)])
        count = pointwise.positions(rows)
        mean_row = rows.mean(0) if pointwise.conv is None else rows.mean(dim=[0, *range(2, rows.ndim)])
        gram = pointwise.gram(exact, rows - pointwise.broadcast(mean_row))
        # M r² A − 2 r M I = −2 r M (I − (r / 2) A): the count rides in the product's beta
        base = axpy(exact.eye, exact.A2 if exact.plain else exact.A, -r / 2)
        if exact.plain:
            product = addmm(base, exact.A2, gram, beta=-2 * r * count, alpha=s * s)
        else:
            product = baddbmm(base, exact.A, gram, beta=-2 * r * count, alpha=s * s)
        offset = _matrix_vector(exact, mean_row, bias=cast(c, rows.dtype), scale=s)  # s A x̄ + c
        value = axpy(torch.vdot(exact.flat, product.view(-1)), torch.vdot(offset, offset), count)
    return value.add_(count * pointwise.channels), ("gram", product, offset, mean_row, count)


def _gram_grad(pointwise: Pointwise, mats: Matrices, state, grad: torch.Tensor, s: float, r: float):
    """∂A = 2 g (P + r M I) + 2 g M s (s A x̄ + c) x̄ᵀ, ∂c = 2 g M (s A x̄ + c)."""
    _, product, offset, mean_row, count = state
    zero = mats.zero if mats.zero.dtype == offset.dtype else offset.new_zeros(())
    grad_offset = torch.addcmul(zero, offset, grad, value=2 * count)
    scaled = torch.mul(axpy(product, mats.eye, r * count), grad)
    g = pointwise.groups
    if g == 1:
        return grad_offset, [addr(scaled, grad_offset, mean_row, beta=2.0, alpha=s)]
    return grad_offset, [baddbmm(scaled, grad_offset.view(g, -1, 1), mean_row.view(g, 1, -1), beta=2.0, alpha=s)]


def loss_forward(den, mats: Matrices, c, rows, pointwise: Pointwise, product=None, mean=None, res=None):
    """The denoiser's noise loss on ``rows`` (its layout: ``pointwise``), summed over its elements
    (positions × channels; the caller divides: `LayerDenoiser.loss_elements`); value (0-dim), state."""
    s, r = den.sqrt_alpha_bar, den.sqrt_one_minus_alpha_bar
    if den.estimator == "sampled":
        return _sampled(pointwise, mats, c, rows, s, r, den.loss_type)
    if product is None and mean is None and mats.form == "full" and den.loss_type == "l2" \
            and pointwise.d < pointwise.positions(rows):
        return _gram(pointwise, mats, c, rows, s, r)
    return _per_position(pointwise, mats, c, rows, s, r, den.loss_type, product, mean, res)


def loss_backward(den, mats: Matrices, state, pointwise: Pointwise, grad: torch.Tensor, product_grad: bool = False):
    """(∂c, the matrix parameters' gradients, ∂/∂(A x) for the input path or None)."""
    s, r = den.sqrt_alpha_bar, den.sqrt_one_minus_alpha_bar
    kind = state[0] if isinstance(state, tuple) else state["kind"]
    if kind == "sampled":
        return (*_sampled_grad(pointwise, mats, state, grad, den.loss_type), None)
    if kind == "gram":
        return (*_gram_grad(pointwise, mats, state, grad, s, r), None)
    return _per_position_grad(pointwise, mats, state, grad, s, r, den.loss_type, product_grad)


# -- the Functions ---------------------------------------------------------------------------------


def _autocast_state(device: str) -> tuple:
    enabled = torch.is_autocast_enabled(device)
    return device, torch.get_autocast_dtype(device) if enabled else None, enabled


def _as_in_forward(ctx, backward, *args):
    """``backward(ctx, *args)`` under the autocast state the forward ran in (a backward runs outside
    the forward's autocast region); a context is entered only where the state differs."""
    device, dtype, enabled = ctx.autocast
    if not enabled and not torch.is_autocast_enabled(device):
        return backward(ctx, *args)
    with torch.autocast(device, dtype=dtype, enabled=enabled):
        return backward(ctx, *args)


def _in_dtypes(grads: list, params) -> list[torch.Tensor]:
    return [cast(g, p.dtype) for g, p in zip(grads, params)]


def _as_parameters(grads: list, params) -> list[torch.Tensor]:
    """The gradients in the parameters' shapes (a `plain` A's and one-group factors' were accumulated 2-D)."""
    return [g if g is None or g.shape == p.shape else g.view(p.shape) for g, p in zip(grads, params)]


class LowRankDense(torch.autograd.Function):
    """A = diag(a) + U V of a one-group low-rank denoiser as one (1, d, d) block, for the layers whose
    step runs it as a full-rank A (`LayerDenoiser.dense_low_rank`): two products forward, two back,
    against the factors' own path through every product of the step. ``mats``: the factors' kept views."""

    @staticmethod
    def forward(ctx, mats: Matrices, diag, U, V):
        ctx.mats = mats
        with torch.autocast(diag.device.type, enabled=False):  # A in the parameters' dtype, as a full one
            dense = torch.addmm(torch.diag(mats.diag_flat), mats.block(1), mats.block(2))
        return dense.view(1, *dense.shape)

    @staticmethod
    def backward(ctx, grad):
        mats = ctx.mats
        need_diag, need_u, need_v = ctx.needs_input_grad[1:]
        # ∂a as a contiguous (1, d) copy of the diagonal: a strided view would make the autograd engine
        # allocate and copy one itself, two operators instead of this one.
        grad_diag = torch.diagonal(grad, dim1=-2, dim2=-1).contiguous() if need_diag else None
        grad = grad.view(grad.shape[1:])
        with torch.autocast(grad.device.type, enabled=False):
            grad_u = torch.mm(grad, mats.block(2, transposed=True)).view(mats.U.shape) if need_u else None
            grad_v = torch.mm(mats.block(1, transposed=True), grad).view(mats.V.shape) if need_v else None
        return None, grad_diag, grad_u, grad_v


class LossStep(torch.autograd.Function):
    """The noise loss alone, on a layer input x (detached): `LayerDenoiser.noise_loss`, label-free steps."""

    @staticmethod
    def forward(ctx, den, x, e, a, *params):
        rows, pointwise = den.loss_positions(x)
        mats = den.step_operands(params)[0]
        value, state = loss_forward(den, mats, constant(mats, e, a), cast(rows, params[0].dtype), pointwise)
        ctx.den, ctx.state, ctx.pointwise, ctx.mats = den, state, pointwise, mats
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(e, *params)
        return value

    @staticmethod
    def backward(ctx, grad):
        return _as_in_forward(ctx, LossStep._backward, grad)

    @staticmethod
    def _backward(ctx, grad):
        e, *params = ctx.saved_tensors
        grad_c, grads, _ = loss_backward(ctx.den, ctx.mats, ctx.state, ctx.pointwise, grad)
        grads = _in_dtypes(grads, params)
        grad_c = grad_c.to(e.dtype)
        grad_e = add_constant_grad(ctx.mats, e, grad_c, grads)
        return None, None, grad_e, grad_c, *_as_parameters(grads, params)


class LayerStep(torch.autograd.Function):
    """(W′ or x̂, b′, noise loss) of one layer's training forward (``path``: "weight" or "input"; with
    ``task`` False, as under `noise_loss_only`, W′ and b′ carry no gradient). Inputs after the
    settings: x, W, b (or None), σ z (or None), e, a, then A (or diag, U, V)."""

    @staticmethod
    def forward(ctx, den, path: str, task: bool, x, weight, bias, noise, e, a, *params):
        groups, c1, c3 = den.groups, den.c1, den.c3
        pointwise = den.pointwise
        mats, views = den.step_operands(params, weight)
        c = constant(mats, e, a)
        if noise is None:
            bias_prime = shifted_bias(views.sum, bias, c, groups, -c1, mats.zero)
        else:
            bias_prime = shifted_bias(views.sum, bias, axpy(noise, c, -c1), groups, 1.0, mats.zero)
        ctx.den, ctx.path, ctx.noise, ctx.mats, ctx.views = den, path, noise, mats, views
        ctx.autocast = _autocast_state(x.device.type)
        if path == "weight":
            out, ctx.kernel = fused_weight_and_kernel(groups, weight, mats.form, params, c1, c3, mats, views)
            rows, loss_layout = den.loss_positions(x)
            value, state = loss_forward(den, mats, c, cast(rows, params[0].dtype), loss_layout)
        elif mats.plain and den.loss_fraction_is_one:  # the loss's mean and the denoised input, one product each
            inputs = cast(den.layer_positions(x), params[0].dtype)
            mean, denoised, ctx.denoise_kernel, res = pointwise.mean_and_denoised(
                mats, inputs, c, den.sqrt_alpha_bar, c1, c3, den.sqrt_one_minus_alpha_bar)
            out = cast(den.from_layer_positions(denoised, x), x.dtype)
            loss_layout, ctx.index = pointwise, None
            value, state = loss_forward(den, mats, c, None, loss_layout, mean=mean, res=res)
        else:  # full rank, expected estimator: the loss reuses the task path's A x
            inputs = cast(den.layer_positions(x), params[0].dtype)
            product, _ = pointwise.apply(mats, inputs)
            out = cast(den.from_layer_positions(axpy_(product.mul(-c1), inputs, c3), x), x.dtype)
            shared, loss_layout, index = den.loss_positions_of_product(product)
            value, state = loss_forward(den, mats, c, None, loss_layout, product=shared)
            ctx.index, ctx.denoise_kernel = index, None
        ctx.state, ctx.loss_layout = state, loss_layout
        ctx.save_for_backward(x, weight, bias, e, c, *params)
        ctx.set_materialize_grads(False)  # an output without a gradient arrives as None, not as zeros
        if not task:
            ctx.mark_non_differentiable(out, bias_prime)
        return out, bias_prime, value

    @staticmethod
    def backward(ctx, grad_out, grad_bias_prime, grad_loss):
        return _as_in_forward(ctx, LayerStep._backward, grad_out, grad_bias_prime, grad_loss)

    @staticmethod
    def _backward(ctx, grad_out, grad_bias_prime, grad_loss):
        den, path, mats = ctx.den, ctx.path, ctx.mats
        groups, c1, c3 = den.groups, den.c1, den.c3
        pointwise = den.pointwise
        x, weight, bias, e, c, *params = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[3:6]
        grad_x = grad_weight = grad_bias = None
        grads = grad_c = grad_product = None
        if grad_bias_prime is not None and need_weight:
            vector = c if ctx.noise is None else axpy(ctx.noise, c, -c1)
            grad_weight = _bias_weight_grad(weight, grad_bias_prime, vector, groups, -c1 if ctx.noise is None else 1.0)
        if path == "input" and ctx.index is None and mats.plain and den.loss_type != "l1+l2" \
                and grad_out is not None and grad_bias_prime is not None and grad_loss is not None:
            grad_x, grad_e, grad_c, grads = _input_path_grads(ctx, x, e, params, grad_out, grad_bias_prime, grad_loss,
                                                              need_x)
            return (None, None, None, grad_x, grad_weight, grad_bias_prime if need_bias else None, None, grad_e, grad_c,
                    *_as_parameters(grads, params))
        if grad_loss is not None:
            grad_c, grads, loss_product = loss_backward(den, mats, ctx.state, ctx.loss_layout, grad_loss,
                                                        product_grad=path == "input")
            grads = _in_dtypes(grads, params)
            grad_c = cast(grad_c, e.dtype)
            if loss_product is not None:
                grad_product = den.product_grad_at_positions(loss_product, ctx.index, x)
        if grads is None:
            grads = [torch.zeros(mats.A2.shape if mats.plain and i == 0 else p.shape, dtype=p.dtype,
                                 device=p.device) for i, p in enumerate(params)]
        if grad_bias_prime is not None:
            grad_c = add_shifted_bias_grad(ctx.views, grad_bias_prime, groups, -c1, grad_c)
            if need_bias:
                grad_bias = grad_bias_prime
        if path == "weight":
            if grad_out is not None:
                grad_w = add_fused_weight_grad(groups, weight, mats, c1, c3, grad_out, grads, need_weight, ctx.views,
                                               ctx.kernel)
                if grad_w is not None:
                    grad_weight = grad_w if grad_weight is None else grad_weight.add_(grad_w)
        elif grad_out is not None or grad_product is not None:
            inputs = cast(den.layer_positions(x), params[0].dtype)
            total = grad_product
            if grad_out is not None:
                grad_denoised = cast(den.layer_positions(grad_out), params[0].dtype)
                total = grad_denoised.mul(-c1) if total is None else axpy_(total, grad_denoised, -c1)
                if need_x:
                    grad_x = pointwise.denoised_input_grad(mats, grad_denoised, inputs, c1, c3)
                    grad_x = cast(den.from_layer_positions(grad_x, x), x.dtype)
            pointwise.add_apply_grad(mats, inputs, cast(total, grads[0].dtype), grads)
        grad_e = grad_a = None
        if grad_c is not None:
            grad_a = cast(grad_c, e.dtype)
            grad_e = add_constant_grad(mats, e, grad_a, grads)
        return None, None, None, grad_x, grad_weight, grad_bias, None, grad_e, grad_a, *_as_parameters(grads, params)


class LinearStep(torch.autograd.Function):
    """`LayerStep` for the paper's setting on a Linear with a frozen W and b: full-rank A, the sampled
    noise loss (on every row or a token fraction), W′ formed. The same operators in the same dtypes as the general step,
    written out without its dispatch on settings: at a GPU's small batches a step's Python is time
    the device waits, and a ViT runs this on every layer. Eager only (under torch.compile, where the
    Python is traced away, the general step runs), so the fused forms are called directly.
    Inputs: x, W, b (or None), e, a, A."""

    @staticmethod
    def forward(ctx, den, task: bool, x, weight, bias, e, a, matrix):
        c1, c3, s, r = den.c1, den.c3, den.sqrt_alpha_bar, den.sqrt_one_minus_alpha_bar
        mats, views = den.step_operands((matrix,), weight)
        fusing = mats if matrix.dtype == weight.dtype else Matrices("full", [matrix.to(weight.dtype)])
        c = torch.addmv(a, mats.A2, e)
        c_w = cast(c, weight.dtype)
        if bias is not None:
            bias_prime = torch.addmv(bias, weight, c_w, alpha=-c1)
        elif mats.zero.dtype == weight.dtype:
            bias_prime = torch.addmv(mats.zero, weight, c_w, beta=0, alpha=-c1)
        else:
            bias_prime = torch.mv(weight, c_w).mul_(-c1)
        # W′ᵀ = c3 Wᵀ − c1 Aᵀ Wᵀ: the layer then runs as one addmm on the rows, with no transpose.
        fused_t = torch.addmm(views.matrix_t, fusing.A2t, views.matrix_t, beta=c3, alpha=-c1)
        rows = cast(den.loss_rows(x), matrix.dtype)
        scaled_noise = torch.normal(0.0, r, rows.shape, dtype=rows.dtype, device=rows.device)  # r ε
        noisy = torch.add(scaled_noise, rows, alpha=s)  # x_t = s x + r ε
        predicted = torch.addmm(cast(c, noisy.dtype), noisy, mats.A2t)
        residuals = _as_float(predicted.add_(scaled_noise, alpha=-1.0 / r))  # A x_t + c − ε
        value = _sampled_value(residuals, den.loss_type)
        ctx.den, ctx.mats, ctx.views = den, mats, views
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(e, residuals, noisy)
        ctx.set_materialize_grads(False)
        if not task:
            ctx.mark_non_differentiable(fused_t, bias_prime)
        return fused_t, bias_prime, value

    @staticmethod
    def backward(ctx, grad_fused_t, grad_bias_prime, grad_loss):
        return _as_in_forward(ctx, LinearStep._backward, grad_fused_t, grad_bias_prime, grad_loss)

    @staticmethod
    def _backward(ctx, grad_fused_t, grad_bias_prime, grad_loss):
        e, residuals, noisy = ctx.saved_tensors
        den, mats, views = ctx.den, ctx.mats, ctx.views
        c1 = den.c1
        if grad_loss is None:
            grad_c = torch.zeros_like(e)
            grad_matrix = torch.zeros(mats.A2.shape, dtype=e.dtype, device=e.device)
        else:
            grad_residuals = cast(_sampled_residual_grad(residuals, grad_loss, den.loss_type), noisy.dtype)
            grad_c, grad_matrix = grad_residuals.sum(0), torch.mm(grad_residuals.t(), noisy)
            grad_c, grad_matrix = cast(grad_c, e.dtype), cast(grad_matrix, e.dtype)
        if grad_bias_prime is not None:
            grad_bias_prime = cast(cast(grad_bias_prime, views.sum.dtype), grad_c.dtype)  # by W's dtype, as the general step
            grad_c.addmv_(views.sum_t, grad_bias_prime, alpha=-c1)
        if grad_fused_t is not None:  # ∂/∂A of −c1 Aᵀ Wᵀ: −c1 Wᵀ Gᵀ
            grad_fused_t = cast(grad_fused_t, views.matrix.dtype)
            grad_matrix.addmm_(views.matrix_t, grad_fused_t.t(), alpha=-c1)
        grad_matrix.addr_(grad_c, e)  # c = A e + a
        grad_e = torch.mv(mats.A2t, grad_c)
        return None, None, None, None, None, grad_e, grad_c, grad_matrix.view(1, *grad_matrix.shape)


def _input_path_grads(ctx, x, e, params, grad_out, grad_bias_prime, grad_loss, need_x: bool):
    """`LayerStep`'s input path for a `plain` A on every position, expected L1 or L2, with every output
    used: (∂x or None, ∂e, ∂c = ∂a, [∂A]). The loss's ∂/∂m (m = s A x + c: 2 g m for L2, g erf(w) for
    L1) and the task's ∂x̂ (x̂ = c3 x − c1 A x) meet in one ``addcmul`` as −1/c1 times ∂/∂(A x), so that
    the loss's gradient g rides in tensor products and the scales in their ``value`` / ``beta``:
    ∂A = −c1 (Σ total xᵀ + k_res g R) + ∂c eᵀ, ∂c = k g Σ signal − c1 W_sumᵀ ∂b′."""
    den, mats, state, pointwise, views = ctx.den, ctx.mats, ctx.state, ctx.loss_layout, ctx.views
    s, r, c1, c3 = den.sqrt_alpha_bar, den.sqrt_one_minus_alpha_bar, den.c1, den.c3
    dtype = params[0].dtype
    inputs = cast(den.layer_positions(x), dtype)
    grad_denoised = cast(den.layer_positions(grad_out), dtype)
    if den.loss_type == "l2":
        signal, k = state["mean"], 2.0
        residual, residual_scale = state["res"], 2 * r * (state["count"] // pointwise.channels) / c1
    else:  # l1: ∂/∂res = res_scale · res
        signal, k = state["erf"], 1.0
        residual, residual_scale = state["res"].mul(state["res_scale"]), -1.0 / c1
    total = torch.addcmul(grad_denoised, signal, grad_loss, value=-k * s / c1)  # −(1/c1) ∂/∂(A x)
    if pointwise.conv is None:
        product_grad = torch.mm(total.t(), inputs)
    else:  # a kernel's shape, as the L2 residual kernel's (a view for L1's 2-D one)
        product_grad = pointwise._product_grad(mats, 0, mats.A, total, inputs, False)[1]
        if product_grad.shape != residual.shape:
            product_grad = product_grad.view(residual.shape)
    weighted = cast(torch.mul(pointwise.sum_positions(signal), grad_loss), views.sum.dtype)  # g Σ signal
    grad_c = cast(addmv(weighted, views.sum_t, cast(grad_bias_prime, views.sum.dtype), beta=k, alpha=-c1), e.dtype)
    grad_matrix = torch.addcmul(cast(product_grad, residual.dtype), residual, grad_loss, value=residual_scale)
    if grad_matrix.ndim != 2:
        grad_matrix = grad_matrix.view(mats.A2.shape)
    grad_matrix = addr(cast(grad_matrix, e.dtype), grad_c, e, beta=-c1)
    grad_e = torch.mv(mats.A2t, grad_c)
    grad_x = None
    if need_x:
        grad_x = pointwise.denoised_input_grad(mats, grad_denoised, inputs, c1, c3, ctx.denoise_kernel)
        grad_x = cast(den.from_layer_positions(grad_x, x), x.dtype)
    return grad_x, grad_e, grad_c, _in_dtypes([grad_matrix], params)


def _bias_weight_grad(weight: torch.Tensor, grad_bias: torch.Tensor, vector: torch.Tensor, groups: int,
                      scale: float) -> torch.Tensor:
    """∂/∂W of scale · Σ_k W[:, :, k] v: scale · ∂b′[o] v[group(o), i] at every kernel position."""
    out, d = weight.shape[0], weight.shape[1]
    outer = grad_bias.view(groups, out // groups, 1) * vector.view(groups, 1, d).to(grad_bias.dtype)
    outer = outer.reshape(out, d).mul_(scale)
    return outer.view(out, d, *[1] * (weight.ndim - 2)).expand_as(weight).clone()
