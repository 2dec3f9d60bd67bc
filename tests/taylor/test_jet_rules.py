"""Every Taylor rule, by value, against reverse-over-reverse autograd along a random Taylor curve
(float64, rtol 1e-10), to order 6 (8 for the elementwise recurrences)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import torch_hod
from jet_reference import check_jet

D = torch.float64


def rnd(*shape, seed=0, low=-2.0, high=2.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)


def pos(*shape, seed=0):
    return rnd(*shape, seed=seed, low=0.5, high=2.0)


X, Y, P = rnd(3, 4), rnd(3, 4, seed=1), pos(3, 4, seed=2)
W, B = rnd(5, 4, seed=3), rnd(5, seed=4)
IDX = torch.tensor([2, 0, 1])
MASK = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)

# name -> (function, inputs, K)
ELEMENTWISE = {
    "exp": (torch.exp, (X,), 8),
    "log": (torch.log, (P,), 8),
    "log1p": (torch.log1p, (P,), 6),
    "sqrt": (torch.sqrt, (P,), 8),
    "rsqrt": (torch.rsqrt, (P,), 8),
    "reciprocal": (torch.reciprocal, (P,), 8),
    "rdiv": (lambda x: 2.0 / x, (P,), 6),
    "sin": (torch.sin, (X,), 8),
    "cos": (torch.cos, (X,), 8),
    "tanh": (torch.tanh, (X,), 8),
    "sigmoid": (torch.sigmoid, (X,), 8),
    "softplus": (F.softplus, (X,), 6),
    "softplus_beta": (lambda x: F.softplus(x, beta=2.0, threshold=3.0), (X,), 6),
    "gelu": (F.gelu, (X,), 6),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), (X,), 6),
    "silu": (F.silu, (X,), 6),
    "elu": (lambda x: F.elu(x, alpha=0.7), (X,), 6),
    "erf": (torch.erf, (X,), 6),
    "expm1": (torch.expm1, (X,), 6),
    "logsigmoid": (F.logsigmoid, (X,), 6),
    "atan": (torch.atan, (X,), 6),
    "sinh_cosh": (lambda x: torch.sinh(x) * torch.cosh(x), (X,), 6),
    "mish": (F.mish, (X,), 6),
    "pow_half": (lambda x: x ** 1.5, (P,), 8),
    "pow_negative": (lambda x: torch.pow(x, -1.3), (P,), 8),
    "pow_int": (lambda x: x ** 3, (X,), 6),
    "pow_int_at_zero": (lambda x: (x * 0) ** 2 + x ** 4, (X,), 6),
    "pow_zero": (lambda x: x ** 0 + x, (X,), 4),
    "pow_tensor_exponent": (lambda x, y: x ** y, (P, X), 6),
    "pow_const_tensor_exponent": (lambda x: torch.pow(x, X), (P,), 6),
    "pow_scalar_base": (lambda y: 2.0 ** y, (X,), 6),
    "square": (torch.square, (X,), 4),
    "log2_log10": (lambda x: torch.log2(x) + torch.log10(x), (P,), 4),
}

ARITHMETIC = {
    "add_sub_neg": (lambda x, y: x + y - (-x) - 3.0 + torch.add(x, y, alpha=2) - torch.sub(y, x, alpha=0.5), (X, Y), 4),
    "rsub_radd": (lambda x: 1.0 - x * x + (2.0 + x), (X,), 3),
    "add_const_broadcast": (lambda x: x[0] + Y, (X,), 3),
    "mul": (lambda x, y: x * y * 3.0, (X, Y), 6),
    "mul_broadcast": (lambda x, y: x[0] * y, (X, Y), 6),
    "mul_const": (lambda x: x * Y, (X,), 4),
    "div": (lambda x, y: x / y, (X, P), 6),
    "div_broadcast": (lambda x, y: x[:, None, :] / y, (X, P), 6),
    "div_const": (lambda x: x / P + torch.div(x, 2.0), (X,), 4),
    "true_divide": (lambda x, y: torch.true_divide(x, y), (X, P), 4),
}

PIECEWISE = {
    "relu": (lambda x: torch.relu(x) + F.relu(x) + x.relu(), (X,), 4),
    "relu6_leaky_hardtanh": (lambda x: F.relu6(3 * x) + F.leaky_relu(x, 0.2) + F.hardtanh(x, -0.5, 0.5), (X,), 4),
    "abs": (torch.abs, (X,), 4),
    "where": (lambda x, y: torch.where(x > 0, x * y, y) + torch.where(y > 0, x, 2.0), (X, Y), 4),
    "tensor_where": (lambda x: x.where(x > 0, Y), (X,), 3),
    "clamp": (lambda x: torch.clamp(x, -0.5, 0.7) + x.clamp(min=0.1) + torch.clip(x, max=Y), (X,), 4),
    "clamp_jet_bounds": (lambda x, y: torch.clamp(x, min=y), (X, Y), 4),
    "maximum_minimum": (lambda x, y: torch.maximum(x, y) * torch.minimum(x, y), (X, Y), 4),
    "max_min_dim": (lambda x: torch.max(x, 1).values + torch.min(x, 1)[0] + x.max(0, keepdim=True).values.sum(), (X,), 4),
    "max_all": (lambda x: x.max() + x.min() + torch.max(x, Y).sum(), (X,), 4),
    "amax": (lambda x: x.amax(1) + x.amin(-1), (X,), 4),
    "sort_topk": (lambda x: x.sort(1).values[:, 0] + torch.sort(x, 0, descending=True)[0].sum(0)[:3] + x.topk(2).values.sum(1)
                  + torch.topk(x, 2, dim=0, largest=False).values.sum(0)[:3], (X,), 4),
    "cummax_kthvalue_median": (lambda x: torch.cummax(x, 1).values + x.cummin(dim=0)[0] + x.kthvalue(2, 1, keepdim=True).values
                               + torch.median(x, 1, keepdim=True).values, (X,), 4),
}

LINEAR = {
    "linear_const": (lambda x: F.linear(x, W, B), (X,), 6),
    "linear_jet_weight": (lambda x, w: F.linear(x, w, B), (X, W), 6),
    "linear_jet_bias": (lambda x, b: F.linear(x, W, b), (X, B), 4),
    "addmm": (lambda x, w: torch.addmm(B, x, w.t(), beta=0.5, alpha=2.0), (X, W), 5),
    "mm_bmm": (lambda x, w: torch.mm(x, w.t()) + torch.bmm(x[None], w.t()[None])[0], (X, W), 5),
    "matmul_left_const": (lambda x: W @ x.t() + torch.matmul(Y, x.t()).sum(), (X,), 4),
    "matmul_vector": (lambda x: x[0] @ W.t() + W @ x[1], (X,), 4),
    "matmul_batched": (lambda a, b: a.reshape(2, 3, 2) @ b.reshape(2, 2, 3), (X, Y), 5),
    "einsum_one": (lambda x: torch.einsum("ij,kj->ik", x, W), (X,), 4),
    "einsum_two": (lambda x, w: torch.einsum("ij,kj->ki", x, w), (X, W), 6),
    "einsum_list": (lambda x, y: torch.einsum("ij,ij->i", [x, y]), (X, Y), 4),
    "conv1d": (lambda x: F.conv1d(x.reshape(1, 3, 4), rnd(2, 3, 2, seed=5), rnd(2, seed=6), padding=1), (X,), 5),
    "conv2d": (lambda x: F.conv2d(x.reshape(1, 1, 3, 4), rnd(2, 1, 2, 2, seed=5), rnd(2, seed=6), stride=1, padding=1), (X,), 5),
    "conv2d_jet_weight": (lambda x, w: F.conv2d(x.reshape(2, 2, 3, 1).expand(2, 2, 3, 3), w.reshape(5, 1, 2, 2)[:4], None, groups=2), (X, W), 5),
    "conv2d_groups_stride": (lambda x: F.conv2d(x.reshape(1, 2, 2, 3), rnd(4, 1, 2, 2, seed=7), rnd(4, seed=8), stride=(1, 2), padding=1, groups=2), (X,), 4),
    "sum_mean": (lambda x: x.sum(0) + x.mean(1).sum() + torch.sum(x, (0, 1), keepdim=True) + x.mean() + x.sum(-1, True).sum(dtype=torch.float64)
                 + torch.mean(x, dim=[-2]) + x.sum([]) + x[0, 0].sum(), (X,), 4),
    "cumsum": (lambda x: torch.cumsum(x, 1) + x.cumsum(0), (X,), 4),
    "views": (lambda x: x.reshape(2, 6).t().reshape(4, 3).view(3, 4).permute(1, 0).transpose(0, 1).contiguous(), (X,), 4),
    "squeeze_expand": (lambda x: x.unsqueeze(0).expand(2, 3, 4).squeeze(0)[1] + x[None].squeeze() + x.flatten().unflatten(0, (3, 4)), (X,), 4),
    "movedim_T": (lambda x: x.T.mT.T.T + torch.movedim(x.reshape(3, 2, 2), 0, 2).reshape(3, 4), (X,), 3),
    "cat_stack": (lambda x, y: torch.cat([x, y, Y], 0).sum(0) + torch.stack([x, Y], 1).sum(1), (X, Y), 4),
    "split_chunk_unbind": (lambda x: x.split(2, 1)[1].sum() + x.chunk(3, 0)[2].sum() + sum(x.unbind(1)).sum(), (X,), 4),
    "getitem": (lambda x: x[1] + x[:, 2].sum() + x[..., 1:3].sum() + x[None, 0, ::2].sum(), (X,), 4),
    "getitem_advanced": (lambda x: x[IDX, 1] + x[x > 0].sum() + x[IDX][:, IDX].sum() + x[torch.tensor([True, False, True])].sum(), (X,), 4),
    "gather_index_select": (lambda x: torch.gather(x, 1, IDX[:, None].expand(3, 2)).sum(1) + x.index_select(0, IDX).sum(1), (X,), 4),
    "flip_roll_repeat": (lambda x: x.flip(0).roll(1, 1).repeat(2, 1)[:3] + x.tile(1, 1), (X,), 3),
    "diag_tril_trace": (lambda x: x[:, :3].tril().sum() + x[:, :3].diagonal() + x[:, :3].trace(), (X,), 3),
    "max_pool": (lambda x: F.max_pool2d(x.reshape(1, 1, 3, 4), 2, stride=1) .sum() + F.max_pool1d(x[None], 2)
                 + F.adaptive_max_pool2d(x.reshape(1, 3, 4), (1, 2)).sum(), (X,), 4),
    "max_pool_indices": (lambda x: F.max_pool2d(x.reshape(1, 1, 3, 4), 2, padding=1, return_indices=True)[0], (X,), 3),
    "interpolate": (lambda x: F.interpolate(x.reshape(1, 3, 4), scale_factor=2, mode="linear").sum(1)
                    + F.interpolate(x.reshape(1, 1, 3, 4), size=(4, 5), mode="bilinear", align_corners=True).sum()
                    + F.interpolate(x.reshape(1, 1, 3, 4), scale_factor=2).mean(), (X,), 3),
    "pad_pool": (lambda x: F.avg_pool2d(F.pad(x.reshape(1, 1, 3, 4), (1, 1, 1, 0)), 2) + F.adaptive_avg_pool2d(x.reshape(1, 1, 3, 4), 1).sum(), (X,), 3),
    "to_dtype": (lambda x: x.float().double() * 0 + x.to(torch.float64) + x.type_as(Y), (X,), 3),
}

REDUCTIONS = {
    "softmax": (lambda x: torch.softmax(x, -1) + F.softmax(x, dim=0) + x.softmax(1), (X,), 6),
    "log_softmax": (lambda x: F.log_softmax(x, 1) + torch.log_softmax(x, 0), (X,), 6),
    "logsumexp": (lambda x: torch.logsumexp(x, 1) + x.logsumexp((0, 1), keepdim=True).squeeze(0), (X,), 6),
    "var_std": (lambda x: x.var(1) + torch.std(x, 0).sum() + x.var(unbiased=False), (X,), 5),
    "mse_loss": (lambda x: F.mse_loss(x, Y) + F.mse_loss(x, Y, reduction="sum") + F.mse_loss(x, Y, reduction="none")[1, 2], (X,), 4),
    "mse_loss_jet_target": (lambda x, y: F.mse_loss(x, y), (X, Y), 4),
    "cross_entropy": (lambda x: F.cross_entropy(x, torch.tensor([1, 3, 0])), (X,), 6),
    "cross_entropy_weighted": (lambda x: F.cross_entropy(x, torch.tensor([1, 3, 0]), weight=pos(4, seed=9), ignore_index=3, label_smoothing=0.1), (X,), 5),
    "cross_entropy_sum_none": (lambda x: F.cross_entropy(x, torch.tensor([1, 3, 0]), reduction="sum") + F.cross_entropy(x, torch.tensor([2, 2, 1]), reduction="none").sum(), (X,), 4),
    "cross_entropy_probs": (lambda x: F.cross_entropy(x, torch.softmax(Y, 1), label_smoothing=0.2), (X,), 5),
    "cross_entropy_1d": (lambda x: F.cross_entropy(x[0], torch.tensor(2)), (X,), 4),
    "nll_loss": (lambda x: F.nll_loss(torch.log_softmax(x, 1), torch.tensor([1, 3, 0])), (X,), 4),
    "batch_norm_eval": (lambda x: F.batch_norm(x, Y[0], P[0], W[0], B[:4], training=False, eps=1e-3), (X,), 6),
    "group_norm": (lambda x: F.group_norm(x.reshape(1, 4, 3), 2, P[1], Y[2]), (X,), 5),
    "masked_fill": (lambda x: x.masked_fill(x > 0.5, 0.25) + torch.masked_fill(x, Y > 0, 1.0) * x, (X,), 4),
    "sdpa": (lambda q, k: F.scaled_dot_product_attention(q.reshape(1, 3, 4), k.reshape(1, 3, 4), q.reshape(1, 3, 4), is_causal=True)
             + F.scaled_dot_product_attention(q[None], k[None], k[None], attn_mask=MASK, scale=0.3)
             + F.scaled_dot_product_attention(q[None], k[None], k[None], attn_mask=Y[:, :3]), (X, Y), 4),
    "vector_norm_normalize": (lambda x: torch.linalg.vector_norm(x, dim=1) + x.norm() + F.normalize(x, dim=0).sum(1), (X,), 4),
    "embedding_weight": (lambda w: F.embedding(IDX, w), (W,), 3),
    "dropout_eval": (lambda x: F.dropout(x, 0.3, training=False) + F.dropout(x, 0.0), (X,), 3),
}

MORE = {
    "tan_asinh_asin_acos": (lambda x: torch.tan(x / 2) + torch.asinh(x) + torch.asin(x / 3) + torch.acos(x / 3), (X,), 5),
    "exp2_softsign_tanhshrink": (lambda x: torch.exp2(x) + F.softsign(x) + F.tanhshrink(x), (X,), 5),
    "softmin": (lambda x: F.softmin(x, 1), (X,), 5),
    "prod": (lambda x: x.prod(1) + torch.prod(x) + x.prod(0, keepdim=True).sum(), (X,), 5),
    "l1_huber_smooth_l1": (lambda x: F.l1_loss(x, Y) + F.huber_loss(x, Y, delta=0.8) + F.smooth_l1_loss(x, Y, beta=0.5)
                           + F.smooth_l1_loss(x, Y, beta=0.0, reduction="sum"), (X,), 4),
    "bce": (lambda x: F.binary_cross_entropy_with_logits(x, torch.sigmoid(Y), pos_weight=P[0]) +
            F.binary_cross_entropy(torch.sigmoid(x), torch.sigmoid(Y), reduction="sum"), (X,), 5),
    "kl_div": (lambda x: F.kl_div(F.log_softmax(x, 1), F.softmax(Y, 1), reduction="batchmean")
               + F.kl_div(x, Y, log_target=True, reduction="sum"), (X,), 5),
}

# functions without a rule of their own, run through PyTorch's decomposition (torch_hod.taylor.engine.DECOMPOSED)
DECOMPOSED = {
    "hardswish": (F.hardswish, (X,), 4),
    "selu": (F.selu, (X,), 4),
    "softshrink_hardshrink": (lambda x: F.softshrink(x, 0.3) + F.hardshrink(x, 0.3), (X,), 4),
    "logit": (lambda x: torch.logit(torch.sigmoid(x)) * x, (X,), 4),
    "sinc": (torch.sinc, (X,), 4),
    "xlogy": (lambda x: torch.xlogy(x, x * x + 1), (X,), 4),
    "glu": (lambda x: F.glu(x, -1), (X,), 4),
    "addcmul_addcdiv_lerp": (lambda x: torch.addcmul(x, x, Y, value=0.5) + torch.addcdiv(x, Y, x * x + 1) + torch.lerp(x, x * x, 0.3), (X,), 4),
    "frac_sgn": (lambda x: torch.frac(x) * x + torch.sgn(x) * x, (X,), 4),
    "std_mean_var_mean": (lambda x: torch.std_mean(x, 1)[0] + torch.var_mean(x, 1)[1], (X,), 4),
}

STRUCTURAL = {
    "narrow_select": (lambda x: x.narrow(1, 1, 2).sum(1) + x.select(1, 0) + torch.take_along_dim(x, IDX[:, None], 1)[:, 0], (X,), 3),
    "tensor_split_flip_rot": (lambda x: x.tensor_split(2, 1)[0].sum() + x.fliplr() + x.flipud() + torch.rot90(x.reshape(4, 3), 1, (0, 1)), (X,), 3),
    "diag_embed_triu_nansum": (lambda x: torch.diag(x[0]).sum(0) + torch.diag_embed(x)[0, 0] + x.triu(1)[0] + x.nansum(), (X,), 3),
    "ravel_repeat_interleave": (lambda x: x.ravel()[:4] + x.repeat_interleave(2, dim=0)[:4].sum(0) + torch.atleast_2d(x[0, 0])[0], (X,), 3),
    "view_variants": (lambda x: x.swapaxes(0, 1).T + x[0].expand_as(x) + x.reshape(12).view_as(x) + x.reshape(4, 3).reshape_as(x)
                      + torch.broadcast_to(x[:, :1], (3, 4)), (X,), 3),
    "stacks": (lambda x: torch.hstack([x, x]).sum(1, keepdim=True) + torch.vstack([x, Y])[:3] + torch.dstack([x, x]).sum(-1)
               + torch.concat([x, x]).reshape(3, 8)[:, :4], (X,), 3),
    "masked_select": (lambda x: torch.masked_select(x, x > 0).sum() + x, (X,), 3),
    "pixel_shuffle_unfold": (lambda x: F.pixel_shuffle(x.reshape(1, 4, 3, 1), 2).sum() + F.unfold(x.reshape(1, 1, 3, 4), 2).sum() + x, (X,), 3),
    "identities": (lambda x: x.positive() + x.conj() + x.resolve_conj() + x.narrow_copy(0, 0, 3) + x.requires_grad_() + x.data, (X,), 3),
    "iteration": (lambda x: sum(r * r for r in x) + len(x), (X,), 3),
    "inplace_methods": (lambda x: x.clone().sub_(x * x).div_(2.0).clamp_(min=-1) + x.clone().abs_().exp_(), (X,), 3),
}

CASES = {**STRUCTURAL, **ELEMENTWISE, **ARITHMETIC, **PIECEWISE, **LINEAR, **REDUCTIONS, **MORE, **DECOMPOSED}


def test_decomposed_list_is_tested():
    from torch_hod.taylor.engine import DECOMPOSED as listed

    tested = " ".join(DECOMPOSED) + " celu"
    assert all(name in tested for name in listed), sorted(n for n in listed if n not in tested)


def test_celu_and_cdist_against_composites():
    """(Autograd's celu backward loses precision (rel 1e-9); cdist has no double backward.)"""
    check_jet(lambda x: F.celu(x, 0.7), (X,), 5, reference=lambda x: torch.where(x > 0, x, 0.7 * (torch.exp(x / 0.7) - 1)))
    check_jet(lambda a, b: torch.cdist(a, b + 1), (X, Y), 5,
              reference=lambda a, b: torch.sqrt(((a[:, None] - b[None] - 1) ** 2).sum(-1)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_nested_jvp(name):
    f, inputs, K = CASES[name]
    check_jet(f, inputs, K)


# --- Ops whose nested jvp is untrustworthy: composites of elementary ops as references


def _layer_norm_ref(x, shape, w=None, b=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) * (x - mu)).mean(dims, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def test_layer_norm_against_composite():
    check_jet(lambda x: F.layer_norm(x, (4,), W[0], B[:4]), (X,), 6,
              reference=lambda x: _layer_norm_ref(x, (4,), W[0], B[:4]))
    check_jet(lambda x, w: F.layer_norm(x, (3, 4), w, eps=1e-3), (X, Y), 5,
              reference=lambda x, w: _layer_norm_ref(x, (3, 4), w, eps=1e-3))


def test_rms_norm_against_composite():
    ref = lambda x, w: x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    check_jet(lambda x, w: F.rms_norm(x, (4,), w, eps=1e-6), (X, Y[0]), 6, reference=ref)
    eps = torch.finfo(torch.float64).eps
    check_jet(lambda x: F.rms_norm(x, (4,)), (X,), 4,
              reference=lambda x: x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def test_batch_norm_training_against_composite():
    x = rnd(4, 3, 2, seed=11)

    def ref(x):
        mu = x.mean((0, 2), keepdim=True)
        var = ((x - mu) ** 2).mean((0, 2), keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * P[0, :3, None] + Y[0, :3, None]

    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    check_jet(lambda x: F.batch_norm(x, rm.clone(), rv.clone(), P[0, :3], Y[0, :3], training=True), (x,), 5, reference=ref)
    # running statistics updated from the primal exactly as PyTorch does
    torch_rm, torch_rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    F.batch_norm(x, torch_rm, torch_rv, training=True, momentum=0.2)
    from torch_hod.taylor import jet

    jet(lambda t: F.batch_norm(t, rm, rv, training=True, momentum=0.2), (x,), [[torch.ones_like(x)]])
    torch.testing.assert_close(rm, torch_rm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rv, torch_rv, rtol=1e-12, atol=1e-14)


def test_torch_hod_ops_rules():
    """torch_hod's own ops reach ``__torch_function__`` as one call and use their registered rules."""
    ops = torch_hod.ops
    check_jet(lambda x: ops.tanh(x) * ops.sigmoid(x) + ops.softplus(x, beta=2.0) + ops.gelu(x, approximate="tanh")
              + ops.silu(x) + ops.elu(x) + ops.sin(x) * ops.cos(x), (X,), 6,
              reference=lambda x: torch.tanh(x) * torch.sigmoid(x) + F.softplus(x, beta=2.0) + F.gelu(x, approximate="tanh")
              + F.silu(x) + F.elu(x) + torch.sin(x) * torch.cos(x))
    check_jet(lambda x: ops.exp(x) + ops.log(x) + ops.log1p(x) + ops.sqrt(x) + ops.rsqrt(x) + ops.reciprocal(x)
              + ops.pow(x, 2.5), (P,), 6,
              reference=lambda x: torch.exp(x) + torch.log(x) + torch.log1p(x) + torch.sqrt(x) + torch.rsqrt(x)
              + 1 / x + x ** 2.5)


def test_torch_hod_composite_ops_rules():
    """The Taylor rules that torch_hod's linear, softmax, normalisation and loss ops register."""
    ops = torch_hod.ops
    t = torch.tensor([0, 3, 1])
    check_jet(lambda x: ops.linear(x, W, B).sum(1) + ops.matmul(x, W.t()).sum(1) + ops.bmm(x[None], x.t()[None])[0].sum(1),
              (X,), 4, reference=lambda x: F.linear(x, W, B).sum(1) + (x @ W.t()).sum(1) + (x @ x.t()).sum(1))
    check_jet(lambda x: ops.softmax(x, -1) + ops.log_softmax(x, 0) + ops.logsumexp(x, 1, keepdim=True), (X,), 5,
              reference=lambda x: torch.softmax(x, -1) + torch.log_softmax(x, 0) + torch.logsumexp(x, 1, keepdim=True))
    check_jet(lambda x: ops.layer_norm(x, (4,), Y[0], Y[1]) + ops.rms_norm(x, (4,), Y[2], eps=1e-6)
              + ops.batch_norm(x, Y[0], P[0], Y[1], Y[2], training=False), (X,), 4,
              reference=lambda x: _layer_norm_ref(x, (4,), Y[0], Y[1]) + x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * Y[2]
              + F.batch_norm(x, Y[0], P[0], Y[1], Y[2], training=False))
    check_jet(lambda x: ops.cross_entropy(x, t) + ops.mse_loss(x, Y), (X,), 5,
              reference=lambda x: F.cross_entropy(x, t) + F.mse_loss(x, Y))


def test_setitem_and_inplace():
    def f(x, y):
        z = x.clone()
        z[1] = y[0] * y[0]
        z[:, 0] = 3.0
        z += x
        z.mul_(y)
        z = F.relu(z, inplace=True)
        return z * z

    def ref(x, y):
        z = x.clone()
        z = torch.cat([z[:1], (y[0] * y[0])[None], z[2:]])
        z = torch.cat([torch.full_like(z[:, :1], 3.0), z[:, 1:]], 1)
        z = torch.relu((z + x) * y)
        return z * z

    check_jet(f, (X, Y), 5, reference=ref)


def test_dropout_training_uses_one_mask():
    from torch_hod.taylor import jet

    x, v = rnd(50, seed=12), rnd(50, seed=13)
    torch.manual_seed(0)
    y0, (y1, y2) = jet(lambda t: F.dropout(t * t, 0.5, training=True), (x,), [[v, v]])
    mask = y0 / (x * x)
    assert set(mask.round(decimals=6).tolist()) == {0.0, 2.0}
    torch.testing.assert_close(y1, mask * 2 * x * v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y2, mask * (2 * v * v + 2 * x * v), rtol=1e-12, atol=1e-12)
