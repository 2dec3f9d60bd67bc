"""The validation harness passes correct ops and catches every kind of wrong derivative."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import torch_hod.ops as ops
from torch_hod.ops.function import elementwise_op
from torch_hod.testing import MODES, CheckReport, check_op, tolerances

from conftest import uniform


# --- deliberately broken ops ------------------------------------------------------------------


class NaiveTanh(torch.autograd.Function):
    """A textbook custom Function: its ``jvp`` body uses plain ops (pytorch#197867)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)

    @staticmethod
    def jvp(ctx, x_dot):
        (y,) = ctx.saved_tensors
        return x_dot * (1 - y * y)


class OnceDifferentiableTanh(NaiveTanh):
    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class DetachedTanh(NaiveTanh):
    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return (grad * (1 - y * y)).detach()


class ForwardOffTanh(NaiveTanh):
    """Right backward, forward-mode rule off by 1 %."""

    @staticmethod
    def jvp(ctx, x_dot):
        (y,) = ctx.saved_tensors
        return 1.01 * x_dot * (1 - y * y)


def tanh_composite(x):
    """tanh from exp: a reference independent of torch.tanh's derivative formulas."""
    return 1 - 2 / (torch.exp(2 * x) + 1)


#: A plain autograd.Function has no Taylor rule (the jet engine refuses it loudly), so the broken
#: Functions below are checked in every mode but the Taylor ones.
NOT_TAYLOR = [mode for mode in MODES if "taylor" not in mode]


def failing(report: CheckReport) -> set:
    return {(row.mode, row.order) for row in report if not row.ok}


@pytest.fixture
def x(device):
    return uniform((5,), device=device)


# --- correct ops pass --------------------------------------------------------------------------


def test_correct_elementwise_op_passes_every_mode_and_order(x):
    report = check_op(torch.tanh, tanh_composite, (x,), order=4)
    assert report.ok
    rows = {("value", 0), ("gradcheck", 1), ("gradgradcheck", 2), ("hessian", 2)}
    rows |= {(m, k) for m in ("autograd", "reverse", "forward", "vmap_reverse", "vmap_forward", "forward_of_vmap",
                              "reverse_of_vmap", "taylor", "taylor_directions") for k in (1, 2, 3, 4)}
    rows |= {("taylor", 0), ("taylor_collapsed", 4)} | {("autograd_of_taylor", k) for k in (2, 3, 4)}
    rows |= {(m, k) for m in ("forward_over_reverse", "reverse_over_forward") for k in (2, 3, 4)}
    rows |= {("vmap_" + m, k) for m in ("forward_over_reverse", "reverse_over_forward") for k in (2, 3, 4)}
    rows |= {(m, k) for m in ("forward_ad", "jacrev", "jacfwd") for k in (1, 2)}
    assert {(row.mode, row.order) for row in report} == rows and len(report) == len(rows)
    assert {m for m, _ in rows} == set(MODES)
    assert all(row.max_rel <= 1e-10 for row in report if not math.isnan(row.max_rel))


def test_report_is_a_table_of_rows(x):
    report = check_op(torch.sin, torch.sin, (x,), order=2, modes=["value", "reverse", "forward"])
    assert [(r.mode, r.order) for r in report] == [("value", 0), ("reverse", 1), ("reverse", 2), ("forward", 1), ("forward", 2)]
    row = report[1]
    assert (row.mode, row.order, row.ok) == ("reverse", 1, True) and row.max_abs >= 0 and row.max_rel >= 0
    text = str(report)
    assert "check_op(sin)" in text and "max_abs" in text and "forward" in text


def test_multi_input_op_with_argnums(device):
    x, W, b = uniform((3, 4), device=device, seed=1), uniform((2, 4), device=device, seed=2), uniform((2,), device=device, seed=3)
    op = lambda x, W, b: torch.tanh(F.linear(x, W, b))
    reference = lambda x, W, b: torch.tanh(x @ W.T + b)
    assert check_op(op, reference, (x, W, b), order=3).ok
    # only W differentiated: a wrong derivative w.r.t. x alone goes unseen, one w.r.t. W does not
    wrong_x = lambda x, W, b: op(x, W, b) + 0.01 * (x - x.detach()).sum()
    assert check_op(wrong_x, reference, (x, W, b), order=2, argnums=(1,)).ok
    with pytest.raises(AssertionError, match="reverse"):
        check_op(wrong_x, reference, (x, W, b), order=2, argnums=(0,))


def test_non_tensor_arguments_and_integer_targets_pass_through(device):
    logits = uniform((3, 4), device=device, seed=4)
    target = torch.tensor([0, 3, 1], device=device)

    def reference(z, t, label_smoothing):
        q = (1 - label_smoothing) * F.one_hot(t, z.shape[-1]) + label_smoothing / z.shape[-1]
        return -(torch.log_softmax(z, -1) * q).sum(-1).mean()

    assert check_op(F.cross_entropy, reference, (logits, target), order=3, kwargs={"label_smoothing": 0.25}).ok
    ignores_smoothing = lambda z, t, label_smoothing: F.cross_entropy(z, t)
    with pytest.raises(AssertionError, match="value"):
        check_op(ignores_smoothing, reference, (logits, target), order=0, kwargs={"label_smoothing": 0.25})


def test_multi_output_op_with_integer_output(x):
    grid = lambda x: torch.sin(x)[None, :] * torch.arange(1.0, 3.0, dtype=x.dtype, device=x.device)[:, None]
    op = lambda x: torch.max(grid(x), dim=1)  # (values, indices)
    reference = lambda x: (grid(x).amax(dim=1), grid(x).argmax(dim=1))
    report = check_op(op, reference, (x,), order=2)
    assert report.ok
    assert {"value[0]", "value[1]"} <= {r.mode for r in report}
    wrong_index = lambda x: (op(x).values, 1 - op(x).indices)
    with pytest.raises(AssertionError, match=r"value\[1\][^\n]*FAIL"):
        check_op(wrong_index, reference, (x,), order=1, modes=["value"])


def test_float32_with_tolerances_from_eps(device):
    x32 = uniform((5,), device=device, dtype=torch.float32)
    rtol, atol = tolerances(torch.float32)
    report = check_op(torch.tanh, tanh_composite, (x32,), order=2, rtol=rtol, atol=atol)
    assert report.ok
    assert not {"gradcheck", "gradgradcheck"} & {r.mode for r in report}  # float64 only
    assert max(r.max_rel for r in report) > 1e-10  # float32 really ran in float32 (vs a float64 reference)
    assert tolerances(torch.float64) == (1e-10, 1e-12)
    with pytest.raises(AssertionError, match=r"inputs are torch.float32: is rtol right for the dtype\? see torch_hod.testing.tolerances"):
        check_op(torch.tanh, tanh_composite, (x32,), order=1, modes=["reverse"])  # float64 tolerances


# --- (a) forward-over-forward of a naive Function --------------------------------------------


def test_catches_naive_jvp_in_forward_over_forward(x):
    report = check_op(NaiveTanh.apply, torch.tanh, (x,), order=3, raise_on_failure=False, modes=NOT_TAYLOR)
    bad = failing(report)
    assert ("forward", 2) in bad and ("vmap_forward", 2) in bad and ("jacfwd", 2) in bad
    assert ("forward", 1) not in bad and not any(mode in ("reverse", "autograd") for mode, _ in bad)
    with pytest.raises(AssertionError, match=r"check_op\(NaiveTanh\)[\s\S]*forward\s+2"):
        check_op(NaiveTanh.apply, torch.tanh, (x,), order=2, name="NaiveTanh", modes=NOT_TAYLOR)


# --- (b) silent zero second derivatives --------------------------------------------------------


@pytest.mark.parametrize("function", [OnceDifferentiableTanh, DetachedTanh])
def test_catches_silent_zero_second_derivative(x, function):
    report = check_op(function.apply, torch.tanh, (x,), order=2, raise_on_failure=False, modes=NOT_TAYLOR)
    first = [r for r in report if r.order <= 1 and r.mode not in ("gradcheck",)]
    assert all(r.ok for r in first), report.table(first)
    for mode in ("autograd", "reverse", "vmap_reverse", "jacrev", "gradgradcheck"):
        row = next(r for r in report if (r.mode, r.order) == (mode, 2))
        assert not row.ok and (row.silent_zero or mode == "gradgradcheck"), report.table([row])
    with pytest.raises(AssertionError, match=r"SILENT ZERO[^\n]*orders \[2\]"):
        check_op(function.apply, torch.tanh, (x,), order=2, modes=["reverse"])


def test_flags_derivatives_identically_zero_at_every_order(x):
    frozen = lambda x: torch.sin(x.detach()) + 0 * x  # right value, every derivative exactly zero
    report = check_op(frozen, torch.sin, (x,), order=3, raise_on_failure=False)
    assert report[0].ok  # value
    assert {r.order for r in report if r.silent_zero} == {1, 2, 3}
    with pytest.raises(AssertionError, match=r"SILENT ZERO[^\n]*orders \[1, 2, 3\]"):
        check_op(frozen, torch.sin, (x,), order=3)


# --- (c) a wrong derivative --------------------------------------------------------------------


def test_catches_wrong_first_derivative_in_every_mode(x):
    bad_sin = elementwise_op("bad_sin", torch.sin, lambda x: 1.01 * torch.cos(x))
    report = check_op(bad_sin, torch.sin, (x,), order=1, raise_on_failure=False)
    assert report[0].ok  # the value is right
    assert all(not r.ok for r in report if r.order == 1 and r.mode != "gradcheck")  # gradcheck sees the op only
    row = next(r for r in report if r.mode == "reverse")
    assert row.max_rel == pytest.approx(0.01, rel=1e-6) and not row.silent_zero
    with pytest.raises(AssertionError, match=r"check_op\(bad_sin\)[\s\S]*reverse\s+1\s+\S+\s+1\.00e-02\s+FAIL"):
        check_op(bad_sin, torch.sin, (x,), order=1)


def test_names_the_wrong_mode(x):
    report = check_op(ForwardOffTanh.apply, torch.tanh, (x,), order=1, raise_on_failure=False, modes=NOT_TAYLOR)
    assert failing(report) == {("forward", 1), ("vmap_forward", 1), ("forward_of_vmap", 1), ("forward_ad", 1), ("jacfwd", 1), ("gradcheck", 1)}


# --- (d) zero where the other is not -----------------------------------------------------------


def test_catches_op_zero_where_reference_is_not(x):
    report = check_op(lambda x: 0 * x, torch.sin, (x,), order=1, raise_on_failure=False)
    value = report[0]
    assert value.mode == "value" and not value.ok and value.silent_zero
    with pytest.raises(AssertionError, match=r"SILENT ZERO[^\n]*orders \[0, 1\]"):
        check_op(lambda x: 0 * x, torch.sin, (x,), order=1)


def test_catches_reference_zero_where_op_is_not(x):
    report = check_op(torch.sin, torch.zeros_like, (x,), order=1, raise_on_failure=False)
    assert not report[0].ok and math.isinf(report[0].max_rel)
    assert any(r.mode == "reference" and not r.ok for r in report)  # a check that could not fail
    assert all(not r.ok for r in report if r.order == 1 and r.mode != "gradcheck")  # gradcheck sees the op only


def test_catches_non_finite_values(x):
    nan_grad = elementwise_op("nan_grad", torch.sin, lambda x: torch.cos(x) * (x / x.abs().clamp(max=0)))
    report = check_op(nan_grad, torch.sin, (x,), order=1, raise_on_failure=False, modes=["value", "reverse"])
    assert report[0].ok and not report[1].ok and math.isinf(report[1].max_abs)


# --- bad arguments -----------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors(x):
    with pytest.raises(ValueError, match=r"unknown modes \['backward'\]"):
        check_op(ops.sin, torch.sin, (x,), modes=["backward"])
    with pytest.raises(ValueError, match="order must be an int >= 0"):
        check_op(ops.sin, torch.sin, (x,), order=-1)
    with pytest.raises(ValueError, match="order must be an int >= 0"):
        check_op(ops.sin, torch.sin, (x,), order=True)
    with pytest.raises(ValueError, match="names an input more than once"):  # before: a confusing silent zero
        check_op(ops.sin, torch.sin, (x,), argnums=(0, -1))
    with pytest.raises(TypeError, match="input 1 is a tensor of dtype torch.int64"):
        check_op(lambda x, t: x, lambda x, t: x, (x, torch.ones(2, dtype=torch.long)), argnums=(1,))
    with pytest.raises(ValueError, match="argnums entry 3 is not a position"):
        check_op(ops.sin, torch.sin, (x,), argnums=(3,))
    with pytest.raises(ValueError, match="no floating-point tensor input"):
        check_op(lambda t: t, lambda t: t, (torch.ones(2, dtype=torch.long),))
    with pytest.raises(TypeError, match=r"inputs must be a tuple of positional arguments, e.g. \(x,\), got Tensor"):
        check_op(ops.sin, torch.sin, x)
    with pytest.raises(AssertionError, match="returns 2 outputs, reference 1"):
        check_op(lambda x: (x, x), lambda x: x, (x,))


def test_a_check_that_could_not_fail_is_a_failure(device):
    empty = torch.empty(0, dtype=torch.float64, device=device)
    report = check_op(torch.sin, torch.sin, (empty,), order=2, raise_on_failure=False)
    assert [r.mode for r in report if not r.ok] == ["reference"]
    constant = lambda x: torch.ones_like(x)
    with pytest.raises(AssertionError, match="reference's derivatives of orders 1..3 are all zero"):
        check_op(constant, constant, (uniform((3,), device=device),), order=3)


def test_order_zero_checks_values_only(x):
    report = check_op(torch.sin, torch.sin, (x,), order=0)
    assert [(r.mode, r.order) for r in report] == [("value", 0)]


def test_non_finite_reference_fails(device):
    x = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    report = check_op(torch.sqrt, torch.sqrt, (x,), order=1, modes=["reverse"], raise_on_failure=False)
    assert not report.ok and "reference is not finite" in report[0].note
