"""Taylor-mode rules of torch functions, grouped by structure (as in JAX jet).

* zero-derivative: comparisons, ``argmax``, ``*_like`` constructors, ``detach``, ``item`` … run on
  the primal and return constants, so ``if h.sum() > 0:`` sees the primal;
* linear: ``y_k = L(x_k)`` in ONE batched call on all coefficients (views, indexing, reductions,
  ``cat``/``stack``, ``F.linear``/``matmul``/``einsum``/``conv`` with a constant operand, ``add``);
* bilinear: Cauchy products (``mul``, ``matmul``/``linear``/``einsum``/``conv`` of two Jets);
* elementwise: ODE recurrences (exp, log, pow, div, tanh, sigmoid, sin/cos) or ``y' = f'(x) x'``
  with ``f'`` evaluated on the jet of order K−1 (softplus, tanh-GELU, silu, elu, log1p, …); erf and exact GELU by
  a coupled Gaussian recurrence;
* piecewise: coefficients selected by the primal (relu, abs, where, clamp, maximum, max);
* compositions: softmax, log_softmax, logsumexp, layer/rms/batch/group norm, mse and cross-entropy
  written as torch code on Jets (shift constants such as ``max x`` are taken from the primal).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_hod.taylor import series as S
from torch_hod.taylor.engine import (
    Jet,
    apply_elementwise_rule,
    bilinear,
    coefficients,
    from_coefficients,
    is_jet,
    level_of,
    linear,
    series_rule,
    value,
    zero_derivative,
)
from torch_hod.taylor.registry import register_taylor_rule

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def _funcs(names: Iterable[str], owners: Iterable[Any] = (torch, Tensor)) -> list:
    """The function objects called ``name`` on each owner (torch, Tensor, F …) that exist."""
    out = []
    for name in names:
        for owner in owners:
            f = getattr(owner, name, None)
            if f is not None and f not in out:
                out.append(f)
    return out


def _register(funcs: Iterable[Any], rule: Callable[..., Any]) -> None:
    for f in funcs:
        register_taylor_rule(f, rule)


def _register_each(funcs: Iterable[Any], make: Callable[[Any], Callable[..., Any]]) -> None:
    for f in funcs:
        register_taylor_rule(f, make(f))


def _prop(name: str) -> Any:
    """The function ``__torch_function__`` receives for the property ``Tensor.<name>``."""
    return getattr(Tensor, name).__get__


# ---------------------------------------------------------------------------------------------
# Zero-derivative ops

_ZERO = [
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "eq", "ne", "lt", "le", "gt", "ge",
    "greater", "less", "greater_equal", "less_equal", "not_equal", "isnan", "isinf", "isfinite",
    "isposinf", "isneginf", "isclose", "allclose", "equal", "sign", "signbit", "argmax", "argmin",
    "argsort", "floor", "ceil", "round", "trunc", "floor_divide", "__floordiv__", "__rfloordiv__",
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__", "any", "all",
    "nonzero", "count_nonzero", "numpy", "detach", "ones_like", "zeros_like", "empty_like",
    "full_like", "rand_like", "randn_like", "randint_like", "new_zeros", "new_ones", "new_empty",
    "new_full", "new_tensor", "logical_and", "logical_or", "logical_not",
    "logical_xor", "__and__", "__or__", "__xor__", "__invert__", "heaviside", "searchsorted",
    "bucketize", "__array__",
]
_register_each(_funcs(_ZERO), zero_derivative)
_register([_prop("data")], zero_derivative(lambda x: x.detach()))


def _identity_grad(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


_register(_funcs(["requires_grad_", "retain_grad"], (Tensor,)), _identity_grad)


# ---------------------------------------------------------------------------------------------
# Linear ops: one batched call on all coefficients

_STRUCTURAL = [
    "view_as", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "swapaxes", "swapdims", "t", "movedim", "moveaxis", "squeeze", "unsqueeze", "expand",
    "expand_as", "broadcast_to", "narrow", "select", "index_select", "gather",
    "take_along_dim", "split", "chunk", "unbind", "tensor_split", "flip", "fliplr", "flipud", "roll",
    "repeat", "tile", "diagonal", "diag", "diag_embed", "tril", "triu", "trace", "nansum", "cumsum", "ravel", "repeat_interleave", "narrow_copy", "atleast_1d",
    "atleast_2d", "atleast_3d", "rot90", "masked_select",
]
_POINTWISE = [
    "neg", "negative", "__neg__", "__pos__", "positive", "conj", "resolve_conj", "resolve_neg", "real",
    "contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type_as", "cpu", "cuda",
]
_register_each(_funcs(_STRUCTURAL), linear)
_register_each(_funcs(_POINTWISE), lambda f: linear(f, elementwise=True))
_register_each([_prop(p) for p in ("T", "mT", "H", "mH", "real")], linear)


def _reshape_rule(func: Any) -> Callable[..., Any]:
    """``reshape``/``view``: the coefficient axis is kept in front (``view(dtype)`` is refused:
    reinterpreting bits is not linear)."""

    def rule(x: Any, *shape: Any, **kwargs: Any) -> Any:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        shape = tuple(kwargs.pop("shape", kwargs.pop("size", shape)))
        if any(isinstance(d, torch.dtype) for d in shape):
            raise NotImplementedError("torch_hod.taylor.jet: view(dtype) reinterprets bits and has no Taylor rule")
        L = level_of(x)
        return Jet(func(x.primal, shape), x.series.reshape(x.series.shape[:1] + shape), L)

    return rule


_register_each(_funcs(["reshape", "view"]), _reshape_rule)


def _reduction_rule(name: str) -> Callable[..., Any]:
    """``sum``/``mean`` over ``dim``: the same reduction of the coefficients, dims shifted by one."""
    general = linear(getattr(torch, name))

    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        dim = args[0] if args else kwargs.get("dim")
        keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
        dims = tuple(range(x.dim())) if dim is None or (isinstance(dim, (tuple, list)) and not dim) else (
            (dim,) if isinstance(dim, int) else tuple(dim))
        L = level_of(x, args, kwargs)
        if len(args) > 2 or not is_jet(x, L) or x.dim() == 0 or not all(isinstance(d, int) for d in dims):
            return general(x, *args, **kwargs)
        y0 = getattr(torch, name)(x.primal, *args, **kwargs)
        shifted = tuple(d % x.dim() + 1 for d in dims)
        return Jet(y0, getattr(torch, name)(x.series, shifted, keepdim=keepdim, dtype=kwargs.get("dtype")), L)

    return rule


_register(_funcs(["sum"]), _reduction_rule("sum"))
_register(_funcs(["mean"]), _reduction_rule("mean"))
_register_each(_funcs(["pad", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
                       "adaptive_avg_pool2d", "adaptive_avg_pool3d", "unfold", "fold", "interpolate", "upsample",
                       "pixel_shuffle", "pixel_unshuffle", "channel_shuffle"], (F,)), linear)
# jointly linear in several arguments: constants there carry zero coefficients
_register_each(_funcs(["cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"]),
               lambda f: linear(f, additive=(0, "tensors")))
_register_each(_funcs(["add", "__add__", "__radd__", "sub", "subtract", "__sub__", "__rsub__", "rsub"]),
               lambda f: linear(f, additive=(0, 1, "input", "other"), elementwise=True))


def _plain_index(idx: Any) -> Any:
    """Boolean masks → integer index tensors (equivalent, and vmappable)."""
    if isinstance(idx, tuple):
        return tuple(p for i in idx for p in (_plain_index_part(i)))
    return _plain_index(tuple([idx])) if isinstance(idx, Tensor) and idx.dtype == torch.bool else idx


def _plain_index_part(i: Any) -> tuple:
    if isinstance(i, Tensor) and i.dtype == torch.bool:
        return tuple(i.nonzero(as_tuple=True))
    return (i,)


_getitem = linear(Tensor.__getitem__)
register_taylor_rule(Tensor.__getitem__, lambda x, idx: _getitem(x, _plain_index(idx)))


def _put(base: Tensor, idx: Any, val: Any) -> Tensor:
    out = base.clone()
    out[idx] = val
    return out


def _setitem(x: Any, idx: Any, val: Any) -> None:
    """``x[idx] = val``: the out-of-place ``_put`` (jointly linear in x and val), then rebind x."""
    L = level_of(x, val)
    if not is_jet(x, L):
        raise RuntimeError(
            "torch_hod.taylor.jet: `tensor[idx] = value` writes a Jet into a constant tensor; build "
            "the result out of place instead (torch.cat, torch.stack, torch.where)."
        )
    y = linear(_put, additive=(0, 2))(x, _plain_index(idx), val)
    x.primal, x.series = y.primal, y.series


register_taylor_rule(Tensor.__setitem__, _setitem)


def _where(condition: Any, input: Any = None, other: Any = None, **kwargs: Any) -> Any:
    """``where(c, a, b)`` is jointly linear in (a, b) for a constant condition."""
    if input is None:
        return zero_derivative(torch.where)(condition)
    return _where_linear(value(condition), input, other)


_where_linear = linear(torch.where, additive=(1, 2), elementwise=True)
_masked_fill = linear(torch.masked_fill, additive=(0, 2, "value"), elementwise=True)
_register(_funcs(["masked_fill"]), _masked_fill)
register_taylor_rule(torch.where, _where)
register_taylor_rule(Tensor.where, lambda self, condition, y: _where(condition, self, y))


# ---------------------------------------------------------------------------------------------
# Products and quotients


def _product(a: Jet, b: Jet) -> Jet:
    """Elementwise Cauchy product of two Jets (broadcasting): ``(ab)_k = Σ_i a_i b_{k−i}``."""
    L = level_of(a, b)
    if a is b:
        return from_coefficients(S.square(coefficients(a), L.collapsed), L)
    ndim = len(torch.broadcast_shapes(a.shape, b.shape))
    return from_coefficients(S.mul(_lift(coefficients(a), ndim, L.collapsed), _lift(coefficients(b), ndim, L.collapsed), L.collapsed), L)


def _mul_rule(func: Any) -> Callable[..., Any]:
    lin = linear(func, elementwise=True)

    def rule(a: Any, b: Any, **kwargs: Any) -> Any:
        L = level_of(a, b)
        if is_jet(a, L) and is_jet(b, L):
            return _product(a, b)
        return lin(a, b, **kwargs)

    return rule


_register_each(_funcs(["mul", "multiply", "__mul__", "__rmul__"]), _mul_rule)


def _lift(c: list, ndim: int, collapsed: bool) -> list:
    """View directed coefficients ``(R, *s)`` as ``(R, 1, …, 1, *s)`` with ``ndim`` value dims."""
    out = [c[0]]
    K = len(c) - 1
    for k in range(1, K + 1):
        if collapsed and k == K:
            out.append(c[k])
        else:
            ck = c[k]
            out.append(ck.reshape(ck.shape[:1] + (1,) * (ndim - ck.dim() + 1) + ck.shape[1:]))
    return out


def _quotient(a: Any, b: Any) -> Any:
    """``a / b`` with ``b`` a Jet: ``z_k = (a_k − Σ_{j=1}^{k} b_j z_{k−j}) / b_0``."""
    L = level_of(a, b)
    if is_jet(a, L):
        ndim = torch.broadcast_shapes(a.shape, b.shape).__len__()
        ca = _lift(coefficients(a), ndim, L.collapsed)
    else:
        ndim = len(torch.broadcast_shapes(torch.as_tensor(value(a)).shape, b.shape))
        ca = [a]
    cb = _lift(coefficients(b), ndim, L.collapsed)
    return from_coefficients(S.div(ca, cb, L.collapsed), L)


def _div_rule(func: Any) -> Callable[..., Any]:
    lin = linear(func, elementwise=True)

    def rule(a: Any, b: Any, *, rounding_mode: Optional[str] = None) -> Any:
        L = level_of(a, b)
        if rounding_mode is not None:
            return zero_derivative(func)(a, b, rounding_mode=rounding_mode)
        if not is_jet(b, L):
            return lin(a, b)
        return _quotient(a, b)

    return rule


_register_each(_funcs(["div", "divide", "true_divide", "__truediv__"]), _div_rule)
_register(_funcs(["__rtruediv__", "__rdiv__"], (Tensor,)), lambda x, other: _quotient(other, x))
_register(_funcs(["reciprocal"]), lambda x: _quotient(1.0, x))


def _power(x: Any, p: Any) -> Any:
    """``x ** p``: Cauchy products for small non-negative integer p (exact at x0 = 0), the
    recurrence ``x y' = p y x'`` for other constant p, and ``exp(p log x)`` for a Jet exponent."""
    L = level_of(x, p)
    if is_jet(p, L):
        logx = torch.log(x) if isinstance(x, Tensor) else math.log(x)
        return torch.exp(p * logx)
    if isinstance(p, (int, float)) and float(p).is_integer() and 0 <= p <= 16:
        n = int(p)
        if n == 0:
            return torch.ones_like(x.primal)
        result, base = None, x
        while n:
            if n & 1:
                result = base if result is None else _product(result, base)
            n >>= 1
            if n:
                base = _product(base, base)
        return result
    c = coefficients(x)
    if isinstance(p, Tensor):
        ndim = len(torch.broadcast_shapes(x.shape, p.shape))
        c = _lift(c, ndim, L.collapsed)
    return from_coefficients(S.pow(c, p, L.collapsed), L)


_register(_funcs(["pow", "__pow__"]), lambda x, exponent: _power(x, exponent))
_register(_funcs(["__rpow__"], (Tensor,)), lambda x, other: _power(other, x))
_register(_funcs(["sqrt"]), lambda x: _power(x, 0.5))
_register(_funcs(["rsqrt"]), lambda x: _power(x, -0.5))
_register(_funcs(["square"]), lambda x: _power(x, 2))

# ---------------------------------------------------------------------------------------------
# Elementwise recurrences

_register(_funcs(["exp"]), series_rule(S.exp))
_register(_funcs(["log"]), series_rule(S.log))
_register(_funcs(["log2"]), lambda x: torch.log(x) / math.log(2.0))
_register(_funcs(["log10"]), lambda x: torch.log(x) / math.log(10.0))
_register(_funcs(["tanh"]) + [F.tanh], series_rule(S.tanh))
_register(_funcs(["sigmoid"]) + [F.sigmoid, torch.special.expit], series_rule(S.sigmoid))
_register(_funcs(["sin"]), series_rule(lambda c, col: S.sincos(c, col)[0]))
_register(_funcs(["cos"]), series_rule(lambda c, col: S.sincos(c, col)[1]))


def _derivative_rule(f: Callable[..., Any], df: Callable[..., Any]) -> Callable[..., Any]:
    """Rule of ``y = f(x)`` through ``y' = f'(x) x'`` (see :func:`apply_elementwise_rule`)."""
    return lambda x, *args, **kwargs: apply_elementwise_rule(
        lambda t: f(t, *args, **kwargs), lambda t: df(t, *args, **kwargs), x
    )


