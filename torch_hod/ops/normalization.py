"""Normalisation ops: layer_norm, rms_norm, batch_norm, with derivatives of every order.

All three are ``y = x̂ ⊙ γ + β`` with a normalised input ``x̂ = N(x)``; they differ only in which
dims the statistics reduce over (``dims``, with ``M`` elements) and whether the mean is removed:

* layer_norm:             ``x̂ = (x − μ) r``, ``r = 1/√(σ² + ε)``, over the trailing ``normalized_shape``
* rms_norm:               ``x̂ = x r``,       ``r = 1/√(mean(x²) + ε)``, over the trailing dims
* batch_norm (training):  as layer_norm, over ``(N, *spatial)`` per channel (biased ``σ²``)
* batch_norm (eval):      ``x̂ = (x − running_mean) / √(running_var + ε)``, affine in ``x``

The Jacobian of ``x̂`` w.r.t. ``x`` is symmetric, so one linear map serves as both VJP and JVP
(:func:`_normalize_jacobian`)::

    J g = r (g − mean(g) − x̂ mean(g ⊙ x̂))      (centred, batch statistics)
    J g = r (g − x̂ mean(g ⊙ x̂))                (rms)
    J g = r g                                  (fixed statistics: batch_norm eval)

    backward:  x̄ = J(ȳ ⊙ γ),   γ̄ = Σ ȳ ⊙ x̂,   β̄ = Σ ȳ    (Σ over the dims γ is broadcast along)
    tangent:   ẏ = γ ⊙ J ẋ + γ̇ ⊙ x̂ + β̇

Both are written in plain differentiable torch ops and recompute ``x̂`` and ``r`` from the saved
input (two reductions), so a higher-order pass keeps one copy of the input. The forward runs the
fused built-in (``native_layer_norm``/``native_batch_norm``) and also keeps its per-row/per-channel
``mean`` and ``rstd`` (non-differentiable, as the built-ins do); a backward whose result nothing
will differentiate (no ``create_graph``, no forward-mode tangent) runs ATen's fused first-order
kernel on them (layer_norm, batch_norm), exactly PyTorch's own first-order path.
The Taylor rule of each op is :func:`_composite` (mean/mul/rsqrt/add on Jets), which is also the
reference the tests differentiate by reverse^k.

In training mode ``batch_norm`` updates ``running_mean``/``running_var`` in place, as torch does
(``running ← (1 − momentum)·running + momentum·batch``, unbiased variance for the update), outside
the differentiable Function and without autograd history.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_hod.ops.function import HigherOrderFunction, public_op, records_nothing, require_floats, saved_primals

__all__ = ["layer_norm", "rms_norm", "batch_norm"]

ShapeLike = Union[int, Sequence[int], torch.Size]

aten = torch.ops.aten


@dataclass(frozen=True)
class _Norm:
    """What a normalisation reduces over; the whole op is determined by this and ``eps``.

    ``kind``: "layer", "rms" or "batch"; ``shape``: layer/rms ``normalized_shape``;
    ``training``: batch_norm uses batch statistics (else the running ones).
    """

    kind: str
    eps: float
    shape: Tuple[int, ...] = ()
    training: bool = True

    def dims(self, x: Tensor) -> Tuple[int, ...]:
        """Dims the statistics reduce over."""
        if self.kind == "batch":
            return (0,) + tuple(range(2, x.dim()))
        return tuple(range(-len(self.shape), 0))

    def param_view(self, p: Tensor, x: Tensor) -> Tensor:
        """γ, β (or a running stat) viewed to broadcast against ``x``."""
        return p.view(-1, *([1] * (x.dim() - 2))) if self.kind == "batch" else p

    def sum_to_param(self, t: Tensor) -> Tensor:
        """Σ of ``t`` over the dims a parameter is broadcast along (its gradient)."""
        if self.kind == "batch":
            return t.sum(self.dims(t))
        lead = t.dim() - len(self.shape)
        return t.sum(tuple(range(lead))) if lead else t


def _statistics(norm: _Norm, x: Tensor, rm: Optional[Tensor], rv: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(x̂, r)``: the normalised input and the reciprocal std, in differentiable ops."""
    if norm.kind == "batch" and not norm.training:
        r = torch.rsqrt(norm.param_view(rv, x) + norm.eps)
        return (x - norm.param_view(rm, x)) * r, r
    dims = norm.dims(x)
    c = x - x.mean(dims, keepdim=True) if norm.kind != "rms" else x
    r = torch.rsqrt((c * c).mean(dims, keepdim=True) + norm.eps)
    return c * r, r


