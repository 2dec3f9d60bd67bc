"""HVP benchmark: time and peak memory of one Hessian-vector product relative to one gradient.

    python benchmarks/bench_hvp.py [--quick] [--device cpu|cuda]

Problems: (a) MLP 128→512→512→10 (tanh) with cross-entropy, batch 512; (b) a small CNN with
BatchNorm (eval mode); (c) a pre-norm transformer block (attention written with softmax, since
CPU ``scaled_dot_product_attention`` has no double backward). Each as the plain model and, when
``torch_hod.nn.convert`` exists, the converted one. Methods: torch_hod's ``hvp`` in every mode,
``torch.func.jvp(grad)``, ``torch.func.vjp(grad)``, autograd double backward,
``torch.autograd.functional.hvp`` and (when importable) curvlinops' ``HessianLinearOperator``.
Every product is also checked against the double backward (``rel_err`` column).

For the MLP the report also gives the fraction of matmul peak that the best HVP reaches:
HVP FLOPs = 4·forward + 5·input-backward matmul FLOPs (forward ``2·B·Σ dᵢₙdₒᵤₜ`` over the three
layers; input-backward the same without the first layer), peak = GFLOP/s of a large square
matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from torch_hod.benchmark import machine_description, markdown_table, peak_memory
from torch_hod.hvp import hvp

try:  # the lead's converter; the "converted" column is skipped while it does not exist
    from torch_hod.nn import convert
except ImportError:  # pragma: no cover - depends on the checkout
    convert = None

try:
    import curvlinops
except ImportError:
    curvlinops = None


class Block(nn.Module):
    """Pre-norm transformer block with explicit attention: x + MHA(LN x), then + MLP(LN ·)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, d))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


