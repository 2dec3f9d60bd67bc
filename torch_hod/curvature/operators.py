"""Curvature of a model's loss as matrix-free linear operators over the flat parameter vector.

For a model ``f(x; θ)``, a loss ``ℓ(f(x; θ), y)`` and data ``D`` of ``N`` samples in batches
``b`` of ``n_b`` samples, with ``θ`` the chosen parameters flattened (:func:`flatten_params`):

* :class:`HessianOperator`:  ``H = Σ_b w_b ∇²_θ L_b(θ)``, with ``L_b = loss_fn(model(X_b), y_b)``;
* :class:`GGNOperator`:      ``G = Σ_b w_b J_bᵀ (∇²_o L_b) J_b``, ``J_b = ∂ model(X_b) / ∂θ``, the
  generalised Gauss-Newton (exact; ``J v`` by forward AD, ``∇²_o L_b u`` by an output-space HVP,
  ``Jᵀ u`` by reverse AD: no Jacobian is formed);
* :class:`EmpiricalFisherOperator`: ``F = c Σ_i g_i g_iᵀ`` with the per-sample gradients
  ``g_i = ∇_θ loss_fn(model(x_i[None]), y_i[None])`` (torch.func ``vmap(grad)``).

Weights: with ``reduction="mean"`` (``loss_fn`` averages over the batch) ``w_b = n_b / N`` and
``c = 1/N``, so any batching, unequal batch sizes included, equals the full-batch mean loss; with
``reduction="sum"`` ``w_b = 1`` and ``c = 1``. ``reduction`` defaults to ``loss_fn.reduction``.
A mean normalised by target weights (``CrossEntropyLoss``/``NLLLoss`` with class ``weight``, or
with targets equal to ``ignore_index``) is not such a weighted mean of batch means: it is accepted
only as one batch (never by :class:`EmpiricalFisherOperator`); use ``reduction="sum"`` otherwise.
A plain function as ``loss_fn`` cannot be inspected: it must be a per-sample mean or a sum.

Data is a list/tuple of ``(X, y)`` batches (``X`` a tensor, or a tuple of tensors passed as
``model(*X)``), a single ``(X, y)`` pair of tensors, or a ``DataLoader`` that does not shuffle: every
product runs over the whole data again, so the source must be re-iterable and give the same
batches each time (shuffling samplers, generators and iterators are rejected; a loader over an
``IterableDataset`` cannot be inspected and must itself repeat its batches).

Module state: products are evaluated in eval mode by default (BatchNorm uses its running
statistics, dropout is off); the model's train/eval flags are restored afterwards. With
``train_mode=True`` BatchNorm uses the statistics of each batch (deterministic, and the running
statistics are not updated), and active dropout is rejected because it would make every product
random.

With ``torch.distributed`` initialised, each rank passes its shard of the data; ``N`` and every
product are summed over ranks (:mod:`torch_hod.curvature.distributed`), so all ranks must call
each product together.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from torch_hod.curvature.distributed import all_reduce_sum
from torch_hod.curvature.linear_operator import LinearOperator
from torch_hod.hvp import MODES, hvp

__all__ = ["flatten_params", "unflatten_params", "HessianOperator", "GGNOperator", "EmpiricalFisherOperator"]

Params = Union[None, Sequence[str], Sequence[Tensor], Mapping[str, Tensor]]


# --- parameters ⇄ flat vectors ------------------------------------------------------------------
def flatten_params(params: Union[Mapping[str, Tensor], Sequence[Tensor]]) -> Tensor:
    """Concatenate tensors (a dict's values in its order, or a sequence) into one flat vector ``(n,)``."""
    tensors = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not tensors:
        raise ValueError("flatten_params: no tensors given")
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_params(vec: Tensor, like: Mapping[str, Any]) -> Dict[str, Tensor]:
    """Split ``vec`` of shape ``(*batch, n)`` into a dict shaped like ``like`` (tensors or shapes):
    entry ``k`` gets shape ``(*batch, *like[k].shape)``. Inverse of :func:`flatten_params`."""
    shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for k, v in like.items()}
    n = sum(int(torch.Size(s).numel()) for s in shapes.values())
    if vec.ndim < 1 or vec.shape[-1] != n:
        raise ValueError(f"unflatten_params: expected a last dimension of {n} (the parameters' total size), "
                         f"got shape {tuple(vec.shape)}")
    out, start = {}, 0
    for k, s in shapes.items():
        size = int(torch.Size(s).numel())
        out[k] = vec[..., start:start + size].reshape(*vec.shape[:-1], *s)
        start += size
    return out


