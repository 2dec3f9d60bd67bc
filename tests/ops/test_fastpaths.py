"""The fused first-order backward paths (ATen kernels used only when nothing differentiates the
backward's result) give the built-ins' gradients, and fall back to the differentiable composites
under a forward-mode tangent or ``create_graph=True`` (checked by value against the built-ins'
reverse-over-reverse, a trustworthy reference for these ops)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from torch_hod import ops
from torch_hod.ops import normalization as N

S = importlib.import_module("torch_hod.ops.softmax")  # (torch_hod.ops.softmax is also the op)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# name → (torch_hod op, built-in), both called as f(x, gamma, beta)
CASES = {
    "layer_norm": (lambda x, g, b: ops.layer_norm(x, (5,), g, b), lambda x, g, b: F.layer_norm(x, (5,), g, b)),
    "batch_norm_train": (lambda x, g, b: ops.batch_norm(x.transpose(1, 2), None, None, g, b, True),
                         lambda x, g, b: F.batch_norm(x.transpose(1, 2), None, None, g, b, True)),
    "log_softmax": (lambda x, g, b: ops.log_softmax(x * g + b, -1), lambda x, g, b: F.log_softmax(x * g + b, -1)),
    "cross_entropy": (lambda x, g, b: ops.cross_entropy((x * g + b).transpose(1, 2), _target(x)),
                      lambda x, g, b: F.cross_entropy((x * g + b).transpose(1, 2), _target(x))),
}


def _target(x: torch.Tensor) -> torch.Tensor:
    """Class indices in [0, 5) for logits of shape (3, 5, 4) (the transposed x)."""
    return torch.tensor([[0, 4, 2, 1], [3, 3, 0, 4], [1, 2, 4, 0]], device=x.device)


def _inputs(device: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(3)
    x = torch.randn(3, 4, 5, dtype=dtype, device=device, requires_grad=True)
    g = (torch.rand(5, dtype=dtype, device=device) + 0.5).requires_grad_()
    b = torch.randn(5, dtype=dtype, device=device, requires_grad=True)
    return x, g, b


def _weights(y: torch.Tensor) -> torch.Tensor:
    return torch.randn(y.shape, dtype=y.dtype, device=y.device, generator=torch.Generator(y.device).manual_seed(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_first_order_equals_builtin(name, device, dtype):
    op, builtin = CASES[name]
    inputs = _inputs(device, dtype)
    y = op(*inputs)
    w = _weights(y)
    ours = torch.autograd.grad((op(*inputs) * w).sum(), inputs)
    theirs = torch.autograd.grad((builtin(*inputs) * w).sum(), inputs)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, e in zip(ours, theirs):
        assert e.abs().max() > 1e-3
        torch.testing.assert_close(a, e, **tol)


def _reference_hvp(builtin, inputs, w, v):
    """Reverse-over-reverse of the built-in: d/dθ ⟨∇⟨w, f⟩, v⟩."""
    grads = torch.autograd.grad((builtin(*inputs) * w).sum(), inputs, create_graph=True)
    return torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, v)), inputs, allow_unused=True,
                               materialize_grads=True)


@pytest.mark.parametrize("name", CASES)
def test_falls_back_under_create_graph_and_forward_tangent(name):
    """With create_graph=True or a forward-mode tangent on the inputs, the backward must be the
    differentiable composite: the second derivatives (reverse-over-reverse and forward-over-reverse)
    equal the built-in's reverse-over-reverse (the fused kernels would give wrong or no derivatives;
    ATen's native_*_backward and _log_softmax_backward_data have incomplete forward AD)."""
    op, builtin = CASES[name]
    inputs = _inputs("cpu")
    w = _weights(op(*inputs))
    v = [torch.randn_like(t) for t in inputs]
    expected = _reference_hvp(builtin, inputs, w, v)
    got_rr = _reference_hvp(op, inputs, w, v)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in zip(inputs, v)]
        grads = torch.autograd.grad((op(*duals) * w).sum(), duals)
        got_fr = [fwAD.unpack_dual(g).tangent for g in grads]
    assert expected[0].abs().max() > 1e-3  # the second derivative in x is never zero here
    for e, rr, fr in zip(expected, got_rr, got_fr):
        fr = torch.zeros_like(e) if fr is None else fr
        torch.testing.assert_close(rr, e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fr, e, rtol=1e-10, atol=1e-12)


def test_fused_paths_are_taken_when_nothing_differentiates(monkeypatch):
    """A plain backward calls ATen's fused kernels (the speed-up is not silently lost); create_graph
    does not."""
    calls = []
    watched = ("native_layer_norm_backward", "native_batch_norm_backward", "_log_softmax_backward_data")

    class Spy:
        def __getattr__(self, name):
            kernel = getattr(torch.ops.aten, name)
            return (lambda *a: calls.append(name) or kernel(*a)) if name in watched else kernel

    monkeypatch.setattr(N, "aten", Spy())
    monkeypatch.setattr(S, "aten", Spy())
    x, g, b = _inputs("cpu")
    for op, _ in CASES.values():
        (op(x, g, b) ** 2).sum().backward()
    assert set(watched) <= set(calls)
    calls.clear()
    for op, _ in CASES.values():
        torch.autograd.grad((op(x, g, b) ** 2).sum(), (x, g, b), create_graph=True)
    assert calls == []


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_fused_path_weights_ignore_index(reduction, device):
    """Index targets with class weights and ignored samples: the fused first-order gradient equals
    the built-in's w.r.t. the logits, and the weight gradient equals reverse mode of a composite of
    elementary ops (torch's cross_entropy has no weight gradient)."""
    torch.manual_seed(4)
    opts = dict(dtype=torch.float64, device=device)
    z = torch.randn(6, 5, 3, **opts, requires_grad=True)
    w = (torch.rand(5, **opts) + 0.5).requires_grad_()
    t = torch.randint(0, 5, (6, 3), device=device)
    t[0, 1] = t[3, 2] = -100
    G = torch.randn(6, 3, **opts) if reduction == "none" else torch.tensor(1.7, **opts)

    def composite(z, w):
        valid = t != -100
        tt = t.where(valid, 0)
        w_t = w[tt] * valid
        loss = -w_t * torch.log_softmax(z, 1).gather(1, tt.unsqueeze(1)).squeeze(1)
        return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / w_t.sum()}[reduction]

    gz, gw = torch.autograd.grad(ops.cross_entropy(z, t, w, reduction=reduction), (z, w), G)
    (gz_ref,) = torch.autograd.grad(F.cross_entropy(z, t, w.detach(), reduction=reduction), z, G)
    gw_ref = torch.autograd.grad(composite(z, w), w, G)[0]
    for got, ref in ((gz, gz_ref), (gw, gw_ref)):
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_cross_entropy_fused_path_is_taken(monkeypatch):
    """A plain backward of cross_entropy skips the differentiable ScaledSoftmaxFunction; create_graph
    uses it."""
    import sys

    CE = sys.modules["torch_hod.ops.cross_entropy"]
    calls = []

    class Spy:
        @staticmethod
        def apply(*args):
            calls.append(1)
            return S.ScaledSoftmaxFunction.apply(*args)

    monkeypatch.setattr(CE, "ScaledSoftmaxFunction", Spy)
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 4, 1])
    ops.cross_entropy(z, t).backward()
    assert calls == []
    torch.autograd.grad(ops.cross_entropy(z, t), z, create_graph=True)
    assert calls == [1]
