"""Taylor-mode differential operators against reverse-mode references, in float64.

References are nested reverse mode (``torch.func.jacrev`` of ``jacrev`` ..., i.e. full derivative
tensors) or nested ``torch.autograd.grad``, never nested forward mode (wrong for F.layer_norm).
Errors are normwise: ``max|got − ref| ≤ rtol · max|ref|``, with ``max|ref| > 0`` asserted.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap

from torch_hod.taylor.operators import (
    bilaplacian,
    derivatives,
    interpolation_weights,
    laplacian,
    mixed_partial,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RTOL = 1e-10


def assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = ref.abs().max().item()
    assert scale > 0, "reference is zero: the check could not fail"
    err = (got - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs err {err:.3e}, rel {err / scale:.3e} > {rtol:.0e}"


def make_model(kind: str, D: int, out: int = 2, *, dtype=torch.float64, device="cpu", seed: int = 0):
    """A small MLP ``(*B, D) -> (*B, out)`` and its parameters (a dict for functional_call)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    params = {
        "w1": torch.randn(16, D, generator=g, dtype=f64) / math.sqrt(D),
        "b1": torch.randn(16, generator=g, dtype=f64) * 0.1,
        "w2": torch.randn(16, 16, generator=g, dtype=f64) / 4,
        "b2": torch.randn(16, generator=g, dtype=f64) * 0.1,
        "w3": torch.randn(out, 16, generator=g, dtype=f64) / 4,
        "g": 1 + 0.1 * torch.randn(16, generator=g, dtype=f64),
        "beta": 0.1 * torch.randn(16, generator=g, dtype=f64),
    }
    params = {k: v.to(device=device, dtype=dtype) for k, v in params.items()}

    def model(x: torch.Tensor, p=params, layer_norm=F.layer_norm) -> torch.Tensor:
        h = F.linear(x, p["w1"], p["b1"])
        if kind == "tanh":
            h = torch.tanh(F.linear(torch.tanh(h), p["w2"], p["b2"]))
        else:  # GELU + LayerNorm
            h = F.gelu(layer_norm(F.linear(F.gelu(h), p["w2"], p["b2"]), (16,), p["g"], p["beta"]))
        return F.linear(h, p["w3"])

    # The reference twin: reverse^k of F.layer_norm is wrong from k = 3 on (torch 2.13, checked
    # against finite differences), so references use LayerNorm written from elementary ops.
    model.reference = lambda x, p=params: model(x, p, layer_norm=_layer_norm_composite)
    return model, params


def _layer_norm_composite(x, shape, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def per_sample(f: Callable, batch_dims: int) -> Callable:
    """Apply a reference transform sample by sample (vmap over the batch dims)."""
    for _ in range(batch_dims):
        f = vmap(f)
    return f


def derivative_tensor(model: Callable, order: int, event: tuple) -> Callable:
    """x (event shape) -> the ``order``-th derivative tensor, shape (*out, D, ..., D), by jacrev^order."""
    def flat(z):
        return model(z.reshape(event))

    g = flat
    for _ in range(order):
        g = jacrev(g)
    return lambda x: g(x.reshape(-1))


MODELS = ["tanh", "gelu_ln"]


# ------------------------------------------------------------------------------- derivatives
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MODELS)
def test_derivatives_match_derivative_tensors(kind, device):
    model, _ = make_model(kind, 3, device=device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64).to(device)
    v = torch.randn(4, 3, generator=g, dtype=torch.float64).to(device)
    got = derivatives(model, x, v, 5)
    assert len(got) == 6
    assert_close(got[0], model(x))
    # reference: g_0 = f_o, g_k = <∇g_{k-1}, v> by nested reverse mode, per output o
    xr = x.detach().requires_grad_(True)
    refs = []
    for o in range(2):
        g, ks = model.reference(xr)[:, o], []
        for _ in range(5):
            g = (torch.autograd.grad(g.sum(), xr, create_graph=True)[0] * v).sum(-1)
            ks.append(g)
        refs.append(ks)
    for k in range(1, 6):
        assert_close(got[k], torch.stack([refs[o][k - 1] for o in range(2)], -1))


def test_derivatives_with_directions_and_order_zero():
    model, _ = make_model("tanh", 3)
    x = torch.randn(3, dtype=torch.float64)
    V = torch.randn(4, 3, dtype=torch.float64)
    got = derivatives(model, x, V, 3)
    for r in range(4):
        single = derivatives(model, x, V[r], 3)
        for k in range(1, 4):
            assert_close(got[k][r], single[k])
    assert_close(derivatives(model, x, V[0], 0)[0], model(x))


