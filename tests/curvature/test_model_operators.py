"""Model curvature operators against dense float64 references built independently."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torch_hod
from torch_hod.curvature.operators import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    flatten_params,
    unflatten_params,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RTOL = 1e-10


class MLP(nn.Module):
    """4 → 5 → 3 with torch_hod's tanh (an op with derivatives of every order)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch_hod.ops.tanh(self.fc1(x)))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    scale = expected.abs().max()
    assert scale > 0, "reference is zero: the check could not fail"
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs err {err:.3e}, rel {err / scale:.3e}"


def setup(loss: str, device: str = "cpu", model_cls=MLP, n: int = 13):
    torch.manual_seed(0)
    model = model_cls().to(device=device, dtype=torch.float64)
    shape = (n, 4) if model_cls is MLP else (n, 1, 5, 5)
    X = torch.randn(*shape, dtype=torch.float64, device=device)
    if loss == "mse":
        y, loss_fn = torch.randn(n, 3, dtype=torch.float64, device=device), nn.MSELoss()
    else:
        y, loss_fn = torch.randint(0, 3, (n,), device=device), nn.CrossEntropyLoss()
    return model, loss_fn, X, y


def unequal(X, y):
    cuts = [0, 3, 10, X.shape[0]]
    return [(X[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])]


def flat_fn(model, names_params, X):
    """θ (flat) ↦ model output, via functional_call (the reference's own parametrisation)."""
    return lambda theta: functional_call(model, unflatten_params(theta, names_params), (X,))


def dense_hessian(model, loss_fn, X, y, params=None):
    params = params or dict(model.named_parameters())
    f = flat_fn(model, params, X)
    return torch.func.hessian(lambda t: loss_fn(f(t), y))(flatten_params(params).detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_hessian_unequal_batches_equals_full_batch(loss, device):
    model, loss_fn, X, y = setup(loss, device)
    H = HessianOperator(model, loss_fn, unequal(X, y)).dense()
    close(H, dense_hessian(model, loss_fn, X, y))


def test_hessian_sum_reduction_adds_batches():
    model, _, X, y = setup("ce")
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    close(HessianOperator(model, loss_fn, unequal(X, y)).dense(), dense_hessian(model, loss_fn, X, y))


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev", "rev-fwd"])
def test_hessian_modes_and_param_subset(mode):
    model, loss_fn, X, y = setup("ce")
    sub = {"fc1.weight": model.fc1.weight, "fc2.bias": model.fc2.bias}
    full = dense_hessian(model, loss_fn, X, y)
    idx = torch.cat([torch.arange(0, 20), torch.arange(full.shape[0] - 3, full.shape[0])])
    for params in (list(sub), [model.fc1.weight, model.fc2.bias]):
        op = HessianOperator(model, loss_fn, unequal(X, y), params=params, mode=mode)
        assert op.shape == (23, 23)
        close(op.dense(), full[idx][:, idx])


def test_dataloader_equals_list_and_linear_operator_interface():
    model, loss_fn, X, y = setup("mse")
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=False)  # 4+4+4+1 samples
    op = HessianOperator(model, loss_fn, loader)
    ref = dense_hessian(model, loss_fn, X, y)
    v, V = torch.randn(op.shape[0], dtype=torch.float64), torch.randn(op.shape[0], 3, dtype=torch.float64)
    close(op @ v, ref @ v)
    close(op.matmat(V), ref @ V)
    close(torch.as_tensor(op.to_scipy().matvec(v.numpy())), ref @ v)
    assert op.num_matvecs == 5 and op.num_data == 13
    close(op.dense(chunk_size=7), ref)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        op.dense(chunk_size=0)


