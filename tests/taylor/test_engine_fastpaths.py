"""Fast Taylor rules (exact GELU and erf by the coupled Gaussian recurrence, layer_norm on stacked
coefficients) against reverse-over-reverse references of the built-ins, to order 8."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.taylor.jet_reference import assert_close, curve_derivatives, random_series
from torch_hod.taylor import jet

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
K = 8


def _layer_norm_composite(x, shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    xc = x - x.mean(dims, keepdim=True)
    y = xc / torch.sqrt((xc * xc).mean(dims, keepdim=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64) * 2
    x[0, :6] = torch.tensor([1e4, -1e4, 30.0, -30.0, 0.0, 5.0], dtype=torch.float64)
    return x.to(device)


CASES = {
    "gelu": (F.gelu, F.gelu),
    "erf": (torch.erf, torch.erf),
    "special_erf": (torch.special.erf, torch.erf),
    "gelu_in_mlp": (lambda x: torch.erf(F.gelu(x) * 0.3) * F.gelu(-x), lambda x: torch.erf(F.gelu(x) * 0.3) * F.gelu(-x)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_gaussian_rules_to_order_8(name, device):
    f, ref = CASES[name]
    x = _inputs(device)
    series = random_series([x], K, seed=1)
    y0, ys = jet(f, (x,), series)
    assert torch.isfinite(torch.stack(ys)).all()
    assert_close(y0, ref(x), what=f"{name} primal")
    for k, (yk, rk) in enumerate(zip(ys, curve_derivatives(ref, [x], series, K)), start=1):
        assert_close(yk, rk, rtol=1e-10, what=f"{name} order {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gelu", "erf", "layer_norm"])
def test_directions_and_collapsed(name, device):
    """Directed jets match the reference per direction; the collapsed top order is their sum."""
    x = _inputs(device)
    w = torch.randn(7, dtype=x.dtype, device=device)
    f, ref = {
        "gelu": (F.gelu, F.gelu),
        "erf": (torch.erf, torch.erf),
        "layer_norm": (lambda t: F.layer_norm(t, (7,), w, w), lambda t: _layer_norm_composite(t, (7,), w, w)),
    }[name]
    R, order = 3, 5
    (cs,) = random_series([x], order, seed=2, R=R)
    _, ys = jet(f, (x,), [cs])
    per_dir = [curve_derivatives(ref, [x], [[c[r] for c in cs]], order) for r in range(R)]
    for k in range(order):
        assert_close(ys[k], torch.stack([p[k] for p in per_dir]), what=f"{name} directed order {k + 1}")
    top = cs[-1].sum(0)
    _, yc = jet(f, (x,), [cs[:-1] + [top]], collapse=True)
    ref_top = sum(curve_derivatives(ref, [x], [[c[r] for c in cs[:-1]] + [top / R]], order)[-1] for r in range(R))
    assert_close(yc[-1], ref_top, what=f"{name} collapsed top")
    for k in range(order - 1):
        assert_close(yc[k], ys[k], what=f"{name} collapsed order {k + 1}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_to_order_8(affine, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 6, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(2, 6, generator=g, dtype=torch.float64).to(device) if affine else None
    b = torch.randn(2, 6, generator=g, dtype=torch.float64).to(device) if affine else None
    series = random_series([x], K, seed=4)
    y0, ys = jet(lambda t: F.layer_norm(t, (2, 6), w, b, eps=1e-3), (x,), series)
    ref = lambda t: _layer_norm_composite(t, (2, 6), w, b, eps=1e-3)
    assert_close(y0, F.layer_norm(x, (2, 6), w, b, eps=1e-3), what="layer_norm primal")
    for k, (yk, rk) in enumerate(zip(ys, curve_derivatives(ref, [x], series, K)), start=1):
        assert_close(yk, rk, rtol=1e-10, what=f"layer_norm order {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_float32_matches_float64(device):
    x = _inputs(device)
    x[0, :2] = torch.tensor([1e3, -1e3])
    series = random_series([x], 4, seed=5)
    f = lambda t: F.layer_norm(F.gelu(t), (7,)) + torch.erf(t)
    _, y64 = jet(f, (x,), series)
    _, y32 = jet(f, (x.float(),), [[c.float() for c in series[0]]])
    for k, (a, b) in enumerate(zip(y32, y64), start=1):
        assert a.dtype == torch.float32
        assert_close(a.double(), b, rtol=1e-3, what=f"float32 order {k}")


def test_parameter_gradients_flow():
    """The fast rules stay on autograd's tape: d/dw of a jet coefficient matches the reference."""
    x = _inputs("cpu")[1:]
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    series = random_series([x], 3, seed=6)
    _, ys = jet(lambda t: F.layer_norm(F.gelu(t * w), (7,)), (x,), series)
    u = torch.randn(x.shape, dtype=torch.float64)  # a plain sum of layer_norm outputs is zero
    (g,) = torch.autograd.grad((ys[-1] * u).sum(), w)
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    xt = x + sum(c * t ** (k + 1) / [1, 2, 6][k] for k, c in enumerate(series[0]))
    d = (_layer_norm_composite(F.gelu(xt * w), (7,)) * u).sum()
    for _ in range(3):
        (d,) = torch.autograd.grad(d, t, create_graph=True)
    (gr,) = torch.autograd.grad(d, w)
    assert_close(g, gr, what="parameter gradient")


def test_gelu_bad_approximate():
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises((RuntimeError, ValueError), match="approximate"):
        jet(lambda t: F.gelu(t, approximate="cubic"), (x,), [[torch.ones_like(x)]])


@pytest.mark.parametrize("name", ["gelu", "erf", "layer_norm"])
def test_nested_jets(name):
    """A jet inside a jet (coefficients are Jets of the outer call): D_w D²_v f against nested
    torch.func.jvp of the reference (of the elementary composite for layer_norm)."""
    from torch.func import jvp

    g = torch.Generator().manual_seed(7)
    x, v, w = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    f, ref = {
        "gelu": (F.gelu, F.gelu),
        "erf": (torch.erf, torch.erf),
        "layer_norm": (lambda t: F.layer_norm(t, (5,)), lambda t: _layer_norm_composite(t, (5,))),
    }[name]
    inner = lambda t: jet(f, (t,), [[v, torch.zeros_like(v)]])[1][1]
    _, (out,) = jet(inner, (x,), [[w]])
    d2 = lambda t: jvp(lambda y: jvp(ref, (y,), (v,))[1], (t,), (v,))[1]
    expected = jvp(d2, (x,), (w,))[1]
    assert_close(out, expected, what=f"nested {name}")
