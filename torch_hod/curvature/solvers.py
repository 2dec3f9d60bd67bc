"""Solvers on matrix-free curvature: damped conjugate gradient and a Newton-CG (Hessian-free) optimiser.

:func:`conjugate_gradient` solves ``(A + λI) x = b`` using only products ``A p`` and stops, as
Newton-CG and Steihaug's method need, at the first direction of non-positive curvature.
:class:`NewtonCG` is a ``torch.optim.Optimizer`` that takes one truncated-Newton step per
``step(closure)``: it solves ``(H + λI) d = −g`` by CG with Hessian-vector products from double
backward, then moves along ``d`` (backtracking line search and/or Levenberg–Marquardt adaptation
of ``λ``; Martens 2010, Nocedal & Wright ch. 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional

import torch
from torch import Tensor

from torch_hod.curvature.linear_operator import CallableOperator, LinearOperator, as_linear_operator

__all__ = ["CGResult", "conjugate_gradient", "NewtonCG"]


@dataclass
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    ``solution`` the last iterate ``x``; ``residual`` ``b − (A + λI) x`` and its norm;
    ``iterations`` CG steps taken; ``converged`` whether ``‖r‖ ≤ max(rtol‖b‖, atol)``;
    ``negative_curvature`` whether CG stopped at a direction ``p`` with ``pᵀ(A + λI)p ≤ 0``
    (then ``direction = p`` and ``curvature = pᵀ(A + λI)p``); ``num_matvecs`` products with ``A``.
    """
    solution: Tensor
    residual: Tensor
    residual_norm: Tensor
    iterations: int
    converged: bool
    negative_curvature: bool
    direction: Optional[Tensor]
    curvature: Optional[Tensor]
    num_matvecs: int


def conjugate_gradient(A: Any, b: Tensor, *, damping: float = 0.0, x0: Optional[Tensor] = None,
                       rtol: float = 1e-5, atol: float = 0.0, max_iterations: Optional[int] = None,
                       size: Optional[int] = None) -> CGResult:
    """Conjugate gradient for ``(A + λI) x = b``, ``λ = damping``, ``A`` symmetric ``(n, n)``.

    From ``x₀`` (default 0), ``r₀ = b − (A + λI)x₀``, ``p₀ = r₀``; each step
    ``α = rᵀr / pᵀ(A + λI)p``, ``x ← x + αp``, ``r ← r − α(A + λI)p``,
    ``p ← r + (r_newᵀr_new / rᵀr) p``. Stops when ``‖r‖ ≤ max(rtol·‖b‖, atol)`` (converged),
    after ``max_iterations`` steps (default ``10n``), or at the first ``p`` with
    ``pᵀ(A + λI)p ≤ 0`` (``negative_curvature``; ``x`` is then the last iterate, a descent direction
    of the quadratic model when ``x₀ = 0``, or 0 at the first step). One product per step
    (plus one for ``x₀``). ``A``: a LinearOperator, a square matrix, or a matvec callable with
    ``size``; ``b``: ``(n,)`` in the operator's dtype and device.
    """
    if not isinstance(b, Tensor):
        raise TypeError(f"conjugate_gradient: b must be a Tensor, got {type(b).__name__}")
    if callable(A) and not isinstance(A, (LinearOperator, Tensor)):
        if size is None:
            raise ValueError("conjugate_gradient: a matvec callable needs size=n")
        A = CallableOperator(A, size, b.dtype, b.device)
    A = as_linear_operator(A)
    n = A.shape[0]
    if b.shape != (n,):
        raise ValueError(f"conjugate_gradient: b must have shape ({n},) to match the operator, got {tuple(b.shape)}")
    if b.dtype != A.dtype:
        raise TypeError(f"conjugate_gradient: b has dtype {b.dtype}, the operator has {A.dtype}")
    if x0 is not None and (x0.shape != b.shape or x0.dtype != b.dtype):
        raise ValueError(f"conjugate_gradient: x0 must match b ({tuple(b.shape)}, {b.dtype}), "
                         f"got ({tuple(x0.shape)}, {x0.dtype})")
    if rtol < 0 or atol < 0:
        raise ValueError(f"conjugate_gradient: rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    steps = 10 * n if max_iterations is None else max_iterations
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"conjugate_gradient: max_iterations must be an integer >= 0, got {max_iterations!r}")

    def damped(v: Tensor) -> Tensor:
        return A.matvec(v) + damping * v

    start = A.num_matvecs
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b.clone() if x0 is None else b - damped(x)
    p = r
    rr = r @ r
    tol = max(rtol * torch.linalg.vector_norm(b).item(), atol)
    direction = curvature = None
    it = 0
    while it < steps and math.sqrt(rr.item()) > tol:
        Ap = damped(p)
        pAp = p @ Ap
        if pAp <= 0:
            direction, curvature = p, pAp
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr, rr_old = r @ r, rr
        p = r + (rr / rr_old) * p
        it += 1
    res = torch.sqrt(rr)
    return CGResult(x, r, res, it, bool(res <= tol), direction is not None, direction, curvature,
                    A.num_matvecs - start)