# --------------------------------------------------------------------------------- Laplacian
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["collapsed", "standard"])
@pytest.mark.parametrize("batch_dims", [0, 1])
@pytest.mark.parametrize("kind", MODELS)
def test_laplacian_exact(kind, batch_dims, method, device):
    D = 5
    model, _ = make_model(kind, D, device=device)
    x = torch.randn(*(3,) * batch_dims, D, dtype=torch.float64, device=device)
    ref = per_sample(lambda z: derivative_tensor(model.reference, 2, (D,))(z).diagonal(dim1=-2, dim2=-1).sum(-1), batch_dims)(x)
    assert_close(laplacian(model, x, batch_dims=batch_dims, method=method), ref)


def test_laplacian_multi_dim_event_and_two_batch_dims():
    model, _ = make_model("tanh", 6)
    f = lambda z: model(z.flatten(-2))  # event shape (2, 3)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    ref = per_sample(lambda z: derivative_tensor(f, 2, (2, 3))(z).diagonal(dim1=-2, dim2=-1).sum(-1), 2)(x)
    assert_close(laplacian(f, x, batch_dims=2), ref)


@pytest.mark.parametrize("per_sample_factor", [False, True])
def test_weighted_laplacian_is_trace_C_H(per_sample_factor):
    D, R, N = 4, 3, 3
    model, _ = make_model("gelu_ln", D)
    x = torch.randn(N, D, dtype=torch.float64)
    Fw = torch.randn(*((N,) if per_sample_factor else ()), D, R, dtype=torch.float64)
    H = vmap(derivative_tensor(model.reference, 2, (D,)))(x)  # (N, out, D, D)
    C = Fw @ Fw.transpose(-1, -2)
    Cb = C.unsqueeze(-3) if per_sample_factor else C
    ref = (H * Cb).sum((-1, -2))
    assert_close(laplacian(model, x, batch_dims=1, weighting=Fw), ref)
    assert_close(laplacian(model, x, batch_dims=1, weighting=Fw, method="standard"), ref)


def test_float32_operators():
    model64, p = make_model("tanh", 4)
    model32, _ = make_model("tanh", 4, dtype=torch.float32)
    x = torch.randn(3, 4, dtype=torch.float64)
    got = laplacian(model32, x.float(), batch_dims=1)
    assert got.dtype == torch.float32
    assert_close(got.double(), laplacian(model64, x, batch_dims=1), rtol=1e-4)
    got = bilaplacian(model32, x.float(), batch_dims=1)
    assert got.dtype == torch.float32
    assert_close(got.double(), bilaplacian(model64, x, batch_dims=1), rtol=1e-3)
    got = mixed_partial(model32, x.float(), (1, 0, 2, 0), batch_dims=1)
    assert_close(got.double(), mixed_partial(model64, x, (1, 0, 2, 0), batch_dims=1), rtol=1e-3)


# -------------------------------------------------------------------------------- biharmonic
@pytest.mark.parametrize("method", ["collapsed", "standard"])
@pytest.mark.parametrize("D", [3, 4, 5])  # weight of D⁴_{e_i} is (4 − D)/3: positive, zero, negative
@pytest.mark.parametrize("kind", MODELS)
def test_bilaplacian_exact(kind, D, method):
    model, _ = make_model(kind, D, out=1)
    x = torch.randn(2, D, dtype=torch.float64)
    T = vmap(derivative_tensor(model.reference, 4, (D,)))(x)  # hessian of hessian, (2, 1, D, D, D, D)
    ref = torch.einsum("noiijj->no", T)
    assert_close(bilaplacian(model, x, batch_dims=1, method=method), ref)
    if kind == "tanh" and method == "collapsed":
        assert_close(bilaplacian(model, x[0]), ref[0])  # batch_dims=0


# ----------------------------------------------------------------------------- mixed partials
def _monomial_check(alpha):
    d = sum(alpha)
    W = interpolation_weights(alpha)

    def compositions(d, n):
        if n == 1:
            yield (d,)
            return
        for a in range(d + 1):
            for rest in compositions(d - a, n - 1):
                yield (a,) + rest

    for beta in compositions(d, len(alpha)):  # D^d_j x^β = d! j^β,  ∂^α x^β = α! δ_αβ
        lhs = sum(w * math.factorial(d) * math.prod(Fraction(jm) ** bm for jm, bm in zip(j, beta)) for j, w in W.items())
        rhs = math.prod(math.factorial(a) for a in alpha) if beta == tuple(alpha) else 0
        assert lhs == rhs, (alpha, beta, lhs, rhs)