# --- argument checks ----------------------------------------------------------------------------
def _select_params(model: nn.Module, params: Params, who: str) -> Dict[str, Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = {k: p for k, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError(f"{who}: no parameter of the model requires grad; pass params= or call requires_grad_()")
    else:
        by_id = {id(p): k for k, p in named.items()}
        chosen = {}
        for item in (params.keys() if isinstance(params, Mapping) else params):
            if isinstance(item, str):
                if item not in named:
                    raise KeyError(f"{who}: {item!r} is not a parameter of the model; its parameters are {list(named)}")
                chosen[item] = named[item]
            elif isinstance(item, Tensor):
                if id(item) not in by_id:
                    raise ValueError(f"{who}: a tensor of shape {tuple(item.shape)} in params is not a parameter of the model")
                chosen[by_id[id(item)]] = item
            else:
                raise TypeError(f"{who}: params must hold parameter names or nn.Parameters, got {type(item).__name__}")
        if not chosen:
            raise ValueError(f"{who}: params is empty")
        frozen = [k for k, p in chosen.items() if not p.requires_grad]
        if frozen:
            raise ValueError(f"{who}: parameters {frozen} do not require grad; call requires_grad_(True) on them "
                             "or leave them out of params")
    first = next(iter(chosen.values()))
    for k, p in chosen.items():
        if not p.dtype.is_floating_point or p.dtype != first.dtype or p.device != first.device:
            raise TypeError(f"{who}: all chosen parameters need one floating dtype and device; {k!r} is "
                            f"{p.dtype} on {p.device}, expected {first.dtype} on {first.device}")
    return chosen


def _check_data(data: Any, who: str) -> Iterable[Any]:
    why = "every product runs over the data again, so it must give the same batches each time"
    if isinstance(data, DataLoader):
        sampler = data.batch_sampler.sampler if data.batch_sampler is not None else data.sampler
        if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)) or \
                (isinstance(sampler, DistributedSampler) and sampler.shuffle):
            raise ValueError(f"{who}: the DataLoader shuffles ({type(sampler).__name__}); {why}. "
                             "Use shuffle=False (or DistributedSampler(..., shuffle=False)).")
        return data
    if isinstance(data, Iterator):
        raise TypeError(f"{who}: data is a {type(data).__name__}, which can be consumed only once; {why}. "
                        "Pass a list of (X, y) batches or a DataLoader without shuffling.")
    if isinstance(data, (list, tuple)):
        if len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            return [tuple(data)]  # a single (X, y) batch
        if not data:
            raise ValueError(f"{who}: data is empty")
        for i, batch in enumerate(data):
            if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
                raise TypeError(f"{who}: data[{i}] must be an (X, y) pair, got {type(batch).__name__}")
        return data
    raise TypeError(f"{who}: data must be a list/tuple of (X, y) batches or a DataLoader, got {type(data).__name__}")


def _infer_reduction(loss_fn: Callable, reduction: Optional[str], who: str) -> str:
    own = getattr(loss_fn, "reduction", None)
    if reduction is None:
        if own is None:
            raise ValueError(f"{who}: cannot infer how loss_fn reduces over the batch; pass reduction='mean' or 'sum'")
        reduction = own
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{who}: reduction must be 'mean' or 'sum' (loss_fn must return a scalar), got {reduction!r}")
    if own is not None and own != reduction:
        raise ValueError(f"{who}: reduction={reduction!r} contradicts loss_fn.reduction={own!r}")
    return reduction


def _weighted_mean(loss_fn: Callable, reduction: str, y: Any) -> str:
    """Why a ``reduction="mean"`` loss divides by a sum of target weights rather than the batch size,
    or ``""``: the ``CrossEntropyLoss``/``NLLLoss`` family (the losses with an ``ignore_index``) with
    class ``weight`` or with targets equal to ``ignore_index``, for class-index targets.
    (Probability targets and ``BCELoss``'s ``weight`` keep the mean over samples/elements.)"""
    ignore = getattr(loss_fn, "ignore_index", None)
    indices = isinstance(y, Tensor) and not y.dtype.is_floating_point  # probability targets: mean over n_b
    if reduction != "mean" or not isinstance(ignore, int) or not indices:
        return ""
    if getattr(loss_fn, "weight", None) is not None:
        return "class weights (weight=...)"
    return f"targets equal to ignore_index={ignore}" if bool((y == ignore).any()) else ""