def dense_ggn(model, loss_fn, X, y):
    params = dict(model.named_parameters())
    theta = flatten_params(params).detach()
    out = flat_fn(model, params, X)(theta)
    J = torch.func.jacrev(flat_fn(model, params, X))(theta).reshape(out.numel(), -1)
    H_out = torch.func.hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1).detach())
    return J.T @ H_out @ J


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_ggn_equals_dense_jt_h_j(loss, device):
    model, loss_fn, X, y = setup(loss, device)
    G = GGNOperator(model, loss_fn, unequal(X, y)).dense()
    close(G, dense_ggn(model, loss_fn, X, y))


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_ggn_with_batchnorm_eval(loss):
    model, loss_fn, X, y = setup(loss, model_cls=ConvBN)
    model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    close(GGNOperator(model, loss_fn, unequal(X, y)).dense(), dense_ggn(model.eval(), loss_fn, X, y))


def dense_ef(model, loss_fn, X, y, scale):
    params = dict(model.named_parameters())
    rows = []
    for i in range(X.shape[0]):
        g = torch.autograd.grad(loss_fn(model(X[i:i + 1]), y[i:i + 1]), list(params.values()))
        rows.append(flatten_params(g))
    G = torch.stack(rows)
    return scale * G.T @ G


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_empirical_fisher_equals_per_sample_definition(loss, reduction):
    model, loss_fn, X, y = setup(loss)
    loss_fn.reduction = reduction
    F = EmpiricalFisherOperator(model, loss_fn, unequal(X, y)).dense()
    close(F, dense_ef(model, loss_fn, X, y, 1 / 13 if reduction == "mean" else 1.0))


def test_batchnorm_eval_default_and_train_mode():
    model, loss_fn, X, y = setup("ce", model_cls=ConvBN)
    model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    stats = [b.clone() for b in model.buffers()]
    model.train()
    params = dict(model.named_parameters())
    # eval (default): running statistics; reference in eval mode
    H_eval = HessianOperator(model, loss_fn, [(X, y)]).dense()
    model.eval()
    ref_eval = dense_hessian(model, loss_fn, X, y)
    close(H_eval, ref_eval)
    # train mode: batch statistics; reference by reverse-over-reverse (autograd.functional.hessian)
    model.train()
    f = flat_fn(model, params, X)
    ref_train = torch.autograd.functional.hessian(lambda t: loss_fn(f(t), y), flatten_params(params).detach())
    model.load_state_dict({**model.state_dict(), **dict(zip(dict(model.named_buffers()), stats))})
    for op_cls in (HessianOperator, GGNOperator):
        op = op_cls(model, loss_fn, [(X, y)], train_mode=True)
        assert model.training
        M = op.dense()
        assert model.training and model.bn.track_running_stats
        for b, s in zip(model.buffers(), stats):
            assert torch.equal(b, s), "running statistics changed"
        if op_cls is HessianOperator:
            close(M, ref_train)
            assert (M - H_eval).abs().max() > 1e-3  # batch statistics really used
        else:
            model.bn.track_running_stats = False  # reference on batch statistics, without buffer updates
            close(M, dense_ggn(model, loss_fn, X, y))  # jacrev (reverse only) of the train-mode model
            model.bn.track_running_stats = True


def test_float32_close_to_float64():
    model, loss_fn, X, y = setup("ce")
    ref = HessianOperator(model, loss_fn, unequal(X, y)).dense()
    model32 = model.float()
    H32 = HessianOperator(model32, loss_fn, [(X.float(), y)]).dense()
    assert H32.dtype == torch.float32
    close(H32.double(), ref, rtol=1e-4)


def test_flatten_unflatten_roundtrip_and_batched():
    p = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    v = flatten_params(p)
    assert v.shape == (10,)
    back = unflatten_params(v, p)
    assert all(torch.equal(back[k], p[k]) for k in p)
    V = torch.randn(7, 10)
    batched = unflatten_params(V, {"a": (2, 3), "b": (4,)})
    assert batched["a"].shape == (7, 2, 3) and torch.equal(batched["b"], V[:, 6:])
    with pytest.raises(ValueError, match="last dimension of 10"):
        unflatten_params(torch.randn(9), p)


