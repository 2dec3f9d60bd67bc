"""Ops linear in several arguments where only an additive one (the bias) carries a series.

Regression: ``F.linear``/``conv`` with a constant input and weight and a Jet bias once propagated
``x Wᵀ`` into every coefficient. Reference: reverse-over-reverse along the Taylor curve.
"""
import pytest
import torch
import torch.nn.functional as F

from torch_hod import jet


def _directional(f, b, v, K):
    t = torch.zeros((), dtype=b.dtype, requires_grad=True)
    out, derivs = f(b + t * v), []
    for _ in range(K):
        (out,) = torch.autograd.grad(out, t, create_graph=True)
        derivs.append(out)
    return derivs


CASES = {
    "linear": (lambda x, W, b: F.linear(x, W, b), (3, 4), (2, 4)),
    "conv1d": (lambda x, W, b: F.conv1d(x, W, b), (1, 2, 5), (3, 2, 3)),
    "conv2d": (lambda x, W, b: F.conv2d(x, W, b, padding=1), (1, 2, 4, 4), (3, 2, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_bias_is_a_jet(name):
    torch.manual_seed(0)
    op, x_shape, w_shape = CASES[name]
    x = torch.randn(x_shape, dtype=torch.float64)
    W = torch.randn(w_shape, dtype=torch.float64)
    b, v = torch.randn(w_shape[0], dtype=torch.float64), torch.randn(w_shape[0], dtype=torch.float64)
    f = lambda b: op(x, W, b).sin().sum()
    _, ys = jet(f, (b,), ([v, torch.zeros_like(v), torch.zeros_like(v)],))
    expected = _directional(f, b, v, 3)
    for k, (got, want) in enumerate(zip(ys, expected), 1):
        assert want.abs() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0, msg=f"order {k}")
