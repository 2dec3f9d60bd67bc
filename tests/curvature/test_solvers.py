"""Damped conjugate gradient and the NewtonCG optimiser, checked against dense solves in float64."""
import pytest
import torch
import torch.nn.functional as F

from torch_hod.curvature.linear_operator import DenseOperator
from torch_hod.curvature.solvers import NewtonCG, conjugate_gradient

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64


def sym(eigenvalues, seed=0, device="cpu"):
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=F64)).Q
    return ((U * lam) @ U.T).to(device)


def rhs(n, seed=1, device="cpu", dtype=F64):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


# --- conjugate gradient --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_cg_solves_spd_system(damping, device):
    n = 40
    A = sym(torch.logspace(-1, 2, n, dtype=F64), device=device)
    b = rhs(n, device=device)
    M = A + damping * torch.eye(n, dtype=F64, device=device)
    exact = torch.linalg.solve(M, b)
    op = DenseOperator(A)
    res = conjugate_gradient(op, b, damping=damping, rtol=1e-13, max_iterations=10 * n)
    assert res.converged and not res.negative_curvature and res.direction is None
    assert res.num_matvecs == res.iterations == op.num_matvecs
    assert ((res.solution - exact).abs().max() <= 1e-10 * exact.abs().max()).item()
    assert torch.allclose(res.residual, b - M @ res.solution, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rtol, atol", [(1e-3, 0.0), (1e-6, 0.0), (0.0, 1e-4)])
def test_cg_meets_requested_tolerance_only(rtol, atol):
    """Stops as soon as ‖b − (A+λI)x‖ ≤ max(rtol‖b‖, atol), checked with a fresh dense residual."""
    n = 60
    A = sym(torch.logspace(0, 3, n, dtype=F64))
    b = rhs(n)
    res = conjugate_gradient(A, b, rtol=rtol, atol=atol)
    tol = max(rtol * b.norm().item(), atol)
    true_res = (b - A @ res.solution).norm().item()
    assert res.converged and true_res <= tol * (1 + 1e-6)
    assert abs(res.residual_norm.item() - true_res) <= 1e-8 * b.norm().item()
    earlier = conjugate_gradient(A, b, rtol=rtol, atol=atol, max_iterations=res.iterations - 1)
    assert earlier.residual_norm.item() > tol and not earlier.converged


def test_cg_initial_guess_and_callable():
    n = 20
    A = sym(torch.linspace(1, 5, n, dtype=F64))
    b, x0 = rhs(n), rhs(n, seed=7)
    res = conjugate_gradient(lambda v: A @ v, b, x0=x0, rtol=1e-12, size=n)
    assert res.num_matvecs == res.iterations + 1  # one product for r₀ = b − A x₀
    exact = torch.linalg.solve(A, b)
    assert ((res.solution - exact).abs().max() <= 1e-10 * exact.abs().max()).item()
    exact_start = conjugate_gradient(A, b, x0=exact.clone(), rtol=1e-8)
    assert exact_start.iterations == 0 and exact_start.converged


@pytest.mark.parametrize("device", DEVICES)
def test_cg_detects_negative_curvature(device):
    n = 30
    lam = torch.linspace(-3.0, 10.0, n, dtype=F64)
    A = sym(lam, device=device)
    b = rhs(n, device=device)
    res = conjugate_gradient(A, b, rtol=1e-12)
    assert res.negative_curvature and not res.converged
    p = res.direction
    assert (p @ A @ p).item() <= 0
    assert torch.allclose(res.curvature, p @ A @ p, rtol=1e-10, atol=0)
    if res.iterations > 0:  # iterates from 0 are descent directions of ½xᵀAx − bᵀx
        assert (0.5 * res.solution @ A @ res.solution - b @ res.solution).item() < 0
    shifted = conjugate_gradient(A, b, damping=3.5, rtol=1e-12)  # A + 3.5 I is positive definite
    assert shifted.converged and not shifted.negative_curvature
    exact = torch.linalg.solve(A + 3.5 * torch.eye(n, dtype=F64, device=device), b)
    assert ((shifted.solution - exact).abs().max() <= 1e-9 * exact.abs().max()).item()


def test_cg_float32():
    A = sym(torch.linspace(1, 10, 25, dtype=F64)).float()
    b = rhs(25, dtype=torch.float32)
    res = conjugate_gradient(A, b, rtol=1e-5)
    assert res.solution.dtype == torch.float32 and res.converged
    assert (b - A @ res.solution).norm() <= 1e-5 * b.norm() * 1.01


@pytest.mark.parametrize("call, err, match", [
    (lambda A: conjugate_gradient(A, torch.ones(9, dtype=F64)), ValueError, r"shape \(10,\)"),
    (lambda A: conjugate_gradient(A, torch.ones(10, 1, dtype=F64)), ValueError, r"shape \(10,\)"),
    (lambda A: conjugate_gradient(A, torch.ones(10)), TypeError, "dtype torch.float32"),
    (lambda A: conjugate_gradient(A, [1.0] * 10), TypeError, "must be a Tensor"),
    (lambda A: conjugate_gradient(A, torch.ones(10, dtype=F64), rtol=-1.0), ValueError, "rtol"),
    (lambda A: conjugate_gradient(A, torch.ones(10, dtype=F64), max_iterations=-1), ValueError, "max_iterations"),
    (lambda A: conjugate_gradient(A, torch.ones(10, dtype=F64), x0=torch.ones(3, dtype=F64)), ValueError, "x0"),
    (lambda A: conjugate_gradient(torch.ones(10, 11, dtype=F64), torch.ones(10, dtype=F64)), ValueError, "square"),
    (lambda A: conjugate_gradient(lambda v: v, torch.ones(10, dtype=F64)), ValueError, "size"),
])
def test_cg_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call(sym(torch.linspace(1, 2, 10, dtype=F64)))


# --- NewtonCG ------------------------------------------------------------------------------------
def test_newton_cg_solves_quadratic_in_one_step():
    """f(x) = ½xᵀAx − bᵀx: an undamped Newton step with exact CG lands on x* = A⁻¹b."""
    n = 15
    A = sym(torch.logspace(-1, 1, n, dtype=F64))
    b = rhs(n)
    x = torch.zeros(n, dtype=F64, requires_grad=True)
    opt = NewtonCG([x], damping=0.0, cg_rtol=1e-14, cg_max_iterations=10 * n, line_search=False)
    loss0 = opt.step(lambda: 0.5 * x @ A @ x - b @ x)
    assert loss0.item() == 0.0 and not loss0.requires_grad
    exact = torch.linalg.solve(A, b)
    assert ((x.detach() - exact).abs().max() <= 1e-10 * exact.abs().max()).item()
    assert opt.last_step[0]["num_hvps"] == opt.last_step[0]["cg_iterations"] > 0


def logistic_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, 6, generator=g, dtype=F64) * torch.logspace(-1, 1, 6, dtype=F64)  # ill-conditioned
    y = (X @ torch.randn(6, generator=g, dtype=F64) > 0).to(F64)
    return X, y


