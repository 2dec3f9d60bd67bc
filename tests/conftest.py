"""Shared test fixtures: the ``device`` parameter and small float64-first input helpers.

Test modules may import from here (``from conftest import DEVICES, uniform``); the ``device``
fixture runs a test on every available device (CPU, plus CUDA when present).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Sequence

import pytest
import torch

from torch_hod.testing import available_devices

DEVICES = available_devices()


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def uniform(
    shape: Sequence[int], low: float = -2.0, high: float = 2.0, *, device: "torch.device | str" = "cpu",
    dtype: torch.dtype = torch.float64, seed: int = 0,
) -> torch.Tensor:
    """Reproducible uniform samples in ``[low, high]`` (generated in float64 on CPU, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(tuple(shape), generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def run_ranks(script: str, rank_args: Callable[[int], Sequence[str]], world_size: int = 2, timeout: float = 180) -> None:
    """Run ``python script *rank_args(r)`` for every rank ``r`` as separate processes (one thread
    each) and assert that all of them exit 0, showing a failing rank's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, script, *rank_args(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world_size)]
    try:
        logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
