"""Jets through unmodified nn.Modules and Python control flow; parameter gradients; nesting;
float32 and devices."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jet_reference import assert_close, check_jet, curve_derivatives, random_series
from torch_hod.taylor import Jet, jet
from torch_hod.testing import available_devices

DEVICES = available_devices()


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return module.double()


class Block(nn.Module):
    """Pre-norm transformer block: causal attention (matmul/softmax) and a GELU MLP."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d), nn.Dropout(0.1))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        att = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


def test_mlp_order_6():
    mlp = _seeded(nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 2)))
    check_jet(mlp, (torch.randn(4, 3, dtype=torch.float64),), K=6)


def test_cnn_with_batchnorm_eval():
    cnn = _seeded(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                                nn.Flatten(), nn.Linear(16, 3), nn.Softplus()))
    with torch.no_grad():
        cnn[1].running_mean.normal_()
        cnn[1].running_var.uniform_(0.5, 2.0)
    cnn.eval()
    check_jet(cnn, (torch.randn(2, 2, 4, 4, dtype=torch.float64),), K=5)


def _layer_norm_composite(x, shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def test_transformer_block():
    """Reference: the same block with a mean/var layer norm (autograd's derivatives of the built-in
    F.layer_norm with respect to the cotangent, which the reference uses, are wrong beyond order 1,
    like its nested jvp: pytorch#196700)."""
    block = _seeded(Block()).eval()

    def reference(x):
        with mock.patch.object(F, "layer_norm", _layer_norm_composite):
            return block(x)

    check_jet(block, (torch.randn(2, 3, 8, dtype=torch.float64),), K=4, reference=reference)


def test_data_dependent_control_flow():
    def f(x):
        h = torch.tanh(x)
        if h.sum() > 0:  # comparisons see the primal
            h = h * h
        else:
            h = torch.exp(h)
        for _ in range(int(x.abs().max().item() * 2) + 1):
            h = h + torch.sin(h)
        return h if bool((h > 0).any()) else -h

    for seed in range(3):
        torch.manual_seed(seed)
        check_jet(f, (torch.randn(4, dtype=torch.float64),), K=5)


def test_tuple_and_constant_outputs():
    x = torch.randn(3, dtype=torch.float64)
    v = [torch.randn(3, dtype=torch.float64) for _ in range(2)]
    y0, ys = jet(lambda t: (t * t, torch.ones(2, dtype=torch.float64), t.argmax()), (x,), [v])
    assert isinstance(y0, tuple) and len(ys) == 2 and all(isinstance(y, tuple) for y in ys)
    assert_close(ys[0][0], 2 * x * v[0], 1e-14)
    assert_close(ys[1][0], 2 * v[0] * v[0] + 2 * x * v[1], 1e-14)
    assert torch.equal(ys[1][1], torch.zeros(2, dtype=torch.float64))


def test_pinn_parameter_gradients_match_double_backward():
    """loss(θ) = mean((Δu_θ(x) − 1)²) with the Laplacian from a collapsed jet; .backward() into
    the parameters equals reverse-over-reverse through torch.func.hessian."""
    net = _seeded(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 1)))
    x = torch.randn(5, 2, dtype=torch.float64)
    E = torch.eye(2, dtype=torch.float64).unsqueeze(1).expand(2, 5, 2)
    _, (_, lap) = jet(net, (x,), [[E, torch.zeros_like(x)]], collapse=True)
    ((lap.squeeze(-1) - 1) ** 2).mean().backward()
    got = [torch.zeros_like(p) if p.grad is None else p.grad for p in net.parameters()]

    params = dict(net.named_parameters())

    def loss(p):
        u = lambda xi: torch.func.functional_call(net, p, (xi,)).squeeze()
        H = torch.func.vmap(torch.func.hessian(u))(x)
        return ((H.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) ** 2).mean()

    expected = torch.autograd.grad(loss(params), list(params.values()), allow_unused=True, materialize_grads=True)
    for name, g, e in zip(params, got, expected):
        if e.abs().max() > 0:
            assert_close(g, e, 1e-10, what=name)
    assert any(e.abs().max() > 0 for e in expected)


def test_parameter_gradients_of_fourth_order_coefficient():
    net = _seeded(nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Linear(6, 1)))
    x = torch.randn(4, 3, dtype=torch.float64)
    series = random_series((x,), 4, seed=3)
    _, ys = jet(net, (x,), series)
    ys[-1].sum().backward()
    got = [torch.zeros_like(p) if p.grad is None else p.grad for p in net.parameters()]
    expected = torch.autograd.grad(_curve_with_graph(net, x, series[0], 4)[-1].sum(), list(net.parameters()),
                                   allow_unused=True, materialize_grads=True)
    for g, e in zip(got, expected):
        if e.abs().max() > 0:
            assert_close(g, e, 1e-10)
        else:
            assert g.abs().max() == 0


