"""Truncated Taylor-series arithmetic on lists of normalised coefficients.

A series is a list ``c = [c0, c1, ..., cK]`` of *normalised* coefficients,
``x(t) = c0 + c1 t + c2 t² + ... + cK t^K`` (``c_k = x^{(k)}(0) / k!``). ``c0`` (the primal) has
the value's shape; every ``c_k`` with ``k ≥ 1`` carries a leading direction axis ``(R, *shape)``.
In *collapsed* mode the top coefficient ``cK`` has no direction axis: it is the sum over the R
directions. Every rule below computes ``y_K`` as "linear part in the top input coefficient" plus
"products of lower coefficients", and in collapsed mode sums those products over the direction
axis (:func:`dot`), so the same code serves both modes (Dangel et al., 2025).

All recurrences are O(K²) products of tensors (JAX jet / Griewank–Walther, ch. 13), accumulated
with fused multiply-adds (:func:`fma`, one ``torch.addcmul`` per term with the recurrence weight
folded in); self-products (``x²``, tanh's ``1 − y²``) use the symmetric half of the Cauchy sum.
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple, Union

import torch
from torch import Tensor

Series = List[Tensor]
Number = Union[int, float]


_PLAIN = (Tensor, torch.nn.Parameter)


def fma(acc: Union[Tensor, int, None], a: Any, b: Any, w: float = 1.0) -> Any:
    """``acc + w·a·b`` in one fused ``torch.addcmul`` for plain tensors (``acc=None``: ``w·a·b``);
    the unfused expression for anything else (Jets of an outer call, Python numbers)."""
    number = isinstance(w, (int, float))
    plain = type(a) in _PLAIN and type(b) in _PLAIN and number
    one = number and w == 1
    if acc is None:
        if one or not plain:
            return a * b if one else (a * b) * w
        acc = a.new_zeros(())
    if plain and type(acc) in _PLAIN:
        return torch.addcmul(acc, a, b, value=w)
    return acc + (a * b if one else (a * b) * w)


def dot(terms: Sequence[Tuple[Any, Any, float]], top: bool, acc: Any = None) -> Any:
    """``acc + Σ w·a·b`` over ``terms = [(a, b, w), ...]`` with fused multiply-adds, summed over the
    direction axis when ``top`` (collapsed top order, ``acc`` then already summed); ``acc`` if empty."""
    inner = None
    for a, b, w in terms:
        inner = fma(inner, a, b, w)
    if inner is None:
        return acc
    if top:
        inner = inner.sum(0)
    return inner if acc is None else acc + inner


def _is_top(k: int, K: int, collapsed: bool) -> bool:
    return collapsed and k == K


def mul(a: Series, b: Series, collapsed: bool) -> Series:
    """Cauchy product ``(a·b)_k = Σ_{i=0}^{k} a_i b_{k−i}`` (elementwise, broadcasting over R)."""
    K = len(a) - 1
    out = [a[0] * b[0]]
    for k in range(1, K + 1):
        inner = dot([(a[i], b[k - i], 1) for i in range(1, k)], _is_top(k, K, collapsed))
        out.append(fma(fma(inner, a[0], b[k]), a[k], b[0]))
    return out


def ode(x: Series, g: Series, k: int, top: bool) -> Tensor:
    """k-th coefficient of ``y`` with ``y' = g · x'``: ``y_k = (1/k) Σ_{j=1}^{k} j x_j g_{k−j}``."""
    inner = dot([(x[j], g[k - j], j / k) for j in range(1, k)], top)
    return fma(inner, x[k], g[0])


def square(x: Series, collapsed: bool) -> Series:
    """``y = x²`` with the symmetric Cauchy product ``y_k = Σ_{i+j=k} x_i x_j`` (half the products)."""
    K = len(x) - 1
    return [x[0] * x[0]] + [self_dot(x, k, _is_top(k, K, collapsed)) for k in range(1, K + 1)]


def self_dot(x: Series, k: int, top: bool, w: float = 1.0) -> Tensor:
    """``w Σ_{i=0}^{k} x_i x_{k−i}`` = ``w(2 Σ_{i<k/2} x_i x_{k−i} + [k even] x_{k/2}²)``; in
    collapsed mode (``top``) the directed products are summed over directions, ``x_0 x_k`` is not."""
    inner = dot([(x[i], x[k - i], 2 * w) for i in range(1, (k + 1) // 2)] + ([(x[k // 2], x[k // 2], w)] if k % 2 == 0 else []), top)
    return fma(inner, x[0], x[k], 2 * w)


def integrate(x: Series, g: Series, y0: Tensor, collapsed: bool) -> Series:
    """Series of ``y`` with ``y(0) = y0`` and ``y' = g x'``, for ``g`` known to order K−1."""
    K = len(x) - 1
    return [y0] + [ode(x, g, k, _is_top(k, K, collapsed)) for k in range(1, K + 1)]


def exp(x: Series, collapsed: bool) -> Series:
    """``y = eˣ``: ``y' = y x'``, so ``y_k = (1/k) Σ j x_j y_{k−j}``."""
    K = len(x) - 1
    y = [torch.exp(x[0])]
    for k in range(1, K + 1):
        y.append(ode(x, y, k, _is_top(k, K, collapsed)))
    return y


def log(x: Series, collapsed: bool, y0: Tensor = None) -> Series:
    """``y = log x``: ``x y' = x'``, so ``y_k = (x_k − (1/k) Σ_{j=1}^{k−1} j y_j x_{k−j}) / x_0``."""
    K = len(x) - 1
    y = [torch.log(x[0]) if y0 is None else y0]
    for k in range(1, K + 1):
        inner = dot([(y[j], x[k - j], -j / k) for j in range(1, k)], _is_top(k, K, collapsed), x[k])
        y.append(inner / x[0])
    return y


def div(a: Series, b: Series, collapsed: bool) -> Series:
    """``z = a / b``: ``b z = a``, so ``z_k = (a_k − Σ_{j=1}^{k} b_j z_{k−j}) / b_0``.

    ``a`` may be a one-element list ``[a0]`` (a constant numerator).
    """
    K = len(b) - 1
    z = [a[0] / b[0]]
    for k in range(1, K + 1):
        inner = dot([(b[j], z[k - j], -1) for j in range(1, k)], _is_top(k, K, collapsed), a[k] if len(a) > 1 else None)
        z.append(fma(inner, b[k], z[0], -1) / b[0])
    return z


def pow(x: Series, p: Union[Number, Tensor], collapsed: bool) -> Series:
    """``y = x^p`` (constant p): ``x y' = p y x'``, so
    ``y_k = Σ_{j=1}^{k} (p j − (k − j)) x_j y_{k−j} / (k x_0)``. Needs ``x_0 ≠ 0``."""
    K = len(x) - 1
    y = [torch.pow(x[0], p)]
    for k in range(1, K + 1):
        inner = dot([(x[j], y[k - j], (p * j - (k - j)) / k) for j in range(1, k)], _is_top(k, K, collapsed))
        y.append(fma(inner, x[k], y[0], p) / x[0])
    return y


def tanh(x: Series, collapsed: bool) -> Series:
    """``y = tanh x``: ``y' = (1 − y²) x'``; the series of ``g = 1 − y²`` is built alongside."""
    K = len(x) - 1
    y = [torch.tanh(x[0])]
    g = [1 - y[0] * y[0]]
    for k in range(1, K + 1):
        y.append(ode(x, g, k, _is_top(k, K, collapsed)))
        if k < K:
            g.append(self_dot(y, k, False, -1.0))
    return y


def sigmoid(x: Series, collapsed: bool) -> Series:
    """``y = σ(x)``: ``y' = y(1 − y) x'``; ``g = y − y²`` is built alongside."""
    K = len(x) - 1
    y = [torch.sigmoid(x[0])]
    g = [y[0] * (1 - y[0])]
    for k in range(1, K + 1):
        y.append(ode(x, g, k, _is_top(k, K, collapsed)))
        if k < K:
            g.append(y[k] - self_dot(y, k, False))
    return y


def sincos(x: Series, collapsed: bool) -> "tuple[Series, Series]":
    """``s = sin x, c = cos x``: ``s' = c x'``, ``c' = −s x'`` (coupled recurrence)."""
    K = len(x) - 1
    s, c = [torch.sin(x[0])], [torch.cos(x[0])]
    for k in range(1, K + 1):
        top = _is_top(k, K, collapsed)
        s_k, c_k = ode(x, c, k, top), -ode(x, s, k, top)
        s.append(s_k)
        c.append(c_k)
    return s, c


def gaussian_integral(x: Series, y0: Tensor, q0: Tensor, a: float, collapsed: bool) -> Series:
    """Series of ``y`` with ``y' = q x'`` and ``q = C e^{−a x²}`` (``y(0) = y0``, ``q(0) = q0``):
    ``q' = h x'`` with ``h = −2a x q``, so ``y`` and ``q`` follow O(K²) coupled recurrences
    (``Φ``: ``a = ½``, ``q0 = φ(x0)``; ``erf``: ``a = 1``, ``q0 = (2/√π) e^{−x0²}``). ``q`` is
    needed to order K−1 and ``h`` to K−2, so the top order costs one :func:`ode`."""
    K = len(x) - 1
    y, q, h = [y0], [q0], [(-2.0 * a) * x[0] * q0]
    for k in range(1, K + 1):
        y.append(ode(x, q, k, _is_top(k, K, collapsed)))
        if k < K:
            q.append(ode(x, h, k, False))
        if k < K - 1:
            h.append(dot([(x[i], q[k - i], -2.0 * a) for i in range(k + 1)], False))
    return y


def gelu(x: Series, collapsed: bool) -> Series:
    """``y = x Φ(x)`` (exact GELU): ``Φ`` by :func:`gaussian_integral` (``Φ' = φ x'``,
    ``φ' = −x φ x'``), then one Cauchy product with ``x``."""
    x0 = x[0]
    Phi0 = torch.special.ndtr(x0) if type(x0) in _PLAIN else 0.5 * (1 + torch.erf(x0 * (1 / math.sqrt(2.0))))  # outer Jets
    Phi = gaussian_integral(x, Phi0, torch.exp(-0.5 * x0 * x0) * (1.0 / math.sqrt(2.0 * math.pi)), 0.5, collapsed)
    y = mul(x, Phi, collapsed)
    y[0] = torch.nn.functional.gelu(x0)
    return y


def erf(x: Series, collapsed: bool) -> Series:
    """``y = erf x``: ``y' = q x'`` with ``q = (2/√π) e^{−x²}`` (:func:`gaussian_integral`, a = 1)."""
    x0 = x[0]
    return gaussian_integral(x, torch.erf(x0), torch.exp(-x0 * x0) * (2.0 / math.sqrt(math.pi)), 1.0, collapsed)
