"""Shared test fixtures: the ``device`` parameter and small float64-first input helpers.

Test modules may import from here (``from conftest import DEVICES, uniform``); the ``device``
fixture runs a test on every available device (CPU, plus CUDA when present).
"""
from __future__ import annotations

from typing import Sequence

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