def _gelu_tanh_d(x: Any, approximate: str = "tanh") -> Any:
    """gelu' of the tanh form: ½(1+t) + ½x(1−t²)·√(2/π)(1 + 3c x²), t = tanh(√(2/π)(x + c x³))."""
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * (_SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x))


def _softplus_d(x: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
    return torch.where(x * beta > threshold, 1.0, torch.sigmoid(beta * x))


def _silu_d(x: Any, inplace: bool = False) -> Any:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _elu_d(x: Any, alpha: float = 1.0, inplace: bool = False) -> Any:
    return torch.where(x > 0, 1.0, alpha * torch.exp(torch.clamp(x, max=0)))


def _inplace_ok(rule: Callable[..., Any]) -> Callable[..., Any]:
    """Honour ``inplace=True`` of functional activations by rebinding the Jet."""

    def wrapped(x: Any, *args: Any, **kwargs: Any) -> Any:
        inplace = kwargs.pop("inplace", False)
        y = rule(x, *args, **kwargs)
        if inplace and isinstance(x, Jet) and is_jet(y, x.level):
            x.primal, x.series = y.primal, y.series
            return x
        return y

    return wrapped


_register(_funcs(["erf"]) + [torch.special.erf], series_rule(S.erf))
_register(_funcs(["log1p"]), _derivative_rule(torch.log1p, lambda x: torch.reciprocal(1 + x)))
_register(_funcs(["expm1"]), _derivative_rule(torch.expm1, torch.exp))
_register(_funcs(["atan", "arctan"]), _derivative_rule(torch.atan, lambda x: torch.reciprocal(1 + x * x)))
_register(_funcs(["sinh"]), _derivative_rule(torch.sinh, torch.cosh))
_register(_funcs(["cosh"]), _derivative_rule(torch.cosh, torch.sinh))
_gelu_tanh = _derivative_rule(lambda x, approximate="none": F.gelu(x, approximate=approximate), _gelu_tanh_d)
_gelu_exact = series_rule(S.gelu)
_register(_funcs(["gelu"], (torch._C._nn, F)),
          lambda x, approximate="none": _gelu_tanh(x, approximate=approximate) if approximate != "none" else _gelu_exact(x))
_register(_funcs(["softplus"], (torch._C._nn, F)), _derivative_rule(lambda x, beta=1.0, threshold=20.0: F.softplus(x, beta, threshold), _softplus_d))
_register([F.silu], _inplace_ok(_derivative_rule(F.silu, _silu_d)))
_register([F.elu], _inplace_ok(_derivative_rule(lambda x, alpha=1.0: F.elu(x, alpha), _elu_d)))
_register(_funcs(["log_sigmoid", "logsigmoid"], (torch._C._nn, F)), _derivative_rule(F.logsigmoid, lambda x: torch.sigmoid(-x)))
register_taylor_rule(F.mish, _inplace_ok(lambda x: x * torch.tanh(F.softplus(x))))
_register(_funcs(["tan"]), _derivative_rule(torch.tan, lambda x: 1 + torch.tan(x) ** 2))
_register(_funcs(["asinh", "arcsinh"]), _derivative_rule(torch.asinh, lambda x: torch.rsqrt(1 + x * x)))
_register(_funcs(["asin", "arcsin"]), _derivative_rule(torch.asin, lambda x: torch.rsqrt(1 - x * x)))
_register(_funcs(["acos", "arccos"]), _derivative_rule(torch.acos, lambda x: -torch.rsqrt(1 - x * x)))
_register(_funcs(["exp2"]), lambda x: torch.exp(x * math.log(2.0)))
register_taylor_rule(F.softsign, lambda x: x / (1 + torch.abs(x)))
register_taylor_rule(F.tanhshrink, lambda x: x - torch.tanh(x))

# ---------------------------------------------------------------------------------------------
# Piecewise ops: coefficients selected by the primal


def _masked(f: Callable[[Tensor], Tensor], slope: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    """Rule of a piecewise-linear ``y = f(x)`` with local slope ``slope(x0)``: ``y_k = slope · x_k``."""

    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        L = level_of(x)
        return Jet(f(x.primal, *args, **kwargs), x.series * slope(value(x), *args, **kwargs), L)

    return rule


_relu = _masked(torch.relu, lambda x: (x > 0).to(x.dtype))
_register(_funcs(["relu"]), _relu)
register_taylor_rule(F.relu, _inplace_ok(_relu))
register_taylor_rule(F.relu6, _inplace_ok(lambda x: torch.clamp(x, 0.0, 6.0)))
register_taylor_rule(F.leaky_relu, _inplace_ok(_masked(
    F.leaky_relu, lambda x, negative_slope=0.01: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope)))))
