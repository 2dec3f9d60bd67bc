"""Smoke test: every script in examples/ runs to completion and prints what it computed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", TORCH_HOD_EXAMPLE_OUT=str(tmp_path))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{script.name} printed nothing"


def test_examples_present():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.py", "custom_op.py", "hessian_spectrum.py", "newton_cg.py", "pinn_poisson.py", "taylor_ode.py"} <= names
