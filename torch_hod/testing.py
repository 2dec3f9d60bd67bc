"""Validation harness: compare an op with a plain-torch reference in every AD mode, by value.

Everything is reduced to scalars by random projections. With random directions ``v`` (one per
differentiated input, a tuple when there are several) and a random output cotangent ``w``, let

    s(x)      = <w, f(x)>                    (summed over the float outputs of a tuple)
    q_k(x)    = <w, D^k f(x)[v, ..., v]>     = d^k/dt^k s(x + t v) at t = 0
    g_k(x)    = ∇_x q_{k-1}(x)               = D^k s(x)[v, ..., v, ·]   (one free index)

``g_k`` and ``q_k`` involve k derivatives of ``f``. Each *mode* computes ``q_k`` (forward-only
modes) or ``g_k`` (modes that end in a reverse pass, which fixes ``q_k = <g_k, v>`` too):

=========================  ========  =========================================================
mode                       orders    how
=========================  ========  =========================================================
value                      0         ``op(*inputs)`` against ``reference(*inputs)``
autograd                   1..K      ``torch.autograd.grad(create_graph=True)`` chain → g_k
reverse                    1..K      nested ``torch.func.grad`` → g_k
forward                    1..K      nested ``torch.func.jvp`` → q_k
forward_over_reverse       2..K      ``jvp^{k-1}(grad s)`` → g_k
reverse_over_forward       2..K      ``vjp(jvp^{k-1} s)`` → g_k
forward_ad                 1..2      ``torch.autograd.forward_ad`` dual: q_1, and tangent of
                                     ``autograd.grad`` → g_2
vmap_<mode>                as above  ``torch.func.vmap`` over a batch of directions
                                     (reverse, forward, forward_over_reverse,
                                     reverse_over_forward)
forward_of_vmap            1..K      nested jvp of ``vmap(op)`` (the op inside vmap, under
reverse_of_vmap            1..K      forward / reverse levels), resp. nested grad
taylor                     0..K      ``torch_hod.taylor.jet`` with series ``[v, 0, ..., 0]`` → q_k
taylor_directions          1..K      the same with a direction axis (R directions at once)
taylor_collapsed           K         ``jet(collapse=True)``: Σ_r q_K over the R directions
autograd_of_taylor         2..K      ``torch.autograd.grad`` of the jet's q_{k−1} → g_k
jacrev, jacfwd             1..2      full Jacobian of f contracted with w (1); ``jac(jac(s))·v`` (2)
hessian                    2         ``torch.func.hessian(s)·v``
gradcheck, gradgradcheck   1, 2      on the op, float64 inputs only (forward AD and
                                     forward-over-reverse checked too)
=========================  ========  =========================================================

The reference values come from one trustworthy path only: the ``torch.autograd.grad`` chain
(reverse-over-reverse) of ``reference`` evaluated in float64 on the same inputs and directions,
never from nested jvp of the reference (torch.func's forward-over-forward of ``F.layer_norm`` and
training ``F.batch_norm`` is wrong, pytorch#196700/#196699).

A quantity passes when ``max|op − ref| ≤ atol + rtol · max|ref|`` (a norm-wise test: rounding
errors scale with the largest term). A failing quantity whose op value is zero while the
reference's is not is reported as a *silent zero* (``once_differentiable``, a detached backward, a
Function ``jvp`` invisible to an outer forward level); a reference that is zero at every order
1..K is itself a failure, since such a check could not fail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad as fwAD

__all__ = ["check_op", "CheckReport", "CheckRow", "MODES", "tolerances", "available_devices"]

Tensors = Tuple[Tensor, ...]

#: Every mode, with the orders it covers ("K" = the ``order`` argument).
MODES: Dict[str, str] = {
    "value": "0",
    "autograd": "1..K",
    "reverse": "1..K",
    "forward": "1..K",
    "forward_over_reverse": "2..K",
    "reverse_over_forward": "2..K",
    "forward_ad": "1..2",
    "vmap_reverse": "1..K",
    "vmap_forward": "1..K",
    "vmap_forward_over_reverse": "2..K",
    "vmap_reverse_over_forward": "2..K",
    "forward_of_vmap": "1..K",
    "reverse_of_vmap": "1..K",
    "taylor": "0..K",
    "taylor_directions": "1..K",
    "taylor_collapsed": "K (K >= 2)",
    "autograd_of_taylor": "2..K",
    "jacrev": "1..2",
    "jacfwd": "1..2",
    "hessian": "2",
    "gradcheck": "1 (float64)",
    "gradgradcheck": "2 (float64)",
}

_NUM_DIRECTIONS = 2  # batch size of the vmap modes
_MAX_ROWS_SHOWN = 16  # failing rows printed in the AssertionError


def tolerances(dtype: torch.dtype) -> Tuple[float, float]:
    """``(rtol, atol)`` suited to ``dtype``: ``(1e-10, 1e-12)`` for float64, else from its eps.

    For float32 this is ``(2000 eps, 100 eps)`` ≈ ``(2.4e-4, 1.2e-5)``: derivatives of order ≤ 2
    of smooth ops computed in float32 against a float64 reference.
    """
    if dtype == torch.float64:
        return 1e-10, 1e-12
    eps = torch.finfo(dtype).eps
    return 2000 * eps, 100 * eps


@dataclass
class CheckRow:
    """One compared quantity: ``mode`` at derivative ``order``."""

    mode: str
    order: int
    max_abs: float
    max_rel: float
    ok: bool
    silent_zero: bool = False
    note: str = ""


class CheckReport(List[CheckRow]):
    """The rows of one :func:`check_op` run; ``str(report)`` is a table."""

    def __init__(self, op_name: str, rows: Sequence[CheckRow] = ()) -> None:
        super().__init__(rows)
        self.op_name = op_name

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self)

    @property
    def failures(self) -> List[CheckRow]:
        return [row for row in self if not row.ok]

    def table(self, rows: Optional[Sequence[CheckRow]] = None) -> str:
        rows = self if rows is None else rows
        lines = [f"{'mode':<26} {'order':>5} {'max_abs':>10} {'max_rel':>10}  result"]
        for r in rows:
            result = "ok" if r.ok else ("FAIL (silent zero)" if r.silent_zero else "FAIL")
            lines.append(f"{r.mode:<26} {r.order:>5} {r.max_abs:>10.2e} {r.max_rel:>10.2e}  {result}")
            if r.note and not r.ok:
                lines.extend("      " + line for line in r.note.splitlines())
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"check_op({self.op_name}):\n" + self.table()


# ---------------------------------------------------------------------------------------------
# small pytree helpers (tuples of tensors)


def _as_tuple(out: Any) -> Tensors:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _dot(a: Sequence[Optional[Tensor]], b: Sequence[Optional[Tensor]]) -> Tensor:
    terms = [(x * y).sum() for x, y in zip(a, b) if x is not None and y is not None]
    return torch.stack(terms).sum()


def _contract(a: Tensor, b: Tensor, trailing: bool) -> Tensor:
    """Sum of ``a · b`` over ``b``'s dims, aligned at the front (``trailing=False``) or back of ``a``."""
    dims = list(range(b.dim()))
    adims = [a.dim() - b.dim() + d for d in dims] if trailing else dims
    return torch.tensordot(a, b, dims=(adims, dims)) if dims else a * b


