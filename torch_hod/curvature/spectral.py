"""Spectral tools on matrix-free symmetric operators: trace, diagonal, extreme eigenpairs, density.

Every routine takes a :class:`~torch_hod.curvature.linear_operator.LinearOperator` (or anything
:func:`as_linear_operator` accepts), draws its random probes from ``generator`` (or a fresh CPU
generator seeded with ``seed``, moved to the operator's device), so that every rank of a
distributed job draws *identical* probes and, since the operator's product is already all-reduced,
computes identical statistics; and reports the products it used in ``num_matvecs``.
Operators are assumed symmetric (Hessian, GGN, Fisher).

Estimators:

* :func:`hutchinson_trace`: ``tr A ≈ mean_j z_jᵀ A z_j`` with ``E[z zᵀ] = I`` (``m`` probes);
* :func:`hutchpp_trace`: ``tr(QᵀAQ) + mean_j g_jᵀ(I−QQᵀ)A(I−QQᵀ)g_j``, ``Q = orth(AS)`` (Hutch++);
* :func:`xtrace`: Hutch++ made exchangeable by leaving each probe out in turn (XTrace);
* :func:`hutchinson_diagonal`: ``diag A ≈ mean_j z_j ∘ A z_j`` (Rademacher ``z``);
* :func:`xdiag`: the exchangeable leave-one-out version of Diag++ (XDiag);
* :func:`lanczos_eigsh`: ``k`` extreme eigenpairs by Lanczos with full reorthogonalisation;
* :func:`power_iteration`: the eigenpair of largest magnitude;
* :func:`spectral_density`: stochastic Lanczos quadrature, Gaussian-broadened, and
  :func:`plot_spectral_density` to write it as a PNG.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from torch_hod.curvature.linear_operator import LinearOperator, as_linear_operator

__all__ = [
    "TraceEstimate", "DiagonalEstimate", "EigenResult", "SpectralDensity",
    "hutchinson_trace", "hutchpp_trace", "xtrace", "hutchinson_diagonal", "xdiag",
    "lanczos_eigsh", "power_iteration", "spectral_density", "plot_spectral_density",
]


# --- results -------------------------------------------------------------------------------------
@dataclass
class TraceEstimate:
    """``estimate`` of ``tr(A)``; ``std`` is the estimated standard error of ``estimate``."""
    estimate: Tensor
    std: Tensor
    num_matvecs: int


@dataclass
class DiagonalEstimate:
    """``estimate`` of ``diag(A)`` (shape ``(n,)``) with per-entry standard errors ``std``."""
    estimate: Tensor
    std: Tensor
    num_matvecs: int


@dataclass
class EigenResult:
    """Ritz pairs: ``eigenvalues`` ``(k,)`` (sorted as requested), ``eigenvectors`` ``(n, k)``
    (unit columns), ``residuals`` ``‖A v − θ v‖`` ``(k,)``, and whether all met the tolerance."""
    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: bool
    num_matvecs: int


@dataclass
class SpectralDensity:
    """``density`` ``φ(t)`` on ``grid`` (both ``(num_points,)``), from the quadrature ``nodes`` and
    ``weights`` (both ``(num_probes, num_steps)``; each row of weights sums to 1)."""
    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int


# --- shared helpers ------------------------------------------------------------------------------
def _operator(A: Any) -> LinearOperator:
    if isinstance(A, Tensor) and (A.ndim != 2 or A.shape[0] != A.shape[1]):
        raise ValueError(f"expected a square operator (n, n), got a tensor of shape {tuple(A.shape)}")
    A = as_linear_operator(A)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"expected a square operator (n, n), got shape {A.shape}")
    if not A.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point operator, got dtype {A.dtype}")
    return A


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _budget(num_matvecs: int, per_probe: int) -> int:
    """Probes affordable with ``num_matvecs`` products at ``per_probe`` products each (≥ 1)."""
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < per_probe:
        raise ValueError(f"num_matvecs must be an integer >= {per_probe}, got {num_matvecs!r}")
    return num_matvecs // per_probe


def _probes(A: LinearOperator, shape: Tuple[int, ...], kind: str, seed: int,
            generator: Optional[torch.Generator]) -> Tensor:
    """Random probes of ``shape`` in the operator's dtype and device; ``kind`` is
    ``"rademacher"`` (±1), ``"gaussian"`` (N(0, 1)) or ``"sphere"`` (Gaussian columns rescaled to
    norm ``√n``; ``shape = (n, m)``). Drawn on the generator's device (CPU when seeded)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        z = torch.randint(0, 2, shape, generator=g, device=g.device).to(A.dtype).mul_(2).sub_(1)
    elif kind in ("gaussian", "sphere"):
        z = torch.randn(shape, generator=g, device=g.device, dtype=A.dtype)
        if kind == "sphere":
            z = z * (math.sqrt(shape[0]) / torch.linalg.vector_norm(z, dim=0))
    else:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {kind!r}")
    return z.to(A.device)


