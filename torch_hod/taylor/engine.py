"""The Taylor-mode transform: the :class:`Jet` tensor, :func:`jet`, and the rule combinators.

Design (measured in ``/work/shared/FACTS.md``): a :class:`Jet` is a storage-less wrapper tensor
(``_make_wrapper_subclass``) with the primal's shape, dtype and device. It carries

* ``primal``: the value ``x0`` (shape ``S``);
* ``series``: the normalised coefficients ``x_1 … x_K`` stacked in one tensor of shape ``(N, *S)``
  with ``N = (K−1)·R + R_top`` rows: order ``k < K`` owns rows ``[(k−1)R, kR)`` (one per direction)
  and the top order owns the last ``R`` rows, or a single row in collapsed mode;
* ``level``: the call's :class:`Level` (a tag against perturbation confusion in nested jets, K, R,
  collapsed).

All work happens in ``__torch_function__``, where calls arrive as the user wrote them
(``F.linear``, ``F.layer_norm``, ``Tensor.__getitem__``, ``torch_hod.ops.tanh``): the rule of the
function is looked up in :mod:`torch_hod.taylor.registry` and called with the Jets.
``__torch_dispatch__`` raises, so an operation without a rule can never silently drop the higher
coefficients. Everything stays on autograd's tape: model parameters get gradients by ``.backward()``.

Rule combinators (the structure classes of JAX jet): :func:`linear` (one batched call on all
coefficients), :func:`bilinear` (Cauchy product with O(K) batched calls), :func:`series_rule`
(elementwise recurrences of :mod:`torch_hod.taylor.series`), :func:`apply_elementwise_rule`
(``y' = f'(x) x'`` with ``f'`` evaluated on the jet of order K−1), zero-derivative ops (run on the
primal, return a constant) and compositions (rules written as torch code on Jets).
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from torch_hod.taylor import series as S
from torch_hod.taylor.registry import taylor_rule_for

__all__ = [
    "Jet",
    "Level",
    "jet",
    "apply_elementwise_rule",
    "linear",
    "bilinear",
    "series_rule",
    "zero_derivative",
    "level_of",
    "is_jet",
    "coefficients",
    "from_coefficients",
    "value",
]

_TAGS = itertools.count(1)


@dataclass(frozen=True)
class Level:
    """One ``jet`` call: ``tag`` orders nested calls; ``K`` orders, ``R`` directions, ``collapsed``."""

    tag: int
    K: int
    R: int
    collapsed: bool


class Jet(Tensor):
    """A tensor carrying a truncated Taylor series (see the module docstring)."""

    primal: Tensor
    series: Tensor
    level: Level

    @staticmethod
    def __new__(cls, primal: Tensor, series: Tensor, level: Level) -> "Jet":
        out = Tensor._make_wrapper_subclass(cls, primal.shape, dtype=primal.dtype, device=primal.device)
        out.primal, out.series, out.level = primal, series, level
        return out

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        L = self.level
        return f"Jet(K={L.K}, R={L.R}, collapsed={L.collapsed}, primal={self.primal!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_metadata(func):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        rule = taylor_rule_for(func)
        if rule is None:
            rule = _aten_alias(func) or _decomposition(func, kwargs)
        if rule is None:
            return _inplace(func, args, kwargs)
        if not torch.is_grad_enabled() and _inside_function_apply():
            raise RuntimeError(
                f"torch_hod.taylor.jet: a torch.autograd.Function was applied to a Jet (its forward "
                f"called {_name(func)} with gradients disabled), which would silently drop gradients "
                f"of model parameters. Give the Function's public wrapper a Taylor rule: call it "
                f"through torch.overrides.handle_torch_function and register the rule with "
                f"torch_hod.taylor.register_taylor_rule(func, rule)."
            )
        return rule(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(
            f"torch_hod.taylor.jet: the operation {func} reached ATen with a Jet argument, so it has "
            f"no Taylor-mode rule (a torch.autograd.Function or an unsupported internal call). "
            f"Register a rule for the function you call with torch_hod.taylor.register_taylor_rule."
        )


# ----------------------------------------------------------------------------------------------
# Access to levels and coefficients


def is_jet(x: Any, level: Optional[Level]) -> bool:
    """Whether ``x`` is a Jet of ``level``'s call (Jets of outer calls are constants here)."""
    return isinstance(x, Jet) and level is not None and x.level.tag == level.tag