# ---------------------------------------------------------------------------------------------
# the modes


@dataclass
class _Problem:
    """The op on its differentiated inputs, with the random projections of this check."""

    f: Callable[..., Tensors]  # op(*xs) as a tuple of outputs (other arguments bound)
    ws: Tuple[Optional[Tensor], ...]  # output cotangents w (None for non-float outputs)
    xs: Tensors  # the differentiated inputs
    V: Tensors  # R directions per input, shape (R, *x.shape); V[i][0] is the main direction v
    K: int  # highest order

    @property
    def vs(self) -> Tensors:
        return tuple(v[0] for v in self.V)

    def s(self, *x: Tensor) -> Tensor:
        """s(x) = <w, f(x)>."""
        return _dot(self.f(*x), self.ws)

    def s_vmap(self, *x: Tensor) -> Tensor:
        """s(x), with the op run inside ``vmap`` (a batch of one)."""
        out = torch.func.vmap(self.f)(*(xi.unsqueeze(0) for xi in x))
        return _dot(tuple(o.squeeze(0) for o in out), self.ws)

    @property
    def argnums(self) -> Tuple[int, ...]:
        return tuple(range(len(self.xs)))


Scalar = Callable[..., Tensor]
#: what a mode returns: {order: (kind, quantity)}, kind "q" (a 1-tuple), "g" (one tensor per
#: input), "q_sum" (q summed over the directions) or "y" (the values of the float outputs)
Quantities = Dict[int, Tuple[str, Tensors]]


