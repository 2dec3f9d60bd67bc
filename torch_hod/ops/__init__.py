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
