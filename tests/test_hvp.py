"""Hessian-vector products: every mode against dense float64 Hessians built independently."""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_map

import torch_hod
from torch_hod.hvp import MODES, choose_mode, hessian, hvp, hvp_batched, vhp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RTOL = 1e-10


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    scale = expected.abs().max()
    assert scale > 0, "reference is zero: the check could not fail"
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs err {err:.3e}, rel {err / scale:.3e}"


def mlp_loss(params: dict, x: torch.Tensor) -> torch.Tensor:
    """Two-layer net with torch_hod ops; differentiated w.r.t. the parameter dict and the input."""
    h = torch_hod.ops.tanh(x @ params["W1"].T + params["b1"])
    out = torch_hod.ops.softplus(h @ params["W2"].T)
    return (out * torch_hod.ops.sigmoid(x.sum(-1, keepdim=True))).pow(2).mean()


def make(device: str = "cpu", dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    params = {"W1": r(5, 3), "b1": r(5), "W2": r(2, 5)}
    x = r(4, 3)
    tangents = ({k: r(*p.shape) for k, p in params.items()}, r(4, 3))
    return (params, x), tangents


def flat(tree) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_flatten(tree)[0]])


def dense_reference(primals) -> torch.Tensor:
    """torch.func.hessian of the flattened function (forward-over-reverse of the composite)."""
    params, x = primals
    sizes = [p.numel() for p in params.values()] + [x.numel()]

    def f(theta):
        parts = list(torch.split(theta, sizes))
        p = {k: t.reshape(v.shape) for (k, v), t in zip(params.items(), parts)}
        return mlp_loss(p, parts[-1].reshape(x.shape))

    return torch.func.hessian(f)(flat(primals))


def plain_reference(primals) -> torch.Tensor:
    """Reverse-over-reverse Hessian of the same function written in plain torch ops."""
    params, x = primals
    sizes = [p.numel() for p in params.values()] + [x.numel()]

    def f(theta):
        parts = list(torch.split(theta, sizes))
        W1, b1, W2 = (t.reshape(v.shape) for v, t in zip(params.values(), parts))
        xx = parts[-1].reshape(x.shape)
        out = torch.nn.functional.softplus(torch.tanh(xx @ W1.T + b1) @ W2.T)
        return (out * torch.sigmoid(xx.sum(-1, keepdim=True))).pow(2).mean()

    return torch.autograd.functional.hessian(f, flat(primals))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES + ("auto",))
def test_modes_match_dense_hessian_on_pytrees(mode, device):
    primals, tangents = make(device)
    H = dense_reference(primals)
    close(H, plain_reference(primals))  # the two references agree
    value, hv = hvp(mlp_loss, primals, tangents, mode=mode)
    close(value, mlp_loss(*primals))
    assert hv[0].keys() == primals[0].keys() and hv[1].shape == primals[1].shape
    close(flat(hv), H @ flat(tangents))


@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_loop(mode):
    primals, _ = make()
    B = 3
    g = torch.Generator().manual_seed(1)
    batch = tree_map(lambda p: torch.randn(B, *p.shape, generator=g, dtype=p.dtype), tuple(primals))
    _, hv = hvp_batched(mlp_loss, primals, batch, mode=mode)
    H = dense_reference(primals)
    for b in range(B):
        one = tree_map(lambda t: t[b], batch)
        close(flat(tree_map(lambda t: t[b], hv)), flat(hvp(mlp_loss, primals, one, mode=mode)[1]))
        close(flat(tree_map(lambda t: t[b], hv)), H @ flat(one))


class Mul(torch.autograd.Function):
    """A product whose rules are not vmappable (``.item()``): batched paths must fall back to a loop."""

    @staticmethod
    def forward(a, b):
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        unit = 1.0 if g.abs().sum().item() >= 0 else 0.0  # data-dependent: not vmappable
        return g * b * unit, g * a * unit

    @staticmethod
    def jvp(ctx, da, db):
        a, b = ctx.saved_tensors
        unit = 1.0 if da.abs().sum().item() >= 0 else 0.0  # data-dependent: not vmappable
        return (da * b + a * db) * unit