def problems(quick: bool, device: str) -> List[Tuple[str, nn.Module, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    width, batch = (64, 32) if quick else (512, 512)
    mlp = nn.Sequential(nn.Linear(128, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Tanh(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.Tanh(),
                        nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
    d, T = (32, 8) if quick else (128, 32)
    out = [
        ("mlp", mlp, torch.randn(batch, 128, generator=g), torch.randint(0, 10, (batch,), generator=g)),
        ("cnn-bn", cnn, torch.randn(8 if quick else 64, 3, 16, 16, generator=g),
         torch.randint(0, 10, (8 if quick else 64,), generator=g)),
        ("transformer", Block(d, 4), torch.randn(4 if quick else 16, T, d, generator=g),
         torch.randint(0, 10, (4 if quick else 16,), generator=g)),
    ]
    return [(n, m.to(device), X.to(device), y.to(device)) for n, m, X, y in out]


def methods(model: nn.Module, X: Tensor, y: Tensor) -> Tuple[Dict[str, Callable[[], Any]], Dict[str, Tensor]]:
    """Zero-argument callables for the gradient and each HVP implementation, sharing one tangent."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g).to(p) for k, p in params.items()}

    def loss(p: Dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (X,)), y)

    def gradient() -> Any:
        leaves = [p.requires_grad_() for p in (t.detach() for t in params.values())]
        out = loss(dict(zip(params, leaves)))
        return torch.autograd.grad(out, leaves)

    def double_backward() -> Dict[str, Tensor]:
        leaves = [t.detach().requires_grad_() for t in params.values()]
        grads = torch.autograd.grad(loss(dict(zip(params, leaves))), leaves, create_graph=True)
        return dict(zip(params, torch.autograd.grad(grads, leaves, list(v.values()))))

    def func_jvp_grad() -> Dict[str, Tensor]:
        return torch.func.jvp(torch.func.grad(loss), (params,), (v,))[1]

    def func_vjp_grad() -> Dict[str, Tensor]:
        _, pullback = torch.func.vjp(torch.func.grad(loss), params)
        return pullback(v)[0]

    names = list(params)

    def functional_hvp() -> Dict[str, Tensor]:
        f = lambda *ts: loss(dict(zip(names, ts)))  # noqa: E731
        return dict(zip(names, torch.autograd.functional.hvp(f, tuple(params.values()), tuple(v.values()))[1]))

    table: Dict[str, Callable[[], Any]] = {"gradient": gradient}
    for mode in ("auto", "rev-rev", "fwd-rev", "rev-fwd"):
        table[f"torch_hod {mode}"] = (lambda m: lambda: hvp(loss, (params,), (v,), mode=m)[1][0])(mode)
    table.update({"torch.func jvp(grad)": func_jvp_grad, "torch.func vjp(grad)": func_vjp_grad,
                  "autograd double backward": double_backward, "autograd.functional.hvp": functional_hvp})
    if curvlinops is not None:  # pragma: no cover - optional
        op = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
        flat_v = torch.cat([t.reshape(-1) for t in v.values()])
        table["curvlinops"] = lambda: op @ flat_v
    return table, double_backward()


def _flat(result: Any) -> Tensor:
    if isinstance(result, Tensor):
        return result.reshape(-1)
    values = result.values() if isinstance(result, dict) else result
    return torch.cat([t.reshape(-1) for t in values])


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_fraction(hvp_fn: Callable[[], Any], flops: float, device: str, quick: bool, rounds: int = 7) -> Dict[str, float]:
    """Fraction of matmul peak reached by ``hvp_fn``: best-of-``rounds`` times of the HVP and of a
    large square matmul, interleaved so both see the same machine load (shared CPUs are noisy)."""
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = {"mm": math.inf, "hvp": math.inf}
    for fn in (lambda: a @ b, hvp_fn):  # warm-up
        fn()
    for _ in range(rounds):
        for key, fn in (("mm", lambda: a @ b), ("hvp", hvp_fn)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[key] = min(best[key], time.perf_counter() - start)
    peak, achieved = 2 * n**3 / best["mm"] / 1e9, flops / best["hvp"] / 1e9
    return {"matmul_peak_GFLOPs": peak, "hvp_GFLOPs": achieved, "peak_fraction": achieved / peak}


def mlp_hvp_flops(model: nn.Sequential, batch: int) -> float:
    dims = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)]
    forward = sum(2 * batch * i * o for i, o in dims)
    input_backward = sum(2 * batch * i * o for i, o in dims[1:])
    return 4 * forward + 5 * input_backward


def interleaved_times(fns: Dict[str, Callable[[], Any]], repeats: int, device: str) -> Dict[str, List[float]]:
    """Wall times of each callable, measured in rounds (one call of each per round) so that every
    method sees the same machine load: on a shared machine, sequential timing blocks drift."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return times


def run(quick: bool = False, device: str = "cpu") -> List[Dict[str, Any]]:
    """One row per (problem, variant, method): median and best time over interleaved rounds, peak
    memory, ratios to one gradient (medians), rel_err against the double backward; then, for the
    MLP, one row per variant with the fastest HVP's ``peak_fraction`` (:func:`peak_fraction`)."""
    repeats = 3 if quick else 9
    rows: List[Dict[str, Any]] = []
    peaks: List[Dict[str, Any]] = []
    for name, model, X, y in problems(quick, device):
        variants = [("plain", model)]
        if convert is not None:
            variants.append(("converted", convert(copy.deepcopy(model))))
        for variant, m in variants:
            try:
                table, reference = methods(m, X, y)
            except Exception as err:  # e.g. a converted model using an op that is not written yet
                rows.append({"problem": name, "variant": variant, "method": "(all)", "error": _describe(err)})
                continue
            found: Dict[str, Dict[str, Any]] = {}
            for method, fn in table.items():  # first call: result check and warm-up; then memory
                row = found[method] = {"problem": name, "variant": variant, "method": method}
                try:
                    result = fn()
                    fn()
                    row["peak_MB"] = peak_memory(fn, device=device) / 2**20
                except Exception as err:  # a method that cannot run this model is reported, not fatal
                    row["error"] = _describe(err)
                    continue
                if method != "gradient":
                    ref = _flat(reference)
                    row["rel_err"] = float((_flat(result) - ref).abs().max() / ref.abs().max())
            ok = {k: fn for k, fn in table.items() if "error" not in found[k]}
            times = interleaved_times(ok, repeats, device)
            base = found["gradient"]
            base_time, base_mem = statistics.median(times["gradient"]), max(base["peak_MB"], 1e-9)
            for method, ts in times.items():
                med = statistics.median(ts)
                found[method].update(time_ms=med * 1e3, best_ms=min(ts) * 1e3, time_ratio=med / base_time,
                                     mem_ratio=found[method]["peak_MB"] / base_mem)
            rows += found.values()
            if name == "mlp":  # fraction of matmul peak for the fastest HVP of this variant
                best = min((k for k in times if k != "gradient"), key=lambda k: found[k]["time_ms"])
                peaks.append({"problem": name, "variant": variant, "method": best,
                              **peak_fraction(ok[best], mlp_hvp_flops(m, X.shape[0]), device, quick)})
    return rows + peaks


def plot(rows: List[Dict[str, Any]], out: Any) -> List[str]:
    """PNG: HVP time and peak memory as multiples of one gradient, per problem and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    timed = [r for r in rows if "time_ratio" in r and r["method"] != "gradient"]
    if not timed:
        return []
    groups = list(dict.fromkeys((r["problem"], r["variant"]) for r in timed))
    methods = list(dict.fromkeys(r["method"] for r in timed))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(methods)
    for ax, key, label in ((axes[0], "time_ratio", "time / one gradient"), (axes[1], "mem_ratio", "peak memory / one gradient")):
        for i, method in enumerate(methods):
            values = [next((r[key] for r in timed if (r["problem"], r["variant"]) == g and r["method"] == method), 0.0)
                      for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{p}\n{v}" for p, v in groups], fontsize=7)
        ax.set_ylabel(label)
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0].legend(fontsize=6)
    fig.suptitle("Hessian-vector product cost relative to one gradient")
    fig.tight_layout()
    path = Path(out) / "hvp_cost_vs_gradient.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [str(path)]


def report(rows: List[Dict[str, Any]], device: str = "cpu") -> str:
    cols = ["problem", "variant", "method", "time_ms", "best_ms", "time_ratio", "peak_MB", "mem_ratio", "rel_err", "error"]
    timings = [r for r in rows if "peak_fraction" not in r]
    peaks = [r for r in rows if "peak_fraction" in r]
    text = [f"## HVP vs one gradient ({machine_description(device)})", "",
            "Ratios are to one gradient of the same model in the same run (median of interleaved rounds; "
            "peak memory allocated during the call); rel_err is the max error against the autograd double backward, "
            "relative to its largest entry.", "", markdown_table(timings, cols)]
    if peaks:
        text += ["", "MLP: fraction of matmul peak reached by the fastest HVP (HVP FLOPs = 4·forward + "
                     "5·input-backward matmul FLOPs; best-of-7 times, interleaved with a large square matmul):", "",
                 markdown_table(peaks, ["variant", "method", "hvp_GFLOPs", "matmul_peak_GFLOPs", "peak_fraction"])]
    if curvlinops is None:
        text += ["", "curvlinops is not installed: its column is skipped."]
    if convert is None:
        text += ["", "torch_hod.nn.convert is not available: the converted variant is skipped."]
    return "\n".join(text)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run(quick=args.quick, device=args.device)
    print(report(rows, args.device))
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