def _batch_size(X: Any) -> int:
    return (X[0] if isinstance(X, (list, tuple)) else X).shape[0]


# --- the operators ------------------------------------------------------------------------------
class _ModelOperator(LinearOperator):
    """Shared engine: parameter selection, data passes, weighting, module modes, all-reduce.

    Subclasses implement :meth:`_batch_product` (``(n, k)`` block of one batch, unweighted) and may
    change :meth:`_weight`.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], data: Any,
                 params: Params = None, *, reduction: Optional[str] = None, train_mode: bool = False) -> None:
        who = type(self).__name__
        self.model, self.loss_fn, self.train_mode = model, loss_fn, bool(train_mode)
        self.params = _select_params(model, params, who)
        self.data = _check_data(data, who)
        self.reduction = _infer_reduction(loss_fn, reduction, who)
        self._check_modules(who)
        sizes = [(_batch_size(X), _weighted_mean(loss_fn, self.reduction, y)) for X, y in self.data]
        #: Total number of samples, summed over ranks.
        self.num_data = int(all_reduce_sum(sum(n for n, _ in sizes)))
        self._check_weighted_mean(next((w for _, w in sizes if w), ""), len(sizes), who)
        if self.num_data == 0:
            raise ValueError(f"{who}: the data holds no samples (every batch is empty); the curvature of an "
                             "empty data set is undefined")
        first = next(iter(self.params.values()))
        super().__init__(sum(p.numel() for p in self.params.values()), first.dtype, first.device)

    #: How many batches (over all ranks) a mean loss normalised by target weights may span.
    _max_weighted_batches = 1

    def _check_weighted_mean(self, why: str, num_batches: int, who: str) -> None:
        """A mean normalised by a sum of target weights (class ``weight``, ``ignore_index``) is not
        the ``n_b/N``-weighted mean of batch means: reject it over several batches (ranks included)."""
        flagged, num_batches = int(all_reduce_sum(int(bool(why)))), int(all_reduce_sum(num_batches))
        if flagged and num_batches > self._max_weighted_batches:
            raise ValueError(f"{who}: loss_fn averages over the batch with {why or 'target weights (on another rank)'}, "
                             "so the mean over the data is not the n_b/N-weighted mean of per-batch losses; "
                             + ("use a loss_fn with reduction='sum'" if self._max_weighted_batches == 0 else
                                "pass the data as one batch, or use a loss_fn with reduction='sum'"))

    def _check_modules(self, who: str) -> None:
        if self.train_mode:
            active = [k for k, m in self.model.named_modules()
                      if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
            if active:
                raise ValueError(f"{who}: train_mode=True with active dropout in {active} makes every product "
                                 "random; set p=0 or use train_mode=False (eval mode, dropout off)")

    @contextlib.contextmanager
    def _modes(self) -> Any:
        """Eval mode, or train mode with BatchNorm on batch statistics and no running-stat update."""
        modules = list(self.model.modules())
        saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in modules]
        self.model.train(self.train_mode)
        if self.train_mode:
            for m in modules:
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.track_running_stats = False  # forward passes no running stats: batch stats, no update
        try:
            yield
        finally:
            for m, training, track in saved:
                m.training = training
                if track is not None:
                    m.track_running_stats = track

    def _forward(self, params: Dict[str, Tensor], X: Any) -> Tensor:
        return functional_call(self.model, params, tuple(X) if isinstance(X, (list, tuple)) else (X,))

    def _weight(self, n_batch: int) -> float:
        return n_batch / self.num_data if self.reduction == "mean" else 1.0

    def _batch_product(self, params: Dict[str, Tensor], X: Any, y: Tensor, V: Dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _to_device(self, x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(self._to_device(t) for t in x)
        return x.to(self.device) if isinstance(x, Tensor) else x

    def _matmat(self, V: Tensor) -> Tensor:
        params = {k: p.detach() for k, p in self.params.items()}
        tangents = unflatten_params(V.T, params)  # leaves (k, *shape)
        total = torch.zeros_like(V)
        with self._modes():
            for X, y in self.data:
                X, y = self._to_device(X), self._to_device(y)
                total = total + self._weight(_batch_size(X)) * self._batch_product(params, X, y, tangents)
        return all_reduce_sum(total)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v[:, None])[:, 0]


def _columns(hv: Dict[str, Tensor]) -> Tensor:
    """Batched dict (leaves ``(k, *shape)``) → ``(n, k)``."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in hv.values()], dim=1).T