@pytest.mark.parametrize("mode", MODES)
def test_batched_falls_back_to_loop_without_vmap(mode):
    f = lambda x: Mul.apply(x.sin(), x.cos()).pow(2).sum()  # noqa: E731  (= Σ sin²(2x)/4)
    x = torch.randn(4, dtype=torch.float64)
    V = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falling back to a loop"):
        _, (hv,) = hvp(f, (x,), (V,), mode=mode, batched=True)
    expected = (2 * torch.cos(4 * x)) * V  # d²/dx² sin²(2x)/4 = 2 cos(4x)
    close(hv, expected)


def test_has_aux_value_and_aux():
    primals, tangents = make()
    f = lambda p, x: (mlp_loss(p, x), {"h": x.sum()})  # noqa: E731
    for mode in MODES:
        value, hv, aux = hvp(f, primals, tangents, mode=mode, has_aux=True)
        close(value, mlp_loss(*primals))
        close(aux["h"], primals[1].sum())
        close(flat(hv), dense_reference(primals) @ flat(tangents))


def test_vhp_conventions():
    x = torch.randn(5, dtype=torch.float64)
    v = torch.randn(5, dtype=torch.float64)
    f = lambda x: torch_hod.ops.tanh(x).pow(3).sum()  # noqa: E731
    value, out = vhp(f, x, v)
    ref_value, ref = torch.autograd.functional.vhp(f, x, v)
    assert isinstance(out, torch.Tensor) and not out.requires_grad
    close(value, ref_value)
    close(out, ref)
    y = torch.randn(3, dtype=torch.float64)
    g = lambda a, b: (torch_hod.ops.sin(a).sum() * torch_hod.ops.exp(b).sum())  # noqa: E731
    vs = (v, torch.randn(3, dtype=torch.float64))
    _, outs = vhp(g, (x, y), vs, mode="fwd-rev")
    _, refs = torch.autograd.functional.vhp(g, (x, y), vs)
    assert isinstance(outs, tuple) and len(outs) == 2
    close(torch.cat(outs), torch.cat(refs))


@pytest.mark.parametrize("mode", MODES)
def test_dense_hessian(mode):
    primals, _ = make()
    close(hessian(mlp_loss, primals, mode=mode), dense_reference(primals))


@pytest.mark.parametrize("mode", MODES)
def test_differentiable_wrt_outer_parameters(mode):
    """Hv for f(x) = w · Σ x⁴ is 12 w x² v; its gradient w.r.t. w is 12 x² v."""
    w = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    x, v = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    _, (hv,) = hvp(lambda x: w * torch_hod.ops.pow(x, 4).sum(), (x,), (v,), mode=mode, create_graph=True)
    close(hv.detach(), 12 * 1.7 * x**2 * v)
    (gw,) = torch.autograd.grad(hv.sum(), w)
    close(gw, (12 * x**2 * v).sum())


def test_rev_rev_differentiable_wrt_primals():
    """d/dx Σ (Hv) for f = Σ x⁴: Σ 12 x² v → 24 x v (third derivative through the double backward)."""
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64)
    _, (hv,) = hvp(lambda x: x.pow(4).sum(), (x,), (v,), mode="rev-rev")
    (gx,) = torch.autograd.grad(hv.sum(), x)
    close(gx, 24 * x.detach() * v)


def test_auto_inside_torch_func_transform():
    primals, _ = make()
    H = dense_reference(primals)
    V = torch.randn(3, H.shape[0], dtype=torch.float64)
    sizes = [p.numel() for p in primals[0].values()]

    def one(vec):
        parts = torch.split(vec, sizes + [primals[1].numel()])
        t = ({k: c.reshape(p.shape) for (k, p), c in zip(primals[0].items(), parts)}, parts[-1].reshape(primals[1].shape))
        assert choose_mode(primals) == "fwd-rev"  # autograd.grad cannot run under vmap
        return flat(hvp(mlp_loss, primals, t)[1])

    close(torch.func.vmap(one)(V), V @ H)
    assert choose_mode(primals) == "rev-rev"