def _none_to_zeros(values: Sequence[Optional[Tensor]], like: Tensors) -> Tensors:
    return tuple(torch.zeros_like(x) if v is None else v for v, x in zip(values, like))


def _autograd_chain(s: Scalar, xs: Tensors, vs: Tensors, K: int) -> Dict[int, Tensors]:
    """g_1..g_K by ``torch.autograd.grad(create_graph=True)``: the trusted reference path."""
    leaves = tuple(x.detach().requires_grad_() for x in xs)
    h, out = s(*leaves), {}
    for k in range(1, K + 1):
        # once h no longer depends on the inputs, every further derivative is zero
        g = torch.autograd.grad(h, leaves, create_graph=k < K, allow_unused=True) if h.requires_grad else ()
        g = _none_to_zeros(g or (None,) * len(xs), leaves)
        out[k] = tuple(gi.detach() for gi in g)
        h = _dot(g, vs)
    return out


def _reverse(s: Scalar, xs: Tensors, vs: Tensors, K: int) -> Dict[int, Tensors]:
    """g_1..g_K from one nest of ``torch.func.grad`` (lower orders returned as aux)."""
    argnums = tuple(range(len(xs)))

    def level(prev: Callable) -> Callable:
        def h(*x: Tensor) -> Tuple[Tensor, Tuple]:
            g, aux = torch.func.grad(prev, argnums=argnums, has_aux=True)(*x)
            return _dot(g, vs), aux + (g,)

        return h

    fn: Callable = lambda *x: (s(*x), ())
    for _ in range(K - 1):
        fn = level(fn)
    g, aux = torch.func.grad(fn, argnums=argnums, has_aux=True)(*xs)
    return dict(enumerate(aux + (g,), start=1))


def _jvp_tower(fn0: Callable, xs: Tensors, vs: Tensors, depth: int) -> Tuple[Any, ...]:
    """``(F, D F[v], ..., D^depth F[v..v])`` from one nest of ``torch.func.jvp``."""

    def level(prev: Callable) -> Callable:
        def fn(*x: Tensor) -> Tuple[Any, ...]:
            p, t = torch.func.jvp(prev, x, vs)
            return p + (t[-1],)

        return fn

    fn: Callable = lambda *x: (fn0(*x),)
    for _ in range(depth):
        fn = level(fn)
    return fn(*xs)


def _forward(s: Scalar, xs: Tensors, vs: Tensors, K: int) -> Dict[int, Tensors]:
    q = _jvp_tower(s, xs, vs, K)
    return {k: (q[k],) for k in range(1, K + 1)}


def _forward_over_reverse(s: Scalar, xs: Tensors, vs: Tensors, K: int) -> Dict[int, Tensors]:
    g = _jvp_tower(torch.func.grad(s, argnums=tuple(range(len(xs)))), xs, vs, K - 1)
    return {k: g[k - 1] for k in range(2, K + 1)}