def _normalize_jacobian(norm: _Norm, g: Tensor, xhat: Tensor, r: Tensor) -> Tensor:
    """``J g`` with ``J = ∂x̂/∂x`` (symmetric, so this is both the VJP and the JVP of ``x̂``)."""
    if norm.kind == "batch" and not norm.training:
        return r * g
    dims = norm.dims(g)
    out = g - xhat * (g * xhat).mean(dims, keepdim=True)
    if norm.kind != "rms":
        out = out - g.mean(dims, keepdim=True)
    return r * out


def _fused_backward(norm: _Norm, gy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    rm: Optional[Tensor], rv: Optional[Tensor], mean: Tensor, rstd: Tensor,
                    need: Tuple[bool, bool, bool]) -> Tuple[Optional[Tensor], ...]:
    """``(x̄, γ̄, β̄)`` by ATen's fused first-order kernels, from the forward's saved ``mean``/``rstd``
    (layer_norm and batch_norm only: ATen's rms_norm backward has no CPU kernel, and torch's own CPU
    rms_norm backward is a composite, like ours)."""
    if norm.kind == "layer":
        return aten.native_layer_norm_backward(gy, x, norm.shape, mean, rstd, weight, bias, list(need))
    if norm.training:
        return aten.native_batch_norm_backward(gy, x, weight, None, None, mean, rstd, True, norm.eps, list(need))
    return aten.native_batch_norm_backward(gy, x, weight, rm, rv, None, None, False, norm.eps, list(need))


class NormalizeFunction(HigherOrderFunction):
    """``(y, mean, rstd)`` with ``y = N(x) ⊙ γ + β`` for a :class:`_Norm`; the running stats (eval)
    are constants. ``mean`` and ``rstd`` are the fused forward's per-row (layer) or per-channel
    (batch, training) statistics, private outputs kept only for the fused first-order backward
    (empty for rms_norm and eval batch_norm): the public ops return ``y`` alone, so nothing ever
    differentiates them, and their rules ignore them (zero tangent, cotangent dropped). They are
    not marked non-differentiable because torch's generated vmap rule rejects the ``None`` tangent
    that would then be required (``jvp(vmap(op))``)."""

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], rm: Optional[Tensor],
                rv: Optional[Tensor], norm: _Norm) -> Tuple[Tensor, Tensor, Tensor]:
        if norm.kind == "layer":
            return aten.native_layer_norm(x, norm.shape, weight, bias, norm.eps)
        if norm.kind == "batch" and norm.training:
            return aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, norm.eps)
        if norm.kind == "rms":
            y = F.rms_norm(x, norm.shape, weight, norm.eps)
        else:
            y = F.batch_norm(x, rm, rv, weight, bias, False, 0.0, norm.eps)
        return y, y.new_empty(0), y.new_empty(0)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight, bias, rm, rv, norm = inputs
        _, mean, rstd = output
        ctx.norm = norm
        ctx.save_for_backward(x, weight, bias, rm, rv, mean, rstd)
        ctx.save_for_forward(x, weight, bias, rm, rv, mean, rstd)

    @staticmethod
    def backward(ctx: Any, gy: Tensor, *_: Any) -> Tuple[Optional[Tensor], ...]:
        x, weight, bias, rm, rv, mean, rstd = ctx.saved_tensors
        norm: _Norm = ctx.norm
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if norm.kind != "rms" and records_nothing(gy, x, weight):
            grads = _fused_backward(norm, gy, x, weight, bias, rm, rv, mean, rstd, (need_x, need_w, need_b))
            return (*grads, None, None, None)
        gb = norm.sum_to_param(gy) if need_b else None
        xhat, r = _statistics(norm, x, rm, rv)
        gx = gw = None
        if need_x:
            g = gy if weight is None else gy * norm.param_view(weight, x)
            gx = _normalize_jacobian(norm, g, xhat, r)
        if need_w:
            gw = norm.sum_to_param(gy * xhat)
        return gx, gw, gb, None, None, None

    @staticmethod
    def tangent(ctx: Any, dx: Optional[Tensor], dw: Optional[Tensor], db: Optional[Tensor], *_: Any) -> Tensor:
        x, weight, _, rm, rv, mean, rstd = saved_primals(ctx)
        norm: _Norm = ctx.norm
        xhat, r = _statistics(norm, x, rm, rv)
        dy = torch.zeros_like(xhat)
        if dx is not None:
            dxhat = _normalize_jacobian(norm, dx, xhat, r)
            dy = dy + (dxhat if weight is None else dxhat * norm.param_view(weight, x))
        if dw is not None:
            dy = dy + xhat * norm.param_view(dw, x)
        if db is not None:
            dy = dy + norm.param_view(db, x)
        return dy, torch.zeros_like(mean), torch.zeros_like(rstd)  # the statistics' tangents: unused


