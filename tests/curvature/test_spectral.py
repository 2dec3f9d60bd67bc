"""Spectral tools checked against dense linear algebra (torch.linalg) in float64.

Statistical checks use a tolerance derived from the observed variance: over R independent seeds,
|mean − exact| < 5 · (sample std) / √R.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

from torch_hod.curvature.linear_operator import CallableOperator, DenseOperator
from torch_hod.curvature.solvers import conjugate_gradient
from torch_hod.curvature.spectral import (
    _xdiag_estimates, _xtrace_estimates, hutchinson_diagonal, hutchinson_trace, hutchpp_trace,
    lanczos_eigsh, plot_spectral_density, power_iteration, spectral_density, xdiag, xtrace,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64


def sym(eigenvalues, seed=0, device="cpu", dtype=F64):
    """U diag(λ) Uᵀ with a random orthogonal U."""
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=F64)).Q
    return ((U * lam) @ U.T).to(device=device, dtype=dtype)


def decaying(n, power=2.0, seed=0, device="cpu"):
    j = torch.arange(1, n + 1, dtype=F64)
    return sym(j ** -power, seed, device)


def indefinite(n, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed + 100)
    return sym(torch.randn(n, generator=g, dtype=F64) * 3, seed, device)


def assert_close(x, ref, rtol, atol=0.0):
    ref = torch.as_tensor(ref, dtype=x.dtype, device=x.device)
    assert ref.abs().max() > 0, "reference is zero: the check could not fail"
    err = (x - ref).abs().max().item()
    assert err <= atol + rtol * ref.abs().max().item(), f"max abs err {err:.3e}, ref scale {ref.abs().max().item():.3e}"


def assert_unbiased(samples, exact):
    """|mean − exact| < 5 · std / √R, entrywise, for samples of shape (R, ...)."""
    R = samples.shape[0]
    std = samples.std(dim=0)
    assert (std > 0).all(), "estimator has zero variance across seeds: probes are not random"
    dev = (samples.mean(dim=0) - exact).abs()
    bound = 5 * std / math.sqrt(R)
    assert (dev < bound).all(), f"bias {dev.max().item():.3e} exceeds 5 std/sqrt(R) {bound.min().item():.3e}"


# --- Lanczos and power iteration -----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_matches_eigh(which, device):
    n, k = 60, 5
    A = indefinite(n, device=device)
    lam, U = torch.linalg.eigh(A)
    order = {"LA": torch.argsort(-lam), "SA": torch.argsort(lam), "LM": torch.argsort(-lam.abs())}[which][:k]
    op = DenseOperator(A)
    res = lanczos_eigsh(op, k, which=which, seed=1)
    assert res.converged and res.num_matvecs == op.num_matvecs <= n
    assert_close(res.eigenvalues, lam[order], rtol=1e-8)
    V = res.eigenvectors
    assert V.shape == (n, k)
    overlap = (V * U[:, order]).sum(dim=0).abs()  # |cos| = 1 up to sign
    assert_close(overlap, torch.ones(k, dtype=F64, device=device), rtol=1e-8)
    assert (torch.linalg.vector_norm(A @ V - V * res.eigenvalues, dim=0) <= 1e-8 * lam.abs().max()).all()


def test_lanczos_model_hessian():
    """Top eigenvalues of a small MLP's loss Hessian (HVP by double backward) vs eigh of torch.func.hessian."""
    torch.manual_seed(0)
    X, y = torch.randn(32, 3, dtype=F64), torch.randn(32, 1, dtype=F64)
    shapes = [(4, 3), (4,), (1, 4), (1,)]
    sizes = [math.prod(s) for s in shapes]

    def loss(theta):
        W1, b1, W2, b2 = [t.reshape(s) for t, s in zip(theta.split(sizes), shapes)]
        return ((torch.tanh(X @ W1.T + b1) @ W2.T + b2 - y) ** 2).mean()

    theta = torch.randn(sum(sizes), dtype=F64)
    Hd = torch.func.hessian(loss)(theta)
    t = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(t), t, create_graph=True)
    H = CallableOperator(lambda v: torch.autograd.grad(g, t, v, retain_graph=True)[0], t.numel(), F64)
    lam = torch.linalg.eigvalsh(Hd)
    assert_close(lanczos_eigsh(H, 3).eigenvalues, lam.flip(0)[:3], rtol=1e-8)
    assert_close(lanczos_eigsh(H, 2, which="SA").eigenvalues, lam[:2], rtol=1e-8)


