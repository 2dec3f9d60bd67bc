"""Elementwise ops: one line of mathematics each.

Each op is ``elementwise_op(name, f, f')``: the forward, its derivative ``f'`` written in
differentiable torch ops (which gives every higher derivative and the Taylor rule), and where it
pays, a fused ATen kernel for ``v · f'(x)`` (``tanh_backward`` etc. are themselves differentiable to
every order, support forward AD and vmap). A plain first-order backward (nothing will
differentiate its result) of softplus, gelu, silu and elu runs ATen's fused ``*_backward`` kernel.
Derivatives are kept finite for large ``|x|``: every formula avoids ``inf · 0`` (e.g. ``exp`` is
evaluated on ``min(x, 0)`` where only that branch is used).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_hod.ops.function import elementwise_op

aten = torch.ops.aten

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def _check_approximate(approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"torch_hod.ops.gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def _check_positive(name: str, what: str):
    def check(*values: float) -> None:
        for value in values[:1]:
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"torch_hod.ops.{name}: {what} must be a positive number, got {value!r}")

    return check


def _check_not_inplace(name: str):
    def check(*values: object) -> None:
        inplace = values[-1]
        if not isinstance(inplace, bool) or inplace:
            raise ValueError(
                f"torch_hod.ops.{name}: inplace={inplace!r} is not supported (an in-place activation would "
                "overwrite the input its higher derivatives need); use inplace=False and the returned tensor"
            )

    return check


def _check_exponent(exponent: float) -> None:
    if isinstance(exponent, Tensor) or not isinstance(exponent, (int, float)):
        raise TypeError(
            "torch_hod.ops.pow: exponent must be a Python number (a constant), got "
            f"{type(exponent).__name__}; for a tensor exponent use torch.exp(exponent * torch_hod.ops.log(x))"
        )


def _gelu_derivative(x: Tensor, approximate: str) -> Tensor:
    """gelu'(x): ``Φ(x) + x φ(x)`` (exact) or ``½(1+t) + ½x(1−t²)u'`` with ``t = tanh(u)``."""
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3)
        t = torch.tanh(u)
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du
    return 0.5 * (1 + torch.erf(x / _SQRT_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


tanh = elementwise_op(
    "tanh", torch.tanh, lambda x: 1 - torch.tanh(x) ** 2,
    df_from_output=lambda y: 1 - y * y,
    times_derivative=lambda v, y: aten.tanh_backward(v, y),
    register=True, doc="tanh(x), saving only the output: tanh' = 1 − y².",
)

sigmoid = elementwise_op(
    "sigmoid", torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)),
    df_from_output=lambda y: y * (1 - y),
    times_derivative=lambda v, y: aten.sigmoid_backward(v, y),
    register=True, doc="σ(x) = 1/(1+e^{−x}), saving only the output: σ' = y(1 − y).",
)

softplus = elementwise_op(
    "softplus",
    lambda x, beta, threshold: F.softplus(x, beta, threshold),
    lambda x, beta, threshold: torch.where(x * beta > threshold, torch.ones_like(x), torch.sigmoid(x * beta)),
    params={"beta": 1.0, "threshold": 20.0}, check=_check_positive("softplus", "beta"),
    fused_vjp=lambda g, x, beta, threshold: aten.softplus_backward(g, x, beta, threshold),
    register=True,
    doc="softplus(x) = log(1 + e^{βx})/β (linear where βx > threshold); softplus' = σ(βx).",
)

gelu = elementwise_op(
    "gelu",
    lambda x, approximate: F.gelu(x, approximate=approximate),
    _gelu_derivative,
    params={"approximate": "none"}, check=_check_approximate, register=True,
    fused_vjp=lambda g, x, approximate: aten.gelu_backward(g, x, approximate=approximate),
    doc="gelu(x) = x Φ(x) (or its tanh approximation); gelu' = Φ(x) + x φ(x).",
)

silu = elementwise_op(
    "silu",
    lambda x, inplace: F.silu(x),
    lambda x, inplace: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
    params={"inplace": False}, check=_check_not_inplace("silu"), register=True,
    fused_vjp=lambda g, x, inplace: aten.silu_backward(g, x),
    doc="silu(x) = x σ(x); silu' = σ(x)(1 + x(1 − σ(x))). ``inplace`` must be False.",
)

elu = elementwise_op(
    "elu",
    lambda x, alpha, inplace: F.elu(x, alpha),
    lambda x, alpha, inplace: torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(torch.clamp(x, max=0))),
    params={"alpha": 1.0, "inplace": False}, check=_check_not_inplace("elu"), register=True,
    fused_vjp=lambda g, x, alpha, inplace: aten.elu_backward(g, alpha, 1, 1, False, x),
    doc="elu(x) = x (x > 0), α(eˣ − 1) (x ≤ 0); elu' = 1 or α eˣ. ``inplace`` must be False.",
)

exp = elementwise_op(
    "exp", torch.exp, torch.exp, df_from_output=lambda y: y, register=True,
    doc="eˣ, saving only the output: exp' = y.",
)

log = elementwise_op("log", torch.log, torch.reciprocal, register=True, doc="log(x); log' = 1/x.")

log1p = elementwise_op(
    "log1p", torch.log1p, lambda x: torch.reciprocal(1 + x), register=True, doc="log(1 + x); log1p' = 1/(1 + x)."
)

sin = elementwise_op("sin", torch.sin, torch.cos, register=True, doc="sin(x); sin' = cos(x).")

cos = elementwise_op("cos", torch.cos, lambda x: -torch.sin(x), register=True, doc="cos(x); cos' = −sin(x).")

sqrt = elementwise_op(
    "sqrt", torch.sqrt, lambda x: 0.5 * torch.rsqrt(x), df_from_output=lambda y: 0.5 / y,
    register=True, doc="√x, saving only the output: sqrt' = 1/(2y).",
)

rsqrt = elementwise_op(
    "rsqrt", torch.rsqrt, lambda x: -0.5 * torch.rsqrt(x) / x, df_from_output=lambda y: -0.5 * y * y * y,
    register=True, doc="x^{−1/2}, saving only the output: rsqrt' = −y³/2.",
)

reciprocal = elementwise_op(
    "reciprocal", torch.reciprocal, lambda x: -torch.reciprocal(x * x), df_from_output=lambda y: -y * y,
    register=True, doc="1/x, saving only the output: reciprocal' = −y².",
)

pow = elementwise_op(
    "pow",
    lambda x, exponent: torch.pow(x, exponent),
    lambda x, exponent: exponent * torch.pow(x, exponent - 1) if exponent != 0 else torch.zeros_like(x),
    params={"exponent": 1.0}, check=_check_exponent, register=True,
    doc="x^p for a constant p; pow' = p x^{p−1}.",
)
