"""``convert``: swap supported ``torch.nn`` submodules for their torch_hod twins."""
from __future__ import annotations

from typing import List, Tuple, Union

from torch import nn

from torch_hod.nn.modules import TWINS

__all__ = ["convert"]

# Modules that hold no parameters and whose forward is already differentiable to every order with
# plain torch ops; they are not reported as "not converted".
_HARMLESS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Dropout, nn.Flatten,
             nn.Unflatten, nn.ReLU, nn.LeakyReLU)


def _twin_of(module: nn.Module) -> nn.Module:
    """A twin instance sharing the module's parameters, buffers, hooks and training flag."""
    twin = TWINS[type(module)].__new__(TWINS[type(module)])
    twin.__dict__ = module.__dict__.copy()
    # The containers must be copied, not shared, so later edits of one module don't alter the other.
    for key in ("_parameters", "_buffers", "_modules"):
        twin.__dict__[key] = dict(module.__dict__[key])
    return twin


def convert(
    model: nn.Module, *, report: bool = False
) -> Union[nn.Module, Tuple[nn.Module, List[Tuple[str, str]]]]:
    """Replace every supported ``torch.nn`` submodule of ``model`` by its :mod:`torch_hod.nn` twin.

    Supported (exact types; subclasses are left alone since they may override ``forward``): Tanh,
    Sigmoid, Softplus, GELU, SiLU, ELU, Linear, LayerNorm, RMSNorm, BatchNorm1d/2d, Softmax,
    LogSoftmax, MSELoss, CrossEntropyLoss. The twins *share* the original ``Parameter`` and buffer
    objects (same device, dtype, ``requires_grad``; an optimizer built before conversion still
    updates them), so outputs, gradients and Hessian-vector products are unchanged. ``model`` is
    modified in place and returned (if ``model`` itself is supported, its twin is returned).

    With ``report=True`` returns ``(model, not_converted)``: the ``(qualified name, type name)`` of
    every module with its own parameters or computation that stayed a plain ``torch.nn`` module.
    Such modules still work (their plain torch ops are differentiable), only without torch_hod's
    rules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"torch_hod.nn.convert: expected an nn.Module, got {type(model).__name__}")
    not_converted: List[Tuple[str, str]] = []

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        if type(module) in TWINS:
            return _twin_of(module)
        for name, child in list(module.named_children()):
            new_child = visit(child, f"{prefix}.{name}" if prefix else name)
            if new_child is not child:
                setattr(module, name, new_child)
        is_leaf = not any(True for _ in module.children())
        is_twin = type(module) in TWINS.values()
        if not is_twin and not isinstance(module, _HARMLESS) and (
            is_leaf or any(True for _ in module.parameters(recurse=False))
        ):
            not_converted.append((prefix or "<root>", type(module).__name__))
        return module

    converted = visit(model, "")
    return (converted, not_converted) if report else converted
