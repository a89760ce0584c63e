"""Undoing a closure step: the parameters, their ``.grad`` and the optimizer's state as they were.

``step(closure=...)`` lets the optimizer move the parameters before the closure has had its
last word (L-BFGS re-evaluates it); when a re-evaluation raises, or is non-finite under
``nonfinite="skip"``, the whole call is undone. An optimizer that cannot re-evaluate
(:func:`reevaluates`: every ``torch.optim`` optimizer but L-BFGS with ``max_iter > 1`` or a line
search) needs no snapshot and gets none. Otherwise the snapshot copies the parameters, not the
optimizer's state:

- the optimizer's state is copied *structurally*: dicts and lists are copied, tensors are kept
  by reference. Tensors that sit directly in a parameter's state (Adam's moments, L-BFGS's
  ``d`` and ``prev_flat_grad``) may be updated in place, so they are cloned; tensors inside
  lists (L-BFGS's ``old_dirs``/``old_stps`` history, which it only appends to and pops from)
  are kept by reference, and their version counters are checked when the snapshot is restored.
- ``.grad`` tensors are kept by reference, except those that are views of the engine's reused
  buffer (the next gradient step overwrites it), which are cloned.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["ClosureSnapshot", "reevaluates", "take_snapshot", "restore_snapshot"]


def reevaluates(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step(closure)`` may call the closure again after it has changed the
    parameters or its state, so that a failing re-evaluation needs the snapshot to be undone.

    ``torch.optim``'s optimizers call the closure once, before they change anything, except
    ``LBFGS`` with ``max_iter > 1`` or a line search; an optimizer from elsewhere may do anything.
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        return any(g["max_iter"] > 1 or g["line_search_fn"] is not None for g in optimizer.param_groups)
    return not type(optimizer).__module__.startswith("torch.optim")


class ClosureSnapshot(NamedTuple):
    values: list[Tensor]
    grads: list[Tensor | None]
    optimizer_state: dict[Any, Any]
    versions: list[tuple[Tensor, int]]


def take_snapshot(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], reused: Callable[[Tensor], bool]
) -> ClosureSnapshot:
    """A snapshot of ``params``, their ``.grad`` (``reused(grad)``: whether to clone it) and the
    optimizer's per-parameter state."""
    with torch.no_grad():
        values = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else (p.grad.clone() if reused(p.grad) else p.grad) for p in params]
    versions: list[tuple[Tensor, int]] = []
    state = {key: _copy_state(entry, versions) for key, entry in optimizer.state.items()}
    return ClosureSnapshot(values, grads, state, versions)


def restore_snapshot(snapshot: ClosureSnapshot | None, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
    """Put the parameters, their ``.grad`` and the optimizer's state back as they were (``None``:
    no snapshot was needed, see :func:`reevaluates`; what the optimizer did stays, as in PyTorch)."""
    if snapshot is None:
        return
    with torch.no_grad():
        for p, value, grad in zip(params, snapshot.values, snapshot.grads):
            p.copy_(value)
            p.grad = grad
    changed = [t for t, version in snapshot.versions if t._version != version]
    if changed:
        raise RuntimeError(
            f"{type(optimizer).__name__} changed {len(changed)} tensor(s) of its history in place during the "
            "failed step, so its state cannot be restored (the parameters were restored)"
        )
    optimizer.state.clear()
    optimizer.state.update(snapshot.optimizer_state)


def _copy_state(entry: Any, versions: list[tuple[Tensor, int]]) -> Any:
    """A parameter's state: the dict copied, its tensors cloned, its lists copied by reference."""
    if not isinstance(entry, dict):
        return entry
    return {key: _copy_value(value, versions) for key, value in entry.items()}


def _copy_value(value: Any, versions: list[tuple[Tensor, int]]) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, Tensor):
                versions.append((item, item._version))
        return type(value)(value)
    if isinstance(value, dict):
        return dict(value)
    return value