def _reverse_over_forward(s: Scalar, xs: Tensors, vs: Tensors, K: int) -> Dict[int, Tensors]:
    q, pullback = torch.func.vjp(lambda *x: _jvp_tower(s, x, vs, K - 1), *xs)
    unit = lambda j: tuple(torch.ones_like(qi) if i == j else torch.zeros_like(qi) for i, qi in enumerate(q))
    return {k: pullback(unit(k - 1)) for k in range(2, K + 1)}


def _forward_ad(p: _Problem) -> Quantities:
    """q_1 from a ``torch.autograd.forward_ad`` dual; g_2 as the tangent of ``autograd.grad``."""
    leaves = tuple(x.detach().requires_grad_() for x in p.xs)
    with fwAD.dual_level():
        h = p.s(*(fwAD.make_dual(x, v) for x, v in zip(leaves, p.vs)))
        out: Quantities = {1: ("q", _none_to_zeros((fwAD.unpack_dual(h).tangent,), (h,)))}
        if p.K >= 2:
            g = torch.autograd.grad(h, leaves, allow_unused=True)
            out[2] = ("g", _none_to_zeros([None if gi is None else fwAD.unpack_dual(gi).tangent for gi in g], leaves))
    return out


def _taylor(p: _Problem, vs: Tensors, K: int, collapse: bool = False, xs: Optional[Tensors] = None) -> Tuple[Tensors, Dict[int, Tensor]]:
    """``jet(f, xs, [[v, 0, ..., 0]])``: the float outputs y0 and q_1..q_K (per direction if ``vs``
    has a direction axis; the top order summed over directions if ``collapse``)."""
    from torch_hod.taylor import jet  # the Taylor engine sits above the ops: imported on use

    xs = p.xs if xs is None else xs
    top = lambda x, v: torch.zeros_like(x if collapse else v)
    series = [[v] + [torch.zeros_like(v)] * (K - 2) + [top(x, v)] if K > 1 else [v] for x, v in zip(xs, vs)]
    y0, ys = jet(p.f, xs, series, collapse=collapse)
    directed = vs[0].dim() > xs[0].dim()
    q = {}
    for k, yk in enumerate(ys, start=1):
        batched = directed and not (collapse and k == K)
        terms = [(w * y).reshape(y.shape[:1] + (-1,) if batched else (-1,)).sum(-1)
                 for y, w in zip(_as_tuple(yk), p.ws) if w is not None]
        q[k] = torch.stack(terms).sum(0)
    return tuple(y for y, w in zip(_as_tuple(y0), p.ws) if w is not None), q


def _taylor_mode(p: _Problem) -> Quantities:
    y0, q = _taylor(p, p.vs, p.K)
    return {0: ("y", y0), **{k: ("q", (qk,)) for k, qk in q.items()}}


def _autograd_of_taylor(p: _Problem) -> Quantities:
    """g_2..g_K: ``torch.autograd.grad`` of the jet's q_1..q_{K-1} (training through Taylor mode)."""
    leaves = tuple(x.detach().requires_grad_() for x in p.xs)
    _, q = _taylor(p, p.vs, p.K - 1, xs=leaves)
    grad = lambda h: torch.autograd.grad(h, leaves, retain_graph=True, allow_unused=True) if h.requires_grad else (None,) * len(leaves)
    return {k: ("g", _none_to_zeros(grad(q[k - 1]), leaves)) for k in range(2, p.K + 1)}


