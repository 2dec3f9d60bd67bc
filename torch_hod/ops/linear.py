"""Bilinear ops: ``linear``, ``matmul``, ``bmm``, with derivatives of every order in every AD mode.

Each op is bilinear in its two tensor operands, so both rules are the product rule:

* ``y = A B``:      ``Ā = Ȳ Bᵀ``, ``B̄ = Aᵀ Ȳ`` (reverse, reduced over broadcast batch dims);
                    ``Ẏ = Ȧ B + A Ḃ``           (forward).
* ``y = x Wᵀ + b``: ``x̄ = ȳ W``, ``W̄ = Σ_batch ȳᵀ x``, ``b̄ = Σ_batch ȳ``;
                    ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``.

Both rules are written in plain (differentiable, vmappable) torch ops, so every higher derivative
follows. Derivatives of order ≥ 3 are zero; mixed second derivatives (w.r.t. both operands) are not.
The Taylor rule is the op itself on jets (the engine propagates products of series).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_hod.ops.function import HigherOrderFunction, public_op, require_floats, saved_primals

__all__ = ["linear", "matmul", "bmm"]


def _shape(t: Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _same_dtype_device(op: str, **tensors: Optional[Tensor]) -> None:
    """Raise unless all given tensors share one dtype and one device (naming each)."""
    given = {name: t for name, t in tensors.items() if t is not None}
    (first, ref), *rest = given.items()
    for name, t in rest:
        if t.dtype != ref.dtype:
            raise TypeError(
                f"torch_hod.ops.{op}: {first} has dtype {ref.dtype} but {name} has dtype {t.dtype}; "
                f"expected one dtype (convert one of them with .to({ref.dtype}) or .to({t.dtype}))"
            )
        if t.device != ref.device:
            raise ValueError(f"torch_hod.ops.{op}: {first} is on {ref.device} but {name} is on {t.device}")


def _check_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    require_floats("linear", input=input, weight=weight, bias=bias)
    _same_dtype_device("linear", input=input, weight=weight, bias=bias)
    if input.dim() == 0:
        raise ValueError("torch_hod.ops.linear: input must have at least 1 dimension (..., in_features), got a scalar")
    features = input.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != features:
        raise ValueError(
            f"torch_hod.ops.linear: input has {features} features (last dim) but weight has shape "
            f"{_shape(weight)}, expected (out_features, {features})"
        )
    if bias is not None and _shape(bias) != (weight.shape[0],):
        raise ValueError(
            f"torch_hod.ops.linear: bias has shape {_shape(bias)} but weight has {weight.shape[0]} output "
            f"features, expected bias of shape ({weight.shape[0]},)"
        )


def _check_matmul(op: str, a: Tensor, b: Tensor, names: Sequence[str]) -> None:
    """torch.matmul's shape rules, with errors that state both shapes."""
    require_floats(op, **{names[0]: a, names[1]: b})
    _same_dtype_device(op, **{names[0]: a, names[1]: b})
    shapes = f"{names[0]} has shape {_shape(a)}, {names[1]} has shape {_shape(b)}"
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"torch_hod.ops.{op}: both operands need at least 1 dimension; {shapes}")
    inner = b.shape[0] if b.dim() == 1 else b.shape[-2]
    if a.shape[-1] != inner:
        raise ValueError(
            f"torch_hod.ops.{op}: inner dimensions differ: {shapes}; expected {names[0]}.shape[-1] "
            f"({a.shape[-1]}) == {names[1]}.shape[{0 if b.dim() == 1 else -2}] ({inner})"
        )
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"torch_hod.ops.{op}: batch dimensions {_shape(a)[:-2]} and {_shape(b)[:-2]} do not broadcast; "
            f"{shapes}"
        ) from None


def _check_bmm(input: Tensor, mat2: Tensor) -> None:
    require_floats("bmm", input=input, mat2=mat2)
    if input.dim() != 3 or mat2.dim() != 3 or input.shape[0] != mat2.shape[0]:
        raise ValueError(
            f"torch_hod.ops.bmm: expected 3-D tensors (b, n, m) and (b, m, p) with the same b; input has "
            f"shape {_shape(input)}, mat2 has shape {_shape(mat2)}"
        )
    _check_matmul("bmm", input, mat2, ("input", "mat2"))


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


def _matmul_sum_to(x: Tensor, y: Tensor, shape: torch.Size) -> Tensor:
    """``x @ y`` summed over broadcast dims down to ``shape`` (the adjoint of broadcasting).

    When the result is a matrix but ``x``, ``y`` carry the same batch dims, the batch is folded
    into the contraction (one matmul, no (batch, p, r) intermediate):
    ``Σ_n x_n y_n = [x as (p, n·q)] [y as (n·q, r)]``.
    """
    if len(shape) == 2 and x.dim() > 2 and x.shape[:-2] == y.shape[:-2]:
        return x.movedim(-2, 0).reshape(shape[0], -1) @ y.reshape(-1, shape[1])
    return (x @ y).sum_to_size(shape)


