"""Curvature: matrix-free model operators (Hessian, GGN, empirical Fisher), spectral estimators
(trace, diagonal, Lanczos, stochastic Lanczos quadrature) and solvers (CG, Newton-CG), all
``torch.distributed``-aware."""
from torch_hod.curvature import distributed
from torch_hod.curvature.linear_operator import CallableOperator, DenseOperator, LinearOperator, as_linear_operator
from torch_hod.curvature.operators import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    flatten_params,
    unflatten_params,
)
from torch_hod.curvature.solvers import CGResult, NewtonCG, conjugate_gradient
from torch_hod.curvature.spectral import (
    DiagonalEstimate,
    EigenResult,
    SpectralDensity,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigsh,
    plot_spectral_density,
    power_iteration,
    spectral_density,
    xdiag,
    xtrace,
)