def _curve_with_graph(f, x, cs, K):
    """Like curve_derivatives but keeps the graph (for parameter gradients)."""
    t = torch.zeros((), dtype=x.dtype, requires_grad=True)
    d = f(x + sum(c * t ** (k + 1) / math.factorial(k + 1) for k, c in enumerate(cs)))
    out = []
    for _ in range(K):
        u = torch.zeros_like(d, requires_grad=True)
        (g,) = torch.autograd.grad((u * d).sum(), t, create_graph=True)
        (d,) = torch.autograd.grad(g, u, create_graph=True)
        out.append(d)
    return out


def test_torch_func_grad_around_jet():
    """torch.func.grad of a function that runs a jet inside."""
    x = torch.randn(3, dtype=torch.float64)
    v = torch.randn(3, dtype=torch.float64)
    third = lambda x0: jet(lambda t: torch.sin(t) * t, (x0,), [[v, torch.zeros_like(v), torch.zeros_like(v)]])[1][2].sum()
    # d³/ds³ [sin(x+sv)(x+sv)] = v³ (−cos(x)·x − 3 sin(x)); its gradient in x:
    expected = v ** 3 * (torch.sin(x) * x - torch.cos(x) - 3 * torch.cos(x))
    assert_close(torch.func.grad(third)(x), expected, 1e-12)


def test_vmap_around_jet():
    W = torch.randn(2, 3, dtype=torch.float64)
    v = torch.randn(3, dtype=torch.float64)
    f = lambda t: F.linear(torch.tanh(t), W).softmax(-1) * t.sum()
    xs = torch.randn(4, 3, dtype=torch.float64)
    got = torch.vmap(lambda x: jet(f, (x,), [[v, v]])[1][1])(xs)
    expected = torch.stack([curve_derivatives(f, (x,), [[v, v]], 2)[1] for x in xs])
    assert_close(got, expected, 1e-12)


def test_nested_jets_no_perturbation_confusion():
    """d/dx [x · d/dy (x + y)] = 1, not 2."""
    one = torch.ones((), dtype=torch.float64)

    def g(x):
        _, (d,) = jet(lambda y: x + y, (one,), [[one]])
        return x * d

    _, (dx,) = jet(g, (one,), [[one]])
    assert dx.item() == 1.0

    def h(x):  # d²/dy² sin(x·y) at y = x, then d/dx: −2x sin(x²) − 2x³ cos(x²)
        _, (_, d2) = jet(lambda y: torch.sin(x * y), (x,), [[torch.ones_like(x), torch.zeros_like(x)]])
        return d2

    x = torch.tensor([0.7, 1.3], dtype=torch.float64)
    _, (dh,) = jet(h, (x,), [[torch.ones_like(x)]])
    assert_close(dh, -2 * x * torch.sin(x * x) - 2 * x ** 3 * torch.cos(x * x), 1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_devices(device, dtype):
    mlp = _seeded(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))).to(device=device, dtype=dtype)
    x = torch.randn(4, 3, dtype=dtype, device=device)
    series = [[torch.randn(2, 4, 3, dtype=dtype, device=device) for _ in range(3)]]
    y0, ys = jet(mlp, (x,), series)
    assert y0.dtype == dtype and all(y.dtype == dtype and y.device == x.device for y in ys)
    ref = [curve_derivatives(mlp.double(), (x.double(),), [[c[r].double() for c in series[0]]], 3) for r in range(2)]
    mlp.to(dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for k in range(3):
        assert_close(ys[k].double(), torch.stack([ref[r][k] for r in range(2)]), rtol)


def test_mlp_order_8_and_nested_jvp_cross_check():
    """K = 8 against the reverse-over-reverse reference, and K = 4 against nested torch.func.jvp."""
    mlp = _seeded(nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 1)))
    x = torch.randn(3, 2, dtype=torch.float64)
    check_jet(mlp, (x,), K=8)

    series = random_series((x,), 4, seed=5)
    curve = lambda t: mlp(x + sum(c * t ** (k + 1) / math.factorial(k + 1) for k, c in enumerate(series[0])))
    g, expected = curve, []
    for _ in range(4):
        g = (lambda h: lambda t: torch.func.jvp(h, (t,), (torch.ones_like(t),))[1])(g)
        expected.append(g(torch.zeros((), dtype=torch.float64)))
    _, ys = jet(mlp, (x,), series)
    for k in range(4):
        assert_close(ys[k], expected[k], 1e-10, what=f"order {k + 1}")
