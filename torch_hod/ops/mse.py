"""``mse_loss`` with derivatives of every order in every AD mode.

``ℓ = reduce((x − t)²)`` over the broadcast shape of input ``x`` and target ``t``, with
``reduce`` = mean (``Σ/N``), sum, or none. With ``d = x − t`` and ``c = 2/N`` (mean) or ``2``:

* reverse: ``x̄ = sum_to(c ℓ̄ d, x.shape)``, ``t̄ = −sum_to(c ℓ̄ d, t.shape)``;
* forward: ``ℓ̇ = reduce(2 d (ẋ − ṫ))``;
* Taylor:  the same composition on jets (a difference, a square, a reduction).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction

from torch_hod.ops.function import HigherOrderFunction, public_op, require_floats, saved_primals
from torch_hod.ops.linear import _same_dtype_device

__all__ = ["mse_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _reduction_of(size_average: Optional[bool], reduce: Optional[bool], reduction: str) -> str:
    """The reduction, from the legacy flags as torch resolves them (with its deprecation warning)."""
    if size_average is not None or reduce is not None:
        return _reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"torch_hod.ops.mse_loss: reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    return reduction


def _check_shapes(input: Tensor, target: Tensor) -> None:
    """torch's rule: equal shapes, or broadcastable ones with a warning; else a clear error."""
    require_floats("mse_loss", input=input, target=target)
    _same_dtype_device("mse_loss", input=input, target=target)
    if input.shape == target.shape:
        return
    try:
        torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise ValueError(
            f"torch_hod.ops.mse_loss: input shape {tuple(input.shape)} and target shape "
            f"{tuple(target.shape)} do not broadcast; expected equal shapes"
        ) from None
    warnings.warn(
        f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
        "This will likely lead to incorrect results due to broadcasting. Please ensure they have the same size.",
        stacklevel=4,
    )


def _reduce(x: Tensor, reduction: str) -> Tensor:
    return x.mean() if reduction == "mean" else x.sum() if reduction == "sum" else x


class MseLossFunction(HigherOrderFunction):
    """``ℓ = reduce((x − t)²)``; x and t broadcast together; ℓ is () or the broadcast shape."""

    @staticmethod
    def forward(input: Tensor, target: Tensor, reduction: str) -> Tensor:
        return F.mse_loss(*torch.broadcast_tensors(input, target), reduction=reduction)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        input, target, ctx.reduction = inputs
        ctx.save_for_backward(input, target)
        ctx.save_for_forward(input, target)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], None]:
        """``x̄ = sum_to(c ℓ̄ d)``, ``t̄ = −sum_to(c ℓ̄ d)``, ``c = 2/N`` (mean) or 2."""
        input, target = ctx.saved_tensors
        diff = input - target
        scale = 2.0 / diff.numel() if ctx.reduction == "mean" else 2.0
        grad_diff = diff * (grad * scale)
        need_input, need_target, _ = ctx.needs_input_grad
        grad_input = grad_diff.sum_to_size(input.shape) if need_input else None
        grad_target = -grad_diff.sum_to_size(target.shape) if need_target else None
        return grad_input, grad_target, None

    @staticmethod
    def tangent(ctx: Any, input_dot: Optional[Tensor], target_dot: Optional[Tensor], _: Any) -> Tensor:
        """``ℓ̇ = reduce(2 d (ẋ − ṫ))`` (missing tangents are zero)."""
        input, target = saved_primals(ctx)
        diff_dot = input_dot if target_dot is None else -target_dot if input_dot is None else input_dot - target_dot
        return _reduce(2 * (input - target) * diff_dot, ctx.reduction)


def _mse_taylor(input: Any, target: Any, size_average: Optional[bool] = None, reduce: Optional[bool] = None,
                reduction: str = "mean") -> Any:
    reduction = _reduction_of(size_average, reduce, reduction)
    _check_shapes(input, target)
    diff = input - target
    return _reduce(diff * diff, reduction)


@public_op("mse_loss", taylor=_mse_taylor)
def mse_loss(input: Tensor, target: Tensor, size_average: Optional[bool] = None, reduce: Optional[bool] = None,
             reduction: str = "mean") -> Tensor:
    """Mean squared error like :func:`torch.nn.functional.mse_loss`, differentiable to every order.

    ``ℓ = reduce((x − t)²)``, ``reduction`` ∈ {"mean", "sum", "none"} (the deprecated
    ``size_average``/``reduce`` flags are resolved as torch does). Input and target may both be
    differentiated; shapes broadcast as in torch (with torch's warning when they differ), the
    output is a scalar, or the broadcast shape for "none".
    Reverse: ``x̄ = −t̄ = c ℓ̄ (x − t)`` summed to each operand's shape, ``c = 2/N`` (mean) or 2.
    Forward: ``ℓ̇ = reduce(2 (x − t)(ẋ − ṫ))``.
    """
    reduction = _reduction_of(size_average, reduce, reduction)
    _check_shapes(input, target)
    return MseLossFunction.apply(input, target, reduction)
