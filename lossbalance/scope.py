"""What a loss term may train: parameter scopes by name, and constant applications of a module.

A term's *scope* (``LossBalancer(..., scope={term: parameters})``) lets gradient flow through the
whole graph while only the scope's parameters receive it. Inside one term, :func:`constant_call`
applies a module with its parameters as constants, so that one application of a shared module
passes gradient to its input but does not train the module.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

__all__ = ["constant_call", "parameters_by_prefix"]


def constant_call(module: nn.Module, /, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with the module's parameters detached for this call only.

    Gradient flows to the inputs, never to the parameters. Built on
    ``torch.func.functional_call``: nothing is toggled on the shared module, so it is safe under
    exceptions, threads and DistributedDataParallel (unlike flipping ``requires_grad``).
    """
    constants = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, constants, args, kwargs)


def _selects(prefix: str, name: str) -> bool:
    """Whether ``prefix`` selects the parameter ``name``: the full name, or a module path
    (``"net"`` or ``"net."``) followed by ``.``; never a mere string prefix (``"coef"`` does not
    select ``coef_net.weight``)."""
    module = prefix if prefix.endswith(".") else prefix + "."
    return name == prefix or name.startswith(module)


def parameters_by_prefix(model: nn.Module, prefixes: Iterable[str]) -> list[Tensor]:
    """The parameters of ``model`` that ``prefixes`` select (in model order): each prefix is a
    full parameter name (``"coef"``, ``"net.0.weight"``) or a module path (``"net"``, ``"net.0"``,
    also written ``"net."``) that selects every parameter under that module. Matching is on
    module boundaries: ``"coef"`` selects ``coef`` and ``coef.*``, not ``coef_net.*``.

    Raises ``ValueError`` naming a prefix that selects no parameter.
    """
    prefixes = list(prefixes)
    named = list(model.named_parameters())
    unmatched = [p for p in prefixes if not any(_selects(p, name) for name, _ in named)]
    if unmatched:
        known = ", ".join(name for name, _ in named)
        raise ValueError(
            f"scope prefix(es) {unmatched} match no parameter of the model (a prefix is a parameter's full "
            f"name or a module path, matched on '.' boundaries); parameters: {known}"
        )
    return [p for name, p in named if any(_selects(prefix, name) for prefix in prefixes)]
