"""Differential operators in Taylor mode: directional derivatives, Laplacians, the biharmonic, and
mixed partials, each a weighted sum of univariate Taylor coefficients.

With ``x(t) = x + t v``, the k-th output coefficient of ``jet(f, (x,), ([v, 0, ..., 0],))`` is the
k-th directional derivative ``D^k_v f = ∂^k f[v, ..., v] = d^k/dt^k f(x + t v)|_{t=0}``. Then

* Laplacian:      ``Δf = Σ_i D²_{e_i} f``                                    (D directions)
* weighted:       ``Σ_ij C_ij ∂_i∂_j f = Σ_r D²_{F_r} f`` for ``C = F Fᵀ`` (``F_r``: columns of F)
* randomised:     ``Δf ≈ 1/S Σ_s D²_{v_s} f`` with ``E[v vᵀ] = I`` (Rademacher or Gaussian v)
* biharmonic:     ``Δ²f = Σ_ij ∂_i²∂_j² f
                        = (4 − D)/3 Σ_i D⁴_{e_i} f + 1/6 Σ_{i<j} (D⁴_{e_i+e_j} + D⁴_{e_i−e_j}) f``
                  (from ``12 ∂_i²∂_j² f = D⁴_{e_i+e_j} + D⁴_{e_i−e_j} − 2 D⁴_{e_i} − 2 D⁴_{e_j}``)
* randomised:     ``Δ²f ≈ 1/(3S) Σ_s D⁴_{v_s} f`` with ``v ~ N(0, I)``, since
                  ``E[v_i v_j v_k v_l] = δ_ij δ_kl + δ_ik δ_jl + δ_il δ_jk`` gives ``E[D⁴_v f] = 3 Δ²f``
                  (Rademacher v would give ``3 Δ²f − 2 Σ_i ∂_i⁴ f``: biased, so refused)
* mixed partial:  ``∂^α f = Σ_{|j|=|α|} w_{α,j} D^{|α|}_j f`` over integer directions j
                  (Griewank, Utke & Walther 2000; weights in :func:`interpolation_weights`).

Collapsed Taylor mode (Dangel et al. 2025): the K-th output coefficient is linear in the K-th input
coefficient, so a sum over directions ``Σ_r w_r D^K_{v_r} f`` is propagated as one K-th coefficient
already summed over r, while coefficients 1..K-1 keep the direction axis. A weight is absorbed into
its direction, ``w D^K_v = D^K_{w^{1/K} v}`` (for odd K with the sign of w; for even K, positive and
negative weights run as two passes).

Batches: the leading ``batch_dims`` dims of x index independent samples; ``func`` maps
``(*B, *E) -> (*B, *O)`` and sample b of the output depends on ``x[b]`` only (no BatchNorm in train
mode). A direction is the same ``e_i`` (or an independent random vector) for every sample, so no
direction is spent on the batch: ``R`` directions have shape ``(R, *B, *E)`` and cost R, not R·N.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from torch_hod.taylor.engine import jet

__all__ = [
    "derivatives",
    "laplacian",
    "bilaplacian",
    "mixed_partial",
    "interpolation_weights",
]

Func = Callable[[Tensor], Tensor]
Seed = Union[None, int, torch.Generator]
_METHODS = ("collapsed", "standard")


# --------------------------------------------------------------------------------------- checks
def _check_x(x: object, op: str, batch_dims: int = 0) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"torch_hod.taylor.{op}: x must be a Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"torch_hod.taylor.{op}: x has dtype {x.dtype}; expected a real floating-point tensor "
            f"(float32 or float64). Convert with x.float() or x.double()."
        )
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or not 0 <= batch_dims <= x.dim():
        raise ValueError(
            f"torch_hod.taylor.{op}: batch_dims={batch_dims!r} is out of range for x of shape "
            f"{tuple(x.shape)}; expected an int in [0, {x.dim()}] (the leading dims that index samples)."
        )


def _check_choice(value: str, choices: Sequence[str], op: str, arg: str) -> None:
    if value not in choices:
        raise ValueError(f"torch_hod.taylor.{op}: {arg}={value!r}; expected one of {tuple(choices)}")


def _check_output(y: Tensor, x: Tensor, batch_dims: int, op: str) -> Tensor:
    if tuple(y.shape[:batch_dims]) != tuple(x.shape[:batch_dims]):
        raise ValueError(
            f"torch_hod.taylor.{op}: with batch_dims={batch_dims}, func must keep the batch dims "
            f"{tuple(x.shape[:batch_dims])} in front of its output, but returned shape {tuple(y.shape)}."
        )
    return y


def _tensor_output(y: object, op: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"torch_hod.taylor.{op}: func must return one Tensor, got {type(y).__name__}")
    return y


def _generator(seed: Seed, device: torch.device) -> Optional[torch.Generator]:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"torch_hod.taylor: generator must be None, an int seed or a torch.Generator, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------- weighted sums of directional derivatives
def _lift(m: Tensor, x: Tensor, batch_dims: int) -> Tensor:
    """Directions ``(R, D)`` or ``(R, *B, D)`` over the flattened event -> ``(R, *x.shape)``."""
    lead = tuple(m.shape[1:-1]) if m.dim() > 2 else (1,) * batch_dims
    return m.reshape(m.shape[0], *lead, *x.shape[batch_dims:]).expand(m.shape[0], *x.shape)


def _directional_sum(
    func: Func, x: Tensor, dirs: Tensor, order: int, weights: Optional[Sequence[float]], method: str
) -> Tensor:
    """``Σ_r w_r D^K_{dirs[r]} f(x)`` for directions ``dirs`` of shape ``(R, *x.shape)``, K = ``order``.

    ``weights`` are constants (``None``: all ones). ``"collapsed"`` absorbs ``|w_r|^{1/K}`` into the
    directions and propagates the K-th coefficient summed over r (one jet per sign of weight);
    ``"standard"`` propagates every direction to order K and contracts the K-th coefficients.
    """
    K = order
    if method == "standard" or K == 1:  # for K = 1 the sum is one direction: D_{Σ w v} f
        if K == 1:
            w = torch.ones(dirs.shape[0]) if weights is None else torch.tensor([float(c) for c in weights])
            dirs = torch.tensordot(w.to(dirs), dirs, dims=1).unsqueeze(0)
            weights = None
        zero = dirs.new_zeros(()).expand(dirs.shape)
        _, ys = jet(func, (x,), ([dirs] + [zero] * (K - 1),))
        _tensor_output(ys[-1], "operators")
        if weights is None:
            return ys[-1].sum(0)
        w = torch.tensor([float(c) for c in weights], dtype=ys[-1].dtype, device=ys[-1].device)
        return torch.tensordot(w, ys[-1], dims=1)

    groups: List[Tuple[float, Tensor]] = []
    if weights is None:
        groups.append((1.0, dirs))
    else:
        for sign in (1.0, -1.0) if K % 2 == 0 else (1.0,):
            picked = [(r, float(c)) for r, c in enumerate(weights) if c * sign > 0 or (K % 2 and c != 0)]
            if not picked:
                continue
            index = torch.tensor([r for r, _ in picked], device=dirs.device)
            scale = torch.tensor(
                [math.copysign(abs(c) ** (1.0 / K), c * sign) for _, c in picked], dtype=dirs.dtype, device=dirs.device
            )
            groups.append((sign, dirs.index_select(0, index) * scale.view(-1, *[1] * x.dim())))
    total: Optional[Tensor] = None
    for sign, d in groups:
        zero = d.new_zeros(()).expand(d.shape)
        _, ys = jet(func, (x,), ([d] + [zero] * (K - 2) + [torch.zeros_like(x)],), collapse=True)
        part = _tensor_output(ys[-1], "operators") if sign > 0 else -ys[-1]
        total = part if total is None else total + part
    if total is None:  # every weight was zero
        return torch.zeros_like(func(x))
    return total


def _sample(shape: Tuple[int, ...], distribution: str, x: Tensor, generator: Seed) -> Tensor:
    g = _generator(generator, x.device)
    if distribution == "gaussian":
        return torch.randn(shape, generator=g, dtype=x.dtype, device=x.device)
    return torch.randint(0, 2, shape, generator=g, device=x.device).to(x.dtype) * 2 - 1


# -------------------------------------------------------------------------------- public operators
def derivatives(func: Func, x: Tensor, v: Tensor, order: int) -> List[Tensor]:
    """All directional derivatives ``[f(x), D_v f, D²_v f, ..., D^order_v f]`` from one jet.

    ``D^k_v f = d^k/dt^k f(x + t v)|_{t=0}``. ``v`` has x's shape, or ``(R, *x.shape)`` for R
    directions at once (then ``D^k_v f`` for k ≥ 1 has shape ``(R, *f(x).shape)``).
    """
    _check_x(x, "derivatives")
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"torch_hod.taylor.derivatives: order must be a non-negative int, got {order!r}")
    if not isinstance(v, Tensor) or tuple(v.shape[-x.dim():] if x.dim() else ()) != tuple(x.shape) or v.dim() not in (
        x.dim(),
        x.dim() + 1,
    ):
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(
            f"torch_hod.taylor.derivatives: v must have x's shape {tuple(x.shape)} or (R, *x.shape), got {got}"
        )
    if order == 0:
        return [_tensor_output(func(x), "derivatives")]
    v = v.to(dtype=x.dtype, device=x.device)
    y0, ys = jet(func, (x,), ([v] + [v.new_zeros(()).expand(v.shape)] * (order - 1),))
    return [_tensor_output(y0, "derivatives"), *ys]


def laplacian(
    func: Func,
    x: Tensor,
    *,
    batch_dims: int = 0,
    method: str = "collapsed",
    weighting: Optional[Tensor] = None,
    randomization: bool = False,
    num_samples: int = 16,
    distribution: str = "rademacher",
    generator: Seed = None,
) -> Tensor:
    """Laplacian ``Δf(x) = Σ_i ∂²f/∂x_i²`` (or ``Σ_ij C_ij ∂²f/∂x_i∂x_j``) by Taylor mode.

    Shapes: x is ``(*B, *E)`` with ``B = x.shape[:batch_dims]``, ``D = prod(E)``; the result has
    ``f(x)``'s shape ``(*B, *O)``: one Laplacian per sample and output entry.

    * exact (default): D directions ``e_i``, one collapsed 2-jet (``method="standard"``: the
      uncollapsed jet, summed afterwards; for comparison).
    * ``weighting=F`` of shape ``(D, R)`` or ``(*B, D, R)``: ``Σ_ij C_ij ∂_i∂_j f`` with ``C = F Fᵀ``
      (directions: the R columns of F).
    * ``randomization=True``: the unbiased estimate ``1/S Σ_s D²_{v_s} f`` with
      ``S = num_samples`` directions per sample, drawn independently for every sample from
      ``distribution`` (``"rademacher"`` or ``"gaussian"``, both ``E[v vᵀ] = I``; with a weighting,
      ``F v``) using ``generator`` (a ``torch.Generator`` or an int seed).

    Differentiable with respect to every tensor ``func`` closes over (model parameters) and x.
    """
    _check_x(x, "laplacian", batch_dims)
    _check_choice(method, _METHODS, "laplacian", "method")
    batch, D = tuple(x.shape[:batch_dims]), math.prod(x.shape[batch_dims:])
    width = D
    if weighting is not None:
        F = weighting
        if not isinstance(F, Tensor) or F.dim() < 2 or F.shape[-2] != D or F.shape[:-2] not in ((), torch.Size(batch)):
            got = tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__
            raise ValueError(
                f"torch_hod.taylor.laplacian: weighting must be a factor F of C = F Fᵀ with shape (D, R) "
                f"or (*batch, D, R) = ({D}, R) or {(*batch, D)} + (R,), got {got}"
            )
        width = F.shape[-1]
    if randomization:
        _check_choice(distribution, ("rademacher", "gaussian"), "laplacian", "distribution")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"torch_hod.taylor.laplacian: num_samples must be a positive int, got {num_samples!r}")
        coeff = _sample((num_samples, *batch, width), distribution, x, generator)
    else:
        coeff = torch.eye(width, dtype=x.dtype, device=x.device).reshape(width, *(1,) * batch_dims, width)
    if weighting is not None:  # directions F c: (R, *B or 1s, D)
        coeff = torch.matmul(weighting.to(x.dtype), coeff.unsqueeze(-1)).squeeze(-1)
    lap = _directional_sum(func, x, _lift(coeff, x, batch_dims), 2, None, method)
    return _check_output(lap / num_samples if randomization else lap, x, batch_dims, "laplacian")


def _biharmonic_directions(D: int) -> Tuple[List[Tuple[int, ...]], List[Fraction]]:
    """Directions and weights of ``Δ²f = (4 − D)/3 Σ_i D⁴_{e_i} + 1/6 Σ_{i<j} (D⁴_{e_i+e_j} + D⁴_{e_i−e_j})``."""
    dirs: List[Tuple[int, ...]] = []
    weights: List[Fraction] = []
    for i in range(D):
        dirs.append(tuple(int(m == i) for m in range(D)))
        weights.append(Fraction(4 - D, 3))
    for i, j in itertools.combinations(range(D), 2):
        for s in (1, -1):
            dirs.append(tuple(int(m == i) + s * int(m == j) for m in range(D)))
            weights.append(Fraction(1, 6))
    return dirs, weights


def bilaplacian(
    func: Func,
    x: Tensor,
    *,
    batch_dims: int = 0,
    method: str = "collapsed",
    randomization: bool = False,
    num_samples: int = 16,
    distribution: str = "gaussian",
    generator: Seed = None,
) -> Tensor:
    """Biharmonic ``Δ²f = Σ_ij ∂⁴f/∂x_i²∂x_j²`` by Taylor mode (shapes as in :func:`laplacian`).

    * exact (default): the D² directions and weights of the module docstring, as two collapsed
      4-jets (positive and negative weights; one when D ≤ 4); ``method="standard"``: one uncollapsed
      4-jet over all directions, contracted with the weights afterwards.
    * ``randomization=True``: the unbiased estimate ``1/(3S) Σ_s D⁴_{v_s} f`` with
      ``v ~ N(0, I)`` (only ``distribution="gaussian"``: Rademacher directions are biased here).
    """
    _check_x(x, "bilaplacian", batch_dims)
    _check_choice(method, _METHODS, "bilaplacian", "method")
    batch, D = tuple(x.shape[:batch_dims]), math.prod(x.shape[batch_dims:])
    if randomization:
        if distribution != "gaussian":
            raise ValueError(
                f"torch_hod.taylor.bilaplacian: distribution={distribution!r}; only 'gaussian' gives an "
                f"unbiased estimate (E[D⁴_v f] = 3Δ²f needs E[v_i⁴] = 3; Rademacher has E[v_i⁴] = 1)."
            )
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"torch_hod.taylor.bilaplacian: num_samples must be a positive int, got {num_samples!r}")
        dirs = _lift(_sample((num_samples, *batch, D), "gaussian", x, generator), x, batch_dims)
        out = _directional_sum(func, x, dirs, 4, None, method) / (3 * num_samples)
    else:
        ints, weights = _biharmonic_directions(D)
        dirs = _lift(torch.tensor(ints, dtype=x.dtype, device=x.device), x, batch_dims)
        out = _directional_sum(func, x, dirs, 4, weights, method)
    return _check_output(out, x, batch_dims, "bilaplacian")


def _compositions(d: int, n: int) -> List[Tuple[int, ...]]:
    """All ``j ∈ ℕⁿ`` with ``|j| = d`` (there are ``binom(n + d − 1, d)``)."""
    if n == 1:
        return [(d,)]
    return [(a,) + rest for a in range(d, -1, -1) for rest in _compositions(d - a, n - 1)]


def _binom(r: Fraction, k: int) -> Fraction:
    """Generalised binomial ``r (r−1) ⋯ (r−k+1) / k!`` for rational r."""
    out = Fraction(1)
    for t in range(k):
        out *= (r - t) / (k - t)
    return out


def interpolation_weights(multi_index: Sequence[int]) -> Dict[Tuple[int, ...], Fraction]:
    """Exact weights ``w_j`` with ``∂^α f = Σ_{|j|=d} w_j D^d_j f`` (``d = |α|``, j ∈ ℕⁿ, zeros dropped).

    Griewank, Utke & Walther (Math. Comp. 2000), in derivative convention:
    ``w_j = 1/d! Σ_{0<k≤α} (−1)^{|α−k|} binom(α, k) binom(d k/|k|, j) (|k|/d)^d`` with multi-index
    binomials ``binom(a, b) = Π_m binom(a_m, b_m)``. Exact (``Fraction``); ``tests`` check
    ``Σ_j w_j D^d_j x^β = ∂^α x^β`` for every monomial of degree d.
    """
    alpha = tuple(multi_index)
    d = sum(alpha)
    weights: Dict[Tuple[int, ...], Fraction] = {}
    for j in _compositions(d, len(alpha)):
        w = Fraction(0)
        for k in itertools.product(*(range(a + 1) for a in alpha)):
            s = sum(k)
            if s == 0:
                continue
            term = Fraction((-1) ** (d - s) * math.prod(math.comb(a, b) for a, b in zip(alpha, k)))
            for km, jm in zip(k, j):
                term *= _binom(Fraction(d * km, s), jm)
            w += term * Fraction(s, d) ** d
        if w:
            weights[j] = w / math.factorial(d)
    return weights


def mixed_partial(
    func: Func, x: Tensor, multi_index: Sequence[int], *, batch_dims: int = 0, method: str = "collapsed"
) -> Tensor:
    """Mixed partial ``∂^α f = ∂^{|α|} f / ∂x_1^{α_1} ⋯ ∂x_D^{α_D}`` by interpolating univariate jets.

    ``multi_index`` α has one non-negative int per event coordinate (length ``D = prod(E)``, x
    flattened row-major over its event dims). Only the n coordinates with ``α_i > 0`` are used:
    ``binom(n + d − 1, d)`` directions of order ``d = |α|`` (fewer where a weight is zero), as one
    collapsed d-jet per sign of weight. Shapes as in :func:`laplacian`.
    """
    _check_x(x, "mixed_partial", batch_dims)
    _check_choice(method, _METHODS, "mixed_partial", "method")
    D = math.prod(x.shape[batch_dims:])
    alpha = tuple(multi_index) if isinstance(multi_index, (tuple, list)) else None
    if alpha is None or len(alpha) != D or any(isinstance(a, bool) or not isinstance(a, int) or a < 0 for a in alpha):
        raise ValueError(
            f"torch_hod.taylor.mixed_partial: multi_index must be a tuple of {D} non-negative ints (one order "
            f"per coordinate of x's event shape {tuple(x.shape[batch_dims:])}), got {multi_index!r}"
        )
    if sum(alpha) == 0:
        return _check_output(func(x), x, batch_dims, "mixed_partial")
    used = [i for i, a in enumerate(alpha) if a > 0]
    weights = interpolation_weights([alpha[i] for i in used])
    ints = torch.zeros(len(weights), D, dtype=x.dtype, device=x.device)
    ints[:, used] = torch.tensor(list(weights), dtype=x.dtype, device=x.device)
    out = _directional_sum(func, x, _lift(ints, x, batch_dims), sum(alpha), list(weights.values()), method)
    return _check_output(out, x, batch_dims, "mixed_partial")
