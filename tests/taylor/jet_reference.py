"""Trustworthy references for Taylor-mode tests (helpers, not tests).

``curve_derivatives`` differentiates ``f(x(t))`` along the Taylor curve
``x(t) = x0 + Σ_k x_k t^k / k!`` K times in the scalar ``t`` by reverse-over-reverse autograd of
the built-ins: independent of the jet engine and much cheaper than K nested ``torch.func.jvp``
(which grows ~4× per order here). Each order differentiates a backward with respect to its
cotangent, which for ``F.layer_norm`` (and training ``F.batch_norm``) goes through the same wrong
formula as their nested jvp (pytorch#196700/#196699; measured: order 2 off by 30–70 %): for those,
pass a mean/var composite as the reference.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Sequence

import torch
from torch import Tensor

from torch_hod.taylor import jet


def curve_derivatives(f: Callable[..., Any], primals: Sequence[Tensor], series: Sequence[Sequence[Tensor]], K: int) -> List[Tensor]:
    """``[d^k/dt^k f(x(t)) at t = 0 for k = 1..K]`` by reverse-over-reverse autograd in ``t``.

    Each order is one vector derivative ``dy/dt`` by the double-vjp trick: ``g(u) = ∂<u, y>/∂t``
    is linear in ``u`` and ``∂g/∂u = dy/dt`` (two ``autograd.grad`` calls with ``create_graph``).
    """
    t = torch.zeros((), dtype=primals[0].dtype, device=primals[0].device, requires_grad=True)
    xs = [x0 + sum(c * t ** (k + 1) / math.factorial(k + 1) for k, c in enumerate(cs)) for x0, cs in zip(primals, series)]
    d, out = f(*xs), []
    for _ in range(K):
        u = torch.zeros_like(d, requires_grad=True)
        (g,) = torch.autograd.grad((u * d).sum(), t, create_graph=True, allow_unused=True, materialize_grads=True)
        (d,) = torch.autograd.grad(g, u, create_graph=True, allow_unused=True, materialize_grads=True)
        out.append(d.detach())
    return out


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-10, atol: float = 0.0, what: str = "") -> None:
    """Norm-wise ``max|a − e| ≤ atol + rtol · max|e|`` with a non-zero reference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the reference is zero, so this check could not fail"
    err = (actual - expected).abs().max().item()
    assert err <= atol + rtol * scale, f"{what}: max abs error {err:.3e}, rel {err / scale:.3e} (rtol {rtol:.0e})"


def random_series(primals: Sequence[Tensor], K: int, seed: int = 0, R: int = 0) -> List[List[Tensor]]:
    """K random coefficients per primal (with a leading direction axis of size R if R > 0)."""
    gen = torch.Generator().manual_seed(seed)
    shape = lambda x: ((R,) if R else ()) + tuple(x.shape)
    return [[torch.randn(shape(x), generator=gen, dtype=torch.float64).to(x) for _ in range(K)] for x in primals]


def check_jet(f: Callable[..., Any], primals: Sequence[Tensor], K: int = 6, rtol: float = 1e-10, seed: int = 0,
              reference: Callable[..., Any] = None) -> None:
    """``jet(f)`` against nested jvp of ``reference`` (default ``f``) along a random Taylor curve."""
    series = random_series(primals, K, seed)
    y0, ys = jet(f, tuple(primals), series)
    ref = reference or f
    torch.testing.assert_close(y0, ref(*primals), rtol=1e-12, atol=1e-12)
    expected = curve_derivatives(ref, primals, series, K)
    assert len(ys) == K
    for k, (a, e) in enumerate(zip(ys, expected), start=1):
        assert_close(a, e, rtol, what=f"order {k}")
