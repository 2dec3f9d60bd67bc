"""Data-parallel curvature: 2 gloo ranks on 2 shards give the single-process numbers on all data.

The test spawns this file twice as a worker (``--worker RANK WORLD INIT_FILE OUT_DIR``), each rank
with its shard of unequal batches, and compares what they return with one process on all data.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import torch_hod
from torch_hod.curvature import distributed as D
from torch_hod.curvature.operators import EmpiricalFisherOperator, GGNOperator, HessianOperator

OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": EmpiricalFisherOperator}
SHARDS = [[(0, 3), (3, 6)], [(6, 8), (8, 11)]]  # rank → batches (start, stop): sizes 3+3 and 2+3
TIMEOUT_S = 180


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch_hod.ops.tanh(self.fc1(x)))


def problem():
    torch.manual_seed(0)
    model = Net().double()
    X = torch.randn(11, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    return model, nn.CrossEntropyLoss(), X, y


def batches(X, y, spans):
    return [(X[a:b], y[a:b]) for a, b in spans]


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert D.is_distributed() and D.world_size() == world and D.rank() == rank
        model, loss_fn, X, y = problem()
        data = batches(X, y, SHARDS[rank])
        results = {name: cls(model, loss_fn, data).dense() for name, cls in OPERATORS.items()}
        results["num_data"] = torch.tensor(HessianOperator(model, loss_fn, data).num_data)
        results["sum_int"] = torch.tensor(D.all_reduce_sum(rank + 1))
        results["sum_tensor"] = D.all_reduce_sum(torch.full((2,), float(rank + 1)))
        results["broadcast"] = D.broadcast(torch.full((2,), float(rank + 5)), src=1)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_single_process(tmp_path):
    from conftest import run_ranks  # not at module level: the workers run this file as a script

    init = tmp_path / "init"
    run_ranks(__file__, lambda r: ["--worker", str(r), "2", str(init), str(tmp_path)], timeout=TIMEOUT_S)

    model, loss_fn, X, y = problem()
    full = batches(X, y, SHARDS[0] + SHARDS[1])
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["num_data"].item() == 11 and got["sum_int"].item() == 3
        assert torch.equal(got["sum_tensor"], torch.full((2,), 3.0))
        assert torch.equal(got["broadcast"], torch.full((2,), 6.0))
        for name, cls in OPERATORS.items():
            expected = cls(model, loss_fn, full).dense()
            shard_only = cls(model, loss_fn, batches(X, y, SHARDS[r])).dense()
            scale = expected.abs().max()
            assert scale > 0 and (shard_only - expected).abs().max() > 1e-3 * scale  # the test can fail
            err = (got[name] - expected).abs().max()
            assert err <= 1e-10 * scale, f"{name} rank {r}: max abs err {err:.3e}"


def test_helpers_are_identity_without_process_group():
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0
    t = torch.randn(3)
    assert D.all_reduce_sum(t) is t and D.all_reduce_sum(2.5) == 2.5 and D.broadcast(t) is t


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
