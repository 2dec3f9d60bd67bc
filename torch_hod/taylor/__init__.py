"""Taylor mode (jets): ``jet(func, primals, series, collapse=False)`` with JAX jet semantics.

:mod:`~torch_hod.taylor.engine` holds the :class:`Jet` tensor and the transform,
:mod:`~torch_hod.taylor.series` the truncated-series arithmetic, :mod:`~torch_hod.taylor.rules` the
rule table of torch functions and :mod:`~torch_hod.taylor.registry` the table itself.
"""
from torch_hod.taylor.registry import register_taylor_rule, taylor_rule_for
from torch_hod.taylor.engine import Jet, jet
from torch_hod.taylor import rules as _rules  # noqa: F401  (fills the rule table)
from torch_hod.taylor.operators import bilaplacian, derivatives, interpolation_weights, laplacian, mixed_partial

__all__ = [
    "jet", "Jet", "register_taylor_rule", "taylor_rule_for",
    "derivatives", "laplacian", "bilaplacian", "mixed_partial", "interpolation_weights",
]
