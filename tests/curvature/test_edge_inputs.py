"""Edge inputs of the curvature tools: empty data, callables, parameter groups without trainables."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torch_hod.curvature import (
    CallableOperator, EmpiricalFisherOperator, GGNOperator, HessianOperator, NewtonCG, as_linear_operator,
    hutchinson_trace,
)


@pytest.mark.parametrize("Op", [HessianOperator, GGNOperator, EmpiricalFisherOperator])
def test_empty_data_is_rejected(Op):
    model = torch.nn.Linear(3, 2).double()
    X, y = torch.randn(0, 3, dtype=torch.float64), torch.randint(0, 2, (0,))
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    for data in (loader, [(X, y)]):  # before: an all-zero operator / ZeroDivisionError at the first product
        with pytest.raises(ValueError, match="no samples"):
            Op(model, torch.nn.CrossEntropyLoss(), data)


def test_callable_operator_follows_default_dtype():
    A = as_linear_operator(lambda v: 2 * v, 4)
    assert A.dtype == torch.get_default_dtype() and A.device == torch.empty(0).device
    B = CallableOperator(lambda v: 3 * v, 5, torch.float64)
    est = hutchinson_trace(B, 3)
    assert est.estimate.dtype == torch.float64 and est.estimate.item() == pytest.approx(15.0, rel=1e-12)


def test_newton_cg_group_without_trainable_parameters():
    frozen = torch.zeros(2, dtype=torch.float64)
    opt = NewtonCG([frozen])
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        opt.step(lambda: (frozen + 1).pow(2).sum())


def _linear_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 0, 1])
    return model, X, y


@pytest.mark.parametrize("Op", [HessianOperator, GGNOperator])
def test_weighted_mean_over_several_batches_is_rejected(Op):
    model, X, y = _linear_problem()
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    weighted = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    y_ignored = y.clone()
    y_ignored[4] = -100
    for loss_fn, target in ((weighted, y), (torch.nn.CrossEntropyLoss(), y_ignored)):
        # before: the n_b/N weighting gave a silently wrong operator (off by 5-14% of its largest entry)
        with pytest.raises(ValueError, match="weight|ignore_index"):
            Op(model, loss_fn, [(X[:2], target[:2]), (X[2:], target[2:])])
        # one batch is exact; for a linear model the GGN equals the Hessian (reverse-over-reverse)
        loss_flat = lambda t: loss_fn(torch.nn.functional.linear(X, t[:9].reshape(3, 3), t[9:]), target)  # noqa: E731
        ref = torch.autograd.functional.hessian(loss_flat, theta)
        assert ref.abs().max() > 0
        torch.testing.assert_close(Op(model, loss_fn, [(X, target)]).dense(), ref, rtol=1e-10, atol=1e-12)
    # sum reduction over batches stays allowed (and equals the one-batch sum)
    summed = torch.nn.CrossEntropyLoss(weight=weighted.weight, reduction="sum")
    torch.testing.assert_close(Op(model, summed, [(X[:2], y[:2]), (X[2:], y[2:])]).dense(),
                               Op(model, summed, [(X, y)]).dense(), rtol=1e-10, atol=1e-12)


def test_empirical_fisher_rejects_weighted_mean():
    model, X, y = _linear_problem()
    # per sample a weighted mean is w·l/w = l (the weight cancels), an ignored target 0/0
    with pytest.raises(ValueError, match="weight"):
        EmpiricalFisherOperator(model, torch.nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)), [(X, y)])


def test_hessian_operator_rejects_unknown_mode_at_construction():
    model, X, y = _linear_problem()
    with pytest.raises(ValueError, match="unknown mode 'fwd-fwd'"):  # before: only at the first product
        HessianOperator(model, torch.nn.CrossEntropyLoss(), [(X, y)], mode="fwd-fwd")


@pytest.mark.parametrize("loss_fn", [
    torch.nn.HuberLoss(), torch.nn.SmoothL1Loss(), torch.nn.MSELoss(),
    lambda o, t: torch.nn.functional.layer_norm(o, (3,)).pow(2).sum(1).mean() + torch.nn.functional.mse_loss(o, t),
], ids=["huber", "smooth_l1", "mse", "layer_norm_loss"])  # before: layer_norm_loss was silently wrong (rev-fwd)
def test_ggn_for_losses_without_reliable_forward_ad(loss_fn):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    X, Y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(t):
        chunks = torch.split(t, [s.numel() for s in shapes])
        return torch.func.functional_call(model, {k: c.reshape(s) for k, c, s in zip(names, chunks, shapes)}, (X,))

    # reference: dense Jacobian (reverse mode) and output Hessian (reverse-over-reverse)
    out = outputs(theta).detach()
    J = torch.autograd.functional.jacobian(outputs, theta).reshape(out.numel(), -1)
    H_o = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape), Y), out.reshape(-1))
    ref = J.T @ H_o @ J
    assert ref.abs().max() > 0
    G = GGNOperator(model, loss_fn, [(X[:2], Y[:2]), (X[2:], Y[2:])], reduction="mean").dense()
    torch.testing.assert_close(G, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["bce", "cross_entropy_probabilities"])
def test_weights_that_keep_the_mean_over_samples_are_allowed_and_exact(loss):
    # BCEWithLogitsLoss(weight=w) averages w·l over elements, and cross-entropy with probability
    # targets and class weights divides by n_b: the n_b/N weighting over batches is exact
    model, X, _ = _linear_problem()
    Y = torch.rand(6, 3, dtype=torch.float64).softmax(1)
    w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    loss_fn = torch.nn.BCEWithLogitsLoss(weight=w) if loss == "bce" else torch.nn.CrossEntropyLoss(weight=w)
    split = HessianOperator(model, loss_fn, [(X[:2], Y[:2]), (X[2:], Y[2:])]).dense()
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    ref = torch.autograd.functional.hessian(
        lambda t: loss_fn(torch.nn.functional.linear(X, t[:9].reshape(3, 3), t[9:]), Y), theta)
    assert ref.abs().max() > 0
    torch.testing.assert_close(split, ref, rtol=1e-10, atol=1e-12)
