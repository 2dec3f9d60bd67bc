"""Train a small MLP with the NewtonCG (Hessian-free) optimiser and print the loss per step.

Each step solves ``(H + λI) d = −g`` by conjugate gradient with Hessian-vector products from
double backward, takes a backtracking line search along ``d`` and adapts ``λ`` with the
Levenberg–Marquardt rule. For comparison, Adam runs the same number of steps and, separately, as
many steps as NewtonCG used gradients and HVPs (its line-search forward passes not counted).
Run: ``python examples/newton_cg.py [--steps 15]``.
"""
import argparse

import torch
from torch import nn

from torch_hod.curvature.solvers import NewtonCG


def make_problem():
    torch.manual_seed(0)
    X = torch.rand(256, 2, dtype=torch.float64) * 4 - 2
    y = (torch.sin(2 * X[:, :1]) * torch.cos(X[:, 1:])).to(torch.float64)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    return X, y, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--cg-iterations", type=int, default=30)
    args = parser.parse_args()

    X, y, model = make_problem()
    loss_fn = nn.MSELoss()
    opt = NewtonCG(model.parameters(), damping=1.0, cg_max_iterations=args.cg_iterations, adapt_damping=True)
    closure = lambda: loss_fn(model(X), y)  # noqa: E731  (returns the loss; NewtonCG differentiates it)
    print(f"NewtonCG on a {sum(p.numel() for p in model.parameters())}-parameter MLP, MSE regression")
    print(" step        loss    damping  CG its  step size  negative curvature")
    work = 0
    for step in range(args.steps):
        loss = opt.step(closure)
        info = opt.last_step[0]
        work += info["num_hvps"] + 1
        print(f"{step:5d}  {loss.item():.4e}  {info['damping']:.2e}  {info['cg_iterations']:6d}  "
              f"{info['step_size']:9.3g}  {info['negative_curvature']}")
    print(f"final loss {closure().item():.4e} after {args.steps} steps (≈{work} gradient/HVP passes "
          "plus line-search evaluations)")

    for label, steps in (("same steps", args.steps), ("same passes", work)):
        _, _, baseline = make_problem()
        adam = torch.optim.Adam(baseline.parameters(), lr=1e-2)
        for _ in range(steps):
            adam.zero_grad()
            loss = loss_fn(baseline(X), y)
            loss.backward()
            adam.step()
        print(f"Adam (lr 1e-2), {label} ({steps}): final loss {loss_fn(baseline(X), y).item():.4e}")


if __name__ == "__main__":
    main()
