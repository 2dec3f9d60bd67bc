"""Direction-batched and collapsed jets equal per-direction loops (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jet_reference import assert_close, random_series
from torch_hod.taylor import jet

torch.manual_seed(0)
D = torch.float64

_W = torch.randn(5, 4, dtype=D)
_MLP = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.GELU(), nn.LayerNorm(3)).double()
_CONV = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(8, 2)).double()

FUNCS = {
    "elementwise_linear_mul": (lambda x: torch.exp(torch.sin(x)) * F.linear(x, _W)[..., :4] + x / (2 + x * x), 1),
    "two_inputs_bilinear": (lambda x, w: torch.einsum("ij,kj->ik", torch.tanh(x), w) * F.linear(x, w), 2),
    "mlp_module": (_MLP, 1),
    "conv_module": (lambda x: _CONV(x.reshape(2, 1, 4)), 1),
    "softmax_pow": (lambda x: torch.softmax(x, -1) ** 2.5 + torch.sigmoid(x).sqrt(), 1),
}


def _inputs(n):
    return (torch.randn(2, 4, dtype=D), _W.clone())[:n]


@pytest.mark.parametrize("K", [1, 3, 5])
@pytest.mark.parametrize("name", sorted(FUNCS))
def test_directions_equal_loop_and_collapse_equals_sum(name, K):
    f, n = FUNCS[name]
    primals = _inputs(n)
    R = 3
    series = random_series(primals, K, seed=1, R=R)
    y0, ys = jet(f, primals, series)
    assert all(y.shape == (R,) + tuple(y0.shape) for y in ys)
    for r in range(R):
        y0r, ysr = jet(f, primals, [[c[r] for c in cs] for cs in series])
        torch.testing.assert_close(y0r, y0, rtol=0, atol=0)
        for k in range(K):
            assert_close(ys[k][r], ysr[k], 1e-12, what=f"direction {r} order {k + 1}")
    collapsed = [cs[:-1] + [cs[-1].sum(0)] for cs in series]
    y0c, ysc = jet(f, primals, collapsed, collapse=True)
    assert ysc[-1].shape == y0.shape
    torch.testing.assert_close(y0c, y0, rtol=0, atol=0)
    assert_close(ysc[-1], ys[-1].sum(0), 1e-11, what="collapsed top")
    for k in range(K - 1):
        assert_close(ysc[k], ys[k], 1e-12, what=f"collapsed lower order {k + 1}")


def test_undirected_coefficients_are_shared():
    """A coefficient without the direction axis is the same for every direction."""
    f, _ = FUNCS["elementwise_linear_mul"]
    x = torch.randn(2, 4, dtype=D)
    v, a = torch.randn(3, 2, 4, dtype=D), torch.randn(2, 4, dtype=D)
    _, ys = jet(f, (x,), [[v, a]])
    _, ys_full = jet(f, (x,), [[v, a.expand(3, 2, 4)]])
    for y, z in zip(ys, ys_full):
        assert_close(y, z, 1e-14)


def test_collapsed_laplacian_equals_hessian_trace():
    """Σ_i ∂²f/∂x_i² from directions e_i with a collapsed (zero) second coefficient."""
    x = torch.randn(3, 4, dtype=D)
    d = x.shape[1]
    E = torch.eye(d, dtype=D).unsqueeze(1).expand(d, 3, d)
    _, (_, lap) = jet(_MLP, (x,), [[E, torch.zeros_like(x)]], collapse=True)
    H = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(lambda xi: _MLP(xi))))(x)  # (3, out, d, d)
    assert_close(lap, H.diagonal(dim1=-2, dim2=-1).sum(-1), 1e-10)


def test_no_direction_axis_outputs_unbatched():
    x = torch.randn(4, dtype=D)
    y0, ys = jet(torch.sin, (x,), [[torch.ones(4, dtype=D), torch.zeros(4, dtype=D)]], collapse=True)
    assert ys[0].shape == (4,) and ys[1].shape == (4,)
    assert_close(ys[1], -torch.sin(x), 1e-14)