@pytest.mark.parametrize("alpha", [(1,), (3,), (1, 1), (2, 2), (1, 2), (3, 1, 2), (1, 1, 1, 1), (0, 2, 1)])
def test_interpolation_weights_exact_on_monomials(alpha):
    _monomial_check(alpha)


def _nested_grad(f, x, alpha):
    """∂^α f per sample by nested torch.autograd.grad (samples independent: grad of the batch sum)."""
    x = x.detach().requires_grad_(True)
    y = f(x)
    outs = []
    for o in range(y.shape[-1]):
        z = y[..., o]
        for i, a in enumerate(alpha):
            for _ in range(a):
                z = torch.autograd.grad(z.sum(), x, create_graph=True)[0][..., i]
        outs.append(z)
    return torch.stack(outs, -1)


@pytest.mark.parametrize("method", ["collapsed", "standard"])
@pytest.mark.parametrize("alpha", [(0, 1, 0), (2, 0, 1), (1, 1, 1), (2, 1, 1), (0, 3, 2)])
def test_mixed_partial_vs_nested_autograd(alpha, method):
    model, _ = make_model("tanh", 3)
    x = torch.randn(3, 3, dtype=torch.float64)
    ref = _nested_grad(model.reference, x, alpha)
    assert_close(mixed_partial(model, x, alpha, batch_dims=1, method=method), ref, rtol=1e-9)


def test_mixed_partial_gelu_ln_unbatched_and_order_zero():
    model, _ = make_model("gelu_ln", 3)
    x = torch.randn(3, dtype=torch.float64)
    assert_close(mixed_partial(model, x, (1, 0, 2)), _nested_grad(model.reference, x, (1, 0, 2)), rtol=1e-9)
    assert_close(mixed_partial(model, x, (0, 0, 0)), model(x))


# ---------------------------------------------------------------------------- randomised
def _unbiased(estimates: torch.Tensor, exact: torch.Tensor) -> None:
    """|mean − exact| < 5 std/√S per entry, from S independent estimates along dim 0."""
    S = estimates.shape[0]
    mean, std = estimates.mean(0), estimates.std(0)
    assert exact.abs().min() > 0 and std.min() > 0, "degenerate check"
    z = ((mean - exact).abs() / (std / math.sqrt(S))).max().item()
    assert z < 5, f"estimator off by {z:.2f} standard errors"


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("weighted", [False, True])
def test_randomised_laplacian_unbiased(distribution, weighted):
    D, S = 4, 400
    model, _ = make_model("tanh", D)
    x = torch.randn(D, dtype=torch.float64)
    Fw = torch.randn(D, 3, dtype=torch.float64) if weighted else None
    exact = laplacian(model, x, weighting=Fw)
    reps = x.repeat(S, 1)  # S copies on a batch dim: independent directions per copy
    est = laplacian(
        model, reps, batch_dims=1, weighting=Fw, randomization=True, num_samples=1,
        distribution=distribution, generator=0,
    )
    _unbiased(est, exact)
    # reproducible from a seed or a generator, and num_samples averages
    a = laplacian(model, x, randomization=True, num_samples=3, generator=torch.Generator().manual_seed(7))
    b = laplacian(model, x, randomization=True, num_samples=3, generator=7)
    assert torch.equal(a, b)


def test_randomised_bilaplacian_unbiased():
    D, S = 3, 400
    model, _ = make_model("tanh", D, out=1)
    x = torch.randn(D, dtype=torch.float64)
    exact = bilaplacian(model, x)
    est = bilaplacian(model, x.repeat(S, 1), batch_dims=1, randomization=True, num_samples=1, generator=1)
    _unbiased(est, exact)


