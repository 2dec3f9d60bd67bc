"""Bad input and unsupported operations fail loudly with specific messages; user rules work."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

from jet_reference import check_jet
from torch_hod.taylor import jet, register_taylor_rule

X = torch.randn(3, dtype=torch.float64)
V = torch.randn(3, dtype=torch.float64)


def test_op_without_rule_names_it_and_register_taylor_rule():
    with pytest.raises(NotImplementedError, match=r"torch\.cumprod.*register_taylor_rule"):
        jet(lambda x: torch.cumprod(x, 0), (X,), [[V]])
    with pytest.raises(NotImplementedError, match=r"special_bessel_j0.*register_taylor_rule"):
        jet(torch.special.bessel_j0, (X,), [[V]])
    with pytest.raises(NotImplementedError, match=r"torch\.ops\.aten\.cumprod\.default.*register_taylor_rule"):
        jet(lambda x: torch.ops.aten.cumprod.default(x, 0), (X,), [[V]])
    with pytest.raises(RuntimeError, match=r"in-place torch\.Tensor\.squeeze_ .*use the out-of-place squeeze"):
        jet(lambda x: x.squeeze_(), (X[None],), [[V[None]]])


def test_third_party_autograd_function_is_refused():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return 2 * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    with pytest.raises(RuntimeError, match=r"autograd\.Function.*register_taylor_rule"):
        jet(Double.apply, (X,), [[V]])


def test_user_rule_for_own_function():
    """The documented recipe: dispatch through handle_torch_function, register a rule."""

    def cube_plus(x, c=1.0):
        if has_torch_function((x,)):
            return handle_torch_function(cube_plus, (x,), x, c=c)
        return x * x * x + c

    register_taylor_rule(cube_plus, lambda x, c=1.0: x * x * x + c)
    check_jet(lambda x: torch.sin(cube_plus(x, c=2.0)), (X,), 5)


@pytest.mark.parametrize(
    "primals, series, error, message",
    [
        ((X,), [], ValueError, r"1 primals but 0 series"),
        ((X, X), [[V], [V, V]], ValueError, r"different lengths \[1, 2\]"),
        ((X,), [[]], ValueError, r"series\[0\] is empty; expected K >= 1"),
        ((X,), [[V.float()]], TypeError, r"dtype torch.float32.*expected the primal's dtype torch.float64"),
        ((X,), [[V.to("meta")]], TypeError, r"on meta.*expected the primal's dtype torch.float64 on cpu"),
        ((X,), [[torch.randn(4, dtype=torch.float64)]], ValueError, r"shape \(4,\); expected the primal's shape \(3,\)"),
        ((X,), [[torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]], ValueError,
         r"different numbers of directions \[2, 4\]"),
        ((torch.arange(3),), [[torch.arange(3)]], TypeError, r"primal 0 has dtype torch.int64; expected a floating-point"),
        (X, [[V]], TypeError, r"primals must be a tuple or list"),
        ((X,), [V], TypeError, r"series\[0\] must be a list"),
    ],
)
def test_bad_arguments(primals, series, error, message):
    with pytest.raises(error, match=message):
        jet(torch.sin, primals, series)


def test_collapsed_top_must_be_summed():
    with pytest.raises(ValueError, match=r"collapse=True.*already summed over directions"):
        jet(torch.sin, (X,), [[torch.randn(2, 3, dtype=torch.float64)] * 2], collapse=True)


def test_unsupported_variants_raise():
    with pytest.raises(NotImplementedError, match="einsum with 3 operands"):
        jet(lambda x: torch.einsum("i,i,i->", x, x, x), (X,), [[V]])
    with pytest.raises(NotImplementedError, match="ord=1"):
        jet(lambda x: torch.linalg.vector_norm(x, 1), (X,), [[V]])
    with pytest.raises(ValueError, match="explicit dim"):
        jet(lambda x: F.softmax(x), (X,), [[V]])


def test_view_dtype_raises_and_integer_cast_is_constant():
    with pytest.raises(NotImplementedError, match=r"view\(dtype\)"):
        jet(lambda x: x.view(torch.int64), (X,), [[V]])
    _, (y1,) = jet(lambda x: x.to(torch.int64) * x, (X,), [[V]])
    assert torch.equal(y1, X.to(torch.int64) * V)


def test_writing_a_jet_into_a_constant_raises():
    def f(x):
        out = torch.zeros(3, dtype=torch.float64)
        out[0] = x[1]
        return out

    with pytest.raises(RuntimeError, match=r"writes a Jet into a constant tensor"):
        jet(f, (X,), [[V]])


def test_func_returning_non_tensor():
    with pytest.raises(TypeError, match="func returned a str"):
        jet(lambda x: "nope", (X,), [[V]])
