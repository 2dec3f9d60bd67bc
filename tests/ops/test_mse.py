"""mse_loss: every derivative order and AD mode against reverse-over-reverse of F.mse_loss
(torch_hod.testing.check_op), w.r.t. input and target, every reduction, broadcasting; values,
torch's legacy flags and clear errors on bad input."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from torch_hod.ops.mse import mse_loss
from torch_hod.testing import check_op, tolerances

REDUCTIONS = ["mean", "sum", "none"]
# (input shape, target shape): equal, target broadcast, input broadcast, scalars
SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (3, 4)), ((), ())]


def _randn(*shape: int, dtype: torch.dtype = torch.float64, device: "torch.device | str" = "cpu",
           seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_all_modes_float64(reduction, shapes, device):
    x = _randn(*shapes[0], device=device, seed=1)
    t = _randn(*shapes[1], device=device, seed=2)
    check_op(mse_loss, F.mse_loss, (x, t), order=4, kwargs={"reduction": reduction})


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("shapes", SHAPES[:2], ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_all_modes_float32(reduction, shapes, device):
    x = _randn(*shapes[0], dtype=torch.float32, device=device, seed=3)
    t = _randn(*shapes[1], dtype=torch.float32, device=device, seed=4)
    rtol, atol = tolerances(torch.float32)
    check_op(mse_loss, F.mse_loss, (x, t), order=2, rtol=rtol, atol=atol, kwargs={"reduction": reduction})


@pytest.mark.parametrize("argnums", [(0,), (1,)], ids=["constant_target", "constant_input"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_one_operand_constant(reduction, argnums):
    x, t = _randn(2, 5, seed=5), _randn(2, 5, seed=6)
    check_op(mse_loss, F.mse_loss, (x, t), order=3, argnums=argnums, kwargs={"reduction": reduction})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_values_equal_builtin(reduction, dtype, device):
    x, t = _randn(3, 4, dtype=dtype, device=device, seed=7), _randn(3, 4, dtype=dtype, device=device, seed=8)
    out, ref = mse_loss(x, t, reduction=reduction), F.mse_loss(x, t, reduction=reduction)
    assert out.dtype == ref.dtype and out.shape == ref.shape and torch.equal(out, ref)


def test_mse_broadcast_warns_like_torch_and_matches():
    x, t = _randn(3, 4, seed=9), _randn(4, seed=10)
    for reduction in REDUCTIONS:
        with pytest.warns(UserWarning, match=r"Using a target size \(torch.Size\(\[4\]\)\) that is different"):
            out = mse_loss(x, t, reduction=reduction)
        with pytest.warns(UserWarning):
            ref = F.mse_loss(x, t, reduction=reduction)
        torch.testing.assert_close(out, ref, rtol=1e-15, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mse_loss(x, x.flip(0))  # equal shapes: no warning


@pytest.mark.parametrize("size_average,reduce,expected", [
    (False, None, "sum"), (True, None, "mean"), (None, False, "none"), (True, True, "mean"),
])
def test_mse_legacy_flags_as_torch(size_average, reduce, expected):
    x, t = _randn(3, 4, seed=11), _randn(3, 4, seed=12)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        out = mse_loss(x, t, size_average, reduce)
    assert torch.equal(out, F.mse_loss(x, t, reduction=expected))


def test_mse_gradients_reach_parameters_by_backward():
    x = _randn(4, 3, seed=13)
    w = _randn(3, seed=14).requires_grad_()
    t = _randn(4, 3, seed=15)
    loss = mse_loss(torch.sin(x * w), t)
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    g.pow(2).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad(F.mse_loss(torch.sin(x * w2), t), w2, create_graph=True)
    g2.pow(2).sum().backward()
    assert w2.grad.abs().max() > 0
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_vmap_over_data_per_sample_hessians(reduction):
    # per-sample losses under vmap: "mean" must divide by the per-sample size, not the batch's.
    xs, ts = _randn(3, 2, 4, seed=16), _randn(3, 2, 4, seed=17)

    def per_sample(fn):
        loss = lambda x, t: fn(x.sin(), t, reduction=reduction).sum()
        return torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(loss, (0, 1)), (0, 1)))(xs, ts)

    got, expected = per_sample(mse_loss), per_sample(F.mse_loss)
    for i in range(2):
        for j in range(2):
            assert expected[i][j].abs().max() > 0
            torch.testing.assert_close(got[i][j], expected[i][j], rtol=1e-10, atol=1e-12)


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kwargs,error,match", [
    ((_randn(3), _randn(3)), {"reduction": "avg"}, ValueError,
     r"mse_loss: reduction must be one of \['mean', 'sum', 'none'\], got 'avg'"),
    ((_randn(3, 4), _randn(3)), {}, ValueError,
     r"mse_loss: input shape \(3, 4\) and target shape \(3,\) do not broadcast"),
    ((_randn(3), _randn(3, dtype=torch.float32)), {}, TypeError,
     r"mse_loss: input has dtype torch.float64 but target has dtype torch.float32"),
    ((_randn(3), torch.ones(3, dtype=torch.int64)), {}, TypeError, r"mse_loss: target has integer/bool dtype"),
    ((torch.ones(3, dtype=torch.complex128), _randn(3)), {}, TypeError, r"mse_loss: input has complex dtype"),
    ((_randn(3), [0.0, 1.0, 2.0]), {}, TypeError, r"mse_loss: target must be a Tensor, got list"),
])
def test_mse_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        mse_loss(*args, **kwargs)


# --- Taylor mode ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("shapes", SHAPES[:3], ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_taylor_input_and_target(reduction, shapes, device):
    from test_linear import assert_jet_matches  # the shared Taylor reference (nested jacrev of F.mse_loss)

    K, R = 3, 2
    primals = [_randn(*shapes[0], device=device, seed=20), _randn(*shapes[1], device=device, seed=21)]
    series = [[_randn(R, *p.shape, device=device, seed=30 + 10 * i + k) for k in range(K)] for i, p in enumerate(primals)]
    assert_jet_matches(lambda x, t: mse_loss(x, t, reduction=reduction),
                       lambda x, t: F.mse_loss(x, t, reduction=reduction), primals, series, K=K, R=R)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_taylor_constant_target(reduction):
    from test_linear import assert_jet_matches

    t = _randn(3, 4, seed=40)
    primals = [_randn(3, 4, seed=41)]
    series = [[_randn(3, 4, seed=42), _randn(3, 4, seed=43)]]
    assert_jet_matches(lambda x: mse_loss(x, t, reduction=reduction),
                       lambda x: F.mse_loss(x, t, reduction=reduction), primals, series, K=2)