# --------------------------------------------------------------------- parameter gradients
@pytest.mark.parametrize("kind", MODELS)
def test_parameter_gradients_of_laplacian_loss(kind):
    D = 3
    model, params = make_model(kind, D)
    x = torch.randn(4, D, dtype=torch.float64)

    def ref_loss(p):  # triple reverse mode: grad over jacrev(jacrev)
        lap = vmap(lambda z: jacrev(jacrev(lambda u: model.reference(u, p)))(z).diagonal(dim1=-2, dim2=-1).sum(-1))(x)
        return (lap**2).mean()

    ref = torch.func.grad(ref_loss)(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = (laplacian(lambda z: model(z, leaves), x, batch_dims=1) ** 2).mean()
    loss.backward()
    for k in params:
        if k == "g" or k == "beta":  # LayerNorm parameters are unused by the tanh model
            if kind == "tanh":
                assert leaves[k].grad is None
                continue
        assert_close(leaves[k].grad, ref[k], rtol=1e-9)


def test_gradient_with_respect_to_x():
    model, _ = make_model("tanh", 3)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    laplacian(model, x, batch_dims=1).sum().backward()
    ref = vmap(jacrev(lambda z: derivative_tensor(model.reference, 2, (3,))(z).diagonal(dim1=-2, dim2=-1).sum()))(x.detach())
    assert_close(x.grad, ref, rtol=1e-9)


# ------------------------------------------------------------------------------ bad input
def test_errors():
    model, _ = make_model("tanh", 3)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="real floating-point"):
        laplacian(model, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a Tensor"):
        bilaplacian(model, [1.0, 2.0, 3.0])
    for bad in (-1, 3, 1.0):
        with pytest.raises(ValueError, match="batch_dims"):
            laplacian(model, x, batch_dims=bad)
    with pytest.raises(ValueError, match="order must be a non-negative int"):
        derivatives(model, x, x, -1)
    with pytest.raises(ValueError, match=r"v must have x's shape"):
        derivatives(model, x, x[0], 2)
    with pytest.raises(ValueError, match="multi_index must be a tuple of 3"):
        mixed_partial(model, x, (1, 1), batch_dims=1)
    with pytest.raises(ValueError, match="non-negative ints"):
        mixed_partial(model, x, (1, -1, 0), batch_dims=1)
    with pytest.raises(ValueError, match="method="):
        laplacian(model, x, method="nested")
    with pytest.raises(ValueError, match="distribution="):
        laplacian(model, x, randomization=True, distribution="uniform")
    with pytest.raises(ValueError, match="only 'gaussian'"):
        bilaplacian(model, x, randomization=True, distribution="rademacher")
    with pytest.raises(ValueError, match="num_samples"):
        laplacian(model, x, randomization=True, num_samples=0)
    with pytest.raises(ValueError, match="weighting must be a factor"):
        laplacian(model, x, batch_dims=1, weighting=torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="must keep the batch dims"):
        laplacian(lambda z: model(z).sum(0), torch.randn(4, 3, dtype=torch.float64), batch_dims=1)
    with pytest.raises(TypeError, match="func must return one Tensor"):
        laplacian(lambda z: (model(z), model(z)), x, batch_dims=1)
    with pytest.raises(TypeError, match="func must return one Tensor"):
        derivatives(lambda z: [model(z)], x, x, 0)
    with pytest.raises(TypeError, match="generator"):
        laplacian(model, x, randomization=True, generator="seed")


# --------------------------------------------------------------------------- pass structure
def test_passes_are_collapsed_and_spend_no_direction_on_the_batch(monkeypatch):
    import torch_hod.taylor.operators as operators

    calls = []

    def spy(func, primals, series, *, collapse=False):
        calls.append((collapse, [tuple(c.shape) for c in series[0]]))
        return real(func, primals, series, collapse=collapse)

    real = operators.jet
    monkeypatch.setattr(operators, "jet", spy)
    model, _ = make_model("tanh", 5, out=1)
    x = torch.randn(7, 5, dtype=torch.float64)
    laplacian(model, x, batch_dims=1)
    assert calls == [(True, [(5, 7, 5), (7, 5)])]  # one 2-jet, R = D = 5 directions, top collapsed
    calls.clear()
    bilaplacian(model, x, batch_dims=1)  # D = 5: weights of both signs -> two collapsed 4-jets
    assert [c[0] for c in calls] == [True, True]
    assert sorted(c[1][0][0] for c in calls) == [5, 20] and all(c[1][-1] == (7, 5) for c in calls)
    calls.clear()
    laplacian(model, x, batch_dims=1, randomization=True, num_samples=3, generator=0)
    assert calls == [(True, [(3, 7, 5), (7, 5)])]


def test_benchmark_smoke():
    """benchmarks/bench_taylor.py runs and its jets agree with the baselines (tiny sizes)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_taylor.py"
    spec = importlib.util.spec_from_file_location("bench_taylor", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(quick=True, device="cpu", dtype=torch.float64, memory=False, tables=("laplacian", "biharmonic"), models=("tanh",))
    assert {r["method"] for r in rows} >= {"jet collapsed", "vmap(hessian)+trace", "vmap(hessian(hessian))"}
    assert all(r["rel_err"] < 1e-10 and r["time_ms"] > 0 for r in rows)
    with pytest.raises(ValueError, match="unknown tables"):
        bench.run(quick=True, tables=("laplace",))