def _jacobians(p: _Problem, jac: Callable) -> Quantities:
    """Full Jacobian of f contracted with w (order 1); ``jac(jac(s)) · v`` (order 2)."""
    J = jac(lambda *x: tuple(o for o, w in zip(p.f(*x), p.ws) if w is not None), argnums=p.argnums)(*p.xs)
    ws = [w for w in p.ws if w is not None]
    out: Quantities = {1: ("g", tuple(sum(_contract(J[o][i], w, trailing=False) for o, w in enumerate(ws)) for i in p.argnums))}
    if p.K >= 2:
        out[2] = ("g", _hessian_times_v(p, jac(jac(p.s, argnums=p.argnums), argnums=p.argnums)(*p.xs)))
    return out


def _hessian_times_v(p: _Problem, H: Any) -> Tensors:
    return tuple(sum(_contract(H[i][j], p.vs[j], trailing=True) for j in p.argnums) for i in p.argnums)


def _vmap(mode: Callable[[Scalar, Tensors, Tensors, int], Dict[int, Tensors]]) -> Callable:
    """``mode`` under ``torch.func.vmap`` over the R directions."""
    return lambda s, xs, V, K: torch.func.vmap(lambda *v: mode(s, xs, v, K))(*V)


def _kind(kind: str, quantities: Dict[int, Tensors]) -> Quantities:
    return {k: (kind, q) for k, q in quantities.items()}


#: name → (runner, lowest K it needs, whether it works on all R directions at once)
_RUNNERS: Dict[str, Tuple[Callable[[_Problem], Quantities], int, bool]] = {
    "autograd": (lambda p: _kind("g", _autograd_chain(p.s, p.xs, p.vs, p.K)), 1, False),
    "reverse": (lambda p: _kind("g", _reverse(p.s, p.xs, p.vs, p.K)), 1, False),
    "forward": (lambda p: _kind("q", _forward(p.s, p.xs, p.vs, p.K)), 1, False),
    "forward_over_reverse": (lambda p: _kind("g", _forward_over_reverse(p.s, p.xs, p.vs, p.K)), 2, False),
    "reverse_over_forward": (lambda p: _kind("g", _reverse_over_forward(p.s, p.xs, p.vs, p.K)), 2, False),
    "forward_ad": (_forward_ad, 1, False),
    "vmap_reverse": (lambda p: _kind("g", _vmap(_reverse)(p.s, p.xs, p.V, p.K)), 1, True),
    "vmap_forward": (lambda p: _kind("q", _vmap(_forward)(p.s, p.xs, p.V, p.K)), 1, True),
    "vmap_forward_over_reverse": (lambda p: _kind("g", _vmap(_forward_over_reverse)(p.s, p.xs, p.V, p.K)), 2, True),
    "vmap_reverse_over_forward": (lambda p: _kind("g", _vmap(_reverse_over_forward)(p.s, p.xs, p.V, p.K)), 2, True),
    "forward_of_vmap": (lambda p: _kind("q", _forward(p.s_vmap, p.xs, p.vs, p.K)), 1, False),
    "reverse_of_vmap": (lambda p: _kind("g", _reverse(p.s_vmap, p.xs, p.vs, p.K)), 1, False),
    "taylor": (_taylor_mode, 1, False),
    "taylor_directions": (lambda p: {k: ("q", (q,)) for k, q in _taylor(p, p.V, p.K)[1].items()}, 1, True),
    "taylor_collapsed": (lambda p: {p.K: ("q_sum", (_taylor(p, p.V, p.K, collapse=True)[1][p.K],))}, 2, True),
    "autograd_of_taylor": (_autograd_of_taylor, 2, False),
    "jacrev": (lambda p: _jacobians(p, torch.func.jacrev), 1, False),
    "jacfwd": (lambda p: _jacobians(p, torch.func.jacfwd), 1, False),
    "hessian": (lambda p: {2: ("g", _hessian_times_v(p, torch.func.hessian(p.s, argnums=p.argnums)(*p.xs)))}, 2, False),
}
assert set(MODES) == set(_RUNNERS) | {"value", "gradcheck", "gradgradcheck"}


# ---------------------------------------------------------------------------------------------
# comparison


