"""torch_hod.nn twins: same constructor, state_dict and numbers as torch.nn; convert keeps models equal."""
import copy

import pytest
import torch
from torch import nn

import torch_hod
import torch_hod.nn as hnn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (torch module factory, input factory) — each twin is built with the same arguments.
SINGLE_INPUT = {
    "Tanh": (lambda: nn.Tanh(), lambda: torch.randn(4, 5)),
    "Sigmoid": (lambda: nn.Sigmoid(), lambda: torch.randn(4, 5)),
    "Softplus": (lambda: nn.Softplus(beta=2.0, threshold=5.0), lambda: 3 * torch.randn(4, 5)),
    "GELU": (lambda: nn.GELU(approximate="tanh"), lambda: torch.randn(4, 5)),
    "SiLU": (lambda: nn.SiLU(), lambda: torch.randn(4, 5)),
    "ELU": (lambda: nn.ELU(alpha=0.7), lambda: torch.randn(4, 5)),
    "Linear": (lambda: nn.Linear(5, 3), lambda: torch.randn(2, 4, 5)),
    "LayerNorm": (lambda: nn.LayerNorm((4, 5)), lambda: torch.randn(3, 4, 5)),
    "RMSNorm": (lambda: nn.RMSNorm(5), lambda: torch.randn(3, 5)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(5), lambda: torch.randn(6, 5)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(3), lambda: torch.randn(4, 3, 2, 2)),
    "Softmax": (lambda: nn.Softmax(dim=-1), lambda: torch.randn(4, 5)),
    "LogSoftmax": (lambda: nn.LogSoftmax(dim=1), lambda: torch.randn(4, 5)),
}


def _twin(module: nn.Module) -> nn.Module:
    return hnn.convert(copy.deepcopy(module))


@pytest.mark.parametrize("name", sorted(SINGLE_INPUT))
def test_twin_matches_torch_module(name):
    torch.manual_seed(0)
    make, make_input = SINGLE_INPUT[name]
    reference = make().double()
    twin = _twin(reference)
    assert type(twin) is getattr(hnn, name) and isinstance(twin, type(reference))
    assert list(twin.state_dict()) == list(reference.state_dict())
    for mode in ("train", "eval"):
        getattr(reference, mode)(), getattr(twin, mode)()
        x = make_input().double()
        x_ref, x_hod = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_hod = reference(x_ref), twin(x_hod)
        torch.testing.assert_close(y_hod, y_ref, rtol=1e-12, atol=1e-12)
        w = torch.randn_like(y_ref)
        (g_ref,) = torch.autograd.grad((y_ref * w).sum(), x_ref)
        (g_hod,) = torch.autograd.grad((y_hod * w).sum(), x_hod)
        torch.testing.assert_close(g_hod, g_ref, rtol=1e-10, atol=1e-12)
    for key, value in reference.state_dict().items():  # running stats updated identically
        torch.testing.assert_close(twin.state_dict()[key], value)


def test_state_dict_loads_both_ways():
    torch.manual_seed(0)
    for name in ("Linear", "LayerNorm", "BatchNorm2d", "RMSNorm"):
        make, _ = SINGLE_INPUT[name]
        a, b = make(), make()
        twin = getattr(hnn, name).__new__(getattr(hnn, name))
        twin.__init__(*_ctor_args(b))
        twin.load_state_dict(a.state_dict())
        b.load_state_dict(twin.state_dict())
        for key, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[key], value)


def _ctor_args(module: nn.Module):
    if isinstance(module, nn.Linear):
        return (module.in_features, module.out_features)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return (module.normalized_shape,)
    return (module.num_features,)


def test_losses_match():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (6,))
    weight = torch.rand(4, dtype=torch.float64)
    ref = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    ours = _twin(ref)
    assert type(ours) is hnn.CrossEntropyLoss
    torch.testing.assert_close(ours(logits, target), ref(logits, target), rtol=1e-12, atol=0)
    y = torch.randn(6, 4, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(hnn.MSELoss(reduction=reduction)(logits, y), nn.MSELoss(reduction=reduction)(logits, y))


# --------------------------------------------------------------------------------- convert
class Block(nn.Module):
    """A transformer-style block: LayerNorm, attention with an nn.Softmax, GELU MLP."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.softmax = nn.Softmax(dim=-1)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


def _models():
    mlp = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.SiLU(), nn.Linear(10, 3))
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    return {
        "mlp": (mlp, lambda: torch.randn(5, 6)),
        "cnn_bn": (cnn, lambda: torch.randn(3, 2, 5, 5)),
        "transformer": (Block(), lambda: torch.randn(2, 4, 8)),
    }


def _loss_grad_hvp(model, x, v):
    params = [p for p in model.parameters()]
    loss = model(x).square().mean() + model(x).sin().sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)
    return loss, grads, hvp


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "transformer"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [False, True])
def test_convert_keeps_outputs_gradients_and_hvps(name, device, train):
    torch.manual_seed(0)
    model, make_input = _models()[name]
    model = model.double().to(device).train(train)
    reference = copy.deepcopy(model)
    converted, not_converted = hnn.convert(model, report=True)
    for module in converted.modules():
        assert type(module) not in hnn.modules.TWINS, f"{type(module).__name__} was not converted"
    if name == "cnn_bn":
        assert [t for _, t in not_converted] == ["Conv2d"]
    else:
        assert not_converted == []
    for p in converted.parameters():
        assert p.device.type == device and p.dtype == torch.float64
    x = make_input().double().to(device)
    v = [torch.randn_like(p) for p in reference.parameters()]
    loss_ref, g_ref, h_ref = _loss_grad_hvp(reference, x, v)
    loss_hod, g_hod, h_hod = _loss_grad_hvp(converted, x, v)
    torch.testing.assert_close(loss_hod, loss_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_hod, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(h.abs().max() > 0 for h in h_ref)
    for a, b in zip(h_hod, h_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_convert_shares_parameters_and_converts_root():
    lin = nn.Linear(3, 2)
    twin = hnn.convert(lin)
    assert type(twin) is hnn.Linear and twin.weight is lin.weight
    seq = nn.Sequential(lin)
    hnn.convert(seq)
    assert type(seq[0]) is hnn.Linear and seq[0].weight is lin.weight


def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        hnn.convert(torch.randn(3))


def test_top_level_namespace():
    assert torch_hod.nn.convert is hnn.convert