def test_rejects_bad_inputs():
    model, loss_fn, X, y = setup("ce")
    ds = TensorDataset(X, y)
    with pytest.raises(ValueError, match="shuffles .*RandomSampler.*same batches"):
        HessianOperator(model, loss_fn, DataLoader(ds, batch_size=4, shuffle=True))
    shard = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True)
    with pytest.raises(ValueError, match="shuffles \\(DistributedSampler\\)"):
        HessianOperator(model, loss_fn, DataLoader(ds, batch_size=4, sampler=shard))
    shard = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False)
    assert HessianOperator(model, loss_fn, DataLoader(ds, batch_size=4, sampler=shard)).num_data == 7
    with pytest.raises(TypeError, match="consumed only once"):
        HessianOperator(model, loss_fn, ((X[i:i + 4], y[i:i + 4]) for i in range(0, 13, 4)))
    with pytest.raises(TypeError, match="consumed only once"):
        HessianOperator(model, loss_fn, iter(unequal(X, y)))
    with pytest.raises(TypeError, match=r"data\[1\] must be an \(X, y\) pair"):
        HessianOperator(model, loss_fn, [(X, y), X])
    with pytest.raises(KeyError, match="'fc3.weight' is not a parameter"):
        HessianOperator(model, loss_fn, [(X, y)], params=["fc3.weight"])
    model.fc2.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['fc2.bias'\] do not require grad"):
        HessianOperator(model, loss_fn, [(X, y)], params=["fc1.weight", "fc2.bias"])
    assert HessianOperator(model, loss_fn, [(X, y)]).shape == (40, 40)  # default: only trainable ones
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), [(X, y)])
    with pytest.raises(ValueError, match="cannot infer"):
        HessianOperator(model, lambda o, t: torch.nn.functional.cross_entropy(o, t), [(X, y)])
    with pytest.raises(ValueError, match="contradicts"):
        HessianOperator(model, loss_fn, [(X, y)], reduction="sum")
    drop = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.1)).double()
    with pytest.raises(ValueError, match="active dropout in \\['1'\\]"):
        GGNOperator(drop, loss_fn, [(X, y)], train_mode=True)
    GGNOperator(drop, loss_fn, [(X, y)])  # eval mode: dropout off, accepted
    bn_model, *_ = setup("ce", model_cls=ConvBN)
    with pytest.raises(ValueError, match="per-sample gradients are undefined with BatchNorm"):
        EmpiricalFisherOperator(bn_model, loss_fn, [(X, y)], train_mode=True)


def test_functional_loss_with_explicit_reduction():
    model, loss_fn, X, y = setup("ce")
    op = HessianOperator(model, torch.nn.functional.cross_entropy, unequal(X, y), reduction="mean")
    close(op.dense(), dense_hessian(model, loss_fn, X, y))


def test_converted_model_gives_the_same_operators():
    """A model converted to torch_hod modules (shared parameters) has the same curvature."""
    import copy

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    converted = torch_hod.nn.convert(copy.deepcopy(plain))
    assert type(converted[0]) is not nn.Linear and type(converted[1]) is not nn.Tanh
    _, loss_fn, X, y = setup("ce")
    for op_cls in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        close(op_cls(converted, loss_fn, unequal(X, y)).dense(), op_cls(plain, loss_fn, unequal(X, y)).dense())
    close(HessianOperator(converted, loss_fn, unequal(X, y)).dense(), dense_hessian(plain, loss_fn, X, y))


def test_to_scipy_eigsh_matches_dense_spectrum():
    from scipy.sparse.linalg import eigsh

    model, loss_fn, X, y = setup("ce")
    op = GGNOperator(model, loss_fn, unequal(X, y))
    top = torch.as_tensor(sorted(eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)))
    close(top, torch.linalg.eigvalsh(dense_ggn(model, loss_fn, X, y))[-3:], rtol=1e-8)