_register(_funcs(["abs", "absolute", "__abs__"]), _masked(torch.abs, lambda x: torch.sign(x)))


def _clamp(x: Any, min: Any = None, max: Any = None) -> Any:
    """``clamp``: slope 1 where ``min ≤ x0 ≤ max``; Jet bounds go through maximum/minimum."""
    L = level_of(x, min, max)
    if not is_jet(x, L) or is_jet(min, L) or is_jet(max, L):
        y = x
        if min is not None:
            y = torch.maximum(y, min if isinstance(min, Tensor) else torch.as_tensor(min, dtype=value(x).dtype))
        if max is not None:
            y = torch.minimum(y, max if isinstance(max, Tensor) else torch.as_tensor(max, dtype=value(x).dtype))
        return y
    x0 = value(x)
    inside = torch.ones_like(x0, dtype=torch.bool)
    if min is not None:
        inside = inside & (x0 >= value(min))
    if max is not None:
        inside = inside & (x0 <= value(max))
    return Jet(torch.clamp(x.primal, min, max), x.series * inside.to(x0.dtype), L)


_register(_funcs(["clamp", "clip"]), _clamp)
_register(_funcs(["clamp_min"]), lambda x, min: _clamp(x, min=min))
_register(_funcs(["clamp_max"]), lambda x, max: _clamp(x, max=max))
register_taylor_rule(F.hardtanh, _inplace_ok(lambda x, min_val=-1.0, max_val=1.0: _clamp(x, min_val, max_val)))
_register(_funcs(["maximum", "fmax"]), lambda a, b: _where_linear(value(a) >= value(b), a, b))
_register(_funcs(["minimum", "fmin"]), lambda a, b: _where_linear(value(a) <= value(b), a, b))


