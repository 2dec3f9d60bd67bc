"""Hessian-vector products of scalar functions, in three AD compositions.

For a scalar ``f(x)`` (``x`` any tuple of tensors or pytrees of tensors, e.g. a dict of
parameters) and a tangent ``v`` shaped like ``x``::

    hvp(f, x, v) = (f(x), H v),   H v = ∇ₓ ⟨∇ₓ f(x), v⟩ = d/dε ∇f(x + ε v) |₀

Modes (all exact; they differ in cost and in what ``f`` must support):

==========  =========================================================  ===========================
mode        composition                                                needs
==========  =========================================================  ===========================
rev-rev     ``autograd.grad(⟨autograd.grad(f, x, create_graph), v⟩)``   double backward
fwd-rev     ``torch.func.jvp(torch.func.grad(f), x, v)``                forward AD of the backward
rev-fwd     ``torch.func.grad(x ↦ torch.func.jvp(f, x, v)[1])``         backward of forward AD
auto        rev-rev outside torch.func transforms, else fwd-rev        see :func:`choose_mode`
==========  =========================================================  ===========================

``auto`` rule: ``rev-rev``, except inside a ``torch.func`` transform, where ``autograd.grad``
cannot see functorch levels and ``auto`` picks ``fwd-rev`` (the composition ``torch.func.hessian``
uses). Measured by ``benchmarks/bench_hvp.py`` (CPU, 1 thread, fp32; MLP, CNN+BatchNorm and
transformer block, plain and converted): ``rev-rev`` had the lowest peak memory in every case
(0.5–0.8× that of ``fwd-rev``, e.g. MLP 11.3 vs 18.1 MB) and a median time of 2.1–3.2× one
gradient against 3.0–4.0× for ``fwd-rev``; it also works for ops without forward AD (``cdist``).

Caution (measured on torch 2.13, pytorch#198017): built-ins whose forward-AD rule is not correctly
differentiable give silently wrong ``rev-fwd`` products; through ``F.layer_norm`` they are off by
30–130% (relative, depending on the inputs) w.r.t. its input, while ``rev-rev`` and ``fwd-rev`` are
exact. ``rev-fwd`` is offered for completeness and for functions made of torch_hod ops; ``auto``
never picks it.

Batched products (``batched=True`` or :func:`hvp_batched`): tangents carry a leading batch axis
``B``; ``rev-rev`` computes the gradient once and runs the second backward with
``is_grads_batched=True`` (vmap over the backward); the torch.func modes ``vmap`` the product. If
the function does not support vmap, the product falls back to a loop over the batch (with a
warning) so results are always returned.

Every mode is differentiable again, so ``hvp`` can sit inside an outer ``.backward()``: the
torch.func modes always, ``rev-rev`` when a primal requires grad or ``create_graph=True`` (needed
to reach tensors that ``func`` captures rather than takes as primals).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_map, tree_unflatten, keystr

__all__ = ["hvp", "hvp_batched", "vhp", "hessian", "choose_mode", "MODES"]

#: The explicit modes; ``"auto"`` picks one of them (:func:`choose_mode`).
MODES: Tuple[str, ...] = ("rev-rev", "fwd-rev", "rev-fwd")


# --- input checks -------------------------------------------------------------------------------
def _leaf_name(tree: Any, index: int, root: str) -> str:
    """``root[0]['weight']``-style name of leaf ``index`` (computed only for error messages)."""
    return root + keystr(tree_flatten_with_path(tree)[0][index][0])


def _check_primals(primals: Any, who: str) -> None:
    if not isinstance(primals, (tuple, list)):
        raise TypeError(
            f"{who}: primals must be a tuple of tensors or pytrees (torch.func convention), got "
            f"{type(primals).__name__}; wrap a single tensor as (x,)"
        )
    leaves, _ = tree_flatten(primals)
    if not leaves:
        raise ValueError(f"{who}: primals contain no tensors")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{who}: {_leaf_name(primals, i, 'primals')} must be a Tensor, got {type(leaf).__name__}")
        if not leaf.dtype.is_floating_point:
            raise TypeError(
                f"{who}: {_leaf_name(primals, i, 'primals')} has dtype {leaf.dtype}; the Hessian needs real "
                "floating-point primals (float16/bfloat16/float32/float64). Convert with .double() or .float()."
            )


def _check_tangents(primals: Any, tangents: Any, batched: bool, who: str) -> int:
    """Validate ``tangents`` against ``primals``; return the batch size (0 when not batched)."""
    if not isinstance(tangents, (tuple, list)):
        raise TypeError(f"{who}: tangents must be a tuple shaped like primals, got {type(tangents).__name__}")
    p_leaves, p_spec = tree_flatten(primals)
    t_leaves, t_spec = tree_flatten(tangents)
    if p_spec != t_spec:
        raise ValueError(f"{who}: tangents have pytree structure\n  {t_spec}\nexpected the structure of primals\n  {p_spec}")
    batch = 0
    for i, (p, t) in enumerate(zip(p_leaves, t_leaves)):
        name = lambda: _leaf_name(tangents, i, "tangents")  # noqa: E731
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name()} must be a Tensor, got {type(t).__name__}")
        want = tuple(p.shape)
        if batched:
            if t.ndim != p.ndim + 1 or tuple(t.shape[1:]) != want or (batch and t.shape[0] != batch):
                lead = batch or "B"
                raise ValueError(f"{who}: {name()} has shape {tuple(t.shape)}, expected ({lead}, *{want}) "
                                 "(a leading batch axis shared by all tangents)")
            batch = t.shape[0]
        elif tuple(t.shape) != want:
            raise ValueError(f"{who}: {name()} has shape {tuple(t.shape)}, expected {want} (the primal's shape)")
        if t.dtype != p.dtype:
            raise TypeError(f"{who}: {name()} has dtype {t.dtype}, expected {p.dtype} (the primal's dtype)")
        if t.device != p.device:
            raise ValueError(f"{who}: {name()} is on {t.device}, expected {p.device} (the primal's device)")
    return batch


def _scalar_func(func: Callable[..., Any], has_aux: bool, who: str) -> Callable[..., Tuple[Tensor, Any]]:
    """``func`` as ``x ↦ (scalar, aux)``, with a clear error when the output is not a scalar."""

    def f(*args: Any) -> Tuple[Tensor, Any]:
        out = func(*args)
        aux: Any = ()  # torch.func needs aux to be a pytree of tensors; () has no leaves
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"{who}: with has_aux=True, func must return (scalar, aux), got {type(out).__name__}")
            out, aux = out
        if not isinstance(out, Tensor) or out.ndim != 0:
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{who}: func must return a scalar tensor (shape ()), got {got}; "
                             "reduce it first (e.g. .sum() or .mean())")
        return out, aux

    return f


def choose_mode(primals: Any) -> str:
    """The mode ``"auto"`` resolves to: ``"fwd-rev"`` inside a torch.func transform, else ``"rev-rev"``."""
    inside = torch._C._functorch.peek_interpreter_stack() is not None
    wrapped = any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in tree_flatten(primals)[0])
    return "fwd-rev" if inside or wrapped else "rev-rev"


def _resolve(mode: str, primals: Any, who: str) -> str:
    if mode == "auto":
        return choose_mode(primals)
    if mode not in MODES:
        raise ValueError(f"{who}: unknown mode {mode!r}; valid modes are 'auto', " + ", ".join(repr(m) for m in MODES))
    return mode


# --- the three compositions ---------------------------------------------------------------------
def _rev_rev(f: Callable, primals: Tuple[Any, ...], tangents: Tuple[Any, ...], batched: bool,
             create_graph: Optional[bool]) -> Tuple[Tensor, Any, Any]:
    leaves, spec = tree_flatten(primals)
    t_leaves = tree_flatten(tangents)[0]
    if create_graph is None:
        create_graph = any(p.requires_grad for p in leaves)
    connected = torch.is_grad_enabled() and create_graph
    xs = [p if p.requires_grad else p.detach().requires_grad_(True) for p in leaves]
    with torch.enable_grad():
        out, aux = f(*tree_unflatten(xs, spec))
        if out.requires_grad:
            grads = torch.autograd.grad(out, xs, create_graph=True, allow_unused=True)
        else:  # f does not depend on the primals: H = 0
            grads = (None,) * len(xs)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hv: List[Any] = [None] * len(xs)
        if live:
            gs, vs = [grads[i] for i in live], [t_leaves[i] for i in live]
            if not batched:
                hv = list(torch.autograd.grad(gs, xs, vs, create_graph=connected, allow_unused=True))
            else:
                try:
                    hv = list(torch.autograd.grad(gs, xs, vs, create_graph=connected, allow_unused=True,
                                                  retain_graph=True, is_grads_batched=True))
                except (RuntimeError, NotImplementedError) as err:
                    _warn_loop(err)
                    rows = [torch.autograd.grad(gs, xs, [v[b] for v in vs], create_graph=connected,
                                                allow_unused=True, retain_graph=True)
                            for b in range(vs[0].shape[0])]
                    hv = [None if col[0] is None else torch.stack(col) for col in zip(*rows)]
    hv = [torch.zeros_like(t) if h is None else h for h, t in zip(hv, t_leaves)]
    return (out if connected else out.detach()), tree_unflatten(hv, spec), aux


def _fwd_rev(f: Callable, primals: Tuple[Any, ...], tangents: Tuple[Any, ...]) -> Tuple[Tensor, Any, Any]:
    argnums = tuple(range(len(primals)))

    def grad_value(*x: Any) -> Tuple[Any, Any]:
        g, (out, aux) = torch.func.grad_and_value(f, argnums=argnums, has_aux=True)(*x)
        return (g, out), aux

    (_, out), (hv, _), aux = torch.func.jvp(grad_value, tuple(primals), tuple(tangents), has_aux=True)
    return out, hv, aux


def _rev_fwd(f: Callable, primals: Tuple[Any, ...], tangents: Tuple[Any, ...]) -> Tuple[Tensor, Any, Any]:
    argnums = tuple(range(len(primals)))

    def directional(*x: Any) -> Tuple[Tensor, Any]:
        out, dout, aux = torch.func.jvp(f, x, tuple(tangents), has_aux=True)
        return dout, (out, aux)

    hv, (out, aux) = torch.func.grad(directional, argnums=argnums, has_aux=True)(*primals)
    return out, hv, aux


def _warn_loop(err: BaseException) -> None:
    warnings.warn(f"torch_hod.hvp: batched product not supported by this function ({type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}); falling back to a loop over the batch",
                  RuntimeWarning, stacklevel=4)


def _func_batched(single: Callable, primals: Tuple[Any, ...], tangents: Tuple[Any, ...]) -> Tuple[Tensor, Any, Any]:
    """vmap a torch.func mode over the tangents' leading axis; loop if vmap is not supported."""
    try:
        return torch.func.vmap(lambda t: single(primals, t), in_dims=(0,), out_dims=(None, 0, None))(tuple(tangents))
    except (RuntimeError, NotImplementedError, ValueError) as err:
        _warn_loop(err)
    size = tree_flatten(tangents)[0][0].shape[0]
    results = [single(primals, tree_map(lambda t: t[b], tuple(tangents))) for b in range(size)]
    hv = tree_map(lambda *rows: torch.stack(rows), *[r[1] for r in results])
    return results[0][0], hv, results[0][2]


