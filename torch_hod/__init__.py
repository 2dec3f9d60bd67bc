"""torch_hod: higher-order automatic differentiation for PyTorch."""
from torch_hod import nn, ops, taylor
from torch_hod.taylor import register_taylor_rule

__version__ = "0.1.0"