def test_on_hessian_operator():
    """HessianOperator (matrix-free, torch_hod.curvature.operators) against torch.func.hessian."""
    from torch_hod.curvature.operators import HessianOperator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    X, y = torch.randn(40, 3, dtype=F64), torch.randint(0, 3, (40,))
    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach() for k, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]

    def loss(theta):
        p = {k: t.view_as(params[k]) for k, t in zip(names, theta.split(sizes))}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (X,)), y)

    lam = torch.linalg.eigvalsh(torch.func.hessian(loss)(torch.cat([p.reshape(-1) for p in params.values()])))
    H = HessianOperator(model, torch.nn.CrossEntropyLoss(), (X, y))
    assert_close(lanczos_eigsh(H, 3).eigenvalues, lam.flip(0)[:3], rtol=1e-8)
    assert_close(xtrace(H, 2 * H.shape[0]).estimate, lam.sum(), rtol=1e-10)


def test_lanczos_restarts_on_invariant_subspace():
    """Rank 3, k = 5: the Krylov space is exhausted after 4 steps; restarts find the zero eigenvalues."""
    A = sym([3.0, 2.0, 1.0] + [0.0] * 17)
    res = lanczos_eigsh(A, 5)
    assert res.converged
    assert_close(res.eigenvalues, [3.0, 2.0, 1.0, 0.0, 0.0], rtol=1e-10)
    assert_close(res.eigenvectors.T @ res.eigenvectors, torch.eye(5, dtype=F64), rtol=1e-10)


def test_lanczos_float32():
    A = indefinite(40).float()
    lam = torch.linalg.eigvalsh(A.double())
    res = lanczos_eigsh(A, 3)
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.dtype == torch.float32
    assert_close(res.eigenvalues.double(), lam[torch.argsort(-lam)][:3], rtol=1e-4)


def test_lanczos_warns_when_not_converged():
    A = decaying(50, power=0.1)
    with pytest.warns(RuntimeWarning, match="not converged"):
        res = lanczos_eigsh(A, 3, max_iterations=4)
    assert not res.converged and res.num_matvecs == 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_power_iteration(sign, device):
    lam = torch.tensor([sign * 10.0, 5.0, -4.0] + [1.0 / j for j in range(1, 28)], dtype=F64)
    A = sym(lam, device=device)
    res = power_iteration(A, tol=1e-12)
    assert res.converged
    assert_close(res.eigenvalues, [sign * 10.0], rtol=1e-10)
    v = torch.linalg.eigh(A).eigenvectors[:, lam.sort().indices.tolist().index(0)]
    assert_close((res.eigenvectors[:, 0] @ v).abs().reshape(1), [1.0], rtol=1e-8)
    assert res.num_matvecs > 1


@pytest.mark.parametrize("call", [
    lambda A: lanczos_eigsh(A, 11),
    lambda A: lanczos_eigsh(A, 0),
    lambda A: lanczos_eigsh(A, 2, which="BE"),
    lambda A: lanczos_eigsh(A, 3, max_iterations=2),
    lambda A: power_iteration(A, max_iterations=0),
])
def test_eigen_bad_input(call):
    with pytest.raises(ValueError, match=r"k=11 exceeds|k must be|which must|max_iterations"):
        call(sym(torch.arange(1.0, 11.0)))


