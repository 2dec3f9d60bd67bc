"""softmax, log_softmax, logsumexp: every derivative order in every AD mode, by value, vs torch."""
from __future__ import annotations

import pytest
import torch

from torch_hod.ops.softmax import log_softmax, logsumexp, softmax
from torch_hod.testing import check_op, tolerances

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES_DIMS = [((5,), 0), ((3, 4), 1), ((3, 4), 0), ((2, 3, 4), -1), ((2, 3, 4), 1), ((2, 3, 4), -3)]
PAIRS = [(softmax, torch.softmax), (log_softmax, torch.log_softmax)]


def _logits(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _extreme(shape, device):
    """±1e4 logits with near-ties among the large ones, so the derivatives are non-zero."""
    x = _logits(shape, torch.float64, device)
    sign = torch.where(torch.arange(shape[-1], device=device) % 3 == 2, -1.0, 1.0).to(torch.float64)
    return 1e4 * sign + x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,ref", PAIRS, ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
def test_order4_float64(op, ref, shape, dim, device):
    check_op(op, ref, (_logits(shape, torch.float64, device), dim), order=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,ref", PAIRS, ids=["softmax", "log_softmax"])
def test_order2_float32(op, ref, device):
    rtol, atol = tolerances(torch.float32)
    check_op(op, ref, (_logits((3, 4), torch.float32, device), -1), order=2, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim,keepdim", [(1, False), (-1, True), (0, False), ((0, 2), False), ([2, -3], True), ((0, 1, 2), False)])
def test_logsumexp_order4_float64(dim, keepdim, device):
    check_op(logsumexp, torch.logsumexp, (_logits((2, 3, 4), torch.float64, device), dim, keepdim), order=4)


@pytest.mark.parametrize("device", DEVICES)
def test_logsumexp_order2_float32(device):
    rtol, atol = tolerances(torch.float32)
    check_op(logsumexp, torch.logsumexp, (_logits((3, 4), torch.float32, device), (0, 1)), order=2, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,ref", PAIRS + [(logsumexp, torch.logsumexp)], ids=["softmax", "log_softmax", "logsumexp"])
def test_extreme_logits_finite_every_order(op, ref, device):
    x = _extreme((3, 5), device)
    check_op(op, ref, (x, -1), order=4, modes=["value", "autograd", "reverse", "forward", "forward_over_reverse", "taylor"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,ref", PAIRS + [(logsumexp, torch.logsumexp)], ids=["softmax", "log_softmax", "logsumexp"])
def test_extreme_logits_float32_order2(op, ref, device):
    rtol, atol = tolerances(torch.float32)
    check_op(op, ref, (_extreme((3, 5), device).float(), -1), order=2, rtol=rtol, atol=atol,
             modes=["value", "autograd", "forward", "forward_over_reverse", "taylor"])


def test_logsumexp_infinities_and_nan_follow_torch():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[1.0, 2.0, 3.0], [-inf, -inf, -inf], [inf, 1.0, 2.0], [nan, 1.0, 2.0], [-inf, 0.0, 1.0]])
    for dim in (0, 1):
        torch.testing.assert_close(logsumexp(x, dim), torch.logsumexp(x, dim), equal_nan=True, rtol=0, atol=1e-6)


@pytest.mark.parametrize("op,ref", PAIRS, ids=["softmax", "log_softmax"])
def test_dtype_argument_casts_first(op, ref):
    x = _logits((3, 4), torch.float32, "cpu").requires_grad_()
    y = op(x, 1, dtype=torch.float64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref(x, 1, dtype=torch.float64), rtol=0, atol=0)
    v = torch.randn(3, 4, dtype=torch.float64)
    (gx,) = torch.autograd.grad((y * v).sum(), x)
    (gr,) = torch.autograd.grad((ref(x, 1, dtype=torch.float64) * v).sum(), x)
    assert gx.dtype == torch.float32 and gr.abs().max() > 0
    torch.testing.assert_close(gx, gr)


@pytest.mark.parametrize("op,ref", PAIRS, ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 5)])
def test_implicit_dim_follows_torch(op, ref, shape):
    x = _logits(shape, torch.float64, "cpu")
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        y = op(x)
    with pytest.warns(UserWarning):
        expected = getattr(torch.nn.functional, ref.__name__)(x)  # F.softmax / F.log_softmax pick the same dim
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_zero_dim_input():
    x = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert softmax(x, 0).item() == 1.0 and log_softmax(x, -1).item() == 0.0
    y = logsumexp(x, 0)
    (g,) = torch.autograd.grad(y, x)
    assert y.shape == () and g.shape == () and g.item() == 1.0


@pytest.mark.parametrize("op", [softmax, log_softmax, logsumexp])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_rejects_non_real_float_input(op, dtype):
    x = torch.ones(3, 4, dtype=dtype)
    with pytest.raises(TypeError, match="expected a real floating-point"):
        op(x, 1)


@pytest.mark.parametrize("op", [softmax, log_softmax, logsumexp])
@pytest.mark.parametrize("dim", [2, -3, 7])
def test_dim_out_of_range_names_valid_range(op, dim):
    with pytest.raises(IndexError, match=r"expected dim in \[-2, 1\]"):
        op(torch.randn(3, 4), dim)


def test_bad_dims():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="dim must be an int"):
        softmax(x, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        logsumexp(x, ())
    with pytest.raises(ValueError, match="more than once"):
        logsumexp(x, (1, -1))
    with pytest.raises(TypeError, match="floating-point dtype"):
        softmax(x, 1, dtype=torch.int32)
