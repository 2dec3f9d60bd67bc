"""Hessian spectrum of a small classifier's loss: top-5 eigenvalues, trace and spectral density.

Trains a small MLP briefly on synthetic data, then, using only Hessian-vector products
(torch_hod.curvature.operators.HessianOperator):

* top-5 eigenvalues by Lanczos with full reorthogonalisation,
* the trace by XTrace (and Hutchinson with the same budget, for comparison),
* the spectral density by stochastic Lanczos quadrature, written to a PNG.

With ``--check`` (default on; the model is small) the results are compared with the dense Hessian.
Run: ``python examples/hessian_spectrum.py [--out density.png] [--steps 200]``.
"""
import argparse
import os
import tempfile
import time

import torch
from torch import nn

from torch_hod.curvature.operators import HessianOperator
from torch_hod.curvature.spectral import (
    hutchinson_trace, lanczos_eigsh, plot_spectral_density, spectral_density, xtrace,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "hessian_spectrum.png"))
    parser.add_argument("--steps", type=int, default=200, help="training steps before the analysis")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the dense comparison")
    args = parser.parse_args()

    torch.manual_seed(0)
    X = torch.randn(512, 4)
    y = (X[:, 0] * X[:, 1] > 0).long() + (X[:, 2] > 1).long()  # 3 classes
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
    print(f"trained {args.steps} steps, loss {loss.item():.4f}")

    H = HessianOperator(model, loss_fn, (X, y))
    n = H.shape[0]
    print(f"Hessian of the loss w.r.t. {n} parameters (matrix-free)")

    t = time.perf_counter()
    top = lanczos_eigsh(H, 5, which="LA")
    print(f"top-5 eigenvalues (Lanczos, {top.num_matvecs} HVPs, {time.perf_counter() - t:.2f}s): "
          + ", ".join(f"{v:.5g}" for v in top.eigenvalues.tolist()))
    bottom = lanczos_eigsh(H, 1, which="SA")
    print(f"smallest eigenvalue: {bottom.eigenvalues.item():.5g} ({bottom.num_matvecs} HVPs)")

    tr = xtrace(H, 100, seed=0)
    hutch = hutchinson_trace(H, 100, seed=0)
    print(f"trace: XTrace {tr.estimate.item():.5g} ± {tr.std.item():.2g} ({tr.num_matvecs} HVPs); "
          f"Hutchinson {hutch.estimate.item():.5g} ± {hutch.std.item():.2g} ({hutch.num_matvecs} HVPs)")

    density = spectral_density(H, num_probes=8, num_steps=40, seed=0)
    plot_spectral_density(density, args.out, title=f"Hessian spectral density ({n} parameters)")
    print(f"spectral density (SLQ, {density.num_matvecs} HVPs, sigma {density.sigma:.3g}) written to {args.out}")

    if args.check:
        dense = H.dense()
        lam = torch.linalg.eigvalsh((dense + dense.T) / 2)
        print(f"dense check ({n} HVPs): top-5 max rel error "
              f"{((top.eigenvalues - lam.flip(0)[:5]).abs().max() / lam.abs().max()).item():.2e}, "
              f"exact trace {lam.sum().item():.5g}")


if __name__ == "__main__":
    main()
