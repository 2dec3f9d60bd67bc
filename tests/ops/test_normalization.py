"""Normalisation ops: derivatives of every order in every AD mode, running stats, bad input.

References are the mean/var composites of elementary ops (the ops' own Taylor rules), differentiated
by plain reverse mode (reverse^k), never torch.func's nested jvp of F.layer_norm / training-mode
F.batch_norm (wrong, see FACTS). Forward values and first derivatives are also compared with the
torch built-ins.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch_hod.ops import normalization as N
from torch_hod.testing import check_op, tolerances


# ------------------------------------------------------------------------------ layer_norm
# float64 to order 4 at rtol 1e-10; float32 to order 2 at the harness's float32 tolerances, against
# the float64 reference. The inputs are (x, γ, β): every derivative mixes all three.

PRECISIONS = [(torch.float64, 4), (torch.float32, 2)]
TRAILING = [((3, 4, 5), (5,)), ((2, 3, 4), (3, 4))]


def _params(shape, affine: bool, dtype, device, bias: bool = True) -> list:
    if not affine:
        return [None, None] if bias else [None]
    w = torch.randn(shape, dtype=dtype, device=device) + 1.5
    return [w, torch.randn(shape, dtype=dtype, device=device)] if bias else [w]


def _check(op, ref, inputs, dtype, order, argnums, **kwargs):
    """check_op w.r.t. the inputs at ``argnums`` that are not None (input, weight, bias)."""
    rtol, atol = tolerances(dtype)
    argnums = tuple(i for i in argnums if inputs[i] is not None)
    check_op(op, ref, inputs, order=order, rtol=rtol, atol=atol, kwargs=kwargs, argnums=argnums)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,normalized", TRAILING)
@pytest.mark.parametrize("dtype,order", PRECISIONS)
def test_layer_norm_derivatives(shape, normalized, affine, dtype, order, device):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device)
    inputs = (x, normalized, *_params(normalized, affine, dtype, device))
    _check(N.layer_norm, N._layer_norm_composite, inputs, dtype, order, (0, 2, 3), eps=1e-3)
    torch.testing.assert_close(N.layer_norm(*inputs), F.layer_norm(*inputs))


# -------------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,normalized", TRAILING)
@pytest.mark.parametrize("dtype,order", PRECISIONS)
def test_rms_norm_derivatives(shape, normalized, affine, dtype, order, device):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device)
    inputs = (x, normalized, *_params(normalized, affine, dtype, device, bias=False))
    _check(N.rms_norm, N._rms_norm_composite, inputs, dtype, order, (0, 2), eps=1e-3)
    torch.testing.assert_close(N.rms_norm(*inputs, eps=1e-3), F.rms_norm(*inputs, eps=1e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_default_eps_is_finfo_eps(dtype):
    x = torch.randn(3, 5, dtype=dtype) * 1e-4  # small enough that eps matters
    torch.testing.assert_close(N.rms_norm(x, (5,)), F.rms_norm(x, (5,)))
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(dtype).eps)
    torch.testing.assert_close(N.rms_norm(x, (5,)), expected)


# ------------------------------------------------------------------------------ batch_norm

BATCH_SHAPES = [(6, 3), (3, 2, 2, 3)]


def _running(c, dtype, device):
    return torch.randn(c, dtype=dtype, device=device), torch.rand(c, dtype=dtype, device=device) + 0.5


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", BATCH_SHAPES)
@pytest.mark.parametrize("dtype,order", PRECISIONS)
def test_batch_norm_derivatives(shape, affine, training, dtype, order, device):
    """Training without running stats (the harness vmaps; in-place updates cannot be vmapped);
    eval is affine in x and in γ, so its derivatives of order > 2 vanish identically."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device)
    stats = (None, None) if training else _running(shape[1], dtype, device)
    inputs = (x, *stats, *_params((shape[1],), affine, dtype, device), training)
    order = order if training else min(order, 2)  # eval: bilinear in (x, γ), higher orders are 0
    _check(N.batch_norm, N._batch_norm_composite, inputs, dtype, order, (0, 3, 4), eps=1e-3)
    torch.testing.assert_close(N.batch_norm(*inputs), F.batch_norm(*inputs))


