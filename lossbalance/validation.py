"""Checks on what users hand the balancer; every error names the offending term and the fix.

Nothing here changes any state: the balancer runs these checks before it touches the weights,
the optimizer or ``.grad``.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Collection, Iterator, Mapping

import torch
from torch import Tensor

__all__ = [
    "check_losses", "check_finite", "reaches", "graph_size", "check_key_set", "explain_autograd_error",
    "no_path_error", "warn_user", "FREED_GRAPH_HINT",
]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside lossbalance (whatever the depth)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

FREED_GRAPH_HINT = (
    "build the loss dict anew for every step (a backward pass frees its graph) and do not call "
    "backward() on the terms yourself"
)
_FREED_GRAPH = "backward through the graph a second time"  # torch's message for a freed graph


def explain_autograd_error(name: str, error: RuntimeError, *, stale: bool = False) -> RuntimeError:
    """``error`` from differentiating term ``name``, with the term named; the freed-graph hint
    only when the graph was freed or the term was built on an earlier step (``stale``: its
    parameters have moved since); other autograd errors keep their own message."""
    hint = f": {FREED_GRAPH_HINT}" if stale or _FREED_GRAPH in str(error) else ""
    return RuntimeError(f"while differentiating term {name!r}{hint}. {error}")


def no_path_error(name: str, *, scoped: bool) -> ValueError:
    """The error for a term whose graph reaches none of the parameters it may train."""
    where = "any parameter of its scope" if scoped else "any balanced parameter"
    return ValueError(
        f"loss term {name!r} has no path to {where}: it was built from tensors that do not depend "
        "on them (detached, or only on inputs)"
    )


def check_losses(losses: Any, device: torch.device) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``losses`` is a non-empty ``{str: scalar loss}``."""
    if not isinstance(losses, Mapping):
        raise TypeError(
            f"losses must be a dict of named loss terms, e.g. {{'pde': ..., 'bc': ...}}; got {type(losses).__name__}"
        )
    if not losses:
        raise ValueError("losses is empty: pass at least one named loss term")
    for name, loss in losses.items():
        if not isinstance(name, str):
            raise TypeError(f"loss term names must be strings; got the key {name!r} ({type(name).__name__})")
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"loss term {name!r} is a {type(loss).__name__}, expected a scalar torch.Tensor computed "
                "from the model (a Python number carries no gradient)"
            )
        if loss.numel() != 1:
            raise ValueError(
                f"loss term {name!r} has shape {tuple(loss.shape)}; expected a scalar: reduce it, "
                "e.g. with .mean() or .sum()"
            )
        if not loss.is_floating_point():
            raise TypeError(f"loss term {name!r} has dtype {loss.dtype}; expected a floating-point scalar")
        if not loss.requires_grad:
            raise ValueError(
                f"loss term {name!r} does not require grad: was it computed under torch.no_grad(), "
                "from detached tensors, or from a model whose parameters do not require grad?"
            )
        if loss.device != device:
            raise ValueError(
                f"loss term {name!r} is on {loss.device}, the balanced parameters on {device}: "
                "compute every term on the parameters' device"
            )


def check_finite(names: tuple[str, ...], values: Tensor, what: str = "loss value") -> None:
    """Raise ``ValueError`` naming the terms whose ``values`` are NaN or Inf (one host sync)."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = [f"{n!r} = {v}" for n, v, ok in zip(names, values.tolist(), finite.tolist()) if not ok]
        raise ValueError(
            f"non-finite {what} for term(s) {', '.join(bad)}; nothing was changed. Pass "
            "nonfinite='skip' to skip such steps, or look for a log/sqrt/division of zero in that term"
        )


def _nodes(loss: Tensor) -> Iterator[Any]:
    """The autograd nodes behind ``loss``, each once (depth first)."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)


def reaches(loss: Tensor, targets: Collection[int]) -> bool:
    """Whether the autograd graph of ``loss`` reaches a tensor whose ``id`` is in ``targets``."""
    if id(loss) in targets:
        return True
    return any(id(getattr(node, "variable", None)) in targets for node in _nodes(loss))


def graph_size(loss: Tensor) -> int:
    """The number of autograd nodes behind ``loss`` (a proxy for the cost of its backward)."""
    return sum(1 for _ in _nodes(loss))


def check_key_set(present: Collection[str], known: Collection[str], optional: Collection[str]) -> None:
    """Raise ``KeyError`` if the terms of a step differ from the declared ones."""
    unknown = [n for n in present if n not in known and n not in optional]
    missing = [n for n in known if n not in present and n not in optional]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown term(s) {unknown} (not declared and not seen on earlier steps)")
        if missing:
            parts.append(f"missing term(s) {missing}")
        raise KeyError(
            "the loss terms changed between steps: " + "; ".join(parts) + ". Declare a term that comes and "
            "goes with LossBalancer(..., optional=[name]), or call balancer.add_term(name) / "
            "balancer.remove_term(name) when the phase changes."
        )
