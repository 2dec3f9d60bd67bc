"""Drop-in modules whose forward runs torch_hod ops.

Each module *subclasses* its ``torch.nn`` twin and overrides only ``forward``: constructor
arguments, parameter and buffer names, ``state_dict`` keys, ``repr`` and ``isinstance`` checks are
the twin's, so checkpoints load both ways and code that inspects modules keeps working. The ops are
looked up in :mod:`torch_hod.ops` at call time.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from torch_hod import ops

__all__ = [
    "Tanh", "Sigmoid", "Softplus", "GELU", "SiLU", "ELU", "Linear", "LayerNorm", "RMSNorm",
    "BatchNorm1d", "BatchNorm2d", "Softmax", "LogSoftmax", "MSELoss", "CrossEntropyLoss",
]


class Tanh(nn.Tanh):
    def forward(self, input: Tensor) -> Tensor:
        return ops.tanh(input)


class Sigmoid(nn.Sigmoid):
    def forward(self, input: Tensor) -> Tensor:
        return ops.sigmoid(input)


class Softplus(nn.Softplus):
    def forward(self, input: Tensor) -> Tensor:
        return ops.softplus(input, self.beta, self.threshold)


class GELU(nn.GELU):
    def forward(self, input: Tensor) -> Tensor:
        return ops.gelu(input, approximate=self.approximate)


class SiLU(nn.SiLU):
    """``inplace=True`` is accepted for compatibility; the result is always a new tensor."""

    def forward(self, input: Tensor) -> Tensor:
        return ops.silu(input)


class ELU(nn.ELU):
    """``inplace=True`` is accepted for compatibility; the result is always a new tensor."""

    def forward(self, input: Tensor) -> Tensor:
        return ops.elu(input, self.alpha)


class Linear(nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return ops.linear(input, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    def forward(self, input: Tensor) -> Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def forward(self, input: Tensor) -> Tensor:
        return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class _BatchNormForward:
    """``torch.nn.modules.batchnorm._BatchNorm.forward`` with :func:`torch_hod.ops.batch_norm`.

    Same semantics as torch: in training mode the batch statistics normalise and the running
    statistics are updated (momentum ``None`` = cumulative average); in eval mode the running
    statistics normalise unless ``track_running_stats=False``.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return ops.batch_norm(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    pass


class Softmax(nn.Softmax):
    def forward(self, input: Tensor) -> Tensor:
        return ops.softmax(input, self.dim)


class LogSoftmax(nn.LogSoftmax):
    def forward(self, input: Tensor) -> Tensor:
        return ops.log_softmax(input, self.dim)


class MSELoss(nn.MSELoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.mse_loss(input, target, reduction=self.reduction)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        weight: Optional[Tensor] = self.weight
        return ops.cross_entropy(
            input, target, weight=weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
        )


#: torch.nn type → torch_hod twin (exact types only: subclasses may override forward).
TWINS = {
    nn.Tanh: Tanh, nn.Sigmoid: Sigmoid, nn.Softplus: Softplus, nn.GELU: GELU, nn.SiLU: SiLU,
    nn.ELU: ELU, nn.Linear: Linear, nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm,
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.Softmax: Softmax,
    nn.LogSoftmax: LogSoftmax, nn.MSELoss: MSELoss, nn.CrossEntropyLoss: CrossEntropyLoss,
}
