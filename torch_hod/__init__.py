"""torch_hod: higher-order automatic differentiation for PyTorch.

* :mod:`torch_hod.ops` / :mod:`torch_hod.nn`: ops whose VJP and JVP rules are differentiable to
  every order, in every AD mode (reverse, forward, mixed, vmap), with Taylor rules; drop-in modules
  and :func:`torch_hod.nn.convert`.
* :func:`hvp`, :func:`vhp`, :func:`hessian` and :mod:`torch_hod.curvature`: Hessian-vector products
  in several AD modes, model curvature operators, spectral estimators and solvers.
* :func:`jet` and the differential operators :func:`derivatives`, :func:`laplacian`,
  :func:`bilaplacian`, :func:`mixed_partial`: Taylor mode.
* :mod:`torch_hod.testing`: the validation harness :func:`~torch_hod.testing.check_op`.
"""
from torch_hod import curvature, nn, ops, taylor, testing
from torch_hod.hvp import hessian, hvp, hvp_batched, vhp
from torch_hod.taylor import Jet, bilaplacian, derivatives, jet, laplacian, mixed_partial, register_taylor_rule

__version__ = "0.1.0"

__all__ = [
    "ops", "nn", "curvature", "taylor", "testing", "hvp", "hvp_batched", "vhp", "hessian", "jet", "Jet",
    "register_taylor_rule", "derivatives", "laplacian", "bilaplacian", "mixed_partial",
]
