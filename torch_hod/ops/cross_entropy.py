"""``cross_entropy`` with derivatives of every order; its Hessian-vector product needs 3× the logits' memory.

With logits ``z`` (class dimension ``c``: dim 1, or dim 0 for an input of shape ``(C,)``) and a
target distribution ``Q`` per sample (weights folded in), the per-sample loss is

    ℓ = −Σ_c Q_c log softmax(z)_c = Σ_c Q_c (lse(z) − z_c),       lse = logsumexp over c,

    index targets t:        Q_c = m · w_c · ((1 − ε) δ_{c,t} + ε / C)    (m = 0 where t = ignore_index)
    probability targets q:  Q_c = w_c · ((1 − ε) q_c + ε / C)

and the reduction is ``none`` (ℓ), ``sum`` (Σℓ) or ``mean`` (Σℓ / D, with D = Σ m w_t for index
targets, torch's normaliser, and D = number of samples for probability targets).

Derivatives (g = ∂loss/∂ℓ per sample, p = softmax(z)):

    ∂/∂z_c = g · (s p_c − Q_c),   s = Σ_c Q_c;           ∂/∂q_c = −g (1 − ε) w_c log p_c.

The loss is written as the linear map ``Σ_c Q_c (lse − z_c)`` of ``z`` around one nonlinear op,
:func:`torch_hod.ops.logsumexp`, whose backward ``ḡ ⊙ softmax(z)`` is one Function
(:class:`~torch_hod.ops.softmax.ScaledSoftmaxFunction`) that recomputes ``softmax(z)`` rather than
keeping it. So the gradient is exactly ``g (s p − Q)`` and a Hessian-vector product
``g s (p ⊙ v − p ⟨p, v⟩)`` holds the gradient plus at most two logits-sized temporaries: measured
3.0× the logits' bytes against 7.0× for ``F.cross_entropy`` (see tests/ops/test_cross_entropy.py).
Index targets never build a one-hot ``Q`` (a gather picks ``z_t``). Unsmoothed index targets go
through one Function, :class:`PickedNLLFunction` (``ℓ = a (lse − z_t)``): its forward is the
built-in's (log_softmax + gather), its backward the same ``ScaledSoftmaxFunction`` minus a scatter
for every higher order, and, when nothing differentiates the gradient, one softmax scaled and
scatter-added in place (the fused first-order path). Every order in every AD mode follows from the
softmax-family Functions (the rest is plain torch ops), and the Taylor rule is the composition
(``composite=True``) evaluated on Jets.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import _reduction

from torch_hod.ops.function import HigherOrderFunction, public_op, records_nothing, require_float, saved_primals
from torch_hod.ops.softmax import ScaledSoftmaxFunction, SoftmaxFunction, _unwrapped, logsumexp

__all__ = ["cross_entropy"]

_REDUCTIONS = ("none", "mean", "sum")


def _check(
    input: Tensor, target: Any, weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float
) -> None:
    """Raise a clear error for every argument torch's cross_entropy would reject (and a few more)."""
    require_float(input, "cross_entropy")
    if input.dim() == 0:
        raise ValueError("torch_hod.ops.cross_entropy: input must have shape (C,), (N, C) or (N, C, d1, ...); got a 0-dim tensor")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"torch_hod.ops.cross_entropy: reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"torch_hod.ops.cross_entropy: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    if weight is not None:
        require_float(weight, "cross_entropy", "weight")
        if weight.dim() != 1 or weight.numel() != n_classes:
            raise ValueError(
                f"torch_hod.ops.cross_entropy: weight must be a 1-D tensor with one entry per class "
                f"({n_classes}), got shape {tuple(weight.shape)}"
            )
    if not isinstance(target, Tensor):
        raise TypeError(f"torch_hod.ops.cross_entropy: target must be a Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(
                f"torch_hod.ops.cross_entropy: class-probability targets must have the input's shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
        if ignore_index >= 0:
            raise ValueError("torch_hod.ops.cross_entropy: ignore_index is not supported for class-probability targets")
        return
    expected = input.shape[:class_dim] + input.shape[class_dim + 1:]
    if target.dtype != torch.long:
        raise TypeError(
            f"torch_hod.ops.cross_entropy: target has dtype {target.dtype}; expected int64 (torch.long) class "
            f"indices of shape {tuple(expected)}, or floating class probabilities of shape {tuple(input.shape)}"
        )
    if target.shape != expected:
        raise ValueError(
            f"torch_hod.ops.cross_entropy: class-index targets for an input of shape {tuple(input.shape)} must have "
            f"shape {tuple(expected)} (the input's shape without the class dimension {class_dim}), got {tuple(target.shape)}"
        )
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    try:
        any_bad = bool(bad.any())  # one host sync, outside any Function
    except RuntimeError:  # under vmap no host sync is possible; a bad index still fails in the gather
        return
    if any_bad:
        raise IndexError(
            f"torch_hod.ops.cross_entropy: target value {int(target[bad][0])} is out of range; class indices must "
            f"lie in [0, {n_classes - 1}] (or equal ignore_index={ignore_index})"
        )


class PickedNLLFunction(HigherOrderFunction):
    """``ℓ = a ⊙ (lse(z) − z_t)`` per sample: the index-target term of cross_entropy, class dim ``c``.

    Shapes: logits ``z`` ``(N, C, *)`` (or ``(C,)`` with ``c = 0``); coefficients ``a`` (weight × mask ×
    (1 − ε)) and int64 targets ``t`` of ``z``'s shape without dim ``c``; ``ℓ`` likewise. Saves ``z``,
    ``a``, ``t`` only.

    * backward: ``z̄ = ḡ softmax(z) − scatter_c(t, ḡ)`` with ``ḡ = ℓ̄ a``, ``ā = ℓ̄ (lse − z_t)``;
    * tangent:  ``ℓ̇ = a (⟨ż, softmax(z)⟩ − ż_t) + ȧ (lse − z_t)``.

    The backward is :class:`ScaledSoftmaxFunction` minus a scatter (every order, HVP memory as the
    plain composite); when nothing differentiates it (:func:`records_nothing`) it is one softmax,
    scaled and scatter-added in place: no one-hot, no zero-filled gather gradient, no accumulation.
    """

    @staticmethod
    def forward(z: Tensor, a: Tensor, t: Tensor, c: int) -> Tensor:
        return -a * torch.log_softmax(z, c).gather(c, t.unsqueeze(c)).squeeze(c)  # the built-in's forward

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        z, a, t, ctx.c = inputs
        ctx.save_for_backward(z, a, t)
        ctx.save_for_forward(z, a, t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        z, a, t = ctx.saved_tensors
        c = ctx.c
        index = t.unsqueeze(c)
        grad_a = None
        if ctx.needs_input_grad[1]:
            grad_a = grad * (logsumexp(z, c) - z.gather(c, index).squeeze(c))
        if not ctx.needs_input_grad[0]:
            return None, grad_a, None, None
        g = (grad * a).unsqueeze(c)
        if records_nothing(grad, z, a) and _unwrapped(grad, z, a):  # first order only, in place
            return torch.softmax(z, c).mul_(g).scatter_add_(c, index, -g), grad_a, None, None
        grad_z = ScaledSoftmaxFunction.apply(z, g, c) - torch.zeros_like(z).scatter(c, index, g)
        return grad_z, grad_a, None, None

    @staticmethod
    def tangent(ctx: Any, z_dot: Optional[Tensor], a_dot: Optional[Tensor], *_: Any) -> Tensor:
        z, a, t = saved_primals(ctx)
        c = ctx.c
        index = t.unsqueeze(c)
        out = torch.zeros_like(a)
        if z_dot is not None:
            p = SoftmaxFunction.apply(z, c)
            out = out + a * ((z_dot * p).sum(c) - z_dot.gather(c, index).squeeze(c))
        if a_dot is not None:
            out = out + a_dot * (logsumexp(z, c) - z.gather(c, index).squeeze(c))
        return out


def _loss_per_sample(
    input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
    composite: bool = False,
) -> Tuple[Tensor, Any]:
    """``(ℓ, D)``: per-sample losses ``Σ_c Q_c (lse − z_c)`` and the mean-reduction normaliser.
    Unsmoothed index targets use :class:`PickedNLLFunction` unless ``composite`` (the Taylor rule)."""
    c = 0 if input.dim() == 1 else 1
    n_classes = input.shape[c]
    eps = float(label_smoothing)
    if eps == 0 and not composite and not target.dtype.is_floating_point:
        valid = target != ignore_index
        w_t = valid.to(input.dtype) if weight is None else weight.to(input.dtype)[target.where(valid, 0)] * valid
        return PickedNLLFunction.apply(input, w_t, target.where(valid, 0), c), w_t.sum()
    lse = logsumexp(input, c, keepdim=True)
    w = None
    if weight is not None:
        w = weight.to(input.dtype).reshape((n_classes,) + (1,) * (input.dim() - 1 - c))
    if target.dtype.is_floating_point:  # class probabilities
        q = target.to(input.dtype)
        if eps > 0:
            q = q * (1 - eps) + eps / n_classes
        if w is not None:
            q = q * w
        # −log softmax(z) = lse − z: kept by autograd only when the targets require grad
        return (q * (lse - input)).sum(c), input.numel() // n_classes if n_classes else 0
    valid = target != ignore_index  # class indices
    t = torch.where(valid, target, torch.zeros_like(target))
    m = valid.to(input.dtype)
    w_t = m if weight is None else weight.to(input.dtype)[t] * m
    # gather from ``input`` (alive anyway): gather's backward keeps its source tensor
    loss = (1 - eps) * w_t * (lse - input.gather(c, t.unsqueeze(c))).squeeze(c)
    if eps > 0:
        neg_log_p = lse - input  # a temporary: its consumers below keep only constants
        smooth = neg_log_p if w is None else neg_log_p * w
        loss = loss + (eps / n_classes) * m * smooth.sum(c)
    return loss, w_t.sum()


def _cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    composite: bool = True,
) -> Tensor:
    """cross_entropy in elementary ops (``composite=True``: the Taylor rule, on Jets) or with
    :class:`PickedNLLFunction` for unsmoothed index targets (the public op)."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    _check(input, target, weight, ignore_index, reduction, label_smoothing)
    loss, normaliser = _loss_per_sample(input, target, weight, ignore_index, label_smoothing, composite)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if not isinstance(normaliser, Tensor):
        return total / normaliser
    # every target ignored: NaN loss but zero derivatives, as torch (0/0 would give NaN gradients)
    empty = normaliser == 0
    return torch.where(empty, torch.full_like(total, math.nan), total / torch.where(empty, 1.0, normaliser))


@public_op("cross_entropy", taylor=_cross_entropy)
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross entropy of logits ``input`` against ``target`` (torch.nn.functional.cross_entropy's signature).

    ``input``: (C,), (N, C) or (N, C, d1, ...) logits. ``target``: int64 class indices of the input's
    shape without the class dimension (entries in [0, C) or ``ignore_index``), or class probabilities
    of the input's shape. ``weight``: optional (C,) class weights. Returns the per-sample losses
    ``ℓ = −Σ_c Q_c log softmax(z)_c`` (``reduction="none"``), their sum, or their weighted mean (see the
    module docstring for ``Q`` and the normaliser). Gradient ``g (s softmax(z) − Q)``; derivatives of
    every order w.r.t. the logits and the probability targets.
    """
    return _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                          composite=False)