# --- public API ---------------------------------------------------------------------------------
def hvp(func: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any], *, mode: str = "auto",
        has_aux: bool = False, batched: bool = False, create_graph: Optional[bool] = None) -> Tuple[Any, ...]:
    """Hessian-vector product ``(f(x), H v)`` with torch.func conventions.

    Args:
        func: ``f(*primals) -> scalar`` (or ``(scalar, aux)`` with ``has_aux=True``).
        primals: tuple of tensors or pytrees (e.g. dicts of parameters), real floating point.
        tangents: tuple with the structure, shapes, dtypes and devices of ``primals``; with
            ``batched=True`` every leaf has an extra leading axis ``B`` (B tangents at once).
        mode: ``"auto"``, ``"rev-rev"``, ``"fwd-rev"`` or ``"rev-fwd"`` (module docstring).
        create_graph: ``rev-rev`` only: record the second backward so ``Hv`` can be differentiated
            again. ``None`` (default) records it when a primal requires grad; pass ``True`` to
            differentiate w.r.t. tensors that ``func`` captures (e.g. a model's parameters while
            ``primals`` are its inputs). The torch.func modes are always differentiable.
    Returns:
        ``(f(x), Hv)`` or ``(f(x), Hv, aux)``; ``Hv`` is shaped like ``primals`` (``(B, ...)``
        leaves when batched). ``(Hv)_i = Σ_j ∂²f/∂x_i∂x_j v_j``.
    """
    who = "torch_hod.hvp"
    _check_primals(primals, who)
    _check_tangents(primals, tangents, batched, who)
    mode = _resolve(mode, primals, who)
    f = _scalar_func(func, has_aux, who)
    primals, tangents = tuple(primals), tuple(tangents)
    if mode == "rev-rev":
        out, hv, aux = _rev_rev(f, primals, tangents, batched, create_graph)
    else:
        single = _fwd_rev if mode == "fwd-rev" else _rev_fwd
        out, hv, aux = _func_batched(lambda p, t: single(f, p, t), primals, tangents) if batched \
            else single(f, primals, tangents)
    return (out, hv, aux) if has_aux else (out, hv)