def level_of(*trees: Any) -> Optional[Level]:
    """The innermost level among the Jets in ``trees`` (``None`` if there is none)."""
    return max((a.level for a in _jets(trees)), key=lambda level: level.tag, default=None)


def value(x: Any) -> Any:
    """The plain value under every level of Jet, detached (for shifts, masks and indices)."""
    while isinstance(x, Jet):
        x = x.primal
    return x.detach() if isinstance(x, Tensor) else x


def coefficients(x: Jet) -> List[Tensor]:
    """``[x0, x1, ..., xK]``: ``x_k`` has shape ``(R, *S)``, the collapsed top has shape ``S``."""
    L, s = x.level, x.series
    out = [x.primal] + [s[(k - 1) * L.R : k * L.R] for k in range(1, L.K)]
    out.append(s[(L.K - 1) * L.R] if L.collapsed else s[(L.K - 1) * L.R :])
    return out


def from_coefficients(c: Sequence[Any], level: Level) -> Jet:
    """Inverse of :func:`coefficients` (broadcasts each coefficient to its full shape)."""
    y0 = c[0]
    shape = tuple(y0.shape)
    rows = []
    for k in range(1, level.K + 1):
        ck = c[k] if isinstance(c[k], Tensor) else torch.zeros((), dtype=y0.dtype, device=y0.device)
        if k == level.K and level.collapsed:
            rows.append(torch.broadcast_to(ck, shape).unsqueeze(0))
        else:
            rows.append(torch.broadcast_to(ck, (level.R,) + shape))
    return Jet(y0, torch.cat(rows), level)


def _truncate(x: Jet, K: int) -> Jet:
    """The jet of order ``K`` < x's order (its top order is directed, never collapsed)."""
    L = x.level
    return Jet(x.primal, x.series[: K * L.R], Level(L.tag, K, L.R, False))


def _pack(y0: Any, ys: Any, level: Level) -> Any:
    """Zip a primal output pytree with its batched-coefficient pytree into Jets."""
    v0, spec = tree_flatten(y0)
    vs = tree_leaves(ys)
    out = [
        Jet(a, b, level) if isinstance(a, Tensor) and a.is_floating_point() else a for a, b in zip(v0, vs)
    ]
    return tree_unflatten(out, spec)


def batched(fn: Callable[..., Any], xs: Sequence[Tensor], in_dims: Sequence[Optional[int]], loop: bool = False) -> Any:
    """``fn`` mapped over dim 0 of the inputs with ``in_dims == 0``: one ``vmap`` call, or a Python
    loop when Jets of an outer call are involved (``vmap`` cannot take tensor subclasses)."""
    if not loop and not any(isinstance(leaf, Jet) for leaf in xs):
        return torch.vmap(fn, in_dims=tuple(in_dims))(*xs)
    n = next(x.shape[0] for x, d in zip(xs, in_dims) if d == 0)
    outs = [fn(*[x[i] if d == 0 else x for x, d in zip(xs, in_dims)]) for i in range(n)]
    flat = [tree_flatten(o)[0] for o in outs]
    spec = tree_flatten(outs[0])[1]
    return tree_unflatten([torch.stack(col) for col in zip(*flat)], spec)


# ----------------------------------------------------------------------------------------------
# Rule combinators


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size) and not hasattr(obj, "_fields")


