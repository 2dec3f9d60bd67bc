"""Ops with derivatives of every order in every AD mode (see :mod:`torch_hod.ops.function`).

Functional API with the signatures and defaults of the torch functions they replace.
"""
from torch_hod.ops.function import (
    OPS,
    HigherOrderFunction,
    elementwise_op,
    public_op,
    require_float,
    saved_primals,
)
from torch_hod.ops.elementwise import (
    cos,
    elu,
    exp,
    gelu,
    log,
    log1p,
    pow,
    reciprocal,
    rsqrt,
    sigmoid,
    silu,
    sin,
    softplus,
    sqrt,
    tanh,
)
from torch_hod.ops.linear import bmm, linear, matmul
from torch_hod.ops.mse import mse_loss
from torch_hod.ops.softmax import log_softmax, logsumexp, softmax
from torch_hod.ops.cross_entropy import cross_entropy
from torch_hod.ops.normalization import batch_norm, layer_norm, rms_norm
