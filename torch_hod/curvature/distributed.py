"""Collectives for data-parallel curvature: each rank holds a shard of the data.

The curvature operators (:mod:`torch_hod.curvature.operators`) compute their product on the local
shard, then :func:`all_reduce_sum` it, so ``N`` ranks on ``N`` shards give the numbers of one
process on all the data (a mean loss is weighted by ``n_batch / N_total`` with ``N_total`` summed
over ranks). Estimators built on top follow two rules:

* every rank must call the same collectives in the same order (a ``matvec`` is a collective);
* random probe vectors must be identical on all ranks: draw them on one rank and
  :func:`broadcast` them, or seed every rank's generator identically.

Without an initialised process group every helper is the identity (single process), so the same
code runs unchanged in both settings.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_sum", "broadcast"]


def is_distributed() -> bool:
    """``True`` when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(x: Union[Tensor, int, float]) -> Union[Tensor, int, float]:
    """``Σ_ranks x``: a new tensor (the input is not modified), or a Python number for a number.

    Collective: every rank must call it with the same shape and dtype. Tensors must live where the
    backend wants them (CPU for gloo, CUDA for nccl). Not differentiable (use it on results).
    """
    if not is_distributed():
        return x
    if isinstance(x, Tensor):
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out
    if not isinstance(x, (int, float)):
        raise TypeError(f"all_reduce_sum: expected a Tensor or a Python number, got {type(x).__name__}")
    # nccl reduces only CUDA tensors; gloo and mpi take CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(x, dtype=torch.float64 if isinstance(x, float) else torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def broadcast(x: Tensor, src: int = 0) -> Tensor:
    """Rank ``src``'s ``x`` on every rank (a new tensor; identity without a process group)."""
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.broadcast(out, src=src)
    return out