# ----------------------------------------------------------------------------------- validation


def _check_eps(op: str, eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"torch_hod.ops.{op}: eps must be a finite number ≥ 0, got {eps!r}")
    return float(eps)


def _check_param(op: str, arg: str, p: Optional[Tensor], expected: Tuple[int, ...], x: Tensor, why: str = "") -> None:
    """``p`` must be None or a floating tensor of shape ``expected`` with ``x``'s dtype."""
    if p is None:
        return
    require_floats(op, **{arg: p})
    if tuple(p.shape) != tuple(expected):
        raise ValueError(f"torch_hod.ops.{op}: {arg} must have shape {tuple(expected)}{why}, got {tuple(p.shape)}")
    if p.dtype != x.dtype:
        raise TypeError(f"torch_hod.ops.{op}: {arg} has dtype {p.dtype}, expected the input's dtype {x.dtype}")


def _check_trailing(op: str, x: Tensor, normalized_shape: ShapeLike) -> Tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    if not shape or x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(
            f"torch_hod.ops.{op}: normalized_shape={list(shape)} must be non-empty and equal the input's "
            f"trailing dims; got input of shape {tuple(x.shape)} (expected shape [*, {', '.join(map(str, shape))}])"
        )
    return shape


def _layer_args(x: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: Any) -> _Norm:
    require_floats("layer_norm", input=x)
    shape = _check_trailing("layer_norm", x, normalized_shape)
    _check_param("layer_norm", "weight", weight, shape, x)
    _check_param("layer_norm", "bias", bias, shape, x)
    return _Norm("layer", _check_eps("layer_norm", eps), shape)


def _rms_args(x: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor], eps: Any) -> _Norm:
    require_floats("rms_norm", input=x)
    shape = _check_trailing("rms_norm", x, normalized_shape)
    _check_param("rms_norm", "weight", weight, shape, x)
    eps = torch.finfo(x.dtype).eps if eps is None else _check_eps("rms_norm", eps)
    return _Norm("rms", eps, shape)


def _batch_args(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: Any,
                eps: Any) -> _Norm:
    op = "batch_norm"
    require_floats(op, input=x)
    if x.dim() < 2:
        raise ValueError(
            f"torch_hod.ops.{op}: input must have shape (N, C, *spatial) with ≥ 2 dims, got {tuple(x.shape)}")
    channels = (x.shape[1],)
    for arg, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_param(op, arg, p, channels, x, f" (one entry per channel of the input {tuple(x.shape)})")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"torch_hod.ops.{op}: give both running_mean and running_var or neither")
    if training:
        if x.numel() // x.shape[1] <= 1:
            raise ValueError(
                f"torch_hod.ops.{op}: Expected more than 1 value per channel when training, got input of "
                f"shape {tuple(x.shape)} (N × spatial = 1); use eval mode or a larger batch"
            )
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError(f"torch_hod.ops.{op}: momentum must be a number, got {momentum!r}")
    else:
        if running_mean is None:
            raise ValueError(
                f"torch_hod.ops.{op}: running_mean and running_var are required in eval mode "
                "(training=False); pass them, or use training=True for batch statistics"
            )
        if running_mean.requires_grad or running_var.requires_grad:
            raise ValueError(f"torch_hod.ops.{op}: running_mean/running_var are constants and must not require grad")
    return _Norm("batch", _check_eps(op, eps), training=bool(training))


# ------------------------------------------------------------------ composites (Taylor rules)


def _composite(norm: _Norm, x: Any, weight: Optional[Any], bias: Optional[Any], rm: Optional[Tensor] = None,
               rv: Optional[Tensor] = None) -> Any:
    """``x̂ ⊙ γ + β`` in elementary torch ops (mean, mul, rsqrt, add): the Taylor rule of every op
    (it runs on Jets) and, differentiated by reverse^k, the reference of the tests."""
    y = _statistics(norm, x, rm, rv)[0]
    if weight is not None:
        y = y * norm.param_view(weight, x)
    return y if bias is None else y + norm.param_view(bias, x)


def _layer_norm_composite(input: Any, normalized_shape: ShapeLike, weight: Optional[Any] = None,
                          bias: Optional[Any] = None, eps: float = 1e-5) -> Any:
    """``(x − mean(x)) / √(mean((x − mean x)²) + ε) ⊙ γ + β`` over the trailing dims (Taylor rule)."""
    return _composite(_layer_args(input, normalized_shape, weight, bias, eps), input, weight, bias)