class HessianOperator(_ModelOperator):
    """Hessian of the data loss w.r.t. the chosen parameters: ``H = Σ_b w_b ∇²_θ L_b`` (module docstring).

    ``mode`` is the HVP composition (:func:`torch_hod.hvp.hvp`); a ``matmat`` with ``k`` columns
    runs one forward and backward per batch and a batched second backward.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], data: Any,
                 params: Params = None, *, reduction: Optional[str] = None, train_mode: bool = False,
                 mode: str = "auto") -> None:
        if mode != "auto" and mode not in MODES:
            raise ValueError(f"HessianOperator: unknown mode {mode!r}; valid modes are 'auto', "
                             + ", ".join(repr(m) for m in MODES))
        super().__init__(model, loss_fn, data, params, reduction=reduction, train_mode=train_mode)
        self.mode = mode

    def _batch_product(self, params: Dict[str, Tensor], X: Any, y: Tensor, V: Dict[str, Tensor]) -> Tensor:
        loss = lambda p: self.loss_fn(self._forward(p, X), y)  # noqa: E731
        _, (hv,) = hvp(loss, (params,), (V,), mode=self.mode, batched=True)
        return _columns(hv)


class GGNOperator(_ModelOperator):
    """Generalised Gauss-Newton ``G = Σ_b w_b J_bᵀ (∇²_o L_b) J_b`` (module docstring).

    For the columns ``v`` of ``V``: ``u = J v`` (vmapped ``torch.func.jvp`` of the model),
    ``u' = ∇²_o L_b u`` (HVP of the loss w.r.t. the model output by batched double backward, e.g.
    ``(diag(p) − p pᵀ) u / n_b`` per sample for mean cross-entropy with softmax ``p``,
    ``2u / (n_b d)`` for mean MSE over ``d`` outputs) and ``Jᵀ u'`` (vmapped ``torch.func.vjp``).
    Exact for any twice differentiable loss; positive semi-definite when the loss is convex in the
    output (MSE, cross-entropy, Huber).
    """

    def _batch_product(self, params: Dict[str, Tensor], X: Any, y: Tensor, V: Dict[str, Tensor]) -> Tensor:
        model = lambda p: self._forward(p, X)  # noqa: E731
        out, pullback = torch.func.vjp(model, params)
        JV = torch.func.vmap(lambda v: torch.func.jvp(model, (params,), (v,))[1])(V)
        # double backward in the output space: torch.func's forward AD over the backward raises for
        # F.mse_loss/F.huber_loss (fwd-rev), and rev-fwd is silently wrong through F.layer_norm
        _, (HJV,) = hvp(lambda o: self.loss_fn(o, y), (out,), (JV,), mode="rev-rev", batched=True)
        return _columns(torch.func.vmap(pullback)(HJV)[0])


class EmpiricalFisherOperator(_ModelOperator):
    """Empirical Fisher ``F = c Σ_i g_i g_iᵀ`` from per-sample gradients (module docstring).

    Per batch, ``G = [g_1 … g_{n_b}]ᵀ`` (``n_b × n``, by ``vmap(grad)`` over samples, each sample run
    as a batch of one) and the product is ``Gᵀ (G V)``; ``c = 1/N`` for a mean loss, ``1`` for a sum.
    Batch statistics are undefined for one sample, so ``train_mode=True`` with BatchNorm is rejected.
    """

    def _check_modules(self, who: str) -> None:
        super()._check_modules(who)
        if self.train_mode and any(isinstance(m, nn.modules.batchnorm._NormBase) for m in self.model.modules()):
            raise ValueError(f"{who}: per-sample gradients are undefined with BatchNorm on batch statistics "
                             "(train_mode=True); use train_mode=False")

    # per sample, a weighted mean is w ℓ / w = ℓ (the weight cancels) and an ignored target 0/0
    _max_weighted_batches = 0

    def _weight(self, n_batch: int) -> float:
        return 1.0 / self.num_data if self.reduction == "mean" else 1.0

    def _batch_product(self, params: Dict[str, Tensor], X: Any, y: Tensor, V: Dict[str, Tensor]) -> Tensor:
        def sample_loss(p: Dict[str, Tensor], x: Any, t: Tensor) -> Tensor:
            x = tuple(xi[None] for xi in x) if isinstance(x, (list, tuple)) else x[None]
            return self.loss_fn(self._forward(p, x), t[None])

        grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
        G = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)  # (n_b, n)
        return G.T @ (G @ _columns(V))
