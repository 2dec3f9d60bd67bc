"""torch_hod in 30 lines: an op differentiable to every order, an HVP, a jet and a Laplacian."""
import torch
import torch_hod
from torch_hod import ops

torch.manual_seed(0)
x = torch.randn(5, dtype=torch.float64)
v = torch.randn(5, dtype=torch.float64)

# 1. ops: the 4th derivative of tanh along v by nested forward mode (torch.func.jvp^4), which is
#    silently wrong for a naive custom autograd.Function (pytorch#197867) and right here.
def jvp4(f):
    g = f
    for _ in range(4):
        g = (lambda g: lambda x: torch.func.jvp(g, (x,), (v,))[1])(g)
    return g(x)
print("d⁴/dt⁴ tanh(x+tv) (torch_hod.ops.tanh):", jvp4(ops.tanh)[:3])

# 2. Hessian-vector product of a scalar function, torch.func conventions.
f = lambda x: ops.softplus(x).pow(3).sum()
value, (Hv,) = torch_hod.hvp(f, (x,), (v,))
print("f(x) =", value.item(), " H v =", Hv[:3])

# 3. Taylor mode: all derivatives d^k/dt^k f(x + t v), k = 0..6, in one pass.
y0, ys = torch_hod.jet(lambda x: torch.sin(x).exp().sum(), (x,), ([v] + [torch.zeros_like(v)] * 5,))
print("directional derivatives 1..6:", [round(y.item(), 4) for y in ys])

# 4. The Laplacian of a small network, per sample, by collapsed Taylor mode.
net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
points = torch.randn(4, 3, dtype=torch.float64)
print("Δ net(x) per sample:", torch_hod.laplacian(net, points, batch_dims=1).squeeze(-1))