def _extremum(name: str) -> Callable[..., Any]:
    """``max``/``min``: the selected entry (``gather`` at the primal's arg-extremum)."""
    arg = torch.argmax if name == "max" else torch.argmin

    def rule(x: Any, dim: Any = None, keepdim: bool = False, **kwargs: Any) -> Any:
        if isinstance(dim, Tensor):  # max(a, b) elementwise
            return (torch.maximum if name == "max" else torch.minimum)(x, dim)
        if dim is None:
            return x.reshape(-1)[arg(value(x).reshape(-1))]
        idx = arg(value(x), dim, keepdim=True)
        vals = torch.gather(x, dim, idx)
        if not keepdim:
            vals, idx = vals.squeeze(dim), idx.squeeze(dim)
        return torch.return_types.max((vals, idx)) if name == "max" else torch.return_types.min((vals, idx))

    return rule


_register(_funcs(["max"]), _extremum("max"))
_register(_funcs(["min"]), _extremum("min"))


def _amax_rule(name: str) -> Callable[..., Any]:
    def rule(x: Any, dim: Any = (), keepdim: bool = False) -> Any:
        dims = (dim,) if isinstance(dim, int) else tuple(dim) or tuple(range(x.dim()))
        if len(dims) != 1:
            raise NotImplementedError(f"torch_hod.taylor.jet: {name} over several dims {dims} has no rule; reshape first")
        out = getattr(torch, name[1:])(x, dims[0], keepdim=keepdim)
        return out[0]

    return rule


