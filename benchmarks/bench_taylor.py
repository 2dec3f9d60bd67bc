"""Taylor-mode benchmark: jets and collapsed differential operators vs nested torch.func.

Model: MLP ``D → 256 → 256 → 256 → 1`` on N = 256 samples (``--quick``: width 32, N = 8), either
tanh, or GELU followed by LayerNorm in each hidden layer. Three tables, every ratio from one run:

* ``directional``: the K-th directional derivative ``D^K_v f`` for K = 1..8 (quick: 1..4), one jet
  (``derivatives``) vs K nested ``torch.func.jvp`` (cost ∝ 2^K).
* ``laplacian``: exact per-sample Laplacian for D = 16 and 50 (quick: 4, 6): collapsed and
  standard jets vs ``vmap(hessian)`` + trace and vs D forward-over-reverse HVPs (``vmap`` over
  ``jvp(grad)``), diagonal summed.
* ``biharmonic``: exact per-sample Δ²f for D = 5 (quick: 3): collapsed and standard jets vs
  ``vmap(hessian(hessian))`` + trace.

Columns: median wall time (after warm-up) and its IQR; ``slowdown`` = time / time of the jet's
collapsed method in the same row group (so a baseline's slowdown is the jet's speed-up);
``peak_MB`` = peak bytes allocated during one call (CUDA ``max_memory_allocated``; on CPU the
allocation events of ``torch.profiler(profile_memory=True)``, see ``torch_hod.benchmark``);
``rel_err`` = max|value − jet value| / max|jet value|. Baselines run on a twin of the model whose
LayerNorm is written from elementary ops, because nested forward mode through ``F.layer_norm`` is
wrong in torch 2.13 (see /work/shared/FACTS.md); the twin computes the same function.

    python benchmarks/bench_taylor.py [--quick] [--device cuda] [--dtype float64]
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jvp, vmap

from torch_hod.benchmark import machine_description, markdown_table, measure_time, peak_memory
from torch_hod.taylor.operators import bilaplacian, derivatives, laplacian

Func = Callable[[torch.Tensor], torch.Tensor]
COLUMNS = ["table", "model", "case", "method", "time_ms", "iqr_ms", "slowdown", "peak_MB", "rel_err"]


def _layer_norm_composite(x: torch.Tensor, shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def make_mlp(kind: str, D: int, width: int, device: str, dtype: torch.dtype, seed: int = 0) -> Tuple[Func, Func]:
    """``f: (..., D) -> (...)`` (tanh, or GELU + LayerNorm per hidden layer) and its reference twin."""
    g = torch.Generator().manual_seed(seed)
    sizes = [D, width, width, width, 1]
    layers = [
        ((torch.randn(o, i, generator=g) / math.sqrt(i)).to(device, dtype), (0.1 * torch.randn(o, generator=g)).to(device, dtype))
        for i, o in zip(sizes[:-1], sizes[1:])
    ]

    def build(layer_norm: Callable[..., torch.Tensor]) -> Func:
        def f(x: torch.Tensor) -> torch.Tensor:
            h = x
            for w, b in layers[:-1]:
                h = F.linear(h, w, b)
                h = torch.tanh(h) if kind == "tanh" else layer_norm(F.gelu(h), (width,))
            return F.linear(h, *layers[-1])[..., 0]

        return f

    return build(F.layer_norm), build(_layer_norm_composite)


def _nested_jvp(f: Func, x: torch.Tensor, v: torch.Tensor, K: int) -> torch.Tensor:
    """``D^K_v f`` by K nested ``torch.func.jvp`` (each level doubles the work)."""
    g = f
    for _ in range(K):
        g = (lambda h: lambda z: jvp(h, (z,), (v,))[1])(g)
    return g(x)


def _laplacian_hessian(f: Func, x: torch.Tensor) -> torch.Tensor:
    return vmap(lambda z: hessian(f)(z).diagonal().sum())(x)


def _laplacian_hvps(f: Func, x: torch.Tensor) -> torch.Tensor:
    g = grad(lambda z: f(z).sum())  # samples are independent: per-sample gradients
    E = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    H = vmap(lambda e: jvp(g, (x,), (e.expand_as(x),))[1])(E)  # (D, N, D): column i of each Hessian
    return torch.einsum("ini->n", H)


def _bilaplacian_hessians(f: Func, x: torch.Tensor) -> torch.Tensor:
    return vmap(lambda z: torch.einsum("iijj->", hessian(hessian(f))(z)))(x)


def _group(table: str, model: str, case: str, methods: Dict[str, Callable[[], torch.Tensor]],
           device: str, repeats: int, memory: bool) -> List[Dict[str, Any]]:
    """Time every method of one comparison; the first method is the jet everything is relative to."""
    rows, ref_value, ref_time = [], None, None
    for name, fn in methods.items():
        value = fn()
        t = measure_time(fn, repeats=repeats, warmup=1, device=device)
        if ref_value is None:
            ref_value, ref_time = value, t.median
        err = ((value - ref_value).abs().max() / ref_value.abs().max().clamp_min(1e-300)).item()
        rows.append({
            "table": table, "model": model, "case": case, "method": name,
            "time_ms": t.median * 1e3, "iqr_ms": t.iqr * 1e3, "slowdown": t.median / ref_time,
            "peak_MB": peak_memory(fn, device=device) / 2**20 if memory else None, "rel_err": err,
        })
    return rows


TABLES = ("directional", "laplacian", "biharmonic")


def run(quick: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32, memory: bool = True,
        tables: Sequence[str] = TABLES, models: Sequence[str] = ("tanh", "gelu+layernorm")) -> List[Dict[str, Any]]:
    """The chosen tables (default: all three) as one list of rows (see the module docstring)."""
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise ValueError(f"bench_taylor.run: unknown tables {sorted(unknown)}; expected a subset of {TABLES}")
    if set(models) - {"tanh", "gelu+layernorm"}:
        raise ValueError(f"bench_taylor.run: unknown models {sorted(set(models) - {'tanh', 'gelu+layernorm'})}; expected tanh, gelu+layernorm")
    width, N = (32, 8) if quick else (256, 256)
    orders = range(1, 5) if quick else range(1, 9)
    lap_dims = (4, 6) if quick else (16, 50)
    bih_dim = 3 if quick else 5
    repeats = 3 if quick else 5
    g = torch.Generator().manual_seed(1)
    rows: List[Dict[str, Any]] = []
    for kind in models:
        D = lap_dims[0]
        f, f_ref = make_mlp(kind, D, width, device, dtype)
        x = torch.randn(N, D, generator=g).to(device, dtype)
        v = torch.randn(N, D, generator=g).to(device, dtype)
        for K in orders if "directional" in tables else ():
            rows += _group("directional", kind, f"K={K}", {
                "jet": lambda K=K: derivatives(f, x, v, K)[-1],
                "nested jvp": lambda K=K: _nested_jvp(f_ref, x, v, K),
            }, device, repeats, memory)
        for D in lap_dims if "laplacian" in tables else ():
            f, f_ref = make_mlp(kind, D, width, device, dtype)
            x = torch.randn(N, D, generator=g).to(device, dtype)
            rows += _group("laplacian", kind, f"D={D}", {
                "jet collapsed": lambda: laplacian(f, x, batch_dims=1),
                "jet standard": lambda: laplacian(f, x, batch_dims=1, method="standard"),
                "vmap(hessian)+trace": lambda: _laplacian_hessian(f_ref, x),
                "D HVPs vmap(jvp(grad))": lambda: _laplacian_hvps(f_ref, x),
            }, device, repeats, memory)
        if "biharmonic" not in tables:
            continue
        f, f_ref = make_mlp(kind, bih_dim, width, device, dtype)
        x = torch.randn(N, bih_dim, generator=g).to(device, dtype)
        rows += _group("biharmonic", kind, f"D={bih_dim}", {
            "jet collapsed": lambda: bilaplacian(f, x, batch_dims=1),
            "jet standard": lambda: bilaplacian(f, x, batch_dims=1, method="standard"),
            "vmap(hessian(hessian))": lambda: _bilaplacian_hessians(f_ref, x),
        }, device, repeats, memory)
    return rows


def plot(rows: List[Dict[str, Any]], out: Any) -> List[str]:
    """PNG plots: time vs derivative order (log scale) and Laplacian time vs input dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    paths = []
    for table, xlabel, fname in (("directional", "derivative order K", "taylor_time_vs_order.png"),
                                 ("laplacian", "input dimension D", "laplacian_time_vs_dimension.png")):
        chosen = [r for r in rows if r.get("table") == table]
        if not chosen:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in dict.fromkeys(r["model"] for r in chosen):
            for method in dict.fromkeys(r["method"] for r in chosen):
                pts = [(int(r["case"].split("=")[1]), r["time_ms"]) for r in chosen
                       if r["model"] == model and r["method"] == method]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{method} ({model})")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median time [ms]")
        ax.set_title("K-th directional derivative" if table == "directional" else "exact Laplacian, per sample")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out) / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(str(path))
    return paths


def report(rows: List[Dict[str, Any]], device: str, quick: bool = False) -> str:
    size = "width 32, N=8 (--quick)" if quick else "width 256, N=256"
    head = f"Taylor-mode benchmark, MLP D→{size}; {machine_description(device)}"
    return head + "\n\n" + markdown_table(rows, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--tables", default=",".join(TABLES), help="comma-separated subset of " + ",".join(TABLES))
    parser.add_argument("--models", default="tanh,gelu+layernorm", help="comma-separated subset of tanh,gelu+layernorm")
    args = parser.parse_args()
    rows = run(args.quick, args.device, getattr(torch, args.dtype), not args.no_memory,
               args.tables.split(","), args.models.split(","))
    print(report(rows, args.device, args.quick))


if __name__ == "__main__":
    main()