def _compare(mode: str, order: int, got: Tensors, ref: Tensors, rtol: float, atol: float) -> CheckRow:
    got_flat = torch.cat([g.detach().reshape(-1).to(torch.float64) for g in got])
    ref_flat = torch.cat([r.detach().reshape(-1).to(torch.float64) for r in ref]).to(got_flat.device)
    if got_flat.shape != ref_flat.shape:
        return CheckRow(mode, order, math.inf, math.inf, False, note=f"shape mismatch: op {tuple(got_flat.shape)}, reference {tuple(ref_flat.shape)}")
    err = (got_flat - ref_flat).abs().nan_to_num(nan=math.inf, posinf=math.inf)
    scale = ref_flat.abs().max().item() if ref_flat.numel() else 0.0
    max_abs = err.max().item() if err.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    bound = atol + rtol * scale
    ok = math.isfinite(max_abs) and max_abs <= bound  # a non-finite op or reference value fails
    note, silent = "", False
    if not ok:
        silent = scale > atol and bool((got_flat == 0).all())
        bad = (~(err <= bound)).nonzero().reshape(-1)[:3].tolist()
        note = "; ".join(f"[{i}] op={got_flat[i].item():.10g} ref={ref_flat[i].item():.10g}" for i in bad)
        if silent:
            what = "value" if order == 0 else "derivative"
            note = f"op's {what} is identically 0, the reference's is not; " + note
        if not bool(torch.isfinite(ref_flat).all()):
            note = "the reference is not finite here; " + note
    return CheckRow(mode, order, max_abs, max_rel, ok, silent, note)


def _error_row(mode: str, order: int, exc: BaseException) -> CheckRow:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return CheckRow(mode, order, math.nan, math.nan, False, note="\n".join(msg[:6]))


def _gradchecks(modes: Sequence[str], f: Callable, xs: Tensors, K: int) -> List[CheckRow]:
    rows = []
    leaves = tuple(x.detach().requires_grad_() for x in xs)
    fn = lambda *x: tuple(o for o in f(*x) if o.dtype.is_floating_point)
    for mode, order, check in (
        ("gradcheck", 1, lambda: torch.autograd.gradcheck(fn, leaves, check_forward_ad=True, check_batched_grad=True)),
        ("gradgradcheck", 2, lambda: torch.autograd.gradgradcheck(fn, leaves, check_fwd_over_rev=True, check_batched_grad=True)),
    ):
        if mode in modes and order <= K:
            try:
                check()
                rows.append(CheckRow(mode, order, math.nan, math.nan, True))
            except Exception as exc:  # GradcheckError or a failure inside the op's rules
                rows.append(_error_row(mode, order, exc))
    return rows


