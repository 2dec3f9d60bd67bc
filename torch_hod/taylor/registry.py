"""The table of Taylor-mode rules, keyed by the function a user calls.

A *rule* for ``func`` is a callable with ``func``'s signature. The jet transform calls it with the
same arguments, where every argument that carries a Taylor series is a :class:`~torch_hod.taylor.Jet`
(plain tensors stay constants), and it must return Jet(s). A rule may be a composition of torch
functions (each of which the transform knows), or may work on the stacked coefficients directly.

torch_hod's own ops register their rules here when :mod:`torch_hod.ops` is imported; users add rules
for their own functions with :func:`register_taylor_rule`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

_TAYLOR_RULES: Dict[Any, Callable[..., Any]] = {}


def register_taylor_rule(func: Any, rule: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``rule`` as the Taylor-mode rule of ``func`` (a torch function, a torch_hod op, or
    your own function); a later registration replaces an earlier one. Returns ``rule``.

    The jet transform sees a call as one operation only if the function dispatches through
    ``__torch_function__``: torch's own functions do; for your own function (e.g. one that runs a
    ``torch.autograd.Function``, whose ``apply`` is never seen as one call) add the two standard
    lines of :mod:`torch.overrides`, then register a rule with the same signature::

        from torch.overrides import handle_torch_function, has_torch_function

        def my_op(x, c=1.0):
            if has_torch_function((x,)):
                return handle_torch_function(my_op, (x,), x, c=c)
            return MyFunction.apply(x, c)

        # the rule gets Jets for the series-carrying arguments; compose functions that have rules
        register_taylor_rule(my_op, lambda x, c=1.0: x * torch.sigmoid(c * x))
    """
    if not callable(rule):
        raise TypeError(f"register_taylor_rule: rule must be callable, got {type(rule).__name__}")
    _TAYLOR_RULES[func] = rule
    return rule


def taylor_rule_for(func: Any) -> Optional[Callable[..., Any]]:
    """The registered rule of ``func``, or ``None``."""
    return _TAYLOR_RULES.get(func)


def supported_functions() -> list:
    """Readable names of every function with a Taylor rule (``torch.tanh``, ``Tensor.__getitem__``,
    ``torch_hod.ops.layer_norm``, ...), sorted."""

    def name(func: Any) -> str:
        module = getattr(func, "__module__", None) or ""
        qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
        if module.startswith("torch_hod.ops"):
            module = "torch_hod.ops"
        elif module.startswith("torch.nn.functional") or module == "torch._C._nn":
            module = "torch.nn.functional"
        elif module.startswith("torch") and not qualname.startswith(("Tensor", "_TensorBase", "TensorBase")):
            module = "torch"
        for base, shown in (("_TensorBase.", "Tensor."), ("TensorBase.", "Tensor."), ("_VariableFunctionsClass.", "torch.")):
            if qualname.startswith(base):
                return shown + qualname[len(base):]
        return f"{module}.{qualname}" if module else qualname

    return sorted({name(func) for func in _TAYLOR_RULES})


def elementwise_rule(f: Callable[..., Any], df: Callable[..., Any]) -> Callable[..., Any]:
    """Rule for an elementwise ``y = f(x, *params)`` from its derivative ``df(x, *params)``.

    ``y(t)`` satisfies ``y'(t) = df(x(t)) x'(t)``: the series of ``df(x)`` to order K-1 (``df``
    itself is evaluated on the jet, so it must use functions with rules) is multiplied by ``x'`` and
    integrated term by term, which costs one jet of ``df`` plus O(K²) products.
    """

    def rule(x: Any, *params: Any) -> Any:
        from torch_hod.taylor.engine import apply_elementwise_rule  # imported late: no cycle

        return apply_elementwise_rule(f, df, x, *params)

    return rule