def test_non_square_operator_rejected():
    for fn in (lambda A: lanczos_eigsh(A, 1), lambda A: hutchinson_trace(A, 3),
               lambda A: spectral_density(A, 1, 2)):
        with pytest.raises(ValueError, match="square"):
            fn(torch.randn(4, 5, dtype=F64))
    with pytest.raises(TypeError, match="floating-point"):
        xtrace(torch.eye(4, dtype=torch.int64), 4)


# --- trace ---------------------------------------------------------------------------------------
TRACE = {
    "hutchinson": lambda A, seed: hutchinson_trace(A, 12, seed=seed),
    "hutchinson_gaussian": lambda A, seed: hutchinson_trace(A, 12, distribution="gaussian", seed=seed),
    "hutchpp": lambda A, seed: hutchpp_trace(A, 12, seed=seed),
    "xtrace": lambda A, seed: xtrace(A, 12, seed=seed),
}


@pytest.mark.parametrize("name", list(TRACE))
def test_trace_estimators_unbiased(name):
    A = indefinite(20) + 2 * torch.eye(20, dtype=F64)
    samples = torch.stack([TRACE[name](A, s).estimate for s in range(300)])
    assert_unbiased(samples, torch.trace(A))


def test_hutchinson_reports_its_standard_error():
    """Mean reported std ≈ the spread of estimates across seeds (within 25%)."""
    A = indefinite(20)
    results = [hutchinson_trace(A, 12, seed=s) for s in range(300)]
    spread = torch.stack([r.estimate for r in results]).std()
    reported = torch.stack([r.std for r in results]).mean()
    assert 0.75 < (reported / spread).item() < 1.25
    assert all(r.num_matvecs == 12 for r in results)


def test_trace_accuracy_on_decaying_spectrum():
    """Mean |error| over seeds for 30 products: XTrace ≤ Hutch++ ≤ Hutchinson."""
    A = decaying(100)
    exact = torch.trace(A)
    err = {name: torch.stack([(f(A, s).estimate - exact).abs() for s in range(20)]).mean()
           for name, f in [("hutchinson", lambda A, s: hutchinson_trace(A, 30, seed=s)),
                           ("hutchpp", lambda A, s: hutchpp_trace(A, 30, seed=s)),
                           ("xtrace", lambda A, s: xtrace(A, 30, seed=s))]}
    assert err["xtrace"] <= err["hutchpp"] <= err["hutchinson"], err


def test_trace_exact_cases():
    low_rank = sym([5.0, -2.0, 1.0] + [0.0] * 27)
    r = hutchpp_trace(low_rank, 12)  # sketch of 4 columns captures rank 3
    assert_close(r.estimate, torch.trace(low_rank), rtol=1e-10)
    A = indefinite(10)
    r = xtrace(A, 40)  # m = n probes: the leave-one-out complements are 1-dimensional
    assert r.num_matvecs == 20
    assert_close(r.estimate, torch.trace(A), rtol=1e-10)


def test_exchangeable_estimators_on_low_rank_and_zero_operators():
    """Rank 3 < m − 1: every leave-one-out range holds range(A), so XTrace and XDiag are exact;
    the zero operator (singular sketch) gives 0, not NaN."""
    A = sym([5.0, -2.0, 1.0] + [0.0] * 27)
    assert_close(xtrace(A, 12).estimate, torch.trace(A), rtol=1e-10)
    assert_close(xdiag(A, 12).estimate, torch.diag(A), rtol=1e-10)
    Z = torch.zeros(10, 10, dtype=F64)
    assert xtrace(Z, 6).estimate.item() == 0.0 and hutchpp_trace(Z, 6).estimate.item() == 0.0
    assert torch.equal(xdiag(Z, 6).estimate, torch.zeros(10, dtype=F64))


def naive_leave_one_out(A, Omega, diagonal):
    """XTrace / XDiag from their definition: an explicit QR of A Ω without column i, per i."""
    n, m = Omega.shape
    Y, out = A @ Omega, []
    for i in range(m):
        Qi = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1:]], dim=1)).Q
        P = Qi @ Qi.T
        if diagonal:
            out.append(torch.diag(P @ A) + Omega[:, i] * ((A @ Omega[:, i]) - P @ (A @ Omega[:, i])))
        else:
            x = Omega[:, i] - P @ Omega[:, i]
            out.append(torch.trace(P @ A) + (n - m + 1) * (x @ A @ x) / (x @ x))
    return torch.stack(out)


