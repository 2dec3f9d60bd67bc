"""Taylor expansion of an ODE solution by jets: ``x' = g(x)``, ``x(0) = x0``.

In derivative convention ``x(t) = Σ_k x_k t^k / k!`` with ``x_0 = x0``; differentiating
``x'(t) = g(x(t))`` k times at t = 0 gives ``x_{k+1} = d^k/dt^k g(x(t))|_0``, which is the k-th
output coefficient of ``jet(g, (x0,), ([x_1, ..., x_k],))``: it depends only on ``x_1 … x_k``,
so K coefficients come from K − 1 jets of growing order (the recursion of JAX's jet ODE example).

Checks: (1) ``x' = x²`` has ``x(t) = x0 / (1 − x0 t)``, so ``x_k = k! x0^{k+1}`` exactly;
(2) a neural-ODE vector field ``g(x) = A x + W2 tanh(W1 x + b)`` in R²: the truncated Taylor
polynomial of order K at time t against a fine RK4 integration; the error falls like ``t^{K+1}``.

    python examples/taylor_ode.py [--order 10]
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, List

import torch

from torch_hod.taylor import jet

Field = Callable[[torch.Tensor], torch.Tensor]


def taylor_coefficients(g: Field, x0: torch.Tensor, order: int) -> List[torch.Tensor]:
    """``[x_0, x_1, ..., x_order]`` of the solution of ``x' = g(x), x(0) = x0`` (derivative convention)."""
    xs = [x0, g(x0)]
    for k in range(1, order):
        _, ys = jet(g, (x0,), (xs[1:],))  # series [x_1, ..., x_k] -> y_k = d^k/dt^k g(x(t))
        xs.append(ys[k - 1])
    return xs[: order + 1]


def taylor_polynomial(xs: List[torch.Tensor], t: float) -> torch.Tensor:
    return sum(c * t**k / math.factorial(k) for k, c in enumerate(xs))


def rk4(g: Field, x0: torch.Tensor, t: float, steps: int) -> torch.Tensor:
    h, x = t / steps, x0
    for _ in range(steps):
        k1 = g(x)
        k2 = g(x + h / 2 * k1)
        k3 = g(x + h / 2 * k2)
        k4 = g(x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", type=int, default=10)
    args = parser.parse_args()
    K = args.order
    dt = torch.float64

    # (1) x' = x²: x_k = k! x0^(k+1)
    x0 = torch.tensor([0.5], dtype=dt)
    xs = taylor_coefficients(lambda x: x * x, x0, K)
    rel = max(abs(xs[k].item() - math.factorial(k) * 0.5 ** (k + 1)) / (math.factorial(k) * 0.5 ** (k + 1)) for k in range(K + 1))
    print(f"x' = x², x0 = 0.5: coefficients x_0..x_{K} vs k! x0^(k+1): max relative error {rel:.1e}")

    # (2) a neural-ODE vector field in R²
    gen = torch.Generator().manual_seed(0)
    A = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=dt)
    W1 = torch.randn(16, 2, generator=gen, dtype=dt)
    b = torch.randn(16, generator=gen, dtype=dt)
    W2 = torch.randn(2, 16, generator=gen, dtype=dt) / 4

    def g(x: torch.Tensor) -> torch.Tensor:
        return x @ A.T + torch.tanh(x @ W1.T + b) @ W2.T

    x0 = torch.tensor([1.0, 0.0], dtype=dt)
    xs = taylor_coefficients(g, x0, K)
    print(f"\ng(x) = A x + W2 tanh(W1 x + b), x0 = {x0.tolist()}; Taylor coefficients x_k = d^k x/dt^k (0):")
    for k, c in enumerate(xs):
        print(f"  x_{k:<2d} = [{c[0].item(): .6e}, {c[1].item(): .6e}]")
    times = (0.05, 0.1, 0.2, 0.4)
    ref = {t: rk4(g, x0, t, 4000) for t in times}
    print("\n|Taylor polynomial of order K (t) − RK4 with 4000 steps (t)|, max over components:")
    print("   K  " + "  ".join(f"t={t:<8}" for t in times))
    for order in range(1, K + 1, 1 if K <= 10 else 2):
        errs = [(taylor_polynomial(xs[: order + 1], t) - ref[t]).abs().max().item() for t in times]
        print(f"  {order:2d}  " + "  ".join(f"{e:.2e}  " for e in errs))


if __name__ == "__main__":
    main()