def _walk(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Map ``fn`` over the leaves of call arguments (recursing into lists, tuples and dicts)."""
    if _is_container(obj):
        return type(obj)(_walk(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _walk(v, fn) for k, v in obj.items()}
    return fn(obj)


def _jets(obj: Any) -> Iterator[Jet]:
    """The Jets among the leaves of call arguments, in order."""
    if _is_container(obj):
        for o in obj:
            yield from _jets(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _jets(o)
    elif isinstance(obj, Jet):
        yield obj


def linear(func: Callable[..., Any], additive: Sequence[Any] = (), elementwise: bool = False) -> Callable[..., Any]:
    """Rule of an op that is linear in its Jet arguments: ``y_k = func(x_k)``, one batched call.

    ``additive`` names the positions (ints) or keywords (strs) of arguments that enter additively
    (``add``'s operands, ``cat``'s list, ``where``'s branches, a bias): a constant there has zero
    higher coefficients. Other constant arguments (weights, indices, sizes) are parameters.
    ``elementwise=True`` (broadcasting ops: add, mul by a constant, where, ``to``) applies ``func``
    directly to the stacked coefficients viewed as ``(N, 1, …, 1, *shape)``; otherwise the call is
    one ``torch.vmap`` over the N coefficient rows.
    """

    def rule(*args: Any, **kwargs: Any) -> Any:
        L = level_of(args, kwargs)
        a0, k0 = _walk((args, kwargs), lambda a: a.primal if is_jet(a, L) else a)
        y0 = func(*a0, **k0)
        jets = [a for a in _jets((args, kwargs)) if is_jet(a, L)]
        zero = lambda a: a if is_jet(a, L) else _zero_like(a)
        zeroed = (
            tuple(_walk(a, zero) if j in additive else a for j, a in enumerate(args)),
            {k: _walk(v, zero) if k in additive else v for k, v in kwargs.items()},
        )
        if elementwise:
            if not y0.is_floating_point():  # e.g. .to(torch.int64): piecewise constant
                return y0
            nd = y0.dim()
            lifted = _walk(zeroed, lambda a: a.series.reshape(a.series.shape[:1] + (1,) * (nd - a.dim()) + a.series.shape[1:]) if is_jet(a, L) else a)
            ys = func(*lifted[0], **lifted[1])
            return Jet(y0, torch.broadcast_to(ys, ys.shape[:1] + y0.shape), L)

        def one(*rows: Tensor) -> Any:
            it = iter(rows)
            a, k = _walk(zeroed, lambda t: next(it) if is_jet(t, L) else t)
            return func(*a, **k)

        nested = any(not is_jet(a, L) for a in _jets(zeroed))
        ys = batched(one, [j.series for j in jets], [0] * len(jets), loop=nested)
        return _pack(y0, ys, L)

    return rule


def _zero_like(a: Any) -> Any:
    """The zero coefficient of a constant (a Jet of an outer call included) in an additive slot."""
    if isinstance(a, Tensor) and (a.is_floating_point() or a.is_complex()):
        return torch.zeros((), dtype=a.dtype, device=a.device).expand(a.shape)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return 0
    return a


def bilinear(B: Callable[[Tensor, Tensor], Tensor], a: Any, b: Any) -> Any:
    """Rule of a bilinear ``B(a, b)`` (mul, matmul, linear, einsum, conv with both operands Jets):

    ``(B(a,b))_k = B(a0, b_k) + B(a_k, b0) + Σ_{j=1}^{k−1} B(a_j, b_{k−j})`` (Cauchy product). The
    first two terms are one batched call each on all coefficients; the cross terms of order k are
    one batched call, summed over the direction axis for the collapsed top order.
    """
    L = level_of(a, b)
    ja, jb = is_jet(a, L), is_jet(b, L)
    loop = any(isinstance(t, Jet) and not is_jet(t, L) for t in (a, b))
    if not jb:
        return _pack(B(a.primal, b), batched(lambda s: B(s, b), [a.series], [0], loop), L)
    if not ja:
        return _pack(B(a, b.primal), batched(lambda s: B(a, s), [b.series], [0], loop), L)
    ca, cb = coefficients(a), coefficients(b)
    y0 = B(ca[0], cb[0])
    lin = batched(lambda s: B(ca[0], s), [b.series], [0], loop) + batched(lambda s: B(s, cb[0]), [a.series], [0], loop)
    out = coefficients(Jet(y0, lin, L))
    for k in range(2, L.K + 1):
        A = torch.cat([ca[j] for j in range(1, k)])
        Bk = torch.cat([cb[k - j] for j in range(1, k)])
        prod = batched(B, [A, Bk], [0, 0], loop)
        prod = prod.reshape((k - 1, L.R) + tuple(prod.shape[1:])).sum(0)
        out[k] = out[k] + (prod.sum(0) if (L.collapsed and k == L.K) else prod)
    return from_coefficients(out, L)


def series_rule(fn: Callable[[List[Tensor], bool], List[Tensor]]) -> Callable[..., Any]:
    """Rule of a unary elementwise op from its series recurrence ``fn(coefficients, collapsed)``."""

    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        L = level_of(x)
        return from_coefficients(fn(coefficients(x), L.collapsed), L)

    return rule


def apply_elementwise_rule(f: Callable[..., Any], df: Callable[..., Any], x: Any, *params: Any) -> Any:
    """Taylor rule of an elementwise ``y = f(x, *params)`` from its derivative ``df``:
    ``y' = df(x) x'``, i.e. ``y_k = (1/k) Σ_{j=1}^{k} j x_j g_{k−j}`` with ``g`` the series of
    ``df(x)`` to order K−1 (``df`` evaluated on the truncated jet)."""
    L = level_of(x)
    if not is_jet(x, L):
        return f(x, *params)
    c = coefficients(x)
    y0 = f(c[0], *params)
    if L.K == 1:
        g = [df(c[0], *params)]
    else:
        gj = df(_truncate(x, L.K - 1), *params)
        g = coefficients(gj) if is_jet(gj, L) else [gj] + [0] * (L.K - 1)
    return from_coefficients(S.integrate(c, g, y0, L.collapsed), L)


def zero_derivative(func: Callable[..., Any]) -> Callable[..., Any]:
    """Rule of a piecewise-constant or non-differentiable op: run on the primals, return constants."""

    def rule(*args: Any, **kwargs: Any) -> Any:
        L = level_of(args, kwargs)
        a, k = _walk((args, kwargs), lambda t: t.primal if is_jet(t, L) else t)
        return func(*a, **k)

    return rule


# ----------------------------------------------------------------------------------------------
# Metadata, in-place ops, diagnostics

_METADATA_PROPERTIES = {
    "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_sparse", "is_quantized",
    "is_meta", "is_mps", "is_nested", "names", "itemsize", "nbytes", "is_leaf", "grad_fn", "grad",
    "output_nr", "_version", "is_cpu", "is_xpu", "is_mkldnn", "is_sparse_csr",
}
_METADATA_METHODS = {
    getattr(Tensor, n)
    for n in (
        "size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
        "is_contiguous", "stride", "storage_offset", "__len__", "get_device", "is_signed", "__hash__",
        "ndimension",
    )
}


def _is_metadata(func: Any) -> bool:
    if func in _METADATA_METHODS:
        return True
    owner = getattr(func, "__self__", None)
    return getattr(func, "__name__", "") == "__get__" and getattr(owner, "__name__", "") in _METADATA_PROPERTIES


def _name(func: Any) -> str:
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{func}"
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and owner is not None:
        return f"Tensor.{owner.__name__} (property)"
    qual = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
    module = getattr(func, "__module__", None) or ""
    if qual.startswith("TensorBase.") or qual.startswith("Tensor."):
        return "torch.Tensor." + qual.split(".", 1)[1]
    if qual.startswith("_VariableFunctionsClass."):
        return "torch." + qual.split(".", 1)[1]
    return f"{module}.{qual}" if module else qual


def _inplace(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """In-place ops (``add_``, ``__iadd__``, ``relu_``): the out-of-place rule, then rebind."""
    name = getattr(func, "__name__", "")
    oop_name = "__" + name[3:] if name.startswith("__i") else name[:-1] if (name.endswith("_") and not name.endswith("__")) else None
    oop = None
    if oop_name:
        for owner in (Tensor, torch, torch.nn.functional):
            if getattr(owner, name, None) is func:
                oop = getattr(owner, oop_name, None)
                break
    if oop is None or taylor_rule_for(oop) is None:
        raise NotImplementedError(
            f"torch_hod.taylor.jet: no Taylor-mode rule for {_name(func)}. Register one with "
            f"torch_hod.taylor.register_taylor_rule({_name(func)}, rule), where rule has the same "
            f"signature and computes the result from Jets with functions that have rules."
        )
    target = args[0]
    result = taylor_rule_for(oop)(*args, **kwargs)
    if not isinstance(target, Jet) or not is_jet(result, target.level) or result.shape != target.shape:
        raise RuntimeError(
            f"torch_hod.taylor.jet: in-place {_name(func)} would write a Taylor series into a tensor "
            f"that does not carry one (or of another shape); use the out-of-place {oop_name}."
        )
    target.primal, target.series = result.primal, result.series
    return target


def _aten_alias(func: Any) -> Optional[Callable[..., Any]]:
    """``torch.ops.aten.<name>.<overload>`` (as called inside decompositions) → the rule of
    ``torch.<name>`` (the same operation: torch functions are bindings of the aten schema)."""
    if not isinstance(func, torch._ops.OpOverload):
        return None
    target = getattr(torch, func.overloadpacket.__name__, None)
    return taylor_rule_for(target) if target is not None else None


#: Functions whose PyTorch decomposition runs on Jets and was verified by value (tests/taylor).
DECOMPOSED = frozenset({
    "hardswish", "selu", "celu", "softshrink", "hardshrink", "logit", "sinc", "xlogy", "glu", "addcmul",
    "addcdiv", "lerp", "frac", "sgn", "std_mean", "var_mean",
})


def _decomposition(func: Any, kwargs: Dict[str, Any]) -> Optional[Callable[..., Any]]:
    """Fallback for a composite function without a rule: PyTorch's own decomposition of the aten
    op of the same name (``torch._decomp.decomposition_table``), run on the Jets. Used only for the
    functions in :data:`DECOMPOSED`, each verified by value, so a decomposition that is not
    differentiable in the Taylor sense can never give a wrong number silently."""
    name = getattr(func, "__name__", "")
    packet = getattr(torch.ops.aten, name, None) if name in DECOMPOSED else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    from torch._decomp import decomposition_table

    overloads = [getattr(packet, o) for o in packet.overloads()]
    candidates = [decomposition_table[o] for o in overloads if o in decomposition_table]
    if not candidates:
        return None

    def rule(*args: Any, **kw: Any) -> Any:
        if kw.get("inplace", False):
            raise NotImplementedError(f"torch_hod.taylor.jet: {_name(func)} with inplace=True has no Taylor rule")
        kw.pop("inplace", None)
        errors = []
        for decomposition in candidates:
            try:
                return decomposition(*args, **kw)
            except (TypeError, NotImplementedError, RuntimeError) as err:
                errors.append(err)
        raise NotImplementedError(
            f"torch_hod.taylor.jet: no Taylor-mode rule for {_name(func)}, and its PyTorch "
            f"decomposition failed on Jets ({errors[-1]}). Register a rule with "
            f"torch_hod.taylor.register_taylor_rule({_name(func)}, rule)."
        )

    return rule


_APPLY_CODE = torch.autograd.Function.apply.__func__.__code__


def _inside_function_apply() -> bool:
    frame = sys._getframe(2)
    for _ in range(64):
        if frame is None:
            return False
        if frame.f_code is _APPLY_CODE:
            return True
        frame = frame.f_back
    return False


# ----------------------------------------------------------------------------------------------
# The transform


def jet(
    func: Callable[..., Any],
    primals: Sequence[Tensor],
    series: Sequence[Sequence[Tensor]],
    *,
    collapse: bool = False,
) -> Tuple[Any, List[Any]]:
    """Taylor-mode propagation (JAX ``jet`` semantics): returns ``(y0, [y1, ..., yK])``.

    ``series[i] = [x_1, ..., x_K]`` are the coefficients of primal ``i`` in derivative convention,
    ``x(t) = x0 + x1 t + x2 t²/2! + ...``, and ``y_k = d^k/dt^k func(x(t))`` at ``t = 0``.

    Directions: a coefficient of shape ``(R, *primal.shape)`` carries R directions (coefficient 0
    never does; all directed coefficients share R; undirected ones are shared by all directions).
    The outputs ``y_k`` then have shape ``(R, *y0.shape)``; ``y0`` is computed once.

    ``collapse=True``: the K-th coefficients have no direction axis (they are already summed over
    the directions); the returned ``y_K`` is ``Σ_r y_K[r]`` (shape ``y0.shape``), propagated without
    per-direction K-th coefficients (collapsed Taylor mode, Dangel et al. 2025).

    ``func`` may be any Python function or ``nn.Module`` of tensors (with data-dependent control
    flow: comparisons see the primal); outputs may be a tensor or a pytree of tensors. Everything is
    differentiable with respect to tensors that require grad (parameters), by ``.backward()``.
    """
    primals, series, K, R, directed = _check(primals, series, collapse)
    level = Level(next(_TAGS), K, R, collapse)
    inputs = []
    for x0, xs in zip(primals, series):
        rows = []
        for k, xk in enumerate(xs, start=1):
            xk = xk / math.factorial(k)
            if k == K and collapse:
                rows.append(xk.unsqueeze(0))
            else:
                rows.append(xk if xk.dim() == x0.dim() + 1 else torch.broadcast_to(xk, (R,) + tuple(x0.shape)))
        inputs.append(Jet(x0, torch.cat(rows), level))
    out = func(*inputs)
    leaves, spec = tree_flatten(out)
    y0s, cols = [], []
    for leaf in leaves:
        if is_jet(leaf, level):
            c = coefficients(leaf)
        elif isinstance(leaf, Tensor):
            z = torch.zeros_like(value(leaf)) if isinstance(leaf, Jet) else torch.zeros_like(leaf)
            c = [leaf] + [z if (k == K and collapse) else torch.broadcast_to(z, (R,) + tuple(z.shape)) for k in range(1, K + 1)]
        else:
            raise TypeError(f"torch_hod.taylor.jet: func returned a {type(leaf).__name__}; expected tensors")
        y0s.append(c[0])
        col = []
        for k in range(1, K + 1):
            yk = c[k] * math.factorial(k)
            if not directed and not (k == K and collapse):
                yk = yk[0]
            col.append(yk)
        cols.append(col)
    y0 = tree_unflatten(y0s, spec)
    ys = [tree_unflatten([col[k] for col in cols], spec) for k in range(K)]
    return y0, ys


def _check(primals: Any, series: Any, collapse: bool):
    """Validate the arguments of :func:`jet`; returns ``(primals, series, K, R, directed)``."""
    if isinstance(primals, Tensor) or not isinstance(primals, (tuple, list)):
        raise TypeError("torch_hod.taylor.jet: primals must be a tuple or list of tensors, e.g. (x0,)")
    if isinstance(series, Tensor) or not isinstance(series, (tuple, list)):
        raise TypeError("torch_hod.taylor.jet: series must be a list with one list of coefficients per primal")
    if len(series) != len(primals):
        raise ValueError(f"torch_hod.taylor.jet: got {len(primals)} primals but {len(series)} series; expected one series per primal")
    if not primals:
        raise ValueError("torch_hod.taylor.jet: primals is empty; expected at least one tensor")
    orders = set()
    for i, (x0, xs) in enumerate(zip(primals, series)):
        if not isinstance(x0, Tensor):
            raise TypeError(f"torch_hod.taylor.jet: primal {i} is a {type(x0).__name__}; expected a Tensor")
        if not x0.is_floating_point():
            raise TypeError(f"torch_hod.taylor.jet: primal {i} has dtype {x0.dtype}; expected a floating-point tensor (convert with .double() or .float())")
        if isinstance(xs, Tensor) or not isinstance(xs, (tuple, list)):
            raise TypeError(f"torch_hod.taylor.jet: series[{i}] must be a list [x_1, ..., x_K] of tensors, got {type(xs).__name__}")
        if len(xs) == 0:
            raise ValueError(f"torch_hod.taylor.jet: series[{i}] is empty; expected K >= 1 coefficients [x_1, ..., x_K]")
        orders.add(len(xs))
    if len(orders) > 1:
        raise ValueError(f"torch_hod.taylor.jet: series of different lengths {sorted(orders)}; every primal needs the same number K of coefficients")
    K = orders.pop()
    Rs = set()
    for i, (x0, xs) in enumerate(zip(primals, series)):
        for k, xk in enumerate(xs, start=1):
            where = f"series[{i}][{k - 1}] (coefficient x_{k} of primal {i})"
            if not isinstance(xk, Tensor):
                raise TypeError(f"torch_hod.taylor.jet: {where} is a {type(xk).__name__}; expected a Tensor")
            if xk.dtype != x0.dtype or xk.device != x0.device:
                raise TypeError(f"torch_hod.taylor.jet: {where} has dtype {xk.dtype} on {xk.device}; expected the primal's dtype {x0.dtype} on {x0.device}")
            if tuple(xk.shape) == tuple(x0.shape):
                continue
            if xk.dim() == x0.dim() + 1 and tuple(xk.shape[1:]) == tuple(x0.shape):
                if collapse and k == K:
                    raise ValueError(f"torch_hod.taylor.jet: with collapse=True, {where} must have the primal's shape {tuple(x0.shape)} (already summed over directions), got {tuple(xk.shape)}")
                Rs.add(xk.shape[0])
                continue
            raise ValueError(f"torch_hod.taylor.jet: {where} has shape {tuple(xk.shape)}; expected the primal's shape {tuple(x0.shape)} or (R, *{tuple(x0.shape)}) with a leading direction axis")
    if len(Rs) > 1:
        raise ValueError(f"torch_hod.taylor.jet: directed coefficients have different numbers of directions {sorted(Rs)}; all must share R")
    directed = bool(Rs)
    return tuple(primals), [list(xs) for xs in series], K, (Rs.pop() if Rs else 1), directed