def test_xtrace_xdiag_match_their_definition():
    A = indefinite(25)
    g = torch.Generator().manual_seed(3)
    Omega = torch.randn(25, 7, generator=g, dtype=F64)
    Omega = Omega * (5.0 / torch.linalg.vector_norm(Omega, dim=0))
    assert_close(_xtrace_estimates(DenseOperator(A), Omega), naive_leave_one_out(A, Omega, False), rtol=1e-10)
    signs = torch.randint(0, 2, (25, 7), generator=g).to(F64) * 2 - 1
    assert_close(_xdiag_estimates(DenseOperator(A), signs), naive_leave_one_out(A, signs, True), rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_estimators_follow_dtype_device_and_seed(dtype, device):
    A = decaying(30, device=device).to(dtype)
    for f in (lambda **kw: hutchinson_trace(A, 6, **kw), lambda **kw: hutchpp_trace(A, 6, **kw),
              lambda **kw: xtrace(A, 6, **kw), lambda **kw: hutchinson_diagonal(A, 6, **kw),
              lambda **kw: xdiag(A, 6, **kw)):
        a, b, c = f(seed=4), f(seed=4), f(seed=5)
        assert a.estimate.dtype == dtype and a.estimate.device.type == device
        assert torch.equal(a.estimate, b.estimate) and not torch.equal(a.estimate, c.estimate)
        d = f(generator=torch.Generator().manual_seed(4))
        assert torch.equal(a.estimate, d.estimate)
        assert a.estimate.isfinite().all()


@pytest.mark.parametrize("call, match", [
    (lambda A: hutchinson_trace(A, 0), "num_samples"),
    (lambda A: hutchinson_trace(A, -3), "num_samples"),
    (lambda A: hutchinson_trace(A, 2.5), "num_samples"),
    (lambda A: hutchinson_trace(A, 4, distribution="uniform"), "distribution"),
    (lambda A: hutchpp_trace(A, 2), "num_matvecs must be an integer >= 3"),
    (lambda A: xtrace(A, 1), "num_matvecs must be an integer >= 2"),
    (lambda A: hutchinson_diagonal(A, 0), "num_samples"),
    (lambda A: xdiag(A, 0), "num_matvecs"),
    (lambda A: spectral_density(A, 0), "num_probes"),
    (lambda A: spectral_density(A, 2, 0), "num_steps"),
    (lambda A: spectral_density(A, 2, 3, sigma=-1.0), "sigma"),
])
def test_estimator_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(decaying(10))


# --- diagonal ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hutchinson", "xdiag"])
def test_diagonal_estimators_unbiased(name):
    A = indefinite(15)
    f = (lambda s: hutchinson_diagonal(A, 8, seed=s)) if name == "hutchinson" else (lambda s: xdiag(A, 8, seed=s))
    samples = torch.stack([f(s).estimate for s in range(300)])
    assert_unbiased(samples, torch.diag(A))


def test_diagonal_accuracy_on_decaying_spectrum():
    """Mean error over seeds for 30 products: XDiag < Hutchinson; both improve with more products."""
    A = decaying(80)
    exact = torch.diag(A)

    def err(f, m):
        return torch.stack([torch.linalg.vector_norm(f(A, m, seed=s).estimate - exact) for s in range(10)]).mean()

    assert err(xdiag, 30) < err(hutchinson_diagonal, 30)
    assert err(xdiag, 60) < err(xdiag, 20)
    assert err(hutchinson_diagonal, 120) < err(hutchinson_diagonal, 20)


# --- spectral density ----------------------------------------------------------------------------
def test_slq_quadrature_exact_for_diagonal_matrix():
    """For diagonal A and Rademacher v, vᵀA^p v / n = tr(A^p)/n exactly; Gauss quadrature with s
    steps is exact for p < 2s, so every probe's moments equal the true ones."""
    d = torch.linspace(-1.0, 3.0, 30, dtype=F64)
    res = spectral_density(torch.diag(d), num_probes=3, num_steps=4)
    assert res.num_matvecs == 12 and res.nodes.shape == (3, 4)
    for p in range(8):
        assert_close((res.weights * res.nodes ** p).sum(dim=1), (d ** p).mean().expand(3), rtol=1e-10)


def test_slq_density_integrates_to_one_and_matches_moments():
    A = indefinite(40)
    lam = torch.linalg.eigvalsh(A)
    res = spectral_density(A, num_probes=200, num_steps=8, num_points=4000)
    assert_close(torch.trapezoid(res.density, res.grid).reshape(1), [1.0], rtol=1e-6)
    for p in range(1, 5):  # per-probe quadrature moments are unbiased for tr(A^p)/n
        assert_unbiased((res.weights * res.nodes ** p).sum(dim=1), (lam ** p).mean())
    # the broadened density's moments: ∫tφ = Σ τθ / P, ∫t²φ = Σ τθ² / P + σ²
    m1 = (res.weights * res.nodes).sum() / 200
    m2 = (res.weights * res.nodes ** 2).sum() / 200 + res.sigma ** 2
    assert_close(torch.trapezoid(res.grid * res.density, res.grid).reshape(1), m1.reshape(1), rtol=1e-6)
    assert_close(torch.trapezoid(res.grid ** 2 * res.density, res.grid).reshape(1), m2.reshape(1), rtol=1e-6)


def test_plot_spectral_density(tmp_path):
    res = spectral_density(indefinite(20), num_probes=2, num_steps=5)
    path = plot_spectral_density(res, str(tmp_path / "density.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --- data-parallel: identical probes on every rank -----------------------------------------------
def distributed_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    X, y = torch.randn(12, 3, dtype=F64), torch.randint(0, 3, (12,))
    return model, torch.nn.CrossEntropyLoss(), X, y


def estimates_on(data):
    """Every estimator on the Hessian of the mean loss over ``data`` (collective under gloo)."""
    from torch_hod.curvature.operators import HessianOperator

    model, loss_fn, _, _ = distributed_problem()
    H = HessianOperator(model, loss_fn, data)
    b = torch.ones(H.shape[0], dtype=F64)
    return {"xtrace": xtrace(H, 10).estimate, "hutchpp": hutchpp_trace(H, 9).estimate,
            "xdiag": xdiag(H, 10).estimate, "lanczos": lanczos_eigsh(H, 2).eigenvalues,
            "power": power_iteration(H, max_iterations=5, tol=0.0).eigenvalues,
            "slq": spectral_density(H, 2, 4).nodes,
            "cg": conjugate_gradient(H, b, damping=1.0, rtol=1e-10).solution}


def distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _, _, X, y = distributed_problem()
        shard = [(X[:7], y[:7])] if rank == 0 else [(X[7:9], y[7:9]), (X[9:], y[9:])]
        torch.save(estimates_on(shard), Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_match_single_process(tmp_path):
    """Two ranks on two shards (seeded probes, all-reduced products) return the same numbers as each
    other and as one process on all the data."""
    from conftest import run_ranks  # not at module level: the workers run this file as a script

    run_ranks(__file__, lambda r: ["--worker", str(r), str(tmp_path / "init"), str(tmp_path)], timeout=180)
    _, _, X, y = distributed_problem()
    expected = estimates_on([(X, y)])
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    shard_only = estimates_on([(X[:7], y[:7])])["lanczos"]
    assert (shard_only - expected["lanczos"]).abs().max() > 1e-3 * expected["lanczos"].abs().max()  # can fail
    for name, ref in expected.items():
        assert torch.equal(got[0][name], got[1][name]), f"{name}: ranks disagree"
        assert_close(got[0][name], ref, rtol=1e-9)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    distributed_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