def _max_pool_rule(with_indices: Callable[..., Any], nd: int, returns_indices: Optional[bool], flag: int = 0) -> Callable[..., Any]:
    """Max pooling: the entries selected by the primal's pooling indices (``gather``, linear).
    ``returns_indices=None``: read ``return_indices`` from the call (positional index ``flag``)."""

    def rule(input: Any, *args: Any, **kwargs: Any) -> Any:
        wanted = kwargs.pop("return_indices", args[flag] if returns_indices is None and len(args) > flag else False)
        args = args[:flag] if returns_indices is None and len(args) > flag else args
        _, idx = with_indices(value(input), *args, **kwargs)
        start = input.dim() - nd
        out = input.flatten(start).gather(start, idx.flatten(start)).reshape(idx.shape)
        return (out, idx) if (returns_indices or (returns_indices is None and wanted)) else out

    return rule


for _nd in (1, 2, 3):
    for _kind in ("max_pool", "adaptive_max_pool"):
        _with = getattr(F, f"{_kind}{_nd}d_with_indices")
        register_taylor_rule(_with, _max_pool_rule(_with, _nd, True))
        register_taylor_rule(getattr(F, f"_{_kind}{_nd}d"), _max_pool_rule(_with, _nd, False))
        # the public boolean_dispatch wrappers (return_indices is the 6th / 2nd positional argument)
        register_taylor_rule(getattr(F, f"{_kind}{_nd}d"), _max_pool_rule(_with, _nd, None, 5 if _kind == "max_pool" else 1))

def _selection(name: str, dim_pos: int, default_dim: Optional[int]) -> Callable[..., Any]:
    """``sort``/``topk``/``cummax``/``cummin``/``kthvalue``/``median``: the values are the entries of x at the primal's
    indices (``gather``, linear); the indices are constants."""

    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        res = getattr(torch, name)(value(x), *args, **kwargs)
        if not isinstance(res, tuple):
            raise NotImplementedError(f"torch_hod.taylor.jet: {name} without dim has no Taylor rule; pass dim")
        dim = kwargs.get("dim", args[dim_pos] if len(args) > dim_pos else default_dim)
        idx = res.indices if res.indices.dim() == x.dim() else res.indices.unsqueeze(dim)
        vals = torch.gather(x, dim, idx)
        return type(res)((vals if res.indices.dim() == x.dim() else vals.squeeze(dim), res.indices))

    return rule


for _name_, _pos, _default in (("sort", 0, -1), ("topk", 1, -1), ("cummax", 0, None), ("cummin", 0, None),
                               ("kthvalue", 1, -1), ("median", 0, None)):
    _register(_funcs([_name_]), _selection(_name_, _pos, _default))

_register(_funcs(["amax"]), _amax_rule("amax"))
_register(_funcs(["amin"]), _amax_rule("amin"))

# ---------------------------------------------------------------------------------------------
# Matrix products and convolutions: linear in each operand, bilinear in two Jets


def _bilinear_rule(func: Any, i: int, j: int, additive: tuple = ()) -> Callable[..., Any]:
    """``func`` bilinear in positional args ``i`` and ``j`` (other args constant)."""
    lin = linear(func, additive=additive)

    def rule(*args: Any, **kwargs: Any) -> Any:
        L = level_of(args, kwargs)
        if len(args) > j and is_jet(args[i], L) and is_jet(args[j], L):
            def B(a: Tensor, b: Tensor) -> Tensor:
                new = list(args)
                new[i], new[j] = a, b
                return func(*new, **kwargs)

            return bilinear(B, args[i], args[j])
        return lin(*args, **kwargs)

    return rule


_register_each(_funcs(["mm", "bmm", "mv", "dot", "inner", "outer", "ger", "vdot", "tensordot", "cross"]),
               lambda f: _bilinear_rule(f, 0, 1))


def _matmul_rule(func: Any) -> Callable[..., Any]:
    general = _bilinear_rule(func, 0, 1)

    def rule(a: Any, b: Any) -> Any:
        L = level_of(a, b)
        if is_jet(a, L) and not is_jet(b, L) and b.dim() <= 2:  # coefficient axis = a batch dim
            return Jet(func(a.primal, b), func(a.series, b), L)
        return general(a, b)

    return rule


_register_each(_funcs(["matmul", "__matmul__"]), _matmul_rule)
register_taylor_rule(Tensor.__rmatmul__, lambda x, other: torch.matmul(other, x))


def _linear(input: Any, weight: Any, bias: Any = None) -> Any:
    """``F.linear(x, W, b) = x Wᵀ + b``."""
    L = level_of(input, weight, bias)
    if is_jet(weight, L):
        y = torch.matmul(input, weight.transpose(-1, -2))
        return y if bias is None else y + bias
    if not is_jet(input, L):  # only the bias carries a series: x Wᵀ is a constant term
        return F.linear(input, weight) + bias
    if not is_jet(bias, L):  # the leading coefficient axis is one more batch dim of F.linear
        return Jet(F.linear(input.primal, weight, bias), F.linear(input.series, weight), L)
    return _linear_const(input, weight, bias)


_linear_const = linear(F.linear, additive=(2, "bias"))
register_taylor_rule(F.linear, _linear)


def _addmm_rule(product: Callable[..., Any]) -> Callable[..., Any]:
    def rule(input: Any, a: Any, b: Any, *, beta: float = 1, alpha: float = 1) -> Any:
        out = product(a, b)
        out = out if alpha == 1 else alpha * out
        return out if beta == 0 else out + (input if beta == 1 else beta * input)

    return rule


