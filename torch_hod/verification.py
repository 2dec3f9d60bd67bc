"""``verify``: every op, HVP mode and Taylor rule against trustworthy torch references.

Three tables of checks, all by value in float64:

* ops: each torch_hod op through :func:`torch_hod.testing.check_op` (every AD mode up to
  ``order``) against a reference written in plain torch ops;
* HVP: :func:`torch_hod.hvp` in every mode against the dense ``torch.func.hessian`` times ``v``
  on a small model's loss, with plain torch ops and with a ``convert``-ed model;
* Taylor: the jet rules of torch functions (``taylor``, direction-batched and collapsed modes of
  the harness, to order 6) against the reverse-mode derivatives of the same function.

Used by ``python -m torch_hod verify``; each row is a dict (check, order, mode, max_rel, max_abs,
status) so the CLI prints a table.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_hod import ops

Spec = Tuple[Callable[..., Any], Callable[..., Any], Callable[[], Tuple[Any, ...]], Dict[str, Any]]


def _randn(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def _positive(*shape: int) -> Tensor:
    return torch.rand(*shape, dtype=torch.float64) + 0.5


def _layer_norm_reference(x: Tensor, shape: Sequence[int], w: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    dims = tuple(range(-len(shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(dims, keepdim=True) + eps) * w + b


def _rms_norm_reference(x: Tensor, shape: Sequence[int], w: Tensor, eps: float = 1e-6) -> Tensor:
    dims = tuple(range(-len(shape), 0))
    return x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps) * w


def _batch_norm_train_reference(x: Tensor, rm: Any, rv: Any, w: Tensor, b: Tensor, training: bool = True) -> Tensor:
    dims = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    centred = x - x.mean(dims, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(dims, keepdim=True) + 1e-5) * w.reshape(shape) + b.reshape(shape)


def _cross_entropy_reference(z: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    log_p = z - torch.logsumexp(z, dim=1, keepdim=True)
    q = F.one_hot(target, z.shape[1]).to(z.dtype) * (1 - label_smoothing) + label_smoothing / z.shape[1]
    return -(q * log_p).sum(1).mean()


def op_specs() -> Dict[str, Spec]:
    """name → (torch_hod op, plain-torch reference, inputs factory, kwargs)."""
    elementwise = {
        "tanh": (ops.tanh, torch.tanh, _randn), "sigmoid": (ops.sigmoid, torch.sigmoid, _randn),
        "softplus": (ops.softplus, F.softplus, _randn), "silu": (ops.silu, F.silu, _randn),
        "gelu": (ops.gelu, F.gelu, _randn), "elu": (ops.elu, F.elu, _randn),
        "exp": (ops.exp, torch.exp, _randn), "log": (ops.log, torch.log, _positive),
        "log1p": (ops.log1p, torch.log1p, _positive), "sin": (ops.sin, torch.sin, _randn),
        "cos": (ops.cos, torch.cos, _randn), "sqrt": (ops.sqrt, torch.sqrt, _positive),
        "rsqrt": (ops.rsqrt, torch.rsqrt, _positive), "reciprocal": (ops.reciprocal, torch.reciprocal, _positive),
    }
    specs: Dict[str, Spec] = {
        name: (op, ref, (lambda make=make: (make(5),)), {}) for name, (op, ref, make) in elementwise.items()
    }
    target = torch.tensor([0, 2, 1])
    specs.update({
        "gelu(tanh)": (ops.gelu, F.gelu, lambda: (_randn(5),), {"approximate": "tanh"}),
        "pow(2.5)": (ops.pow, torch.pow, lambda: (_positive(5), 2.5), {}),
        "linear": (ops.linear, F.linear, lambda: (_randn(2, 3), _randn(4, 3), _randn(4)), {}),
        "matmul": (ops.matmul, torch.matmul, lambda: (_randn(2, 3, 4), _randn(4, 2)), {}),
        "bmm": (ops.bmm, torch.bmm, lambda: (_randn(2, 3, 4), _randn(2, 4, 2)), {}),
        "softmax": (ops.softmax, F.softmax, lambda: (_randn(2, 4),), {"dim": -1}),
        "log_softmax": (ops.log_softmax, F.log_softmax, lambda: (_randn(2, 4),), {"dim": 1}),
        "logsumexp": (ops.logsumexp, torch.logsumexp, lambda: (_randn(2, 4),), {"dim": -1}),
        "layer_norm": (ops.layer_norm, _layer_norm_reference, lambda: (_randn(2, 4), (4,), _positive(4), _randn(4)), {}),
        "rms_norm": (ops.rms_norm, _rms_norm_reference, lambda: (_randn(2, 4), (4,), _positive(4)), {"eps": 1e-6}),
        "batch_norm(train)": (ops.batch_norm, _batch_norm_train_reference,
                              lambda: (_randn(4, 3), None, None, _positive(3), _randn(3), True), {}),
        "mse_loss": (ops.mse_loss, F.mse_loss, lambda: (_randn(2, 3), _randn(2, 3)), {}),
        "cross_entropy": (ops.cross_entropy, _cross_entropy_reference, lambda: (_randn(3, 4), target),
                          {"label_smoothing": 0.1}),
    })
    return specs


def taylor_specs() -> Dict[str, Tuple[Callable[..., Any], Callable[..., Any], Callable[[], Tuple[Any, ...]]]]:
    """name → (torch function run on jets, reference, inputs factory) for the built-in rule table."""
    conv_weight = _randn(2, 3, 3, 3)
    mat = _randn(4, 3)
    idx = torch.tensor([2, 0])

    def same(fn: Callable, make: Callable) -> Tuple[Callable, Callable, Callable]:
        return fn, fn, make

    return {
        "exp·log·sqrt": same(lambda x: torch.exp(x) * torch.log(x) + torch.sqrt(x) / x, lambda: (_positive(5),)),
        "tanh·sigmoid": same(lambda x: torch.tanh(x) * torch.sigmoid(x), lambda: (_randn(5),)),
        "sin·cos": same(lambda x: torch.sin(x) / (2 + torch.cos(x)), lambda: (_randn(5),)),
        "softplus·gelu·silu·elu": same(lambda x: F.softplus(x) + F.gelu(x) + F.gelu(x, approximate="tanh") + F.silu(x) + F.elu(x),
                                       lambda: (_randn(5),)),
        "pow·rsqrt·reciprocal·erf·log1p": same(lambda x: x**2.5 + torch.rsqrt(x) + 1 / x + torch.erf(x) + torch.log1p(x) + x**x,
                                               lambda: (_positive(5),)),
        "relu·abs·clamp·where·maximum": same(
            lambda x: F.relu(x) * x.abs() + x.clamp(-0.5, 0.5) + torch.where(x > 0, x**2, x) + torch.maximum(x, x**3),
            lambda: (_randn(5),)),
        "matmul·einsum·linear": same(lambda x: torch.einsum("ij,j->i", mat, torch.tanh(x)) @ F.linear(x, mat).sin(),
                                     lambda: (_randn(3),)),
        "conv2d": same(lambda x: torch.tanh(F.conv2d(x, conv_weight, padding=1)).sum((2, 3)), lambda: (_randn(1, 3, 4, 4),)),
        "reductions·views": same(
            lambda x: torch.cat([x.sum(0), x.mean(1), x.T.reshape(-1)[idx], torch.stack([x[0], x[1]]).cumsum(1)[1]]).exp(),
            lambda: (_randn(2, 3),)),
        "softmax·log_softmax·logsumexp": same(
            lambda x: F.softmax(x, -1) * F.log_softmax(x, 0) + torch.logsumexp(x, -1, keepdim=True), lambda: (_randn(2, 4),)),
        "layer_norm·rms_norm": (lambda x: F.layer_norm(x, (4,)) + F.rms_norm(x, (4,), eps=1e-6),
                                lambda x: _layer_norm_reference(x, (4,), 1.0, 0.0) + _rms_norm_reference(x, (4,), 1.0),
                                lambda: (_randn(2, 4),)),
        "mse_loss·cross_entropy": same(lambda x: F.mse_loss(x.sin(), x) + F.cross_entropy(x, torch.tensor([1, 3])),
                                       lambda: (_randn(2, 4),)),
    }


def _mlp(layer_norm: bool) -> nn.Module:
    layers = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.GELU()]
    layers += [nn.LayerNorm(6)] if layer_norm else [nn.Softplus()]
    return nn.Sequential(*layers, nn.Linear(6, 3)).double()


def _row(check: str, order: int, mode: str, max_rel: float, max_abs: float, ok: bool) -> Dict[str, Any]:
    return {"check": check, "order": order, "mode": mode, "max_rel": max_rel, "max_abs": max_abs,
            "status": "pass" if ok else "FAIL"}


def _dense_hessian(loss: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """Column by column with plain double backward (no vmap): the trustworthy reference.

    (``torch.func.hessian``/``jacrev(jacrev)`` of a model with ``F.layer_norm`` are wrong in torch
    2.13: vmap over layer_norm's double backward; measured here.)
    """
    t = theta.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(t), t, create_graph=True)
    return torch.stack([torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(t.numel())])


def _hvp_rows() -> List[Dict[str, Any]]:
    from torch.func import functional_call

    from torch_hod.hvp import hvp
    from torch_hod.nn import convert

    torch.manual_seed(0)
    x, labels = _randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    rows = []
    for label, model in (("plain MLP", _mlp(False)), ("converted MLP with LayerNorm", convert(_mlp(True)))):
        names = [n for n, _ in model.named_parameters()]
        shapes = [p.shape for p in model.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def loss_flat(theta: Tensor, model: nn.Module = model, names: List[str] = names, shapes: List = shapes) -> Tensor:
            chunks = torch.split(theta, [s.numel() for s in shapes])
            params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
            return F.cross_entropy(functional_call(model, params, (x,)), labels)

        v = torch.randn_like(flat)
        expected = _dense_hessian(loss_flat, flat) @ v
        for mode in ("rev-rev", "fwd-rev", "rev-fwd", "auto"):
            _, (got,) = hvp(loss_flat, (flat,), (v,), mode=mode)
            max_abs = (got - expected).abs().max().item()
            max_rel = max_abs / expected.abs().max().item()
            rows.append(_row(f"hvp ({label})", 2, mode, max_rel, max_abs, max_rel <= 1e-10))
    return rows


def _report_rows(check: str, report: Any) -> List[Dict[str, Any]]:
    return [_row(check, r.order, r.mode, r.max_rel, r.max_abs, r.ok) for r in report]


def verify_all(order: int = 4, only: Optional[Sequence[str]] = None, progress: TextIO = sys.stderr) -> List[Dict[str, Any]]:
    """Run every check (or those whose name is in ``only``); rows for a pass/fail table."""
    from torch_hod.testing import check_op

    torch.manual_seed(0)
    rows: List[Dict[str, Any]] = []
    jobs: List[Tuple[str, Callable[[], List[Dict[str, Any]]]]] = []
    for name, (op, reference, make, kwargs) in op_specs().items():
        jobs.append((f"ops.{name}", lambda op=op, reference=reference, make=make, kwargs=kwargs, name=name: _report_rows(
            f"ops.{name}", check_op(op, reference, make(), order=order, kwargs=kwargs, raise_on_failure=False, name=name))))
    taylor_modes = ["taylor", "taylor_directions", "taylor_collapsed", "autograd_of_taylor"]
    for name, (fn, reference, make) in taylor_specs().items():
        jobs.append((f"taylor.{name}", lambda fn=fn, reference=reference, make=make, name=name: _report_rows(
            f"taylor.{name}", check_op(fn, reference, make(), order=max(order, 6), modes=taylor_modes,
                                       raise_on_failure=False, name=name))))
    jobs.append(("hvp", _hvp_rows))
    selected = [(n, job) for n, job in jobs if not only or any(o in n for o in only)]
    if not selected:
        raise ValueError(f"no check name contains any of {list(only or [])}; the checks are {[n for n, _ in jobs]}")
    for index, (name, job) in enumerate(selected, 1):
        print(f"[{index}/{len(selected)}] {name}", file=progress, flush=True)
        try:
            rows += job()
        except Exception as error:  # a crash is a failure of that check, not of the whole run
            rows.append({"check": name, "order": "", "mode": "", "max_rel": None, "max_abs": None,
                         "status": f"ERROR: {type(error).__name__}: {error}"[:200]})
    return rows