def hvp_batched(func: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any], *, mode: str = "auto",
                has_aux: bool = False, create_graph: Optional[bool] = None) -> Tuple[Any, ...]:
    """:func:`hvp` for ``B`` tangents at once: every tangent leaf has shape ``(B, *primal.shape)``;
    returns ``Hv`` leaves of shape ``(B, *primal.shape)`` with ``Hv[b] = H v[b]``."""
    return hvp(func, primals, tangents, mode=mode, has_aux=has_aux, batched=True, create_graph=create_graph)


def vhp(func: Callable[..., Tensor], inputs: Any, v: Any, *, create_graph: bool = False,
        mode: str = "auto") -> Tuple[Tensor, Any]:
    """Vector-Hessian product ``(f(x), vᵀH)`` with ``torch.autograd.functional.vhp`` conventions.

    Differences from :func:`hvp`: ``inputs`` and ``v`` are a Tensor or a tuple of Tensors (no
    pytrees, no aux); a single Tensor input gives a single Tensor result; results are detached
    unless ``create_graph=True``. For a twice continuously differentiable ``f`` the Hessian is
    symmetric, so ``vᵀH = (Hv)ᵀ`` and the numbers equal :func:`hvp`'s.
    """
    single = isinstance(inputs, Tensor)
    xs = (inputs,) if single else inputs
    vs = (v,) if isinstance(v, Tensor) else v
    if not (isinstance(xs, tuple) and all(isinstance(x, Tensor) for x in xs)):
        raise TypeError("torch_hod.vhp: inputs must be a Tensor or a tuple of Tensors")
    out, hv = hvp(func, xs, vs, mode=mode)
    if not create_graph:
        out, hv = out.detach(), tuple(h.detach() for h in hv)
    return out, (hv[0] if single else tuple(hv))