_register(_funcs(["addmm"]), _addmm_rule(torch.mm))
_register(_funcs(["baddbmm"]), _addmm_rule(torch.bmm))
_register(_funcs(["addmv"]), _addmm_rule(torch.mv))


def _einsum(equation: str, *operands: Any) -> Any:
    """``einsum`` is multilinear: one Jet operand → linear, two → bilinear."""
    ops = list(operands[0]) if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else list(operands)
    L = level_of(ops)
    pos = [i for i, o in enumerate(ops) if is_jet(o, L)]
    if len(pos) == 1:
        return _einsum_linear(equation, *ops)
    if len(pos) == 2:
        def B(a: Tensor, b: Tensor) -> Tensor:
            new = list(ops)
            new[pos[0]], new[pos[1]] = a, b
            return torch.einsum(equation, *new)

        return bilinear(B, ops[pos[0]], ops[pos[1]])
    raise NotImplementedError(
        f"torch_hod.taylor.jet: einsum with {len(pos)} operands carrying Taylor series has no rule "
        "(one or two supported); split it into two einsum calls"
    )


_einsum_linear = linear(torch.einsum)
_register([torch.einsum, torch.functional.einsum], _einsum)


def _conv_rule(conv: Any, ndim: int) -> Callable[..., Any]:
    lin = linear(conv, additive=(2, "bias"))

    def rule(input: Any, weight: Any, bias: Any = None, *args: Any, **kwargs: Any) -> Any:
        L = level_of(input, weight, bias)
        if is_jet(input, L) and not is_jet(weight, L):
            return lin(input, weight, bias, *args, **kwargs)
        if is_jet(weight, L):
            y = bilinear(lambda a, w: conv(a, w, None, *args, **kwargs), input, weight)
        else:  # only the bias carries a series: conv(x, W) is a constant term
            y = conv(input, weight, None, *args, **kwargs)
        if bias is None:
            return y
        return y + bias.reshape((-1,) + (1,) * ndim)

    return rule


for _conv, _nd in ((torch.conv1d, 1), (torch.conv2d, 2), (torch.conv3d, 3)):
    _register(_funcs([_conv.__name__], (torch, F)), _conv_rule(_conv, _nd))

# ---------------------------------------------------------------------------------------------
# Compositions: softmax family, statistics, normalisation, losses, dropout


def _softmax_dim(x: Any, dim: Optional[int], name: str) -> int:
    if dim is None:
        raise ValueError(f"torch_hod.taylor.jet: {name} needs an explicit dim (the implicit-dim form is deprecated)")
    return dim


