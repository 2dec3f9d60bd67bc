"""Normalisation ops: derivatives of every order in every AD mode, running stats, bad input.

References are the mean/var composites of elementary ops (the ops' own Taylor rules), differentiated
by plain reverse mode (reverse^k), never torch.func's nested jvp of F.layer_norm / training-mode
F.batch_norm (wrong, see FACTS). Forward values and first derivatives are also compared with the
torch built-ins.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

from torch_hod.ops import normalization as N

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _direction_derivatives(f: Callable, tensors: Sequence[torch.Tensor], k: int, seed: int):
    """For ``φ(t) = <f(*(x + t v)), u>``: the reference ``φ^(k)(0)`` by reverse^k, and φ^(k)(0) by
    every composition of torch.func grad (r) / jvp (f) of length k, as ``{modes: value}``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)  # noqa: E731
    vs = [rand(t) for t in tensors]
    u = rand(f(*tensors))

    def phi(t):
        return (f(*(x + t * v for x, v in zip(tensors, vs))) * u).sum()

    def compose(fn, modes):
        for m in modes:
            fn = grad(fn) if m == "r" else (lambda g: lambda t: jvp(g, (t,), (torch.ones_like(t),))[1])(fn)
        return fn

    t0 = torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)
    return phi, t0, {"".join(m): compose(phi, m)(t0) for m in itertools.product("rf", repeat=k)}


def _reverse_k(phi: Callable, t0: torch.Tensor, k: int) -> torch.Tensor:
    t = t0.clone().requires_grad_(True)
    y = phi(t)
    for _ in range(k):
        (y,) = torch.autograd.grad(y, t, create_graph=True)
    return y.detach()


def check_all_modes(op: Callable, ref: Callable, tensors: Sequence[torch.Tensor], order: int, rtol: float,
                    atol: float = 1e-12, seed: int = 0) -> None:
    """Compare every derivative order ≤ ``order`` of ``op`` with ``ref`` in every mode composition."""
    ref64 = [t.double() for t in tensors]
    for k in range(1, order + 1):
        phi_ref, t_ref, _ = _direction_derivatives(ref, ref64, 0, seed + k)
        expected = _reverse_k(phi_ref, t_ref, k)
        assert expected.abs() > 1e-6, f"reference derivative of order {k} is zero: the check cannot fail"
        phi, t0, got = _direction_derivatives(op, tensors, k, seed + k)
        got["autograd-reverse"] = _reverse_k(phi, t0, k)
        for modes, value in got.items():
            err = (value.double() - expected).abs()
            assert err <= atol + rtol * expected.abs(), (
                f"order {k}, modes {modes}: got {value.item():.17g}, expected {expected.item():.17g}, "
                f"rel err {(err / expected.abs()).item():.3g}")