@pytest.mark.parametrize("shape", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_running_stats_match_torch(shape, dtype, device):
    torch.manual_seed(4)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    ours = _running(shape[1], dtype, device)
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
    _raises(TypeError, "integer/bool dtype", N.batch_norm, torch.ones(2, 4, dtype=torch.int32), None, None,
            training=True)
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
    channel = r"must have shape \(3,\) \(one entry per channel of the input \(4, 3, 2\)\), got "
    _raises(ValueError, "running_mean " + channel + r"\(2,\)", N.batch_norm, x, torch.zeros(2), rv)
    _raises(ValueError, "weight " + channel + r"\(5,\)", N.batch_norm, x, rm, rv, torch.ones(5))
    _raises(ValueError, "bias " + channel + r"\(1,\)", N.batch_norm, x, rm, rv, None, torch.ones(1))
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


# ------------------------------------------------------------------------------ Taylor mode


def _jet_reference(ref, x, v, u, K):
    """``<u, d^k/dt^k ref(x + t v)>`` at t = 0 for k = 1..K, by reverse^k of the composite."""
    t = torch.zeros((), dtype=x.dtype, requires_grad=True)
    s, out = (ref(x + t * v) * u).sum(), []
    for _ in range(K):
        (s,) = torch.autograd.grad(s, t, create_graph=True)
        out.append(s)
    return out


TAYLOR_CASES = [
    ("layer_norm", lambda x, w, b: N.layer_norm(x, (4,), w, b), lambda x, w, b: N._layer_norm_composite(x, (4,), w, b)),
    ("rms_norm", lambda x, w, b: N.rms_norm(x, (4,), w), lambda x, w, b: N._rms_norm_composite(x, (4,), w)),
    ("batch_norm", lambda x, w, b: N.batch_norm(x.transpose(1, 2), None, None, w, b, True),
     lambda x, w, b: N._batch_norm_composite(x.transpose(1, 2), None, None, w, b, True)),
]


@pytest.mark.parametrize("name,op,ref", TAYLOR_CASES, ids=[c[0] for c in TAYLOR_CASES])
def test_taylor_rule_matches_reverse_derivatives(name, op, ref):
    """jet of the op (K = 4, R = 2 directions) vs reverse^k of the composite; and parameter
    gradients through the jet (``.backward()``) vs those of the reference."""
    from torch_hod.taylor import jet

    torch.manual_seed(5)
    d, K = torch.float64, 4
    x = torch.randn(3, 2, 4, dtype=d)
    w, b = (torch.randn(4, dtype=d, requires_grad=True) for _ in range(2))
    V = torch.randn(2, 3, 2, 4, dtype=d)
    U = torch.randn(3, 2, 4, dtype=d)
    U = U.transpose(1, 2) if name == "batch_norm" else U  # the op's output layout
    y0, ys = jet(lambda x: op(x, w, b), (x,), [[V] + [torch.zeros_like(V)] * (K - 1)])
    torch.testing.assert_close(y0, ref(x, w, b).detach(), rtol=1e-12, atol=1e-12)
    for r in range(2):
        expected = _jet_reference(lambda x: ref(x, w, b), x, V[r], U, K)
        for k in range(K):
            assert expected[k].abs() > 1e-6
            torch.testing.assert_close((ys[k][r] * U).sum(), expected[k], rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{name}: order {k + 1}: {m}")
    # d/dγ of the second directional derivative (β drops out), through the jet and the reference
    (got,) = torch.autograd.grad((ys[1] * U).sum(), w)
    second = sum(_jet_reference(lambda x: ref(x, w, b), x, V[r], U, 2)[1] for r in range(2))
    (expected,) = torch.autograd.grad(second, w)
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_taylor_collapsed_laplacian_of_layer_norm():
    """collapse=True with directions e_i and a zero 2nd coefficient: Σ_i ∂²y/∂x_i², vs the uncollapsed sum."""
    from torch_hod.taylor import jet

    torch.manual_seed(6)
    x = torch.randn(2, 5, dtype=torch.float64)
    E = torch.eye(10, dtype=torch.float64).reshape(10, 2, 5)
    f = lambda x: N.layer_norm(x, (5,))  # noqa: E731
    _, (_, lap) = jet(f, (x,), [[E, torch.zeros_like(x)]], collapse=True)
    _, (_, per_direction) = jet(f, (x,), [[E, torch.zeros_like(E)]])
    assert per_direction.abs().max() > 1e-6
    torch.testing.assert_close(lap, per_direction.sum(0), rtol=1e-10, atol=1e-12)


def test_taylor_batch_norm_updates_running_stats_from_the_primal():
    from torch_hod.taylor import jet

    torch.manual_seed(7)
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    ours = _running(3, torch.float64, "cpu")
    theirs = tuple(t.clone() for t in ours)
    jet(lambda x: N.batch_norm(x, *ours, training=True, momentum=0.2), (x,), [[torch.randn_like(x)]])
    F.batch_norm(x, *theirs, training=True, momentum=0.2)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=0)


def test_taylor_rule_validates_like_the_op():
    from torch_hod.taylor import jet

    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"normalized_shape=\[4\].*input of shape \(2, 3\)"):
        jet(lambda x: N.layer_norm(x, (4,)), (x,), [[torch.ones_like(x)]])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        jet(lambda x: N.batch_norm(x[:1], None, None, training=True), (x,), [[torch.ones_like(x)]])


