"""Matrix-free square linear operators on flat vectors: the common currency of the curvature tools.

Every curvature operator (Hessian, GGN, empirical Fisher of a model) and every estimator or solver
(trace, diagonal, Lanczos, stochastic Lanczos quadrature, conjugate gradient) speaks this interface:
``A.shape == (n, n)``, ``A.dtype``, ``A.device``, ``A.matvec(v)`` for ``v`` of shape ``(n,)`` and
``A.matmat(V)`` for ``V`` of shape ``(n, k)``; ``A @ v`` picks one of them by ``v.ndim``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["LinearOperator", "CallableOperator", "DenseOperator", "as_linear_operator"]


class LinearOperator:
    """A square operator ``A: ℝⁿ → ℝⁿ`` known only through products ``A v``.

    Subclasses implement :meth:`_matvec` (and may override :meth:`_matmat` with a batched path).
    ``num_matvecs`` counts products (a ``matmat`` with ``k`` columns counts ``k``).
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape: Tuple[int, int] = (int(size), int(size))
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    # --- to implement ---------------------------------------------------------------------------
    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    # --- public ---------------------------------------------------------------------------------
    def _check(self, x: Tensor, ndim: int) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a Tensor, got {type(x).__name__}")
        if x.ndim != ndim or x.shape[0] != self.shape[1]:
            want = f"({self.shape[1]},)" if ndim == 1 else f"({self.shape[1]}, k)"
            raise ValueError(f"{type(self).__name__}: expected shape {want}, got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"{type(self).__name__}: expected dtype {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{type(self).__name__}: expected device {self.device}, got {x.device}")

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape ``(n,)``."""
        self._check(v, 1)
        self.num_matvecs += 1
        return self._matvec(v)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(n, k)``."""
        self._check(V, 2)
        self.num_matvecs += V.shape[1]
        return self._matmat(V)

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matvec(x) if isinstance(x, Tensor) and x.ndim == 1 else self.matmat(x)

    def dense(self, chunk_size: Optional[int] = None) -> Tensor:
        """The ``(n, n)`` matrix (``n`` products; for small problems), ``chunk_size`` columns per
        :meth:`matmat` (default: all at once; smaller chunks bound the memory of batched products)."""
        n = self.shape[0]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        if chunk_size is None or chunk_size >= n:
            return self.matmat(eye)
        if chunk_size < 1:
            raise ValueError(f"{type(self).__name__}.dense: chunk_size must be a positive integer, got {chunk_size}")
        return torch.cat([self.matmat(eye[:, j:j + chunk_size]) for j in range(0, n, chunk_size)], dim=1)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` over numpy float64 vectors."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        def mv(v: Any) -> Any:
            x = torch.as_tensor(v.reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(x).detach().cpu().double().numpy()

        def mm(V: Any) -> Any:
            X = torch.as_tensor(V, dtype=self.dtype, device=self.device)
            return self.matmat(X).detach().cpu().double().numpy()

        return ScipyOperator(self.shape, matvec=mv, matmat=mm, dtype="float64")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.shape[0]}, dtype={self.dtype}, device={self.device})"


class CallableOperator(LinearOperator):
    """Wrap a function ``v ↦ A v`` (shape ``(n,)`` to ``(n,)``) as a :class:`LinearOperator`;
    ``dtype`` and ``device`` of its vectors default to torch's defaults."""

    def __init__(self, matvec: Callable[[Tensor], Tensor], size: int, dtype: Optional[torch.dtype] = None,
                 device: Any = None) -> None:
        super().__init__(size, torch.get_default_dtype() if dtype is None else dtype,
                         torch.get_default_device() if device is None else device)
        self._fn = matvec

    def _matvec(self, v: Tensor) -> Tensor:
        return self._fn(v)


class DenseOperator(LinearOperator):
    """A :class:`LinearOperator` backed by an explicit square matrix (tests, small problems)."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator: expected a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V


def as_linear_operator(A: Any, size: Optional[int] = None) -> LinearOperator:
    """Accept a :class:`LinearOperator`, a square matrix, or a matvec callable (with ``size``; its
    vectors in torch's default dtype and device, or wrap it in :class:`CallableOperator`)."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    if callable(A):
        if size is None:
            raise ValueError("as_linear_operator: a matvec callable needs size=n")
        return CallableOperator(A, size)
    raise TypeError(f"as_linear_operator: expected a LinearOperator, a square Tensor or a callable, got {type(A).__name__}")
