"""The command line: subcommands, outputs and exit codes."""
import json
import subprocess
import sys

import torch

from torch_hod.cli import main


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "torch_hod", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_ops_lists_every_op_and_taylor_rules(capsys):
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    for name in ("tanh", "cross_entropy", "layer_norm", "linear"):
        assert f"torch_hod.ops.{name} |" in out
    assert "Taylor mode has rules for" in out and "torch.tanh" in out


def test_verify_subset_passes_and_prints_table(capsys):
    assert main(["verify", "--order", "2", "--only", "ops.tanh,hvp"]) == 0
    out = capsys.readouterr().out
    assert "| ops.tanh | 2 |" in out and "| hvp (plain MLP) | 2 | rev-rev |" in out
    assert out.strip().endswith("0 failed")


def test_bench_quick_writes_tables_and_results(tmp_path):
    result = _run("bench", "--quick", "--only", "ops", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Machine:" in result.stdout and "| tanh |" in result.stdout
    assert "[1/1] ops" in result.stderr  # progress
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"ops_ops", "ops_models"} <= set(data["tables"])
    assert (tmp_path / "ops_ops.csv").read_text().startswith("op,")


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "--only", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main(["verify", "--order", "0"]) == 2
    assert main(["verify", "--only", "nope"]) == 2  # before: "0 passed, 0 failed" and exit 0
    assert "no check name contains any of ['nope']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert _run("frobnicate").returncode == 2  # argparse: unknown subcommand


def test_measure_time_needs_a_repeat():
    import pytest

    from torch_hod.benchmark import measure_time

    assert measure_time(lambda: None, repeats=1, warmup=0).repeats == 1
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):  # before: IndexError
        measure_time(lambda: None, repeats=0)