# ------------------------------------------------- first order (ATen's fused kernels) vs torch

FIRST_ORDER = {  # (op, torch built-in, parameter shape) called as f(x, (running_mean, running_var), *params)
    "layer_norm": (lambda x, s, *p: N.layer_norm(x, (4, 5), *p), lambda x, s, *p: F.layer_norm(x, (4, 5), *p), (4, 5)),
    "rms_norm": (lambda x, s, *p: N.rms_norm(x, (5,), *p[:1]), lambda x, s, *p: F.rms_norm(x, (5,), *p[:1]), (5,)),
    "batch_norm_train": (lambda x, s, *p: N.batch_norm(x, None, None, *p, training=True),
                         lambda x, s, *p: F.batch_norm(x, None, None, *p, training=True), (4,)),
    "batch_norm_eval": (lambda x, s, *p: N.batch_norm(x, *s, *p), lambda x, s, *p: F.batch_norm(x, *s, *p), (4,)),
}


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name", FIRST_ORDER)
def test_first_order_matches_builtin(name, affine, device):
    """Plain ``.backward``-style gradients (the fused path) and batched cotangents
    (``is_grads_batched``, the fused path under vmap) equal torch's own gradients."""
    op, builtin, pshape = FIRST_ORDER[name]
    torch.manual_seed(8)
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(3, 4, 5, **opts, requires_grad=True)
    stats = (torch.randn(4, **opts), torch.rand(4, **opts) + 0.5)
    params = [torch.randn(pshape, **opts, requires_grad=True) for _ in range(2 if affine else 0)]
    params = params[:1] if name == "rms_norm" else params
    G = torch.randn(2, 3, 4, 5, **opts)
    inputs = (x, *params)
    ours = torch.autograd.grad(op(x, stats, *params), inputs, G[0])
    batched = torch.autograd.grad(op(x, stats, *params), inputs, G, is_grads_batched=True)
    theirs = [torch.autograd.grad(builtin(x, stats, *params), inputs, g) for g in G]
    for i in range(len(inputs)):
        assert theirs[0][i].abs().max() > 1e-6
        torch.testing.assert_close(ours[i], theirs[0][i], rtol=1e-10, atol=1e-12)
        for r in range(2):
            torch.testing.assert_close(batched[i][r], theirs[r][i], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transform", ["grad", "grad∘grad", "jvp", "hessian"])
def test_batch_norm_running_stats_under_torch_func(transform):
    """torch.func transforms see the running stats updated once, from the primal, as torch does
    (the op unwraps functorch levels; pinned here because it uses torch._C._functorch)."""
    torch.manual_seed(9)
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    ours = _running(3, torch.float64, "cpu")
    theirs = tuple(t.clone() for t in ours)
    f = lambda x: N.batch_norm(x, *ours, training=True).pow(3).sum()  # noqa: E731
    run = {"grad": lambda: torch.func.grad(f)(x),
           "grad∘grad": lambda: torch.func.grad(lambda y: torch.func.grad(f)(y).pow(2).sum())(x),
           "jvp": lambda: torch.func.jvp(f, (x,), (x,)), "hessian": lambda: torch.func.hessian(f)(x)}
    run[transform]()
    F.batch_norm(x, *theirs, training=True)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=0)


def test_batch_norm_running_stats_refused_under_vmap():
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    rm, rv = _running(3, torch.float64, "cpu")
    before = (rm.clone(), rv.clone())
    with pytest.raises(RuntimeError, match="cannot be updated in place under vmap"):
        torch.func.vmap(lambda x: N.batch_norm(x, rm, rv, training=True))(x)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