def check_jacobians(op: Callable, ref: Callable, x: torch.Tensor, rtol: float = 1e-10) -> None:
    """jacrev, jacfwd, hessian (fwd-over-rev) and vmap of the op vs reverse-mode references."""
    u = torch.randn_like(x)
    scalar = lambda f: lambda y: (f(y) * u).sum()  # noqa: E731
    jac_ref = torch.autograd.functional.jacobian(ref, x)
    hess_ref = torch.autograd.functional.hessian(scalar(ref), x)
    assert jac_ref.abs().max() > 0 and hess_ref.abs().max() > 0
    for name, value, expected in (
        ("jacrev", jacrev(op)(x), jac_ref), ("jacfwd", jacfwd(op)(x), jac_ref),
        ("hessian", hessian(scalar(op))(x), hess_ref), ("jacrev∘jacrev", jacrev(jacrev(scalar(op)))(x), hess_ref),
        ("jacfwd∘jacfwd", jacfwd(jacfwd(scalar(op)))(x), hess_ref),
    ):
        torch.testing.assert_close(value, expected, rtol=rtol, atol=1e-12, msg=lambda m: f"{name}: {m}")
    xs = torch.stack([x, 2 * x + 1, x.flip(0)])
    torch.testing.assert_close(vmap(op)(xs), torch.stack([ref(t) for t in xs]), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(vmap(hessian(scalar(op)))(xs),
                               torch.stack([torch.autograd.functional.hessian(scalar(ref), t) for t in xs]),
                               rtol=rtol, atol=1e-12)


def _params(shape, affine: bool, dtype, device, bias: bool = True):
    if not affine:
        return []
    w = torch.randn(shape, dtype=dtype, device=device) + 1.5
    return [w, torch.randn(shape, dtype=dtype, device=device)] if bias else [w]


# ------------------------------------------------------------------------------ layer_norm

LAYER_CASES = [((3, 4, 5), (5,)), ((3, 4, 5), (4, 5))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,normalized", LAYER_CASES)
@pytest.mark.parametrize("dtype,order,rtol", [(torch.float64, 4, 1e-10), (torch.float32, 2, 2e-4)])
def test_layer_norm_derivatives(shape, normalized, affine, dtype, order, rtol, device):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device)
    params = _params(normalized, affine, dtype, device)
    op = lambda x, *p: N.layer_norm(x, normalized, *p, eps=1e-3)  # noqa: E731
    ref = lambda x, *p: N._layer_norm_composite(x, normalized, *p, eps=1e-3)  # noqa: E731
    check_all_modes(op, ref, [x, *params], order, rtol, atol=1e-12 if dtype == torch.float64 else 1e-4)
    torch.testing.assert_close(op(x, *params), F.layer_norm(x, normalized, *params, eps=1e-3))


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_jacobians_and_vmap(device):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, dtype=torch.float64, device=device)
    w, b = _params((3, 4), True, torch.float64, device)
    check_jacobians(lambda x: N.layer_norm(x, (3, 4), w, b), lambda x: N._layer_norm_composite(x, (3, 4), w, b), x)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_first_order_matches_builtin(device):
    torch.manual_seed(2)
    x, w, b = (torch.randn(s, dtype=torch.float64, device=device, requires_grad=True) for s in ((4, 6), (6,), (6,)))
    g = torch.randn(4, 6, dtype=torch.float64, device=device)
    ours = torch.autograd.grad(N.layer_norm(x, (6,), w, b), (x, w, b), g)
    theirs = torch.autograd.grad(F.layer_norm(x, (6,), w, b), (x, w, b), g)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_layer_norm_gradgradcheck():
    torch.manual_seed(3)
    x, w, b = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (4,), (4,)))
    f = lambda x, w, b: N.layer_norm(x, (4,), w, b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


# -------------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,normalized", LAYER_CASES)
@pytest.mark.parametrize("dtype,order,rtol", [(torch.float64, 4, 1e-10), (torch.float32, 2, 2e-4)])
def test_rms_norm_derivatives(shape, normalized, affine, dtype, order, rtol, device):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device)
    params = _params(normalized, affine, dtype, device, bias=False)
    op = lambda x, *p: N.rms_norm(x, normalized, *p, eps=1e-3)  # noqa: E731
    ref = lambda x, *p: N._rms_norm_composite(x, normalized, *p, eps=1e-3)  # noqa: E731
    check_all_modes(op, ref, [x, *params], order, rtol, atol=1e-12 if dtype == torch.float64 else 1e-4)
    torch.testing.assert_close(op(x, *params), F.rms_norm(x, normalized, *params, eps=1e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_default_eps_is_finfo_eps(dtype):
    x = torch.randn(3, 5, dtype=dtype) * 1e-4  # small enough that eps matters
    torch.testing.assert_close(N.rms_norm(x, (5,)), F.rms_norm(x, (5,)))
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(dtype).eps)
    torch.testing.assert_close(N.rms_norm(x, (5,)), expected)


def test_rms_norm_jacobians_and_vmap():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    (w,) = _params((4,), True, torch.float64, "cpu", bias=False)
    check_jacobians(lambda x: N.rms_norm(x, (4,), w), lambda x: N._rms_norm_composite(x, (4,), w), x)


# ------------------------------------------------------------------------------ batch_norm

BATCH_SHAPES = [(6, 3), (3, 2, 2, 3)]


def _running(c, dtype, device):
    return torch.randn(c, dtype=dtype, device=device), torch.rand(c, dtype=dtype, device=device) + 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", BATCH_SHAPES)
@pytest.mark.parametrize("dtype,order,rtol", [(torch.float64, 4, 1e-10), (torch.float32, 2, 2e-4)])
def test_batch_norm_derivatives(shape, affine, training, dtype, order, rtol, device):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device)
    params = _params((shape[1],), affine, dtype, device)
    rm, rv = (None, None) if training else _running(shape[1], dtype, device)
    op = lambda x, *p: N.batch_norm(x, rm, rv, *p, training=training, eps=1e-3)  # noqa: E731
    stats64 = (None, None) if training else (rm.double(), rv.double())  # the reference runs in float64
    ref = lambda x, *p: N._batch_norm_composite(x, *stats64, *p, training=training, eps=1e-3)  # noqa: E731
    # eval mode is affine in x and in γ: derivatives of order > 2 (> 1 without γ) vanish
    check_all_modes(op, ref, [x, *params], order if training else min(order, 2 if affine else 1), rtol,
                    atol=1e-12 if dtype == torch.float64 else 1e-4)
    torch.testing.assert_close(op(x, *params), F.batch_norm(x, rm, rv, *params, training=training, eps=1e-3))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_jacobians_and_vmap(training):
    torch.manual_seed(1)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    w, b = _params((2,), True, torch.float64, "cpu")
    rm, rv = (None, None) if training else _running(2, torch.float64, "cpu")
    op = lambda x: N.batch_norm(x, rm, rv, w, b, training=training)  # noqa: E731
    ref = lambda x: N._batch_norm_composite(x, rm, rv, w, b, training=training)  # noqa: E731
    if training:
        check_jacobians(op, ref, x)
    else:  # affine in x: the hessian is zero, so compare the Jacobians only
        torch.testing.assert_close(jacfwd(op)(x), torch.autograd.functional.jacobian(ref, x), rtol=1e-10, atol=0)
        torch.testing.assert_close(jacrev(op)(x), torch.autograd.functional.jacobian(ref, x), rtol=1e-10, atol=0)


