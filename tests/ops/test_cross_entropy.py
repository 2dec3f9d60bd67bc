"""cross_entropy: every derivative order in every AD mode, by value, vs F.cross_entropy; bad input; memory.

Run as a script for the HVP peak-memory comparison at full size:
``python tests/ops/test_cross_entropy.py [N C]`` (default 4096 1024, float32).
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from torch_hod.ops.cross_entropy import cross_entropy
from torch_hod.testing import check_op, tolerances

C = 5
FAST_MODES = ["value", "autograd", "reverse", "forward", "forward_over_reverse", "reverse_over_forward", "taylor"]


def _randn(shape, dtype=torch.float64, device="cpu", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _index_target(device, ignore_index=-100) -> torch.Tensor:
    return torch.tensor([0, 3, ignore_index, 4, 1, 3], device=device)


def _prob_target(shape, dtype, device, seed=1) -> torch.Tensor:
    return torch.softmax(_randn(shape, dtype, device, seed), 1 if len(shape) > 1 else 0)


def _weight(dtype, device) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, C, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# derivatives by value
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_index_targets_weight_smoothing_ignore_order4(reduction, device):
    z, t = _randn((6, C), device=device), _index_target(device, ignore_index=2)
    kw = dict(weight=_weight(torch.float64, device), ignore_index=2, label_smoothing=0.15, reduction=reduction)
    check_op(cross_entropy, F.cross_entropy, (z, t), kwargs=kw, order=4)


@pytest.mark.parametrize("case", ["plain", "weight", "smoothing", "ignore_default"])
def test_index_targets_mean_order4(case, device):
    z, t = _randn((6, C), device=device), _index_target(device)
    if case != "ignore_default":
        t = t.clamp(min=0)
    kw = {"weight": dict(weight=_weight(torch.float64, device)), "smoothing": dict(label_smoothing=0.3)}.get(case, {})
    check_op(cross_entropy, F.cross_entropy, (z, t), kwargs=kw, order=4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_order4_wrt_logits_and_targets(reduction, device):
    z, q = _randn((4, C), device=device), _prob_target((4, C), torch.float64, device)
    kw = dict(weight=_weight(torch.float64, device), label_smoothing=0.2, reduction=reduction)
    check_op(cross_entropy, F.cross_entropy, (z, q), kwargs=kw, order=4, argnums=(0, 1))


@pytest.mark.parametrize("target", ["index", "probability"])
def test_spatial_input_order4(target, device):
    z = _randn((2, C, 3), device=device)
    t = torch.tensor([[0, 4, -100], [2, 2, 1]], device=device) if target == "index" else _prob_target((2, C, 3), torch.float64, device)
    check_op(cross_entropy, F.cross_entropy, (z, t), kwargs=dict(label_smoothing=0.1, weight=_weight(torch.float64, device)), order=4)


@pytest.mark.parametrize("target", ["index", "probability"])
def test_unbatched_input_order4(target, device):
    z = _randn((C,), device=device)
    t = torch.tensor(3, device=device) if target == "index" else _prob_target((C,), torch.float64, device)
    check_op(cross_entropy, F.cross_entropy, (z, t), kwargs=dict(label_smoothing=0.1), order=4)


@pytest.mark.parametrize("target", ["index", "probability"])
def test_float32_order2(target, device):
    rtol, atol = tolerances(torch.float32)
    z = _randn((6, C), torch.float32, device)
    t = _index_target(device) if target == "index" else _prob_target((6, C), torch.float32, device)
    kw = dict(weight=_weight(torch.float32, device), label_smoothing=0.1)
    check_op(cross_entropy, F.cross_entropy, (z, t), kwargs=kw, order=2, rtol=rtol, atol=atol)


@pytest.mark.parametrize("target", ["index", "probability"])
def test_extreme_logits_finite_every_order(target, device):
    """Logits ±1e4 (with near-ties among the large ones, so derivatives are non-zero)."""
    sign = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64, device=device)
    z = 1e4 * sign + _randn((6, C), device=device)
    t = _index_target(device) if target == "index" else _prob_target((6, C), torch.float64, device)
    check_op(cross_entropy, F.cross_entropy, (z, t), kwargs=dict(label_smoothing=0.1), order=4, modes=FAST_MODES)


@pytest.mark.parametrize("target", ["index", "probability"])
def test_extreme_logits_float32_order2(target, device):
    rtol, atol = tolerances(torch.float32)
    sign = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0], device=device)
    z = 1e4 * sign + _randn((6, C), torch.float32, device)
    t = _index_target(device) if target == "index" else _prob_target((6, C), torch.float32, device)
    check_op(cross_entropy, F.cross_entropy, (z, t), kwargs=dict(label_smoothing=0.1), order=2, rtol=rtol, atol=atol,
             argnums=(0,), modes=FAST_MODES)


def test_per_sample_gradients_under_vmap_with_batched_targets(device):
    z, t = _randn((6, C), device=device), _index_target(device)
    w = _weight(torch.float64, device)

    def per_sample(fn):
        return torch.func.vmap(torch.func.grad(lambda z, t: fn(z[None], t[None], weight=w, label_smoothing=0.1)))(z, t)

    expected = per_sample(F.cross_entropy)
    assert expected.abs().max() > 0
    torch.testing.assert_close(per_sample(cross_entropy), expected, rtol=1e-12, atol=1e-14)


def test_legacy_size_average_and_reduce(device):
    z, t = _randn((6, C), device=device), _index_target(device)
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        with pytest.warns(UserWarning):
            expected = F.cross_entropy(z, t, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning):
            got = cross_entropy(z, t, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_targets_ignored_gives_nan_loss_and_zero_gradient_like_torch(label_smoothing, device):
    z, t = _randn((3, C), device=device).requires_grad_(), torch.full((3,), -100, device=device)
    for fn in (F.cross_entropy, cross_entropy):
        loss = fn(z, t, label_smoothing=label_smoothing)
        (g,) = torch.autograd.grad(loss, z)
        assert torch.isnan(loss) and (g == 0).all(), fn
    assert cross_entropy(z, t, reduction="sum").item() == 0.0


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input():
    z, t = torch.randn(4, C), torch.tensor([0, 1, 2, 3])
    cases = [
        (TypeError, "integer/bool dtype", lambda: cross_entropy(z.long(), t)),
        (TypeError, "complex dtype", lambda: cross_entropy(z.to(torch.complex64), t)),
        (ValueError, "0-dim", lambda: cross_entropy(torch.tensor(1.0), torch.tensor(0))),
        (IndexError, r"target value 5 is out of range; class indices must lie in \[0, 4\]",
         lambda: cross_entropy(z, torch.tensor([0, 5, 1, 2]))),
        (IndexError, r"target value -1 is out of range", lambda: cross_entropy(z, torch.tensor([0, -1, 1, 2]))),
        (TypeError, r"dtype torch.int32; expected int64 \(torch.long\)", lambda: cross_entropy(z, t.int())),
        (ValueError, r"must have shape \(4,\)", lambda: cross_entropy(z, torch.tensor([0, 1, 2]))),
        (ValueError, r"must have the input's shape \(4, 5\), got \(4, 4\)", lambda: cross_entropy(z, torch.rand(4, 4))),
        (ValueError, r"reduction must be one of \['none', 'mean', 'sum'\], got 'avg'",
         lambda: cross_entropy(z, t, reduction="avg")),
        (ValueError, r"label_smoothing must be a number in \[0, 1\], got 1.5", lambda: cross_entropy(z, t, label_smoothing=1.5)),
        (ValueError, r"label_smoothing must be a number in \[0, 1\], got -0.1", lambda: cross_entropy(z, t, label_smoothing=-0.1)),
        (ValueError, r"one entry per class \(5\), got shape \(4,\)", lambda: cross_entropy(z, t, weight=torch.ones(4))),
        (ValueError, r"ignore_index is not supported", lambda: cross_entropy(z, torch.rand(4, C), ignore_index=0)),
        (TypeError, "target must be a Tensor", lambda: cross_entropy(z, [0, 1, 2, 3])),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_ignore_index_may_lie_outside_the_classes():
    z = _randn((4, C))
    t = torch.tensor([0, 7, 1, 7])
    torch.testing.assert_close(cross_entropy(z, t, ignore_index=7), F.cross_entropy(z, t, ignore_index=7), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# memory: peak of a Hessian-vector product (double backward) w.r.t. the logits
# ------------------------------------------------------------------------------------------------
def _walk(nodes) -> Iterator:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def hvp_peak_bytes(loss: Callable, n: int, c: int, dtype=torch.float32, mode: str = "double_backward", **kwargs) -> int:
    """Peak bytes held by the CPU allocator during one Hessian-vector product w.r.t. the logits.

    ``mode``: ``double_backward`` (``g = ∇L(z)`` with create_graph, then ``∇⟨g, v⟩``) or
    ``jvp_grad`` (``torch.func.jvp(torch.func.grad(L), (z,), (v,))``). Method: torch.profiler
    (profile_memory=True) records every allocation and free of the CPU allocator; the running sum of
    their sizes in time order, maximised, is the peak above what existed before (the logits ``z``,
    the direction ``v`` and the class-index targets).
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    z, v, t = torch.randn(n, c, dtype=dtype), torch.randn(n, c, dtype=dtype), torch.randint(0, c, (n,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if mode == "double_backward":
            z = z.requires_grad_()
            (g,) = torch.autograd.grad(loss(z, t, **kwargs), z, create_graph=True)
            (h,) = torch.autograd.grad(g, z, v)
        else:
            g, h = torch.func.jvp(torch.func.grad(lambda z: loss(z, t, **kwargs)), (z,), (v,))
        del g, h
    events = prof.profiler.kineto_results.experimental_event_tree()
    sizes = sorted((e.start_time_ns, e.extra_fields.alloc_size) for e in _walk(events) if e.tag == _EventType.Allocation)
    running = peak = 0
    for _, size in sizes:
        running += size
        peak = max(peak, running)
    return peak


def test_hvp_peak_memory_at_most_half_of_builtin():
    ours, builtin = hvp_peak_bytes(cross_entropy, 256, 128), hvp_peak_bytes(F.cross_entropy, 256, 128)
    logits = 256 * 128 * 4
    assert builtin > 4 * logits  # the measurement sees the built-in's temporaries
    assert ours <= 0.5 * builtin, f"HVP peak: torch_hod {ours / logits:.2f}x logits, F.cross_entropy {builtin / logits:.2f}x"


if __name__ == "__main__":
    n, c = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (4096, 1024)
    logits = n * c * 4
    for mode in ("double_backward", "jvp_grad"):
        for kwargs in ({}, {"label_smoothing": 0.1, "weight": torch.rand(c)}):
            for name, fn in [("torch_hod.ops.cross_entropy", cross_entropy), ("F.cross_entropy", F.cross_entropy)]:
                peak = hvp_peak_bytes(fn, n, c, mode=mode, **kwargs)
                print(f"{mode:16s} {'smoothing+weight' if kwargs else 'plain':16s} {name:28s} HVP peak "
                      f"{peak / 2**20:8.1f} MiB = {peak / logits:.2f} x logits ({n}x{c} float32)")