@pytest.mark.parametrize("mode", MODES)
def test_float32(mode):
    primals, tangents = make(dtype=torch.float32)
    value, hv = hvp(mlp_loss, primals, tangents, mode=mode)
    assert value.dtype == torch.float32 and hv[1].dtype == torch.float32
    p64, t64 = make()
    close(flat(hv).double(), dense_reference(p64) @ flat(t64), rtol=1e-5)


def test_zero_hessian_of_linear_function():
    x, v = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    for mode in MODES:
        for f in (lambda x: (2 * x).sum(), lambda x: torch.ones((), dtype=x.dtype)):
            _, (hv,) = hvp(f, (x,), (v,), mode=mode)
            assert torch.equal(hv, torch.zeros_like(v))


def test_errors_are_specific():
    primals, tangents = make()
    params, x = primals
    bad = ({k: t for k, t in tangents[0].items() if k != "b1"}, tangents[1])
    with pytest.raises(ValueError, match="pytree structure"):
        hvp(mlp_loss, primals, bad)
    bad = ({**tangents[0], "W2": torch.zeros(5, 2, dtype=torch.float64)}, tangents[1])
    with pytest.raises(ValueError, match=r"tangents\[0\]\['W2'\] has shape \(5, 2\), expected \(2, 5\)"):
        hvp(mlp_loss, primals, bad)
    with pytest.raises(TypeError, match=r"tangents\[1\] has dtype torch.float32, expected torch.float64"):
        hvp(mlp_loss, primals, (tangents[0], tangents[1].float()))
    with pytest.raises(ValueError, match=r"tangents\[1\] is on meta, expected cpu"):
        hvp(mlp_loss, primals, (tangents[0], tangents[1].to("meta")))
    with pytest.raises(ValueError, match=r"tangents\[0\]\['W1'\] has shape \(5, 3\), expected \(B, \*\(5, 3\)\)"):
        hvp(mlp_loss, primals, tangents, batched=True)
    with pytest.raises(ValueError, match=r"scalar tensor \(shape \(\)\), got a tensor of shape \(4, 3\)"):
        hvp(lambda p, x: x * 2, primals, tangents)
    with pytest.raises(TypeError, match=r"primals\[0\] has dtype torch.int64.*floating-point"):
        hvp(lambda n: n.sum(), (torch.arange(3),), (torch.arange(3),))
    with pytest.raises(ValueError, match="unknown mode 'fwd-fwd'; valid modes are 'auto', 'rev-rev', 'fwd-rev', 'rev-fwd'"):
        hvp(mlp_loss, primals, tangents, mode="fwd-fwd")
    with pytest.raises(TypeError, match=r"primals must be a tuple.*\(x,\)"):
        hvp(lambda x: x.sum(), x, x)
    with pytest.raises(TypeError, match=r"has_aux=True, func must return \(scalar, aux\)"):
        hvp(mlp_loss, primals, tangents, has_aux=True)


@pytest.mark.parametrize("mode", MODES)
def test_layer_norm_op_in_every_mode(mode):
    """torch_hod.ops.layer_norm is right in every mode (the built-in is wrong under rev-fwd)."""
    g = torch.Generator().manual_seed(3)
    x, w, b, c = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4, 6), (6,), (6,), (4, 6)))

    def composite(x, w, b):
        m = x.mean(-1, keepdim=True)
        var = ((x - m) ** 2).mean(-1, keepdim=True)
        return (((x - m) / torch.sqrt(var + 1e-5) * w + b) * c).pow(3).sum()

    f = lambda x, w, b: (torch_hod.ops.layer_norm(x, (6,), w, b) * c).pow(3).sum()  # noqa: E731
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b))
    _, hv = hvp(f, (x, w, b), tangents, mode=mode)
    _, ref = torch.autograd.functional.hvp(composite, (x, w, b), tangents)
    close(torch.cat([h.reshape(-1) for h in hv]), torch.cat([r.reshape(-1) for r in ref]))


def test_hessian_of_empty_primals_is_rejected():
    with pytest.raises(ValueError, match="no elements"):
        torch_hod.hessian(lambda x: x.sum(), (torch.zeros(0, dtype=torch.float64),))