def check_op(
    op: Callable[..., Any],
    reference: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    order: int = 4,
    kwargs: Optional[Dict[str, Any]] = None,
    argnums: Optional[Sequence[int]] = None,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    modes: Optional[Sequence[str]] = None,
    seed: int = 0,
    raise_on_failure: bool = True,
    name: Optional[str] = None,
) -> CheckReport:
    """Check ``op`` against ``reference`` by value, for derivative orders 0..``order``, in every mode.

    Args:
        op: the function under test, ``op(*inputs, **kwargs)`` → tensor or tuple of tensors.
        reference: the same function written in plain torch ops (trusted under double backward).
        inputs: positional arguments; non-tensors and non-differentiated tensors (integer targets,
            fixed weights) are passed through unchanged.
        order: highest derivative order K.
        kwargs: keyword arguments for both functions (passed through, never differentiated).
        argnums: positions of the differentiated inputs (default: every floating-point tensor).
        rtol, atol: a quantity passes when ``max|op − ref| ≤ atol + rtol·max|ref|``; see
            :func:`tolerances` for float32.
        modes: subset of :data:`MODES` to run (default: all).
        seed: seed of the random directions ``v`` and cotangent ``w``.
        raise_on_failure: raise ``AssertionError`` (naming op, order, mode, errors, first
            mismatching entries, silent zeros) if any row fails; else just return the report.
        name: the op's name in messages (default ``op.__name__``).

    Returns:
        A :class:`CheckReport` (a list of :class:`CheckRow`: mode, order, max_abs, max_rel, ok).
    """
    name = name or getattr(op, "__name__", repr(op))
    if isinstance(inputs, Tensor) or not isinstance(inputs, (tuple, list)):
        raise TypeError(f"check_op({name}): inputs must be a tuple of positional arguments, e.g. (x,), got {type(inputs).__name__}")
    kwargs, inputs = dict(kwargs or {}), tuple(inputs)
    modes = tuple(MODES) if modes is None else tuple(modes)
    argnums = _check_arguments(name, inputs, order, modes, argnums)

    def bind(fn: Callable, args: Sequence[Any], kw: Dict[str, Any]) -> Callable[..., Tensors]:
        def f(*xs: Tensor) -> Tensors:
            full = list(args)
            for i, x in zip(argnums, xs):
                full[i] = x
            return _as_tuple(fn(*full, **kw))

        return f

    def to64(a: Any) -> Any:
        return a.detach().to(torch.float64) if isinstance(a, Tensor) and a.dtype.is_floating_point else a

    f_op = bind(op, inputs, kwargs)
    f_ref = bind(reference, [to64(a) for a in inputs], {k: to64(a) for k, a in kwargs.items()})
    xs = tuple(inputs[i].detach() for i in argnums)
    xs64 = tuple(x.to(torch.float64) for x in xs)
    with torch.no_grad():
        y_op, y_ref = f_op(*xs), f_ref(*xs64)
    if len(y_op) != len(y_ref):
        raise AssertionError(f"check_op({name}): op returns {len(y_op)} outputs, reference {len(y_ref)}")

    # the random projections: cotangents w of the outputs, R directions per input (in float64,
    # then cast, so the float64 reference sees exactly the same numbers)
    gen = torch.Generator().manual_seed(seed)
    randn = lambda t, batch=(): torch.randn(batch + tuple(t.shape), generator=gen, dtype=torch.float64).to(t.device, t.dtype)
    ws = tuple(randn(y) if y.dtype.is_floating_point else None for y in y_op)
    problem = _Problem(f_op, ws, xs, tuple(randn(x, (_NUM_DIRECTIONS,)) for x in xs), order)
    ws64 = tuple(None if w is None else w.to(torch.float64) for w in ws)
    V64 = tuple(v.to(torch.float64) for v in problem.V)

    rows: List[CheckRow] = []
    if "value" in modes:
        for o, (a, b) in enumerate(zip(y_op, y_ref)):
            label = "value" if len(y_op) == 1 else f"value[{o}]"
            if a.dtype.is_floating_point:
                rows.append(_compare(label, 0, (a,), (b,), rtol, atol))
            else:
                same = a.shape == b.shape and bool((a.to(b.device) == b).all())
                rows.append(CheckRow(label, 0, 0.0 if same else math.inf, 0.0 if same else math.inf, same,
                                     note="" if same else "non-floating output differs"))
    if order > 0:
        # the trusted reference: reverse-over-reverse of the reference in float64, every direction
        s_ref = lambda *x: _dot(f_ref(*x), ws64)
        refs = [_autograd_chain(s_ref, xs64, tuple(v[r] for v in V64), order) for r in range(_NUM_DIRECTIONS)]
        if not any(bool((gi != 0).any()) for g in refs[0].values() for gi in g):
            rows.append(CheckRow("reference", order, 0.0, 0.0, False, note=(
                f"the reference's derivatives of orders 1..{order} are all zero at these inputs: the check could not fail")))

        def expected(k: int, kind: str, batched: bool) -> Tensors:
            if kind == "y":
                return tuple(y for y, w in zip(y_ref, ws) if w is not None)
            per = [r[k] for r in (refs if batched else refs[:1])]
            if kind != "g":  # q_k = <g_k, v> per direction
                per = [(_dot(g, tuple(v[r] for v in V64)),) for r, g in enumerate(per)]
            if kind == "q_sum":
                return (torch.stack([q for (q,) in per]).sum(0),)
            return tuple(torch.stack(parts) for parts in zip(*per)) if batched else per[0]

        for mode in modes:
            if mode not in _RUNNERS or order < _RUNNERS[mode][1]:
                continue
            run, lowest, batched = _RUNNERS[mode]
            try:
                got = run(problem)
            except Exception as exc:  # an op that fails in a mode fails that mode's row
                rows.append(_error_row(mode, lowest, exc))
                continue
            rows.extend(_compare(mode, k, got[k][1], expected(k, got[k][0], batched), rtol, atol) for k in sorted(got))

        if all(x.dtype == torch.float64 for x in xs):
            rows.extend(_gradchecks(modes, f_op, xs, order))

    report = CheckReport(name, rows)
    if raise_on_failure and not report.ok:
        raise AssertionError(_failure_message(report, inputs, argnums))
    return report