def hessian(func: Callable[..., Tensor], primals: Sequence[Any], *, mode: str = "auto") -> Tensor:
    """The dense Hessian ``H`` of a scalar ``f(*primals)`` as an ``(n, n)`` matrix, small problems only.

    ``n`` is the total number of elements of the primals' leaves; rows and columns follow
    ``torch.utils._pytree.tree_flatten(primals)`` order, each leaf flattened row-major (the order
    of :func:`torch_hod.curvature.flatten_params` for a dict). Built from ``n`` batched HVPs with
    the unit vectors: ``H[:, j] = H e_j``.
    """
    _check_primals(primals, "torch_hod.hessian")
    leaves, spec = tree_flatten(tuple(primals))
    n = sum(p.numel() for p in leaves)
    if n == 0:
        raise ValueError("torch_hod.hessian: the primals have no elements (n = 0)")
    eye = torch.eye(n, dtype=leaves[0].dtype, device=leaves[0].device)
    cols, start = [], 0
    for p in leaves:
        cols.append(eye[:, start:start + p.numel()].reshape(n, *p.shape).to(p.dtype))
        start += p.numel()
    _, hv = hvp(func, tuple(primals), tree_unflatten(cols, spec), mode=mode, batched=True)
    return torch.cat([h.reshape(n, -1) for h in tree_flatten(hv)[0]], dim=1)