def train(make_opt, steps, X, y, backward):
    w = torch.zeros(6, dtype=F64, requires_grad=True)
    b = torch.zeros(1, dtype=F64, requires_grad=True)
    opt = make_opt([w, b])
    losses = []

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(X @ w + b, y)
        if backward:
            loss.backward()
        return loss

    for _ in range(steps):
        losses.append(opt.step(closure).item() if not backward else opt.step(closure).detach().item())
    with torch.no_grad():
        losses.append(float(F.binary_cross_entropy_with_logits(X @ w + b, y)))
    return losses, opt


def test_newton_cg_beats_sgd_on_logistic_regression():
    X, y = logistic_problem()
    newton, _ = train(lambda p: NewtonCG(p, damping=1e-3), 5, X, y, backward=False)
    best_sgd = min(train(lambda p: torch.optim.SGD(p, lr=lr), 5, X, y, backward=True)[0][-1]
                   for lr in (0.1, 1.0, 3.0, 10.0))
    assert all(b < a for a, b in zip(newton, newton[1:])), newton  # monotone with line search
    assert newton[-1] < best_sgd, (newton, best_sgd)


def test_newton_cg_levenberg_marquardt_adapts_damping():
    X, y = logistic_problem(1)
    losses, opt = train(lambda p: NewtonCG(p, damping=10.0, adapt_damping=True, line_search=False), 6, X, y, False)
    info = opt.last_step[0]
    assert info["rho"] is not None
    assert opt.param_groups[0]["damping"] < 10.0  # good model agreement (ρ > 3/4) shrinks λ
    assert losses[-1] < losses[0]


def test_newton_cg_negative_curvature_still_descends():
    """f(x, y) = x² − y² + y⁴ at (1, 0.1): the Hessian is indefinite, CG stops on negative curvature."""
    z = torch.tensor([1.0, 0.1], dtype=F64, requires_grad=True)
    opt = NewtonCG([z], damping=0.0, adapt_damping=True)
    f = lambda: z[0] ** 2 - z[1] ** 2 + z[1] ** 4  # noqa: E731
    before = f().item()
    opt.step(f)
    assert opt.last_step[0]["negative_curvature"]
    assert f().item() < before
    assert opt.param_groups[0]["damping"] > 0  # negative curvature raises λ
    for _ in range(30):
        opt.step(f)
    assert abs(f().item() + 0.25) < 1e-10  # minimum −1/4 at (0, ±1/√2)


def test_newton_cg_param_groups_and_float32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    X, y = torch.randn(64, 3), torch.randn(64, 1)
    opt = NewtonCG([{"params": model[0].parameters()}, {"params": model[2].parameters(), "damping": 1e-2}],
                   damping=1e-1, cg_max_iterations=10)
    closure = lambda: F.mse_loss(model(X), y)  # noqa: E731
    first = closure().item()
    for _ in range(5):
        loss = opt.step(closure)
    assert loss.dtype == torch.float32 and len(opt.last_step) == 2
    assert closure().item() < first


def test_newton_cg_bad_input():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="lr must be > 0"):
        NewtonCG([w], lr=0.0)
    with pytest.raises(ValueError, match="damping"):
        NewtonCG([w], damping=-1.0)
    with pytest.raises(ValueError, match="cg_max_iterations"):
        NewtonCG([w], cg_max_iterations=0)
    with pytest.raises(ValueError, match="0 < armijo < 1"):  # before: accepted (armijo=1.5 rejects every step)
        NewtonCG([w], armijo=1.5)
    with pytest.raises(ValueError, match="cg_rtol >= 0"):
        NewtonCG([w], cg_rtol=-1e-3)
    with pytest.raises(ValueError, match="max_backtracks"):
        NewtonCG([w], max_backtracks=-1)
    opt = NewtonCG([w])
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: w * 2)

    x = torch.randn(5, 3)

    def closure_with_backward():
        loss = torch.tanh(x @ w).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"without calling loss.backward\(\)"):
        opt.step(closure_with_backward)
    v = torch.zeros(2, dtype=F64, requires_grad=True)
    with pytest.raises(TypeError, match="one dtype"):
        NewtonCG([w, v]).step(lambda: (w.sum() + v.sum()) ** 2)
