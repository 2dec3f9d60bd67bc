"""A physics-informed network for the 2-D Poisson problem, trained through the collapsed Laplacian.

Problem: ``−Δu = f`` on the unit square, ``u = 0`` on its boundary, with
``f(x, y) = 2π² sin(πx) sin(πy)`` and exact solution ``u*(x, y) = sin(πx) sin(πy)``.

Model: ``u_θ(x, y) = x(1−x) y(1−y) · MLP_θ(x, y)`` (tanh, 2 → 32 → 32 → 1), which satisfies the
boundary condition exactly. Loss: ``mean over collocation points of (Δu_θ + f)²``, where
``Δu_θ`` is one collapsed 2-jet per batch (``torch_hod.taylor.operators.laplacian`` with
``batch_dims=1``: 2 directions for all points at once), and ``.backward()`` gives the parameter
gradients through the jet. Adam, fresh uniform collocation points every step.

    python examples/pinn_poisson.py [--steps 1000] [--plot pinn_poisson.png]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from torch_hod.taylor.operators import laplacian


class PINN(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, p: torch.Tensor) -> torch.Tensor:  # (N, 2) -> (N,)
        x, y = p[..., 0], p[..., 1]
        return x * (1 - x) * y * (1 - y) * self.net(p)[..., 0]


def source(p: torch.Tensor) -> torch.Tensor:
    return 2 * math.pi**2 * torch.sin(math.pi * p[..., 0]) * torch.sin(math.pi * p[..., 1])


def exact(p: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * p[..., 0]) * torch.sin(math.pi * p[..., 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--plot", default=None, help="write a PNG of the solution and its error here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = PINN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 101), torch.linspace(0, 1, 101), indexing="ij"), -1).reshape(-1, 2)

    def rel_l2() -> float:
        with torch.no_grad():
            return ((model(grid) - exact(grid)).norm() / exact(grid).norm()).item()

    print(f"PINN for -Δu = 2π² sin(πx) sin(πy) on [0,1]², {sum(p.numel() for p in model.parameters())} parameters")
    start = time.perf_counter()
    for step in range(args.steps + 1):
        pts = torch.rand(args.points, 2)
        residual = laplacian(model, pts, batch_dims=1) + source(pts)  # collapsed Taylor mode
        loss = residual.pow(2).mean()
        if step % (args.steps // 5 or 1) == 0:
            print(f"step {step:5d}  loss {loss.item():.3e}  rel L2 error vs exact {rel_l2():.3e}")
        if step < args.steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    err = rel_l2()
    with torch.no_grad():
        max_err = (model(grid) - exact(grid)).abs().max().item()
    print(f"final: relative L2 error {err:.3e}, max abs error {max_err:.3e} on a 101×101 grid "
          f"({time.perf_counter() - start:.1f} s)")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with torch.no_grad():
            u, e = model(grid).reshape(101, 101), (model(grid) - exact(grid)).reshape(101, 101)
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for ax, data, title in zip(axes, (u, e), ("u_θ", "u_θ − u*")):
            im = ax.imshow(data.T, origin="lower", extent=(0, 1, 0, 1))
            ax.set_title(title)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