def _softmax(input: Any, dim: Optional[int] = None, _stacklevel: int = 3, dtype: Any = None) -> Any:
    """``softmax(x) = e^{x−m} / Σ e^{x−m}`` with the shift ``m = max x0`` (a constant)."""
    x = input if dtype is None else input.to(dtype)
    dim = _softmax_dim(x, dim, "softmax")
    e = torch.exp(x - value(x).amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def _logsumexp(input: Any, dim: Any, keepdim: bool = False) -> Any:
    """``logsumexp(x) = m + log Σ e^{x−m}`` with the constant shift ``m = max x0``."""
    m = value(input).amax(dim, keepdim=True)
    y = torch.log(torch.exp(input - m).sum(dim, keepdim=True)) + m
    return y if keepdim else y.squeeze(dim)


def _log_softmax(input: Any, dim: Optional[int] = None, _stacklevel: int = 3, dtype: Any = None) -> Any:
    """``log_softmax(x) = x − logsumexp(x)``."""
    x = input if dtype is None else input.to(dtype)
    dim = _softmax_dim(x, dim, "log_softmax")
    return x - _logsumexp(x, dim, keepdim=True)


_register(_funcs(["softmax"], (torch, Tensor, F, torch.special)), _softmax)
register_taylor_rule(F.softmin, lambda input, dim=None, _stacklevel=3, dtype=None: _softmax(-input, dim, dtype=dtype))
_register(_funcs(["log_softmax"], (torch, Tensor, F, torch.special)), _log_softmax)
_register(_funcs(["logsumexp"], (torch, Tensor, torch.special)), _logsumexp)


def _var(input: Any, dim: Any = None, *, correction: Any = 1, keepdim: bool = False, unbiased: Any = None) -> Any:
    """``var = Σ (x − mean)² / (n − correction)``."""
    if isinstance(dim, bool):  # var(x, unbiased)
        unbiased, dim = dim, None
    if unbiased is not None:
        correction = 1 if unbiased else 0
    dims = tuple(range(input.dim())) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    n = math.prod(input.shape[d] for d in dims)
    d = input - input.mean(dims, keepdim=True)
    return (d * d).sum(dims, keepdim=keepdim) / (n - correction)


_register(_funcs(["var"]), _var)
_register(_funcs(["std"]), lambda *a, **k: torch.sqrt(_var(*a, **k)))


def _vector_norm(x: Any, ord: Any = 2, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    """``‖x‖₂ = √(Σ x²)`` (only ord = 2 has a rule; not differentiable at 0)."""
    if ord != 2:
        raise NotImplementedError(f"torch_hod.taylor.jet: vector_norm with ord={ord!r} has no Taylor rule (only ord=2)")
    x = x if dtype is None else x.to(dtype)
    return torch.sqrt((x * x).sum(dim, keepdim=keepdim) if dim is not None else (x * x).sum())


def _tensor_norm(x: Any, p: Any = "fro", dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Any:
    return _vector_norm(x, 2 if p in ("fro", 2, 2.0, None) else p, dim, keepdim, dtype=dtype)


_register([torch.linalg.vector_norm], _vector_norm)
_register(_funcs(["norm"]), _tensor_norm)
register_taylor_rule(F.normalize, lambda input, p=2.0, dim=1, eps=1e-12, out=None:
                     input / torch.clamp(_vector_norm(input, p, dim, keepdim=True), min=eps))


def _sdpa(query: Any, key: Any, value_: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
          scale: Optional[float] = None, enable_gqa: bool = False) -> Any:
    """``softmax(q kᵀ · scale + mask) v`` (causal and boolean/additive masks; no dropout)."""
    if dropout_p != 0.0:
        raise NotImplementedError("torch_hod.taylor.jet: scaled_dot_product_attention with dropout_p > 0 has no rule; use dropout_p=0")
    if enable_gqa:
        raise NotImplementedError("torch_hod.taylor.jet: scaled_dot_product_attention with enable_gqa=True has no rule")
    L_, S_ = query.shape[-2], key.shape[-2]
    scores = (query @ key.transpose(-2, -1)) * (1 / math.sqrt(query.shape[-1]) if scale is None else scale)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(L_, S_, dtype=torch.bool, device=query.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return _softmax(scores, -1) @ value_


register_taylor_rule(F.scaled_dot_product_attention, _sdpa)


def _normalize(x: Any, dims: tuple, eps: float) -> Any:
    """``(x − mean) / sqrt(var + eps)`` over ``dims`` (biased variance).

    On a Jet, directly on its coefficients: ``c = x − mean x`` (one call on all coefficients),
    ``v_k = mean(Σ_{i+j=k} c_i c_j)`` (symmetric products), ``r = (v + ε)^{−1/2}`` by the power
    recurrence on the small reduced tensors, and the Cauchy product ``c·r`` (intermediates never
    re-stacked)."""
    xc = x - x.mean(dims, keepdim=True)
    L = level_of(xc)
    if not is_jet(xc, L):
        return xc * torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
    neg = tuple(d - xc.dim() if d >= 0 else d for d in dims)  # directed coefficients have a leading R axis
    c = coefficients(xc)
    v = [t.mean(neg, keepdim=True) for t in S.square(c, L.collapsed)]
    v[0] = v[0] + eps
    return from_coefficients(S.mul(c, S.pow(v, -0.5, L.collapsed), L.collapsed), L)


def _layer_norm(input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    """``layer_norm(x) = (x − μ)/√(σ² + ε) · w + b`` over the last ``len(normalized_shape)`` dims."""
    y = _normalize(input, tuple(range(-len(normalized_shape), 0)), eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _rms_norm(input: Any, normalized_shape: Any, weight: Any = None, eps: Optional[float] = None) -> Any:
    """``rms_norm(x) = x / √(mean(x²) + ε) · w`` (ε defaults to the dtype's machine epsilon)."""
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    y = input * torch.rsqrt((input * input).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight


def _channel(t: Any, ndim: int) -> Any:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _batch_norm(input: Any, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Any:
    """Eval: ``(x − μ_run)/√(σ²_run + ε) · w + b``; training: batch statistics over all dims but
    the channel dim (running statistics are updated from the primal, as PyTorch does)."""
    nd = input.dim()
    if training:
        dims = (0,) + tuple(range(2, nd))
        y = _normalize(input, dims, eps)
        if running_mean is not None and momentum is not None:
            x0 = value(input)
            n = x0.numel() // x0.shape[1]
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * x0.mean(dims))
                running_var.mul_(1 - momentum).add_(momentum * x0.var(dims, unbiased=True) if n > 1 else 0)
    else:
        y = (input - _channel(running_mean, nd)) * _channel(torch.rsqrt(running_var + eps), nd)
    y = y if weight is None else y * _channel(weight, nd)
    return y if bias is None else y + _channel(bias, nd)


def _group_norm(input: Any, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    """``group_norm``: normalise each group of ``C / G`` channels (and all spatial dims)."""
    shape = input.shape
    y = _normalize(input.reshape(shape[0], num_groups, -1), (2,), eps).reshape(shape)
    y = y if weight is None else y * _channel(weight, len(shape))
    return y if bias is None else y + _channel(bias, len(shape))


register_taylor_rule(F.layer_norm, _layer_norm)
register_taylor_rule(F.rms_norm, _rms_norm)
register_taylor_rule(F.batch_norm, _batch_norm)
register_taylor_rule(F.group_norm, _group_norm)


def _reduce(loss: Any, reduction: str, size_average: Any = None, reduce: Any = None) -> Any:
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"torch_hod.taylor.jet: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _mse_loss(input: Any, target: Any, size_average: Any = None, reduce: Any = None, reduction: str = "mean",
              weight: Any = None) -> Any:
    """``mse = reduce((x − t)²)`` (times ``weight`` if given)."""
    d = input - target
    loss = d * d if weight is None else weight * d * d
    return _reduce(loss, reduction, size_average, reduce)


def _nll(logp: Any, target: Tensor, weight: Any, ignore_index: int, reduction: str, label_smoothing: float = 0.0) -> Any:
    """Negative log-likelihood of class indices (with weights, ignore_index, label smoothing)."""
    cdim = 1 if logp.dim() >= 2 else 0
    C = logp.shape[cdim]
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    w = weight[safe] if weight is not None else torch.ones(safe.shape, dtype=value(logp).dtype, device=safe.device)
    w = w * valid
    loss = -logp.gather(cdim, safe.unsqueeze(cdim)).squeeze(cdim) * w
    if label_smoothing > 0:
        wl = logp if weight is None else logp * _class_view(weight, logp.dim(), cdim)
        loss = (1 - label_smoothing) * loss - (label_smoothing / C) * wl.sum(cdim) * valid
    if reduction == "mean":
        return loss.sum() / w.sum()
    return _reduce(loss, reduction)


def _class_view(weight: Tensor, ndim: int, cdim: int) -> Tensor:
    shape = [1] * ndim
    shape[cdim] = -1
    return weight.reshape(shape)


def _cross_entropy(input: Any, target: Any, weight: Any = None, size_average: Any = None, ignore_index: int = -100,
                   reduce: Any = None, reduction: str = "mean", label_smoothing: float = 0.0) -> Any:
    """``cross_entropy = nll(log_softmax(x))`` for class indices, ``−Σ_c t_c w_c log p_c`` for
    class probabilities (with label smoothing ``t ← (1−ε) t + ε/C``)."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    cdim = 1 if input.dim() >= 2 else 0
    logp = _log_softmax(input, cdim)
    if isinstance(target, Tensor) and target.is_floating_point():
        C = input.shape[cdim]
        t = target if label_smoothing == 0 else target * (1 - label_smoothing) + label_smoothing / C
        wl = logp if weight is None else logp * _class_view(weight, input.dim(), cdim)
        return _reduce(-(t * wl).sum(cdim), reduction)
    return _nll(logp, target, weight, ignore_index, reduction, label_smoothing)


def _nll_loss(input: Any, target: Any, weight: Any = None, size_average: Any = None, ignore_index: int = -100,
              reduce: Any = None, reduction: str = "mean") -> Any:
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    return _nll(input, target, weight, ignore_index, reduction)


register_taylor_rule(F.mse_loss, _mse_loss)
register_taylor_rule(F.cross_entropy, _cross_entropy)
register_taylor_rule(F.nll_loss, _nll_loss)
register_taylor_rule(F.embedding, linear(F.embedding))


def _weighted(loss: Any, weight: Any) -> Any:
    return loss if weight is None else loss * weight


def _l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """``reduce(w |x − t|)``."""
    return _reduce(_weighted(torch.abs(input - target), weight), reduction, size_average, reduce)


def _huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """``½ d²`` where ``|d| < δ``, else ``δ (|d| − ½ δ)``."""
    d = input - target
    a = torch.abs(d)
    return _reduce(_weighted(torch.where(value(a) < delta, 0.5 * d * d, delta * (a - 0.5 * delta)), weight), reduction)


def _smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """``½ d²/β`` where ``|d| < β``, else ``|d| − ½ β`` (``β = 0``: l1)."""
    d = input - target
    a = torch.abs(d)
    loss = a if beta == 0 else torch.where(value(a) < beta, 0.5 * d * d / beta, a - 0.5 * beta)
    return _reduce(loss, reduction, size_average, reduce)


def _bce_with_logits(input, target, weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None):
    """``(1 − t) x + (1 + (p − 1) t) softplus(−x)``, times ``weight``."""
    scale = 1 if pos_weight is None else 1 + (pos_weight - 1) * target
    loss = (1 - target) * input + scale * F.softplus(-input)
    return _reduce(_weighted(loss, weight), reduction, size_average, reduce)


def _bce(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    """``−(t log p + (1 − t) log(1 − p))`` (PyTorch clamps the logs at −100; no clamp here)."""
    loss = -(target * torch.log(input) + (1 - target) * torch.log(1 - input))
    return _reduce(_weighted(loss, weight), reduction, size_average, reduce)


def _kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """``t (log t − x)`` (or ``eᵗ (t − x)`` for log targets); ``batchmean`` divides by the batch."""
    loss = torch.exp(target) * (target - input) if log_target else torch.xlogy(target, target) - target * input
    if reduction == "batchmean":
        return loss.sum() / (input.shape[0] if input.dim() > 0 else 1)
    return _reduce(loss, reduction, size_average, reduce)


def _cdist(x1, x2, p=2.0, compute_mode=None):
    """Euclidean distances ``√(Σ (x1_i − x2_j)²)`` (only p = 2; not differentiable at 0)."""
    if p != 2:
        raise NotImplementedError(f"torch_hod.taylor.jet: cdist with p={p!r} has no Taylor rule (only p=2)")
    d = x1.unsqueeze(-2) - x2.unsqueeze(-3)
    return torch.sqrt((d * d).sum(-1))


for _f, _rule in ((F.l1_loss, _l1_loss), (F.huber_loss, _huber_loss), (F.smooth_l1_loss, _smooth_l1_loss),
                  (F.binary_cross_entropy_with_logits, _bce_with_logits), (F.binary_cross_entropy, _bce),
                  (F.kl_div, _kl_div), (torch.cdist, _cdist), (torch.functional.cdist, _cdist)):
    register_taylor_rule(_f, _rule)


def _prod(input: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    """``prod``: a chain of Cauchy products over the reduced dim (exact when entries vanish)."""
    x = input if dtype is None else input.to(dtype)
    if dim is None:
        x, dim = x.reshape(-1), 0
    parts = x.unbind(dim)
    out = parts[0]
    for part in parts[1:]:
        out = out * part
    return out.unsqueeze(dim) if keepdim else out


_register(_funcs(["prod"]), _prod)


def _dropout_rule(drop: Callable[..., Tensor]) -> Callable[..., Any]:
    """Eval (or p = 0): identity. Training: one mask, drawn once from the primal's shape, scales
    every coefficient: ``y = x · m`` with ``m = drop(1)`` (dropout1d/2d/3d drop whole channels)."""

    def rule(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if not training or p == 0:
            return input
        return input * drop(torch.ones_like(value(input)), p, True)

    return rule


_register_each(_funcs(["dropout", "dropout1d", "dropout2d", "dropout3d"], (F,)), _dropout_rule)