def _check_arguments(name: str, inputs: Tuple[Any, ...], order: Any, modes: Tuple[str, ...],
                     argnums: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """Validate check_op's arguments; returns the normalised ``argnums``."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"check_op({name}): order must be an int >= 0, got {order!r}")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"check_op({name}): unknown modes {unknown}; expected a subset of {list(MODES)}")
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(inputs) if isinstance(a, Tensor) and a.dtype.is_floating_point)
    for i in argnums:
        if not (isinstance(i, int) and -len(inputs) <= i < len(inputs)):
            raise ValueError(f"check_op({name}): argnums entry {i!r} is not a position in the {len(inputs)} inputs")
        a = inputs[i]
        if not (isinstance(a, Tensor) and a.dtype.is_floating_point):
            what = f"a tensor of dtype {a.dtype}" if isinstance(a, Tensor) else type(a).__name__
            raise TypeError(f"check_op({name}): input {i} is {what}; differentiated inputs must be real floating-point tensors")
    if not argnums and order > 0:
        raise ValueError(f"check_op({name}): no floating-point tensor input to differentiate; pass argnums or order=0")
    positions = tuple(i % len(inputs) for i in argnums)
    if len(set(positions)) != len(positions):
        raise ValueError(f"check_op({name}): argnums {tuple(argnums)} names an input more than once")
    return positions


def _failure_message(report: CheckReport, inputs: Tuple[Any, ...], argnums: Tuple[int, ...]) -> str:
    failed = report.failures
    shapes = ", ".join(f"{tuple(inputs[i].shape)} {inputs[i].dtype}" for i in argnums)
    head = f"check_op({report.op_name}) failed {len(failed)} of {len(report)} checks (differentiated inputs: {shapes})"
    low = sorted({str(inputs[i].dtype) for i in argnums if inputs[i].dtype != torch.float64})
    rels = [r.max_rel for r in failed if not math.isnan(r.max_rel)]
    if low and rels and max(rels) < 1e-2:  # small errors in low precision: a tolerance question
        head += f"\n(inputs are {', '.join(low)}: is rtol right for the dtype? see torch_hod.testing.tolerances)"
    zero_orders = sorted({r.order for r in failed if r.silent_zero})
    if zero_orders:
        head += f"\nSILENT ZERO: the op gives exactly 0 where the reference does not, at orders {zero_orders}"
    shown = failed[:_MAX_ROWS_SHOWN]
    more = f"\n... and {len(failed) - len(shown)} more failing rows" if len(failed) > len(shown) else ""
    return head + "\n" + report.table(shown) + more


def available_devices() -> List[str]:
    """``["cpu"]`` plus ``"cuda"`` when available: the devices tests should parametrise over."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
