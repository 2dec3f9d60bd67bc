"""Every elementwise op of torch_hod.ops.elementwise against its torch built-in, in every AD mode.

References are the built-ins themselves, trusted under reverse-over-reverse (check_op never uses
nested jvp of the reference). Inputs are drawn from each op's domain, away from kinks (elu at 0,
softplus at βx = threshold) and singularities.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Tuple

import pytest
import torch
import torch.nn.functional as F

import torch_hod.ops as ops
from torch_hod.testing import check_op, tolerances

GELU_C = math.sqrt(2 / math.pi)


class Case(NamedTuple):
    id: str
    op: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    domain: Tuple[float, float, bool]  # (low, high, mirror to negative values too)
    kwargs: Dict[str, Any] = {}


REAL, POSITIVE, AWAY_FROM_0 = (-2.0, 2.0, False), (0.3, 2.0, False), (0.3, 2.0, True)

CASES = [
    Case("tanh", ops.tanh, torch.tanh, REAL),
    Case("sigmoid", ops.sigmoid, torch.sigmoid, (-3.0, 3.0, False)),
    Case("softplus", ops.softplus, F.softplus, (-3.0, 3.0, False)),
    Case("softplus_beta_threshold", ops.softplus, F.softplus, (0.6, 2.0, True), {"beta": 2.0, "threshold": 1.0}),
    Case("gelu", ops.gelu, F.gelu, REAL),
    Case("gelu_tanh", ops.gelu, F.gelu, REAL, {"approximate": "tanh"}),
    Case("silu", ops.silu, F.silu, REAL),
    Case("elu", ops.elu, F.elu, AWAY_FROM_0),
    Case("elu_alpha", ops.elu, F.elu, AWAY_FROM_0, {"alpha": 1.5}),
    Case("exp", ops.exp, torch.exp, REAL),
    Case("log", ops.log, torch.log, POSITIVE),
    Case("log1p", ops.log1p, torch.log1p, (-0.7, 2.0, False)),
    Case("sin", ops.sin, torch.sin, REAL),
    Case("cos", ops.cos, torch.cos, REAL),
    Case("sqrt", ops.sqrt, torch.sqrt, POSITIVE),
    Case("rsqrt", ops.rsqrt, torch.rsqrt, POSITIVE),
    Case("reciprocal", ops.reciprocal, torch.reciprocal, AWAY_FROM_0),
    Case("pow_1", ops.pow, torch.pow, REAL, {"exponent": 1.0}),
    Case("pow_2", ops.pow, torch.pow, REAL, {"exponent": 2.0}),
    Case("pow_int_3", ops.pow, torch.pow, REAL, {"exponent": 3}),
    Case("pow_0.5", ops.pow, torch.pow, POSITIVE, {"exponent": 0.5}),
    Case("pow_-1.5", ops.pow, torch.pow, POSITIVE, {"exponent": -1.5}),
    Case("pow_-1", ops.pow, torch.pow, AWAY_FROM_0, {"exponent": -1.0}),
    # x⁰ = 1 has only zero derivatives (a check of it alone could not fail): multiply by sin(x),
    # so pow's zero derivatives enter every order through the product rule and must be exact zeros.
    Case("pow_0", lambda x, exponent: ops.pow(x, exponent) * ops.sin(x),
         lambda x, exponent: torch.pow(x, exponent) * torch.sin(x), REAL, {"exponent": 0.0}),
]


def sample(case: Case, device: str, dtype: torch.dtype, n: int = 6) -> torch.Tensor:
    low, high, mirror = case.domain
    gen = torch.Generator().manual_seed(0)
    x = low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
    if mirror:
        x = x * torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_order4_float64(device, case):
    check_op(case.op, case.reference, (sample(case, device, torch.float64),), order=4, kwargs=case.kwargs, name=case.id)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_order2_float32(device, case):
    rtol, atol = tolerances(torch.float32)
    x = sample(case, device, torch.float32)
    check_op(case.op, case.reference, (x,), order=2, kwargs=case.kwargs, rtol=rtol, atol=atol, name=case.id)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_value_equals_builtin(device, case, dtype):
    x = sample(case, device, dtype, n=64)
    y, expected = case.op(x, **case.kwargs), case.reference(x, **case.kwargs)
    assert y.dtype == dtype and y.device == x.device and y.shape == x.shape
    assert torch.equal(y, expected)  # the same kernels: bitwise equal


# --- extreme inputs ----------------------------------------------------------------------------


def gelu_tanh_composite(x: torch.Tensor) -> torch.Tensor:
    """Reference for gelu(approximate='tanh') at large |x|: F.gelu's own third derivative is
    non-finite at |x| = 1e4 (FACTS.md), so this composite of elementary ops is used instead."""
    return 0.5 * x * (1 + torch.tanh(GELU_C * (x + 0.044715 * x**3)))


EXTREME_CASES = [c for c in CASES if c.id in ("tanh", "sigmoid", "softplus", "softplus_beta_threshold", "gelu", "silu")]
EXTREME_CASES.append(Case("gelu_tanh", ops.gelu, lambda x, approximate: gelu_tanh_composite(x), REAL, {"approximate": "tanh"}))
EXTREMES = [-1e4, -1e3, -60.0, -3.0, -0.4, 0.7, 60.0, 1e3, 1e4]


@pytest.mark.parametrize("case", EXTREME_CASES, ids=[c.id for c in EXTREME_CASES])
def test_extreme_inputs_give_finite_derivatives(device, case):
    """|x| up to 1e4: every derivative, every order, every mode finite and right (check_op fails on
    any non-finite value), in float64 to order 4 and float32 to order 2."""
    x = torch.tensor(EXTREMES, dtype=torch.float64, device=device)
    check_op(case.op, case.reference, (x,), order=4, kwargs=case.kwargs, name=case.id)
    rtol, atol = tolerances(torch.float32)
    check_op(case.op, case.reference, (x.float(),), order=2, kwargs=case.kwargs, rtol=rtol, atol=atol, name=case.id)


# --- bad input ----------------------------------------------------------------------------------

ALL_OPS = sorted({c.op.__name__ for c in CASES if hasattr(ops, c.op.__name__)})


@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_rejects_integer_and_complex_input(name, dtype):
    kind = "complex" if dtype.is_complex else "integer/bool"
    with pytest.raises(TypeError, match=rf"torch_hod.ops.{name}: input has {kind} dtype {dtype}; expected a real floating-point"):
        getattr(ops, name)(torch.ones(3, dtype=dtype))


def test_rejects_bad_parameters():
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gelu: approximate must be 'none' or 'tanh', got 'erf'"):
        ops.gelu(x, approximate="erf")
    for exponent in (torch.tensor(2.0), "2", None):
        with pytest.raises(TypeError, match=r"pow: exponent must be a Python number \(a constant\), got"):
            ops.pow(x, exponent)
    for beta in (0, -1.0, "1"):
        with pytest.raises(ValueError, match=rf"softplus: beta must be a positive number, got {beta!r}"):
            ops.softplus(x, beta=beta)
    with pytest.raises(TypeError, match=r"softplus: unexpected argument 'alpha'"):
        ops.softplus(x, alpha=1.0)
    for name in ("silu", "elu"):
        with pytest.raises(ValueError, match=rf"{name}: inplace=True is not supported"):
            getattr(ops, name)(x, inplace=True)


def test_signatures_match_torch():
    x = torch.linspace(-2, 2, 7, dtype=torch.float64)
    assert torch.equal(ops.elu(x, 1.5, False), F.elu(x, 1.5, False))
    assert torch.equal(ops.silu(x, inplace=False), F.silu(x, inplace=False))
    assert torch.equal(ops.softplus(x, 2.0, 1.0), F.softplus(x, 2.0, 1.0))
    assert torch.equal(ops.gelu(x, approximate="tanh"), F.gelu(x, approximate="tanh"))
    assert torch.equal(ops.pow(x, 3), torch.pow(x, 3))