class LinearFunction(HigherOrderFunction):
    """``y = x Wᵀ + b`` for x (..., in), W (out, in), b (out,) or None; y (..., out)."""

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        input, weight, _ = inputs
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        """``x̄ = ȳ W``, ``W̄ = ȳ_flatᵀ x_flat``, ``b̄ = Σ_rows ȳ_flat`` (rows = all leading dims)."""
        input, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        out_features, in_features = weight.shape
        rows = grad.reshape(-1, out_features)
        grad_input = grad @ weight if need_x else None
        grad_weight = rows.mT @ input.reshape(-1, in_features) if need_w else None
        grad_bias = rows.sum(0) if need_b else None
        return grad_input, grad_weight, grad_bias

    @staticmethod
    def tangent(ctx: Any, input_dot: Optional[Tensor], weight_dot: Optional[Tensor],
                bias_dot: Optional[Tensor]) -> Tensor:
        """``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ`` (missing tangents are zero)."""
        input, weight = saved_primals(ctx)
        y_dot = F.linear(input_dot, weight) if input_dot is not None else None
        y_dot = _add(y_dot, F.linear(input, weight_dot) if weight_dot is not None else None)
        if bias_dot is not None:
            y_dot = _add(y_dot, bias_dot.expand(*input.shape[:-1], weight.shape[0]))
        return y_dot


class MatmulFunction(HigherOrderFunction):
    """``Y = A B`` with torch.matmul's broadcasting and 1-D operand rules."""

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """``Ā = Ȳ Bᵀ``, ``B̄ = Aᵀ Ȳ``, on operands promoted to matrices (1-D A → (1, k), 1-D B →
        (k, 1)), each summed back to its operand's shape over broadcast batch dims."""
        a, b = ctx.saved_tensors
        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b
        out = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]) + (a2.shape[-2], b2.shape[-1])
        grad = grad.reshape(out)
        need_a, need_b = ctx.needs_input_grad
        grad_a = _matmul_sum_to(grad, b2.mT, a2.shape).reshape(a.shape) if need_a else None
        grad_b = _matmul_sum_to(a2.mT, grad, b2.shape).reshape(b.shape) if need_b else None
        return grad_a, grad_b

    @staticmethod
    def tangent(ctx: Any, a_dot: Optional[Tensor], b_dot: Optional[Tensor]) -> Tensor:
        """``Ẏ = Ȧ B + A Ḃ`` (missing tangents are zero)."""
        a, b = saved_primals(ctx)
        return _add(torch.matmul(a_dot, b) if a_dot is not None else None,
                    torch.matmul(a, b_dot) if b_dot is not None else None)


class BmmFunction(MatmulFunction):
    """``Y_n = A_n B_n`` for A (b, n, m), B (b, m, p): matmul's rules without broadcasting."""

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> Tensor:
        return torch.bmm(a, b)


def _linear_taylor(input: Any, weight: Any, bias: Any = None) -> Any:
    _check_linear(input, weight, bias)
    # the bias is added separately: the engine's F.linear rule assumes a Jet input when the bias is one
    y = F.linear(input, weight)
    return y if bias is None else y + bias


def _matmul_taylor(input: Any, other: Any) -> Any:
    _check_matmul("matmul", input, other, ("input", "other"))
    return torch.matmul(input, other)


def _bmm_taylor(input: Any, mat2: Any) -> Any:
    _check_bmm(input, mat2)
    return torch.matmul(input, mat2)


@public_op("linear", taylor=_linear_taylor)
def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``y = x Wᵀ + b`` like :func:`torch.nn.functional.linear`, differentiable to every order.

    Shapes: input (..., in) (1-D allowed), weight (out, in), bias (out,) or None → (..., out).
    Reverse: ``x̄ = ȳ W``, ``W̄ = Σ ȳᵀ x``, ``b̄ = Σ ȳ`` (sums over all leading dims).
    Forward: ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``.
    """
    _check_linear(input, weight, bias)
    return LinearFunction.apply(input, weight, bias)


@public_op("matmul", taylor=_matmul_taylor)
def matmul(input: Tensor, other: Tensor) -> Tensor:
    """``Y = A B`` like :func:`torch.matmul` (1-D operands, broadcast batch dims), every order.

    Shapes: (k,)·(k,) → (); (k,)·(..., k, n) → (..., n); (..., m, k)·(k,) → (..., m);
    (..., m, k)·(..., k, n) → (broadcast(...), m, n).
    Reverse: ``Ā = Ȳ Bᵀ``, ``B̄ = Aᵀ Ȳ`` summed over broadcast dims. Forward: ``Ẏ = Ȧ B + A Ḃ``.
    """
    _check_matmul("matmul", input, other, ("input", "other"))
    return MatmulFunction.apply(input, other)


@public_op("bmm", taylor=_bmm_taylor)
def bmm(input: Tensor, mat2: Tensor) -> Tensor:
    """``Y_n = A_n B_n`` like :func:`torch.bmm`: (b, n, m)·(b, m, p) → (b, n, p), every order.

    Reverse: ``Ā = Ȳ Bᵀ``, ``B̄ = Aᵀ Ȳ``. Forward: ``Ẏ = Ȧ B + A Ḃ``.
    """
    _check_bmm(input, mat2)
    return BmmFunction.apply(input, mat2)
