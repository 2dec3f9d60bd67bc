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