def _mean_and_sem(samples: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean over dim 0 and its standard error ``std/√m`` (0 for a single sample)."""
    m = samples.shape[0]
    sem = samples.std(dim=0) / math.sqrt(m) if m > 1 else torch.zeros_like(samples[0])
    return samples.mean(dim=0), sem


def _loo_directions(R: Tensor) -> Tensor:
    """Columns ``s_i`` of ``R⁻ᵀ`` normalised to unit length, ``(m, m)``.

    With ``Y = QR``, ``Q s_i`` is the unit vector of ``range(Y)`` orthogonal to every column of
    ``Y`` but the ``i``-th, so the projector onto ``range(Y without column i)`` is
    ``Q (I − s_i s_iᵀ) Qᵀ``; and ``s_iᵀ R e_i = 1/‖R⁻ᵀ e_i‖``.
    """
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    # an exactly singular R (A Ω with zero columns, e.g. A = 0): perturb at rounding level
    R = R + eye * torch.where(R.diagonal() == 0, torch.finfo(R.dtype).eps * R.abs().max().clamp_min(1), 0)
    Rinv_t = torch.linalg.solve_triangular(R, eye, upper=True).mT
    return Rinv_t / torch.linalg.vector_norm(Rinv_t, dim=0)


# --- trace ---------------------------------------------------------------------------------------
def hutchinson_trace(A: Any, num_samples: int, *, distribution: str = "rademacher", seed: int = 0,
                     generator: Optional[torch.Generator] = None) -> TraceEstimate:
    """Hutchinson's estimator ``tr(A) ≈ (1/m) Σ_j z_jᵀ A z_j`` with ``m = num_samples`` probes,
    Rademacher or Gaussian (``E[z zᵀ] = I``). Unbiased; variance ``2‖A‖_F²/m`` (Gaussian) or
    ``2(‖A‖_F² − Σ A_ii²)/m`` (Rademacher). Uses ``m`` products (one ``matmat`` of ``(n, m)``)."""
    A = _operator(A)
    m = _positive("num_samples", num_samples)
    Z = _probes(A, (A.shape[0], m), distribution, seed, generator)
    estimate, std = _mean_and_sem((Z * A.matmat(Z)).sum(dim=0))
    return TraceEstimate(estimate, std, m)


def hutchpp_trace(A: Any, num_matvecs: int, *, distribution: str = "rademacher", seed: int = 0,
                  generator: Optional[torch.Generator] = None) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with ``k = num_matvecs // 3``,
    ``S, G ∈ ℝ^{n×k}`` random, ``Q = orth(A S)``,
    ``tr(A) ≈ tr(QᵀAQ) + (1/k) Σ_j g_jᵀ (I−QQᵀ) A (I−QQᵀ) g_j``.
    Exact for rank ≤ k; error ``O(1/m)`` instead of ``O(1/√m)`` for a PSD ``A``. ``std`` is the
    standard error of the Hutchinson part. Uses ``3k`` products."""
    A = _operator(A)
    k = _budget(num_matvecs, 3)
    n = A.shape[0]
    S = _probes(A, (n, 2 * k), distribution, seed, generator)
    S, G = S[:, :k], S[:, k:]
    Q = torch.linalg.qr(A.matmat(S)).Q
    G = G - Q @ (Q.mT @ G)
    low_rank = (Q * A.matmat(Q)).sum()
    rest, std = _mean_and_sem((G * A.matmat(G)).sum(dim=0))
    return TraceEstimate(low_rank + rest, std, 3 * k)


def _xtrace_estimates(A: LinearOperator, Omega: Tensor) -> Tensor:
    """The ``m`` leave-one-out estimates of XTrace for probes ``Omega`` ``(n, m)`` on the sphere
    of radius ``√n``; their mean is the XTrace estimate (``2m`` products).

    For each ``i``, with ``Π_i`` the projector onto ``range(A Ω_{−i})`` and
    ``x_i = (I − Π_i) ω_i`` (uniform in a space of dimension ``n − m + 1``):
    ``t_i = tr(Π_i A) + (n − m + 1) x_iᵀ A x_i / ‖x_i‖²``. In the basis ``Y = AΩ = QR``,
    ``H = QᵀAQ``, ``W = QᵀΩ``, ``s_i`` from :func:`_loo_directions`, ``c_i = s_iᵀ w_i``,
    ``γ_i = s_iᵀ R e_i``:
    ``tr(Π_i A) = tr H − s_iᵀ H s_i``, ``‖x_i‖² = ‖ω_i‖² − ‖w_i‖² + c_i²``,
    ``x_iᵀ A x_i = −w_iᵀ R e_i + 2 c_i γ_i + u_iᵀ H u_i`` with ``u_i = w_i − c_i s_i``.
    """
    n, m = Omega.shape
    Q, R = torch.linalg.qr(A.matmat(Omega))
    H = Q.mT @ A.matmat(Q)
    H = (H + H.mT) / 2
    W = Q.mT @ Omega
    S = _loo_directions(R)
    c = (S * W).sum(dim=0)
    gamma = (S * R).sum(dim=0)
    U = W - S * c
    trace_loo = H.diagonal().sum() - (S * (H @ S)).sum(dim=0)
    xAx = -(W * R).sum(dim=0) + 2 * c * gamma + (U * (H @ U)).sum(dim=0)
    x_norm2 = (Omega * Omega).sum(dim=0) - (W * W).sum(dim=0) + c * c
    return trace_loo + (n - m + 1) * xAx / x_norm2


def xtrace(A: Any, num_matvecs: int, *, seed: int = 0,
           generator: Optional[torch.Generator] = None) -> TraceEstimate:
    """XTrace (Epperly, Tropp, Webber, SIAM J. Matrix Anal. Appl. 2024): the exchangeable
    version of Hutch++ that uses every probe both for the low-rank part and for the residual.

    With ``m = min(num_matvecs // 2, n)`` probes ``ω_i`` uniform on the sphere of radius ``√n``,
    ``tr(A) ≈ (1/m) Σ_i [tr(Π_i A) + (n−m+1) x_iᵀAx_i/‖x_i‖²]``, ``Π_i`` the projector onto
    ``range(A ω_j, j ≠ i)`` and ``x_i = (I − Π_i) ω_i``. Unbiased, exact once ``m = n``, and
    typically more accurate than Hutch++ for the same budget; ``std`` is the paper's error
    estimate ``std(t_i)/√m``. Uses ``2m`` products.
    """
    A = _operator(A)
    m = min(_budget(num_matvecs, 2), A.shape[0])
    estimate, std = _mean_and_sem(_xtrace_estimates(A, _probes(A, (A.shape[0], m), "sphere", seed, generator)))
    return TraceEstimate(estimate, std, 2 * m)


# --- diagonal ------------------------------------------------------------------------------------
def hutchinson_diagonal(A: Any, num_samples: int, *, distribution: str = "rademacher", seed: int = 0,
                        generator: Optional[torch.Generator] = None) -> DiagonalEstimate:
    """Hutchinson-style diagonal estimator (Bekas, Kokiopoulou, Saad 2007):
    ``diag(A) ≈ (1/m) Σ_j z_j ∘ A z_j``; unbiased when ``E[z zᵀ] = I``, and with Rademacher
    probes (the default) entry ``i`` has variance ``Σ_{j≠i} A_ij² / m``. Uses ``m`` products."""
    A = _operator(A)
    m = _positive("num_samples", num_samples)
    Z = _probes(A, (A.shape[0], m), distribution, seed, generator)
    estimate, std = _mean_and_sem((Z * A.matmat(Z)).mT)
    return DiagonalEstimate(estimate, std, m)


def _xdiag_estimates(A: LinearOperator, Omega: Tensor) -> Tensor:
    """The ``m`` leave-one-out diagonal estimates of XDiag, ``(m, n)``, for Rademacher probes
    ``Omega`` ``(n, m)`` (``2m`` products):
    ``d_i = diag(Π_i A) + ω_i ∘ (I − Π_i) A ω_i``, and with ``Y = AΩ = QR``, ``Z = AQ``:
    ``diag(Π_i A) = rowsum(Q ∘ Z) − (Q s_i) ∘ (Z s_i)`` and
    ``(I − Π_i) A ω_i = γ_i Q s_i`` (``γ_i = s_iᵀ R e_i``, since ``A ω_i ∈ range Q``)."""
    Q, R = torch.linalg.qr(A.matmat(Omega))
    Z = A.matmat(Q)
    S = _loo_directions(R)
    QS, ZS = Q @ S, Z @ S
    gamma = (S * R).sum(dim=0)
    return ((Q * Z).sum(dim=1, keepdim=True) - QS * ZS + Omega * QS * gamma).mT


def xdiag(A: Any, num_matvecs: int, *, seed: int = 0,
          generator: Optional[torch.Generator] = None) -> DiagonalEstimate:
    """XDiag (Epperly, Tropp, Webber 2024): exchangeable Diag++ with ``m = min(num_matvecs // 2, n)``
    Rademacher probes, ``diag(A) ≈ (1/m) Σ_i [diag(Π_i A) + ω_i ∘ (I − Π_i) A ω_i]``
    (``Π_i`` as in :func:`xtrace`). Unbiased; much more accurate than
    :func:`hutchinson_diagonal` when the spectrum decays. Uses ``2m`` products."""
    A = _operator(A)
    m = min(_budget(num_matvecs, 2), A.shape[0])
    estimate, std = _mean_and_sem(_xdiag_estimates(A, _probes(A, (A.shape[0], m), "rademacher", seed, generator)))
    return DiagonalEstimate(estimate, std, 2 * m)


# --- Lanczos -------------------------------------------------------------------------------------
def _lanczos(A: LinearOperator, v: Tensor, num_steps: int, generator: torch.Generator,
             stop: Optional[Callable[[Tensor, Tensor, Tensor], bool]] = None
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Lanczos with full reorthogonalisation from ``v``: ``A Q_jᵀ ≈ Q_jᵀ T_j`` with
    ``T_j = tridiag(beta, alpha, beta)``. Returns ``Q`` ``(j, n)``, ``alpha`` ``(j,)``,
    ``beta`` ``(j−1,)`` and the last off-diagonal ``β_j`` (``‖A q_j − …‖``; residual of the Ritz
    pair ``(θ, Q_jᵀ s)`` is ``β_j |s_j|``). Each new vector is orthogonalised twice against all
    previous ones (CGS2); an invariant subspace (``β ≈ 0``) restarts from a fresh random vector
    orthogonal to ``Q`` with ``β = 0``. ``stop(alpha, beta, β_j)`` may end the loop early."""
    n = A.shape[0]
    Q = torch.zeros(num_steps, n, dtype=A.dtype, device=A.device)
    alpha = torch.zeros(num_steps, dtype=A.dtype, device=A.device)
    beta = torch.zeros(num_steps, dtype=A.dtype, device=A.device)
    eps = torch.finfo(A.dtype).eps
    Q[0] = v / torch.linalg.vector_norm(v)
    j = 0
    while True:
        w = A.matvec(Q[j])
        alpha[j] = Q[j] @ w
        for _ in range(2):
            w = w - Q[: j + 1].mT @ (Q[: j + 1] @ w)
        b = torch.linalg.vector_norm(w)
        beta[j] = b
        if j + 1 == num_steps or (stop is not None and stop(alpha[: j + 1], beta[:j], b)):
            return Q[: j + 1], alpha[: j + 1], beta[:j], b
        scale = torch.maximum(alpha[: j + 1].abs().max(), beta[: j + 1].max())
        if b <= eps * scale:  # invariant subspace: restart orthogonally
            w = torch.randn(n, generator=generator, device=generator.device, dtype=A.dtype).to(A.device)
            for _ in range(2):
                w = w - Q[: j + 1].mT @ (Q[: j + 1] @ w)
            beta[j] = 0
            b = torch.linalg.vector_norm(w)
        Q[j + 1] = w / b
        j += 1


def _tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


_ORDER = {"LA": lambda t: -t, "SA": lambda t: t, "LM": lambda t: -t.abs()}


def _ritz(alpha: Tensor, beta: Tensor, last_beta: Tensor, k: int, which: str, tol: float
          ) -> Tuple[Tensor, Tensor, Tensor, bool]:
    """The ``k`` wanted Ritz values of ``T``, their eigenvectors in ``T``'s basis, residuals, and
    whether every residual is ``≤ tol · max|θ|`` (the largest Ritz value estimates ``‖A‖``)."""
    theta, S = torch.linalg.eigh(_tridiagonal(alpha, beta))
    idx = torch.argsort(_ORDER[which](theta), stable=True)[:k]
    res = last_beta * S[-1, idx].abs()
    return theta[idx], S[:, idx], res, bool((res <= tol * theta.abs().max()).all())


def lanczos_eigsh(A: Any, k: int = 1, *, which: str = "LA", max_iterations: Optional[int] = None,
                  tol: Optional[float] = None, seed: int = 0,
                  generator: Optional[torch.Generator] = None) -> EigenResult:
    """``k`` extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    ``which``: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
    magnitude. Iterates until every wanted Ritz pair ``(θ, v = Qᵀ s)`` has residual
    ``‖A v − θ v‖ = β_j |s_j| ≤ tol · max|θ|`` (checked each step, ``tol`` defaults to
    ``eps^{3/4}`` of the dtype) or ``max_iterations`` (default ``min(n, max(100, 10k))``) products,
    warning if not converged. Eigenvalue errors are ``≤ residual`` and typically
    ``≈ residual²/gap``. Memory ``O(n · iterations)`` for the basis. Eigenvectors are unit
    columns, determined up to sign.
    """
    A = _operator(A)
    n = A.shape[0]
    _positive("k", k)
    if k > n:
        raise ValueError(f"k={k} exceeds the operator's dimension n={n}")
    if which not in _ORDER:
        raise ValueError(f"which must be one of {sorted(_ORDER)}, got {which!r}")
    steps = min(n, max(100, 10 * k)) if max_iterations is None else _positive("max_iterations", max_iterations)
    if steps < k:
        raise ValueError(f"max_iterations={steps} must be >= k={k}")
    steps = min(steps, n)
    tol = torch.finfo(A.dtype).eps ** 0.75 if tol is None else tol
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    v0 = torch.randn(n, generator=g, device=g.device, dtype=A.dtype).to(A.device)

    def converged(alpha: Tensor, beta: Tensor, last: Tensor) -> bool:
        return alpha.shape[0] >= k and _ritz(alpha, beta, last, k, which, tol)[3]

    start = A.num_matvecs
    Qb, alpha, beta, last = _lanczos(A, v0, steps, g, converged)
    theta, S, res, ok = _ritz(alpha, beta, last, k, which, tol)
    ok = ok or alpha.shape[0] == n
    if not ok:
        warnings.warn(f"lanczos_eigsh: not converged after {alpha.shape[0]} iterations "
                      f"(max residual {res.max().item():.3g}); raise max_iterations", RuntimeWarning)
    return EigenResult(theta, Qb.mT @ S, res, ok, A.num_matvecs - start)


def power_iteration(A: Any, *, max_iterations: int = 1000, tol: Optional[float] = None, seed: int = 0,
                    generator: Optional[torch.Generator] = None) -> EigenResult:
    """The eigenpair of largest magnitude by power iteration: ``w = A v``, ``θ = vᵀw``,
    ``v ← w/‖w‖``, until ``‖w − θ v‖ ≤ tol · |θ|`` (``tol`` defaults to ``√eps``). Converges like
    ``|λ₂/λ₁|^iterations``; fails when ``λ`` and ``−λ`` are both dominant. One product per
    iteration; prefer :func:`lanczos_eigsh` (same cost per step, much faster convergence)."""
    A = _operator(A)
    _positive("max_iterations", max_iterations)
    tol = torch.finfo(A.dtype).eps ** 0.5 if tol is None else tol
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    v = torch.randn(A.shape[0], generator=g, device=g.device, dtype=A.dtype).to(A.device)
    v = v / torch.linalg.vector_norm(v)
    for it in range(1, max_iterations + 1):
        w = A.matvec(v)
        theta = v @ w
        res = torch.linalg.vector_norm(w - theta * v)
        if res <= tol * theta.abs():
            break
        v = w / torch.linalg.vector_norm(w)
    ok = bool(res <= tol * theta.abs())
    if not ok:
        warnings.warn(f"power_iteration: not converged after {max_iterations} iterations "
                      f"(residual {res.item():.3g})", RuntimeWarning)
    return EigenResult(theta.reshape(1), v.reshape(-1, 1), res.reshape(1), ok, it)


# --- spectral density ----------------------------------------------------------------------------
def spectral_density(A: Any, num_probes: int = 10, num_steps: int = 50, *, num_points: int = 1000,
                     sigma: Optional[float] = None, grid: Optional[Tensor] = None, seed: int = 0,
                     generator: Optional[torch.Generator] = None) -> SpectralDensity:
    """Spectral density ``φ(t) = (1/n) Σ_i δ(t − λ_i)`` by stochastic Lanczos quadrature
    (Lin, Saad, Yang 2016; Ghorbani, Krishnan, Xiao 2019).

    For each of ``num_probes`` Rademacher probes ``v`` (``‖v‖² = n``), ``num_steps`` Lanczos steps
    from ``v`` give ``T = S diag(θ) Sᵀ``; Gauss quadrature ``vᵀ f(A) v / n ≈ Σ_j τ_j f(θ_j)`` with
    ``τ_j = S_{1j}²`` is exact for polynomials of degree ``< 2·num_steps`` and unbiased for
    ``tr f(A)/n`` over probes. The density is broadened by Gaussians of width ``sigma``:
    ``φ(t) ≈ (1/P) Σ_p Σ_j τ_{pj} 𝒩(t; θ_{pj}, σ²)``, which integrates to 1 and has the spectrum's
    moments up to broadening (``∫ t² φ = Σ τ θ² + σ²``). Default ``sigma`` is 1% of the node
    range; default ``grid`` spans the nodes ± 5σ with ``num_points`` points.
    Uses ``num_probes · min(num_steps, n)`` products.
    """
    A = _operator(A)
    n = A.shape[0]
    P = _positive("num_probes", num_probes)
    steps = min(_positive("num_steps", num_steps), n)
    _positive("num_points", num_points, 2)
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    V = _probes(A, (n, P), "rademacher", seed, g)
    nodes, weights = [], []
    start = A.num_matvecs
    for p in range(P):
        _, alpha, beta, _ = _lanczos(A, V[:, p], steps, g)
        theta, S = torch.linalg.eigh(_tridiagonal(alpha, beta))
        nodes.append(theta)
        weights.append(S[0] ** 2)
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    lo, hi = nodes_t.min().item(), nodes_t.max().item()
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.01
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=A.dtype, device=A.device)
    z = (grid[:, None, None] - nodes_t) / sigma
    density = (weights_t * torch.exp(-0.5 * z * z)).sum(dim=(1, 2)) / (P * sigma * math.sqrt(2 * math.pi))
    return SpectralDensity(grid, density, nodes_t, weights_t, float(sigma), A.num_matvecs - start)


def plot_spectral_density(result: SpectralDensity, path: str, *, log_scale: bool = True,
                          title: str = "Spectral density") -> str:
    """Write a PNG of ``result.density`` against ``result.grid`` to ``path`` (matplotlib with the
    Agg backend, imported here); ``log_scale`` puts the density on a log axis (Hessian spectra
    span many decades). Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = result.grid.detach().cpu().double().numpy()
    y = result.density.detach().cpu().double().numpy()
    ax.plot(x, y)
    if log_scale:
        ax.set_yscale("log")
        ax.set_ylim(max(y.max() * 1e-8, 1e-300), y.max() * 2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
