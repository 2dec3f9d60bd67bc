"""Writing and validating your own higher-order op.

Two ways:
1. ``elementwise_op(name, f, f')``: give the function and its derivative in torch ops; you get the
   backward, the forward-mode rule, vmap, every higher derivative and a Taylor rule.
2. ``HigherOrderFunction``: write ``forward``/``setup_context``/``backward``/``tangent`` yourself
   (backward and tangent in differentiable ops; read saved tensors with ``saved_primals``) and
   expose it with ``public_op(name, taylor=rule)`` so Taylor mode sees it as one call.
Then ``check_op`` compares it with a plain-torch reference in every AD mode up to order 4.
"""
import torch
import torch_hod
from torch_hod.ops import HigherOrderFunction, elementwise_op, public_op, saved_primals
from torch_hod.testing import check_op

torch.manual_seed(0)

# 1. softsign(x) = x / (1 + |x|), softsign'(x) = 1 / (1 + |x|)².
softsign = elementwise_op("softsign", lambda x: x / (1 + x.abs()), lambda x: (1 + x.abs()).pow(-2))


# 2. A fused op with two inputs: y = a · tanh(b), ∂y/∂a = tanh(b), ∂y/∂b = a (1 − tanh²(b)).
class ScaledTanh(HigherOrderFunction):
    @staticmethod
    def forward(a, b):
        return a * torch.tanh(b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b = inputs
        ctx.save_for_backward(a, b)
        ctx.save_for_forward(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        t = torch.tanh(b)
        return grad * t, grad * a * (1 - t * t)

    @staticmethod
    def tangent(ctx, a_dot, b_dot):
        a, b = saved_primals(ctx)
        t = torch.tanh(b)
        out = torch.zeros_like(t)
        if a_dot is not None:
            out = out + a_dot * t
        if b_dot is not None:
            out = out + a * (1 - t * t) * b_dot
        return out


@public_op("scaled_tanh", taylor=lambda a, b: a * torch.tanh(b))
def scaled_tanh(a, b):
    return ScaledTanh.apply(a, b)


x = torch.randn(4, dtype=torch.float64)
y = torch.randn(4, dtype=torch.float64)
report = check_op(softsign, lambda x: x / (1 + x.abs()), (x,), order=4)
print(f"softsign: {len(report)} checks passed (max rel error {max(r.max_rel for r in report):.1e})")
report = check_op(scaled_tanh, lambda a, b: a * torch.tanh(b), (x, y), order=4)
print(f"scaled_tanh: {len(report)} checks passed (max rel error {max(r.max_rel for r in report):.1e})")

# Taylor mode uses the ops' own rules.
y0, ys = torch_hod.jet(lambda x: scaled_tanh(x, softsign(x)).sum(), (x,), ([torch.ones_like(x), torch.zeros_like(x), torch.zeros_like(x)],))
print("3 directional derivatives of sum(x · tanh(softsign(x))):", [round(c.item(), 6) for c in ys])
