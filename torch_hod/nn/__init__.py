"""Drop-in ``torch.nn`` twins running torch_hod ops, and :func:`convert`."""
from torch_hod.nn.convert import convert
from torch_hod.nn.modules import (
    ELU,
    GELU,
    BatchNorm1d,
    BatchNorm2d,
    CrossEntropyLoss,
    LayerNorm,
    Linear,
    LogSoftmax,
    MSELoss,
    RMSNorm,
    SiLU,
    Sigmoid,
    Softmax,
    Softplus,
    Tanh,
)