@pytest.mark.parametrize("shape", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_running_stats_match_torch(shape, dtype):
    torch.manual_seed(4)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    ours = _running(shape[1], dtype, "cpu")
    theirs = tuple(t.clone() for t in ours)
    for step in range(3):
        xs = x * (step + 1)
        y = N.batch_norm(xs, *ours, training=True, momentum=0.3)
        y_ref = F.batch_norm(xs, *theirs, training=True, momentum=0.3)
        torch.testing.assert_close(y, y_ref)
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
            assert a.grad_fn is None and not a.requires_grad


# ------------------------------------------------------------------------------- bad input


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_bad_dtypes():
    for op, args in ((N.layer_norm, ((4,),)), (N.rms_norm, ((4,),))):
        _raises(TypeError, "integer/bool dtype", op, torch.ones(2, 4, dtype=torch.int64), *args)
        _raises(TypeError, "complex dtype", op, torch.ones(2, 4, dtype=torch.complex64), *args)
    _raises(TypeError, "integer/bool dtype", N.batch_norm, torch.ones(2, 4, dtype=torch.int32), None, None, training=True)
    _raises(TypeError, "weight has dtype torch.float32, expected the input's dtype torch.float64",
            N.layer_norm, torch.ones(2, 4, dtype=torch.float64), (4,), torch.ones(4))


def test_normalized_shape_mismatch_names_both():
    x = torch.randn(2, 3)
    _raises(ValueError, r"normalized_shape=\[4\].*input of shape \(2, 3\)", N.layer_norm, x, (4,))
    _raises(ValueError, r"normalized_shape=\[2, 2\].*input of shape \(2, 3\)", N.rms_norm, x, (2, 2))
    _raises(ValueError, r"normalized_shape=\[5, 2, 3\]", N.layer_norm, x, (5, 2, 3))
    _raises(ValueError, r"normalized_shape=\[\] must be non-empty", N.layer_norm, x, ())


def test_affine_shape_mismatch():
    x = torch.randn(2, 3)
    _raises(ValueError, r"weight must have shape \(3,\), got \(2,\)", N.layer_norm, x, (3,), torch.ones(2))
    _raises(ValueError, r"bias must have shape \(3,\), got \(3, 1\)", N.layer_norm, x, (3,), None, torch.ones(3, 1))
    _raises(ValueError, r"weight must have shape \(3,\), got \(4,\)", N.rms_norm, x, (3,), torch.ones(4))


def test_batch_norm_errors():
    x = torch.randn(4, 3, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    _raises(ValueError, "running_mean and running_var are required in eval mode", N.batch_norm, x, None, None)
    _raises(ValueError, r"running_mean must have shape \(3,\), got \(2,\)", N.batch_norm, x, torch.zeros(2), rv)
    _raises(ValueError, r"weight must have shape \(3,\), got \(5,\)", N.batch_norm, x, rm, rv, torch.ones(5))
    _raises(ValueError, r"bias must have shape \(3,\), got \(1,\)", N.batch_norm, x, rm, rv, None, torch.ones(1))
    _raises(ValueError, "Expected more than 1 value per channel when training", N.batch_norm,
            torch.randn(1, 3), rm, rv, training=True)
    _raises(ValueError, "Expected more than 1 value per channel when training", N.batch_norm,
            torch.randn(1, 3, 1, 1), None, None, training=True)
    _raises(ValueError, "both running_mean and running_var or neither", N.batch_norm, x, rm, None, training=True)
    _raises(ValueError, "≥ 2 dims", N.batch_norm, torch.randn(3), None, None, training=True)
    _raises(TypeError, "momentum must be a number", N.batch_norm, x, rm, rv, training=True, momentum=None)
    _raises(ValueError, "must not require grad", N.batch_norm, x, rm.requires_grad_(), rv)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), "0.1"])
def test_bad_eps(eps):
    x = torch.randn(4, 3)
    _raises(ValueError, "eps must be a finite number ≥ 0", N.layer_norm, x, (3,), eps=eps)
    _raises(ValueError, "eps must be a finite number ≥ 0", N.rms_norm, x, (3,), eps=eps)
    _raises(ValueError, "eps must be a finite number ≥ 0", N.batch_norm, x, None, None, training=True, eps=eps)