def _rms_norm_composite(input: Any, normalized_shape: ShapeLike, weight: Optional[Any] = None,
                        eps: Optional[float] = None) -> Any:
    """``x / √(mean(x²) + ε) ⊙ γ`` over the trailing dims (Taylor rule)."""
    return _composite(_rms_args(input, normalized_shape, weight, eps), input, weight, None)


def _update_running_stats(x: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float) -> None:
    """``running ← (1 − m) running + m batch`` in place, unbiased variance, no autograd history.

    ``x`` may be a Taylor-mode Jet (from the Taylor rule) or carry torch.func grad/jvp levels: the
    update uses its primal value. Under vmap the update is refused, as torch does: one set of running
    stats cannot take a different update per vmapped sample (pass running stats of None there)."""
    from torch_hod.taylor.engine import value  # imported late: the engine is not needed otherwise

    x = value(x)
    while torch._C._functorch.is_functorch_wrapped_tensor(x):
        if torch._C._functorch.is_batchedtensor(x):
            raise RuntimeError(
                "torch_hod.ops.batch_norm: training-mode running statistics cannot be updated in place "
                "under vmap (one running_mean/running_var, a batch of inputs); pass running_mean=None "
                "and running_var=None inside vmap, or update the statistics outside it"
            )
        x = torch._C._functorch.get_unwrapped(x)
    with torch.no_grad():
        aten.batch_norm_update_stats(x, running_mean, running_var, momentum)


def _batch_norm_composite(input: Any, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          weight: Optional[Any] = None, bias: Optional[Any] = None, training: bool = False,
                          momentum: float = 0.1, eps: float = 1e-5) -> Any:
    """Per channel, ``(x − μ) / √(σ² + ε) ⊙ γ + β`` with batch (training) or running (eval) stats."""
    norm = _batch_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if training:
        if running_mean is not None:
            _update_running_stats(input, running_mean, running_var, momentum)
        return _composite(norm, input, weight, bias)
    return _composite(norm, input, weight, bias, running_mean, running_var)


# ------------------------------------------------------------------------------------ public ops


@public_op("layer_norm", taylor=_layer_norm_composite)
def layer_norm(input: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dims (``M`` elements).

    ``y = (x − μ) r ⊙ γ + β`` with ``μ = mean(x)``, ``r = 1/√(mean((x − μ)²) + ε)``;
    ``x̄ = r(ĝ − mean(ĝ) − x̂ mean(ĝ ⊙ x̂))`` with ``ĝ = ȳ ⊙ γ``; ``γ̄ = Σ ȳ ⊙ x̂``; ``β̄ = Σ ȳ``
    (Σ over the leading dims).
    Shapes: input ``(*, *normalized_shape)``; weight, bias ``normalized_shape``; output as input.
    """
    norm = _layer_args(input, normalized_shape, weight, bias, eps)
    return NormalizeFunction.apply(input, weight, bias, None, None, norm)[0]


@public_op("rms_norm", taylor=_rms_norm_composite)
def rms_norm(input: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """RMS normalisation over the trailing ``normalized_shape`` dims.

    ``y = x r ⊙ γ`` with ``r = 1/√(mean(x²) + ε)`` (``eps=None``: ``torch.finfo(input.dtype).eps``);
    ``x̄ = r(ĝ − x̂ mean(ĝ ⊙ x̂))`` with ``ĝ = ȳ ⊙ γ``, ``γ̄ = Σ ȳ ⊙ x̂``.
    Shapes: input ``(*, *normalized_shape)``; weight ``normalized_shape``; output as input.
    """
    norm = _rms_args(input, normalized_shape, weight, eps)
    return NormalizeFunction.apply(input, weight, None, None, None, norm)[0]


@public_op("batch_norm", taylor=_batch_norm_composite)
def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalisation per channel of an ``(N, C, *spatial)`` input.

    training: ``y = (x − μ_c) r_c ⊙ γ_c + β_c`` with the biased batch variance over ``(N, *spatial)``,
    derivatives as in :func:`layer_norm` over those dims; the running stats (if given) are updated in
    place with the unbiased variance, outside autograd. eval: ``y = (x − m_c)/√(v_c + ε) ⊙ γ_c + β_c``
    with the running stats as constants (affine in ``x``: ``x̄ = ȳ γ_c / √(v_c + ε)``).
    Shapes: input ``(N, C, *)``; running stats, weight, bias ``(C,)``; output as input.
    """
    norm = _batch_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if training:
        if running_mean is not None:
            _update_running_stats(input, running_mean, running_var, momentum)
        return NormalizeFunction.apply(input, weight, bias, None, None, norm)[0]
    return NormalizeFunction.apply(input, weight, bias, running_mean, running_var, norm)[0]
