"""Ops benchmark: torch_hod ops and converted models vs the torch built-ins, ratios from one run.

For every op at a realistic size (4096×1024 float32; ``--quick``: 1024×256) it measures
forward+backward time, double-backward time (an HVP ``∂/∂x ⟨∂/∂x ⟨w, f(x)⟩, v⟩``) and the peak
memory of the double backward; then the same for a small MLP and a transformer-style block
converted with ``torch_hod.nn.convert``. Ratios are torch_hod / built-in (< 1 means torch_hod is
faster or smaller).

    python benchmarks/bench_ops.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import torch_hod
from torch_hod import ops
from torch_hod.benchmark import machine_description, markdown_table, measure_time, peak_memory

Case = Tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], Callable[[], Tuple[Any, ...]]]


def _cases(n: int, d: int, device: str) -> Dict[str, Case]:
    """name → (torch_hod op, built-in, make arguments); every argument is differentiated."""

    def x() -> torch.Tensor:
        return torch.randn(n, d, device=device)

    labels = torch.randint(0, d, (n,), device=device)
    weight, bias = torch.randn(d, d, device=device) / d**0.5, torch.randn(d, device=device)
    gamma, beta = torch.rand(d, device=device) + 0.5, torch.randn(d, device=device)
    target = torch.randn(n, d, device=device)
    return {
        "tanh": (ops.tanh, torch.tanh, lambda: (x(),)),
        "sigmoid": (ops.sigmoid, torch.sigmoid, lambda: (x(),)),
        "softplus": (ops.softplus, F.softplus, lambda: (x(),)),
        "gelu": (ops.gelu, F.gelu, lambda: (x(),)),
        "gelu(tanh)": (lambda t: ops.gelu(t, approximate="tanh"), lambda t: F.gelu(t, approximate="tanh"), lambda: (x(),)),
        "silu": (ops.silu, F.silu, lambda: (x(),)),
        "elu": (ops.elu, F.elu, lambda: (x(),)),
        "exp": (ops.exp, torch.exp, lambda: (x(),)),
        "log": (ops.log, torch.log, lambda: (x().abs() + 0.1,)),
        "sin": (ops.sin, torch.sin, lambda: (x(),)),
        "sqrt": (ops.sqrt, torch.sqrt, lambda: (x().abs() + 0.1,)),
        "pow(1.5)": (lambda t: ops.pow(t, 1.5), lambda t: torch.pow(t, 1.5), lambda: (x().abs() + 0.1,)),
        "linear": (lambda t, W: ops.linear(t, W, bias), lambda t, W: F.linear(t, W, bias), lambda: (x(), weight)),
        "softmax": (lambda t: ops.softmax(t, -1), lambda t: F.softmax(t, -1), lambda: (x(),)),
        "log_softmax": (lambda t: ops.log_softmax(t, -1), lambda t: F.log_softmax(t, -1), lambda: (x(),)),
        "logsumexp": (lambda t: ops.logsumexp(t, -1), lambda t: torch.logsumexp(t, -1), lambda: (x(),)),
        "layer_norm": (lambda t: ops.layer_norm(t, (d,), gamma, beta), lambda t: F.layer_norm(t, (d,), gamma, beta), lambda: (x(),)),
        "rms_norm": (lambda t: ops.rms_norm(t, (d,), gamma), lambda t: F.rms_norm(t, (d,), gamma), lambda: (x(),)),
        "batch_norm(train)": (lambda t: ops.batch_norm(t, None, None, gamma, beta, True),
                              lambda t: F.batch_norm(t, None, None, gamma, beta, True), lambda: (x(),)),
        "mse_loss": (lambda t: ops.mse_loss(t, target), lambda t: F.mse_loss(t, target), lambda: (x(),)),
        "cross_entropy": (lambda t: ops.cross_entropy(t, labels), lambda t: F.cross_entropy(t, labels), lambda: (x(),)),
    }


def _forward_backward(fn: Callable, args: Tuple[Any, ...], w: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        xs = [a.detach().requires_grad_() for a in args]
        (fn(*xs) * w).sum().backward()

    return run


def _double_backward(fn: Callable, args: Tuple[Any, ...], w: torch.Tensor, vs: List[torch.Tensor]) -> Callable[[], None]:
    """An HVP of ``⟨w, f(args)⟩`` w.r.t. all arguments, by double backward."""

    def run() -> None:
        xs = [a.detach().requires_grad_() for a in args]
        grads = torch.autograd.grad((fn(*xs) * w).sum(), xs, create_graph=True)
        torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), xs)

    return run


def bench_ops(quick: bool, device: str) -> List[Dict[str, Any]]:
    n, d = (512, 128) if quick else (4096, 1024)
    repeats = 3 if quick else 7
    rows = []
    for name, (ours, builtin, make) in _cases(n, d, device).items():
        args = make()
        w = torch.randn_like(builtin(*args))
        v = [torch.randn_like(a) for a in args]
        row: Dict[str, Any] = {"op": name, "shape": f"{n}x{d}"}
        for label, impl in (("hod", ours), ("torch", builtin)):
            row[f"fb_{label}"] = measure_time(_forward_backward(impl, args, w), repeats=repeats, device=device).median
            row[f"dbl_{label}"] = measure_time(_double_backward(impl, args, w, v), repeats=repeats, device=device).median
            row[f"mem_{label}"] = peak_memory(_double_backward(impl, args, w, v), device=device)
        row["fwd+bwd ratio"] = row["fb_hod"] / row["fb_torch"]
        row["double-bwd ratio"] = row["dbl_hod"] / row["dbl_torch"]
        row["HVP memory ratio"] = row["mem_hod"] / max(row["mem_torch"], 1)
        rows.append(row)
    return rows


class TransformerBlock(nn.Module):
    """Pre-norm block: LayerNorm → attention (nn.Softmax) → LayerNorm → GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.softmax = nn.Softmax(dim=-1)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = d // self.heads
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, h).permute(2, 0, 3, 1, 4)
        attention = self.softmax(q @ k.transpose(-1, -2) / h**0.5)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


