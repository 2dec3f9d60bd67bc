"""Command line: ``python -m torch_hod {bench,verify,ops}`` (also installed as ``torch-hod``).

* ``bench``  runs the benchmark suite in ``benchmarks/`` (ops, HVP, Taylor mode / Laplacian)
  against torch.func baselines measured in the same run; prints markdown tables with the machine,
  writes ``results.json``, one CSV per table and PNG plots to ``--out``.
* ``verify`` runs the torch.func validation harness over every op, the HVP modes and the Taylor
  rules and prints a pass/fail table with the max relative error per op, order and mode.
* ``ops``    lists the ops and Taylor rules and the AD modes each supports.

Exit codes: 0 success; 1 a check or benchmark failed; 2 bad arguments or missing pieces.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import json
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence

BENCHMARKS = {  # name → (file in benchmarks/, what it measures)
    "ops": ("bench_ops.py", "torch_hod ops and converted models vs built-ins"),
    "hvp": ("bench_hvp.py", "Hessian-vector products vs torch.func / autograd"),
    "taylor": ("bench_taylor.py", "Taylor mode, Laplacian and biharmonic vs nested torch.func"),
}


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _benchmarks_dir() -> Path:
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if not folder.is_dir():
        raise CliError(
            "the benchmarks/ folder was not found next to the torch_hod package; run from a source "
            "checkout installed with `pip install -e .`"
        )
    return folder


def _load_benchmark(name: str) -> ModuleType:
    path = _benchmarks_dir() / BENCHMARKS[name][0]
    if not path.is_file():
        raise CliError(f"benchmark {name!r}: {path} is missing")
    spec = importlib.util.spec_from_file_location(f"torch_hod_benchmarks_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as_tables(name: str, results: Any) -> Dict[str, List[Dict[str, Any]]]:
    """Benchmarks return either a list of rows or a dict of named lists of rows."""
    if isinstance(results, dict):
        return {f"{name}_{key}": rows for key, rows in results.items()}
    return {name: list(results)}


def _write_csv(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    columns: List[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if not (device == "cpu" or device.startswith("cuda")):
        raise CliError(f"--device must be 'cpu' or 'cuda[:N]', got {device!r}")


def cmd_bench(args: argparse.Namespace) -> int:
    _check_device(args.device)
    from torch_hod.benchmark import machine_description

    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise CliError(f"--only: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description(args.device)
    print(f"# torch_hod benchmarks ({'quick' if args.quick else 'full'} run)\n\nMachine: {machine}\n")
    everything: Dict[str, Any] = {"machine": machine, "quick": args.quick, "device": args.device, "tables": {}}
    failed = []
    for index, name in enumerate(names, 1):
        print(f"[{index}/{len(names)}] {name}: {BENCHMARKS[name][1]} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            module = _load_benchmark(name)
            results = module.run(quick=args.quick, device=args.device)
        except CliError:
            raise
        except Exception:  # a failing benchmark must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            continue
        print(f"[{index}/{len(names)}] {name}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if hasattr(module, "report"):
            accepts_quick = "quick" in inspect.signature(module.report).parameters
            text = module.report(results, args.device, quick=args.quick) if accepts_quick else module.report(results, args.device)
            print(text + "\n", flush=True)
        tables = _as_tables(name, results)
        everything["tables"].update(tables)
        for table, rows in tables.items():
            _write_csv(out / f"{table}.csv", rows)
        if hasattr(module, "plot"):
            for path in module.plot(results, out) or []:
                print(f"plot: {path}")
    (out / "results.json").write_text(json.dumps(everything, indent=1, default=str))
    print(f"results: {out / 'results.json'} and CSV files in {out}/")
    if failed:
        print(f"FAILED benchmarks: {failed}", file=sys.stderr)
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from torch_hod.benchmark import markdown_table
    from torch_hod.verification import verify_all

    try:
        rows = verify_all(order=args.order, only=args.only.split(",") if args.only else None, progress=sys.stderr)
    except ValueError as error:  # --only matched nothing: a run that could not fail
        raise CliError(f"--only: {error}") from error
    print(markdown_table(rows, ["check", "order", "mode", "max_rel", "max_abs", "status"]))
    failures = [r for r in rows if r["status"] != "pass"]
    print(f"\n{len(rows) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


def cmd_ops(args: argparse.Namespace) -> int:
    from torch_hod.benchmark import markdown_table
    from torch_hod.ops import OPS
    from torch_hod.taylor.registry import taylor_rule_for

    rows = [
        {"op": f"torch_hod.ops.{name}", "reverse^k": "yes", "forward^k": "yes", "mixed fwd/rev": "yes",
         "vmap": "yes", "Taylor rule": "yes" if taylor_rule_for(op) is not None else "no"}
        for name, op in sorted(OPS.items())
    ]
    print(markdown_table(rows, list(rows[0])))
    from torch_hod.taylor.registry import supported_functions

    names = supported_functions()
    print(f"\nTaylor mode has rules for {len(names)} functions:\n" + ", ".join(names))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch-hod", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark suite against torch.func baselines")
    bench.add_argument("--quick", action="store_true", help="small sizes and few repeats (about a minute on 2 cores)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument("--out", default="bench-out", help="folder for results.json, CSV and PNG files")
    bench.add_argument("--only", default="", help=f"comma-separated subset of {list(BENCHMARKS)}")
    bench.set_defaults(run=cmd_bench)
    verify = sub.add_parser("verify", help="validate every op, HVP mode and Taylor rule against torch.func")
    verify.add_argument("--order", type=int, default=4, help="highest derivative order for the ops (default 4)")
    verify.add_argument("--only", default="", help="comma-separated subset of check names")
    verify.set_defaults(run=cmd_verify)
    ops = sub.add_parser("ops", help="list ops, Taylor rules and supported AD modes")
    ops.set_defaults(run=cmd_ops)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "order", 1) is not None and getattr(args, "order", 1) < 1:
        print("torch-hod: error: --order must be a positive integer", file=sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except CliError as error:
        print(f"torch-hod: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
