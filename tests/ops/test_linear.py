"""linear, matmul, bmm: every derivative order and AD mode against reverse-over-reverse of the
built-ins (torch_hod.testing.check_op), per-sample Hessians under vmap over data, Taylor mode
against nested jacrev of the built-ins, exact forward values, and clear errors on bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch_hod.ops.linear import bmm, linear, matmul
from torch_hod.testing import check_op, tolerances

# float64 to order 4 at rel 1e-10; float32 to order 2 at the harness's float32 tolerances.
PRECISIONS = [(torch.float64, 4), (torch.float32, 2)]


def _randn(*shape: int, dtype: torch.dtype = torch.float64, device: "torch.device | str" = "cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _check(op, ref, inputs, dtype, order, **kw):
    rtol, atol = tolerances(dtype)
    check_op(op, ref, inputs, order=order, rtol=rtol, atol=atol, **kw)


@pytest.mark.parametrize("dtype,order", PRECISIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=["1d", "2d", "3d"])
def test_linear_all_modes(batch, bias, dtype, order, device):
    # w.r.t. input, weight and bias jointly: the mixed (x, W) second derivative is non-zero.
    x = _randn(*batch, 4, dtype=dtype, device=device, seed=1)
    w = _randn(5, 4, dtype=dtype, device=device, seed=2)
    b = _randn(5, dtype=dtype, device=device, seed=3) if bias else None
    _check(linear, F.linear, (x, w, b), dtype, order)


@pytest.mark.parametrize("argnums", [(0,), (1,), (2,), (0, 2), (1, 2)])
def test_linear_subsets_of_operands(argnums):
    # the others are constants, which exercises the skipped products (ctx.needs_input_grad).
    dtype = torch.float64
    x, w, b = (_randn(*s, dtype=dtype, device="cpu", seed=i) for i, s in enumerate([(2, 3, 4), (5, 4), (5,)]))
    check_op(linear, F.linear, (x, w, b), order=3, argnums=argnums)


MATMUL_SHAPES = [
    ((4,), (4,)),              # dot
    ((4,), (4, 3)),            # vector · matrix
    ((3, 4), (4,)),            # matrix · vector
    ((3, 4), (4, 2)),          # mm
    ((2, 1, 3, 4), (5, 4, 2)),  # broadcast batch dims on both sides
    ((2, 3, 4), (4, 2)),       # batched · matrix (folded weight gradient)
    ((3, 4), (2, 4, 2)),       # matrix · batched (folded gradient of the first operand)
    ((4,), (2, 4, 3)),         # vector · batched
    ((2, 3, 4), (4,)),         # batched · vector
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matmul_all_modes_float64(shapes, device):
    a = _randn(*shapes[0], dtype=torch.float64, device=device, seed=4)
    b = _randn(*shapes[1], dtype=torch.float64, device=device, seed=5)
    _check(matmul, torch.matmul, (a, b), torch.float64, 4)


@pytest.mark.parametrize("shapes", [MATMUL_SHAPES[1], MATMUL_SHAPES[4], MATMUL_SHAPES[6]],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_matmul_all_modes_float32(shapes, device):
    a = _randn(*shapes[0], dtype=torch.float32, device=device, seed=6)
    b = _randn(*shapes[1], dtype=torch.float32, device=device, seed=7)
    _check(matmul, torch.matmul, (a, b), torch.float32, 2)


@pytest.mark.parametrize("argnums", [(0,), (1,)])
def test_matmul_one_operand_constant(argnums):
    a = _randn(2, 1, 3, 4, dtype=torch.float64, device="cpu", seed=8)
    b = _randn(5, 4, 2, dtype=torch.float64, device="cpu", seed=9)
    check_op(matmul, torch.matmul, (a, b), order=3, argnums=argnums)


@pytest.mark.parametrize("dtype,order", PRECISIONS)
def test_bmm_all_modes(dtype, order, device):
    a = _randn(3, 2, 4, dtype=dtype, device=device, seed=10)
    b = _randn(3, 4, 5, dtype=dtype, device=device, seed=11)
    _check(bmm, torch.bmm, (a, b), dtype, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_values_equal_builtins(dtype, device):
    x = _randn(2, 3, 4, dtype=dtype, device=device, seed=12)
    w = _randn(5, 4, dtype=dtype, device=device, seed=13)
    b = _randn(5, dtype=dtype, device=device, seed=14)
    for out, ref in [
        (linear(x, w, b), F.linear(x, w, b)),
        (linear(x[0, 0], w), F.linear(x[0, 0], w)),
        (matmul(x, w.mT), torch.matmul(x, w.mT)),
        (matmul(x[0, 0], x[0, 0]), torch.matmul(x[0, 0], x[0, 0])),
        (bmm(x, x.mT), torch.bmm(x, x.mT)),
    ]:
        assert out.dtype == ref.dtype and out.device == ref.device and out.shape == ref.shape
        assert torch.equal(out, ref)


def test_gradients_reach_parameters_by_backward():
    # the ordinary training path: .backward() into leaves, and double backward through it.
    x = _randn(6, 4, dtype=torch.float64, device="cpu", seed=15)
    w = _randn(3, 4, dtype=torch.float64, device="cpu", seed=16).requires_grad_()
    b = _randn(3, dtype=torch.float64, device="cpu", seed=17).requires_grad_()
    loss = torch.tanh(linear(x, w, b)).pow(2).sum()
    (gw,) = torch.autograd.grad(loss, w, create_graph=True)
    gw.sum().backward()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    loss2 = torch.tanh(F.linear(x, w2, b2)).pow(2).sum()
    (gw2,) = torch.autograd.grad(loss2, w2, create_graph=True)
    gw2.sum().backward()
    assert b2.grad.abs().max() > 0
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("op,ref,shapes", [
    (linear, F.linear, [(3, 4), (5, 4), (5,)]),
    (matmul, torch.matmul, [(2, 1, 3, 4), (5, 4, 2)]),
    (matmul, torch.matmul, [(3, 4), (2, 4, 2)]),
    (matmul, torch.matmul, [(4,), (2, 4, 3)]),
    (bmm, torch.bmm, [(2, 3, 4), (2, 4, 2)]),
], ids=["linear", "matmul_broadcast", "matmul_fold", "matmul_vector", "bmm"])
def test_vmap_over_data_per_sample_hessians(op, ref, shapes):
    # vmap over a batch of *inputs* (per-sample curvature): the rules then run on batched tensors.
    args = [_randn(*s, seed=20 + i) for i, s in enumerate(shapes)]
    batch = _randn(3, *shapes[0], seed=30)
    argnums = tuple(range(len(args)))

    def per_sample(fn):
        loss = lambda *a: fn(*a).sin().sum()
        return torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(loss, argnums), argnums),
                               in_dims=(0,) + (None,) * (len(args) - 1))(batch, *args[1:])

    got = torch.utils._pytree.tree_leaves(per_sample(op))
    expected = torch.utils._pytree.tree_leaves(per_sample(ref))
    assert any(e.abs().max() > 0 for e in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


# --- bad input ------------------------------------------------------------------------------

def _f64(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64)


@pytest.mark.parametrize("args,error,match", [
    ((_f64(3, 7), _f64(5, 6)), ValueError,
     r"linear: input has 7 features \(last dim\) but weight has shape \(5, 6\), expected \(out_features, 7\)"),
    ((_f64(3, 6), _f64(6)), ValueError, r"weight has shape \(6,\), expected \(out_features, 6\)"),
    ((_f64(3, 6), _f64(5, 6), _f64(4)), ValueError, r"bias has shape \(4,\).*expected bias of shape \(5,\)"),
    ((_f64(3, 6), _f64(5, 6), _f64(5, 1)), ValueError, r"bias has shape \(5, 1\)"),
    ((_f64(), _f64(5, 1)), ValueError, r"input must have at least 1 dimension"),
    ((torch.zeros(3, 6, dtype=torch.int64), _f64(5, 6)), TypeError, r"linear: input has integer/bool dtype torch.int64"),
    ((_f64(3, 6), torch.zeros(5, 6, dtype=torch.complex128)), TypeError, r"linear: weight has complex dtype"),
    ((torch.zeros(3, 6), _f64(5, 6)), TypeError,
     r"linear: input has dtype torch.float32 but weight has dtype torch.float64"),
    ((_f64(3, 6), _f64(5, 6), torch.zeros(5)), TypeError,
     r"input has dtype torch.float64 but bias has dtype torch.float32"),
])
def test_linear_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        linear(*args)


@pytest.mark.parametrize("args,error,match", [
    ((_f64(3, 4), _f64(5, 2)), ValueError,
     r"matmul: inner dimensions differ: input has shape \(3, 4\), other has shape \(5, 2\); "
     r"expected input.shape\[-1\] \(4\) == other.shape\[-2\] \(5\)"),
    ((_f64(4), _f64(5)), ValueError, r"other.shape\[0\] \(5\)"),
    ((_f64(2, 3, 4), _f64(5, 4, 2)), ValueError, r"batch dimensions \(2,\) and \(5,\) do not broadcast"),
    ((_f64(), _f64(3)), ValueError, r"both operands need at least 1 dimension"),
    ((torch.zeros(3, 4, dtype=torch.int32), _f64(4, 2)), TypeError, r"matmul: input has integer/bool dtype"),
    ((_f64(3, 4), torch.zeros(4, 2, dtype=torch.complex64)), TypeError, r"matmul: other has complex dtype"),
    ((_f64(3, 4), torch.zeros(4, 2)), TypeError,
     r"matmul: input has dtype torch.float64 but other has dtype torch.float32"),
])
def test_matmul_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        matmul(*args)


@pytest.mark.parametrize("args,match", [
    ((_f64(3, 4), _f64(4, 2)), r"bmm: expected 3-D tensors.*input has shape \(3, 4\), mat2 has shape \(4, 2\)"),
    ((_f64(2, 3, 4), _f64(3, 4, 2)), r"bmm: expected 3-D tensors \(b, n, m\) and \(b, m, p\) with the same b"),
    ((_f64(2, 3, 4), _f64(2, 5, 2)), r"bmm: inner dimensions differ"),
])
def test_bmm_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        bmm(*args)


# --- Taylor mode ----------------------------------------------------------------------------

def taylor_reference(f, primals, series, K: int, direction: int = 0):
    """``y_k = d^k/dt^k f(x(t))`` at t = 0, ``x(t) = Σ_k x_k t^k / k!`` (Horner), by k nested
    ``jacrev`` (reverse-over-reverse) of the built-in ``f``; coefficients with a leading direction
    axis use their ``direction``-th row."""
    def coeff(x0, xk):
        return xk[direction] if xk.dim() == x0.dim() + 1 else xk

    def path(t):
        xs = []
        for x0, xks in zip(primals, series):
            acc = torch.zeros_like(x0)
            for k in range(K, 0, -1):
                acc = (coeff(x0, xks[k - 1]) + acc) * (t / k)
            xs.append(x0 + acc)
        return f(*xs)

    t0 = torch.zeros((), dtype=primals[0].dtype, device=primals[0].device)
    out, g = [], path
    for _ in range(K):
        g = torch.func.jacrev(g)
        out.append(g(t0))
    return out


def assert_jet_matches(op, ref, primals, series, K, R=None, rtol=1e-10):
    """``jet(op)`` against :func:`taylor_reference` of the built-in ``ref``, per direction."""
    from torch_hod.taylor import jet

    y0, ys = jet(op, primals, series)
    torch.testing.assert_close(y0, ref(*primals), rtol=rtol, atol=0)
    for r in range(R or 1):
        expected = taylor_reference(ref, primals, series, K, r)
        for k in range(K):
            got = ys[k] if R is None else ys[k][r]
            scale = expected[k].abs().max()
            assert scale > 0, f"reference y_{k + 1} is zero: the check could not fail"
            assert got.shape == expected[k].shape, f"y_{k + 1}: shape {got.shape}, expected {expected[k].shape}"
            assert (got - expected[k]).abs().max() <= rtol * scale, f"y_{k + 1}, direction {r}"


def _series(shapes_and_seeds, K, R=None, dtype=torch.float64, device="cpu"):
    lead = () if R is None else (R,)
    primals = [_randn(*s, dtype=dtype, device=device, seed=seed) for s, seed in shapes_and_seeds]
    series = [[_randn(*lead, *s, dtype=dtype, device=device, seed=100 * seed + k) for k in range(K)]
              for s, seed in shapes_and_seeds]
    return primals, series


@pytest.mark.parametrize("R", [None, 2], ids=["undirected", "R2"])
@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["1d", "3d"])
def test_linear_taylor_all_operands(batch, R, device):
    primals, series = _series([((*batch, 4), 1), ((5, 4), 2), ((5,), 3)], K=3, R=R, device=device)
    assert_jet_matches(linear, F.linear, primals, series, K=3, R=R)


def test_linear_taylor_constant_weight_and_collapse(device):
    # x is the only jet (W, b constants); collapsed: top coefficient summed over 3 directions.
    w, b = _randn(5, 4, device=device, seed=4), _randn(5, device=device, seed=5)
    primals, series = _series([((2, 4), 6)], K=2, R=3, device=device)
    assert_jet_matches(lambda x: linear(x, w, b), lambda x: F.linear(x, w, b), primals, series, K=2, R=3)
    from torch_hod.taylor import jet

    top = series[0][1].sum(0)
    _, ys = jet(lambda x: linear(x, w, b), primals, [[series[0][0], top]], collapse=True)
    expected = sum(taylor_reference(lambda x: F.linear(x, w, b), primals, [[series[0][0], top / 3]], 2, r)[1]
                   for r in range(3))
    assert expected.abs().max() > 0
    torch.testing.assert_close(ys[1], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shapes", MATMUL_SHAPES[:5], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matmul_taylor(shapes, device):
    primals, series = _series([(shapes[0], 7), (shapes[1], 8)], K=3, R=2, device=device)
    assert_jet_matches(matmul, torch.matmul, primals, series, K=3, R=2)


def test_bmm_taylor_and_float32(device):
    primals, series = _series([((3, 2, 4), 9), ((3, 4, 5), 10)], K=3, device=device)
    assert_jet_matches(bmm, torch.bmm, primals, series, K=3)
    primals, series = _series([((3, 4), 11), ((5, 4), 12)], K=2, dtype=torch.float32, device=device)
    assert_jet_matches(linear, F.linear, primals, series, K=2, rtol=1e-5)


def test_linear_taylor_gradient_reaches_parameters():
    # a jet over x with W a parameter: .backward() of Σ y_2 equals the reference's gradient.
    from torch_hod.taylor import jet

    x, v = _randn(3, 4, seed=13), _randn(3, 4, seed=14)
    w = _randn(5, 4, seed=15).requires_grad_()
    _, ys = jet(lambda x: torch.tanh(linear(x, w)), (x,), ([v, torch.zeros_like(v)],))
    ys[1].sum().backward()
    w2 = w.detach().clone().requires_grad_()
    ref = taylor_reference(lambda x: torch.tanh(F.linear(x, w2)), (x,), ([v, torch.zeros_like(v)],), 2)[1]
    ref.sum().backward()
    assert w2.grad.abs().max() > 0
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)
