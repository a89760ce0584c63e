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


def parameters_by_prefix(model: nn.Module, prefixes: Iterable[str]) -> list[Tensor]:
    """The parameters of ``model`` whose names start with one of ``prefixes`` (in model order).

    Raises ``ValueError`` naming a prefix that matches no parameter.
    """
    prefixes = list(prefixes)
    named = list(model.named_parameters())
    unmatched = [p for p in prefixes if not any(name.startswith(p) for name, _ in named)]
    if unmatched:
        known = ", ".join(name for name, _ in named)
        raise ValueError(f"scope prefix(es) {unmatched} match no parameter of the model; parameters: {known}")
    return [p for name, p in named if any(name.startswith(prefix) for prefix in prefixes)]