def _models(quick: bool, device: str) -> Dict[str, Tuple[nn.Module, torch.Tensor, Callable]]:
    batch = 128 if quick else 512
    mlp = nn.Sequential(nn.Linear(128, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    labels = torch.randint(0, 10, (batch,), device=device)
    block = TransformerBlock(64 if quick else 128, 4)
    tokens = torch.randn(8 if quick else 32, 32 if quick else 64, 64 if quick else 128, device=device)
    return {
        "MLP 128-512-512-10 + CE": (mlp.to(device), torch.randn(batch, 128, device=device),
                                    lambda out: F.cross_entropy(out, labels)),
        "transformer block": (block.to(device), tokens, lambda out: out.square().mean()),
    }


def bench_models(quick: bool, device: str) -> List[Dict[str, Any]]:
    repeats = 3 if quick else 7
    rows = []
    for name, (model, x, loss_fn) in _models(quick, device).items():
        converted = torch_hod.nn.convert(copy.deepcopy(model))
        row: Dict[str, Any] = {"model": name}
        for label, m in (("hod", converted), ("torch", model)):
            params = [p for p in m.parameters()]
            vs = [torch.randn_like(p) for p in params]

            def fb(m: nn.Module = m) -> None:
                loss_fn(m(x)).backward()

            def hvp(m: nn.Module = m, params: List = params, vs: List = vs) -> None:
                grads = torch.autograd.grad(loss_fn(m(x)), params, create_graph=True)
                torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params)

            row[f"fb_{label}"] = measure_time(fb, repeats=repeats, device=device).median
            row[f"hvp_{label}"] = measure_time(hvp, repeats=repeats, device=device).median
            row[f"mem_{label}"] = peak_memory(hvp, device=device)
            m.zero_grad(set_to_none=True)
        row["fwd+bwd ratio"] = row["fb_hod"] / row["fb_torch"]
        row["HVP time ratio"] = row["hvp_hod"] / row["hvp_torch"]
        row["HVP memory ratio"] = row["mem_hod"] / max(row["mem_torch"], 1)
        rows.append(row)
    return rows


def run(quick: bool = False, device: str = "cpu") -> Dict[str, List[Dict[str, Any]]]:
    """All measurements of this benchmark, as lists of row dicts (times in s, memory in bytes)."""
    torch.manual_seed(0)
    return {"ops": bench_ops(quick, device), "models": bench_models(quick, device)}


OP_COLUMNS = ["op", "shape", "fwd+bwd ratio", "double-bwd ratio", "HVP memory ratio", "fb_torch", "dbl_torch", "mem_torch"]
MODEL_COLUMNS = ["model", "fwd+bwd ratio", "HVP time ratio", "HVP memory ratio", "fb_torch", "hvp_torch", "mem_torch"]


def report(results: Dict[str, List[Dict[str, Any]]], device: str) -> str:
    return "\n\n".join([
        "## Ops: torch_hod vs built-in (ratios torch_hod / built-in; times in s, memory in bytes)",
        markdown_table(results["ops"], OP_COLUMNS),
        "Models converted with torch_hod.nn.convert vs torch.nn",
        markdown_table(results["models"], MODEL_COLUMNS),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"Machine: {machine_description(args.device)}\n")
    print(report(run(args.quick, args.device), args.device))


if __name__ == "__main__":
    main()