def _flat(tensors: Iterable[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(v: Tensor, like: List[Tensor]) -> List[Tensor]:
    return [c.view_as(p) for c, p in zip(v.split([p.numel() for p in like]), like)]


class NewtonCG(torch.optim.Optimizer):
    """Newton-CG / Hessian-free optimiser (Martens 2010) for a normal training loop.

    Each ``step(closure)`` does, per parameter group with parameters ``θ`` (flattened, ``n``):

    1. ``f = closure()`` (the closure re-evaluates the model and **returns the loss without calling
       backward**), ``g = ∇f`` by ``autograd.grad(create_graph=True)``;
    2. ``d ≈ −(H + λI)⁻¹ g`` by :func:`conjugate_gradient` with at most ``cg_max_iterations``
       Hessian-vector products ``Hv = ∇(gᵀv)`` (double backward), relative tolerance ``cg_rtol``;
       on negative curvature at the first CG step, ``d = −g``;
    3. ``θ ← θ + α d``: ``α = lr``, or with ``line_search=True`` the first of ``lr, lr/2, …``
       (``max_backtracks`` halvings) meeting Armijo's ``f(θ + αd) ≤ f + c α gᵀd``
       (``c = armijo``); no move if none does;
    4. with ``adapt_damping=True``, Levenberg–Marquardt: ``ρ = (f(θ + αd) − f) / q(αd)`` against
       the damped model ``q(s) = gᵀs + ½ sᵀ(H + λI)s`` (``dᵀ(H+λI)d = dᵀ(−g − r)`` from CG's
       residual ``r``, no extra product); ``λ ← λ·decrease`` if ``ρ > 3/4``,
       ``λ ← λ·increase`` if ``ρ < 1/4`` or CG met negative curvature, clipped to
       ``[min_damping, ∞)``. The current ``λ`` is ``group["damping"]``.

    The Hessian is that of the loss w.r.t. the group's parameters only (block-diagonal over
    groups; each group calls the closure). ``step`` returns the loss before the step; statistics
    of the last step are in ``self.last_step`` (per group: loss, damping, CG iterations, residual,
    negative curvature, step size, ρ).
    """

    def __init__(self, params: Any, lr: float = 1.0, damping: float = 1e-3, *,
                 cg_max_iterations: int = 50, cg_rtol: float = 1e-2, line_search: bool = True,
                 adapt_damping: bool = False, armijo: float = 1e-4, max_backtracks: int = 20,
                 decrease: float = 2 / 3, increase: float = 3 / 2, min_damping: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"NewtonCG: lr must be > 0, got {lr}")
        if damping < 0 or min_damping < 0:
            raise ValueError(f"NewtonCG: damping and min_damping must be >= 0, got {damping}, {min_damping}")
        if isinstance(cg_max_iterations, bool) or not isinstance(cg_max_iterations, int) or cg_max_iterations < 1:
            raise ValueError(f"NewtonCG: cg_max_iterations must be an integer >= 1, got {cg_max_iterations!r}")
        if not cg_rtol >= 0 or not 0 < armijo < 1:
            raise ValueError(f"NewtonCG: need cg_rtol >= 0 and 0 < armijo < 1, got {cg_rtol}, {armijo}")
        if isinstance(max_backtracks, bool) or not isinstance(max_backtracks, int) or max_backtracks < 0:
            raise ValueError(f"NewtonCG: max_backtracks must be an integer >= 0, got {max_backtracks!r}")
        if not 0 < decrease < 1 < increase:
            raise ValueError(f"NewtonCG: need 0 < decrease < 1 < increase, got {decrease}, {increase}")
        defaults = dict(lr=lr, damping=damping, cg_max_iterations=cg_max_iterations, cg_rtol=cg_rtol,
                        line_search=line_search, adapt_damping=adapt_damping, armijo=armijo,
                        max_backtracks=max_backtracks, decrease=decrease, increase=increase,
                        min_damping=min_damping)
        super().__init__(params, defaults)
        self.last_step: List[dict] = []

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Tensor:  # type: ignore[override]
        """One Newton-CG step per parameter group; returns the loss before the (first) step."""
        if closure is None:
            raise ValueError("NewtonCG.step needs a closure that re-evaluates the model and returns the loss")
        closure = torch.enable_grad()(closure)
        self.last_step = []
        first_loss = None
        for group in self.param_groups:
            info = self._step_group(group, closure)
            self.last_step.append(info)
            first_loss = info["loss"] if first_loss is None else first_loss
        return first_loss

    def _step_group(self, group: dict, closure: Callable[[], Tensor]) -> dict:
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            raise ValueError("NewtonCG: a parameter group has no parameter that requires grad")
        if len({p.dtype for p in params}) > 1 or len({p.device for p in params}) > 1:
            raise TypeError("NewtonCG: all parameters of a group must share one dtype and device, got "
                            f"{sorted({str(p.dtype) for p in params})} on {sorted({str(p.device) for p in params})}")
        loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"NewtonCG: the closure must return a scalar loss tensor, got {loss!r}")
        try:
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
        except RuntimeError as e:
            raise RuntimeError("NewtonCG: could not differentiate the closure's loss; the closure must "
                               f"return the loss without calling loss.backward() ({e})") from e
        g = _flat(grads).detach()
        live = [(gi, p) for gi, p in zip(grads, params) if gi.requires_grad]

        def hvp(v: Tensor) -> Tensor:
            if not live:
                return torch.zeros_like(v)
            vs = [vi for vi, gi in zip(_unflat(v, params), grads) if gi.requires_grad]
            Hv = torch.autograd.grad([gi for gi, _ in live], params, grad_outputs=vs, retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
            return _flat(Hv).detach()

        lam = group["damping"]
        H = CallableOperator(hvp, g.numel(), g.dtype, g.device)
        cg = conjugate_gradient(H, -g, damping=lam, rtol=group["cg_rtol"],
                                max_iterations=group["cg_max_iterations"])
        d = cg.solution
        if cg.negative_curvature and cg.iterations == 0:
            d, dAd = -g, None
        else:
            dAd = d @ (-g - cg.residual)
        f0 = loss.detach()
        gd = g @ d
        alpha = group["lr"]
        self._add(params, d, alpha)
        f_new = None
        if group["line_search"] or group["adapt_damping"]:
            f_new = closure().detach()
        if group["line_search"]:
            for _ in range(group["max_backtracks"]):
                if f_new <= f0 + group["armijo"] * alpha * gd:
                    break
                self._add(params, d, -alpha / 2)
                alpha /= 2
                f_new = closure().detach()
            else:
                if not f_new <= f0 + group["armijo"] * alpha * gd:
                    self._add(params, d, -alpha)
                    alpha = 0.0
        rho = None
        if group["adapt_damping"]:
            if dAd is None or alpha == 0.0:
                rho = -math.inf
            else:
                model = alpha * gd + 0.5 * alpha ** 2 * dAd
                rho = ((f_new - f0) / model).item() if model < 0 else -math.inf
            if rho < 0.25 or cg.negative_curvature:
                lam = max(lam, 1e-8) * group["increase"]
            elif rho > 0.75:
                lam *= group["decrease"]
            group["damping"] = max(lam, group["min_damping"])
        return dict(loss=f0, damping=group["damping"], cg_iterations=cg.iterations,
                    cg_residual=cg.residual_norm.item(), negative_curvature=cg.negative_curvature,
                    step_size=alpha, rho=rho, num_hvps=cg.num_matvecs)

    @staticmethod
    @torch.no_grad()
    def _add(params: List[Tensor], d: Tensor, scale: float) -> None:
        for p, di in zip(params, _unflat(d, params)):
            p.add_(di, alpha=scale)
