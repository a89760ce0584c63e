"""Deferred finiteness checks (``check_every=N``): no host synchronisation on plain steps.

By default every call checks its own loss values and gradients for NaN/Inf before anything
changes, which reads one small tensor back to the host per step (``bool(...)``): on a GPU that
stalls the launch queue every step. With ``LossBalancer(..., check_every=N)`` (N > 1) a call
without a weight update makes **no** host synchronisation; an update call makes exactly one.

- Each call computes its verdict on the device (the values of its terms finite, its gradient
  finite) and folds it into a pending flag, also on the device, with the step at which the first
  non-finite call happened and which of its terms had non-finite values.
- The flag is read (one sync) on every call that updates the weights (in the same read as that
  call's own verdict), on every N-th call since the last read, when the set of terms changes,
  and before a call that checks at once (an L-BFGS closure, ``check_every=1`` semantics).
- ``balancer.check()`` reads it at once (before a checkpoint, at the end of training).
- A clean read marks a **rollback point**: the balancer's state, the parameters and the
  optimizer's state as they were at the start of that call (copies on the device: one copy of
  the parameters and of the optimizer's per-parameter state per read).
- A read that finds a non-finite value or gradient **undoes every call since the last rollback
  point**: the parameters, the optimizer's state and the balancer (weights, step counter,
  strategy state, generator, history, pointwise state) go back to that point, and the balanced
  parameters' ``.grad`` is set to ``None``. Then ``nonfinite="raise"`` raises a ``ValueError``
  naming the first non-finite call's step, its terms with non-finite values (or its gradient)
  and the calls undone; ``nonfinite="skip"`` counts the undone calls as skipped and the current
  call returns NaN (as a skipped step does), so training continues from the rollback point.

So a run with ``check_every=N`` loses at most the ``N + 1`` calls since the last clean read to a
NaN, and never continues from non-finite parameters. It needs the optimizer (to undo its steps):
a balancer built from parameters alone, a ``scaler=`` (``GradScaler.step`` reads its overflow
flag every step anyway) and an L-BFGS closure (L-BFGS reads the loss every evaluation) check at
once.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from .gradients import nonfinite_flag

__all__ = ["DeferredChecks", "Finding"]


class Finding(NamedTuple):
    """What a read found: the step of the first non-finite call and its terms with non-finite
    values (empty: its gradient was not finite, its values were)."""

    step: int
    terms: tuple[str, ...]


class DeferredChecks:
    """The pending verdict of the calls since the last read, kept on the device.

    ``every``: read at least every ``every`` calls. ``point``: what the balancer needs to undo
    the calls since the last clean read (it sets it; this class only keeps it).
    """

    def __init__(self, every: int):
        self.every = every
        self.point: Any = None
        self._names: tuple[str, ...] | None = None
        self._calls = 0
        self._bad: Tensor | None = None  # () bool: some call since the last read was not finite
        self._first: Tensor | None = None  # () int64: the step of the first such call (-1: none)
        self._terms: Tensor | None = None  # (K,) bool: its terms with non-finite values
        self._values_ok: Tensor | None = None  # this call's verdict, pending until fold()
        self._grads_ok: Tensor | None = None

    @property
    def pending(self) -> bool:
        """Whether calls were folded since the last read."""
        return self._calls > 0

    def due(self, update: bool) -> bool:
        """Whether this call reads the verdict (after folding its own): an update, or the N-th call."""
        return update or self._calls + 1 >= self.every

    def other_terms(self, names: tuple[str, ...]) -> bool:
        """Whether calls with other terms than ``names`` are pending (read them first)."""
        return self._calls > 0 and names != self._names

    # ------------------------------------------------------------------ one call's verdict (no sync)
    def note_values(self, values: Tensor) -> None:
        """This call's loss values (K,): which are finite."""
        ok = torch.isfinite(values)
        self._values_ok = ok if self._values_ok is None else self._values_ok & ok

    def note_gradients(self, grads: Sequence[Tensor | None]) -> None:
        """This call's gradient tensors: whether all their entries are finite."""
        present = [g for g in grads if g is not None]
        if present:
            self._note_grads_ok(nonfinite_flag(present).logical_not())

    def note_statistics(self, max_abs: Tensor) -> None:
        """This call's per-term max |g| table: finite iff every gradient entry is."""
        self._note_grads_ok(torch.isfinite(max_abs).all())

    def _note_grads_ok(self, ok: Tensor) -> None:
        self._grads_ok = ok if self._grads_ok is None else self._grads_ok & ok

    def forget_call(self) -> None:
        """Drop this call's verdict (the call was undone before it was folded)."""
        self._values_ok = self._grads_ok = None

    def fold(self, names: tuple[str, ...], step: int) -> None:
        """Fold this call's verdict into the pending one (device ops only)."""
        values_ok, grads_ok = self._values_ok, self._grads_ok
        self._values_ok = self._grads_ok = None
        if values_ok is None:
            return
        bad = ~values_ok.all() if grads_ok is None else ~(values_ok.all() & grads_ok)
        if self._bad is None:
            self._start(names, values_ok)
        first = bad & ~self._bad  # this call is the first non-finite one since the last read
        self._first = torch.where(first, torch.full_like(self._first, step), self._first)
        self._terms = torch.where(first, ~values_ok, self._terms)
        self._bad = self._bad | bad
        self._calls += 1

    def _start(self, names: tuple[str, ...], like: Tensor) -> None:
        self._names = names
        self._bad = torch.zeros((), dtype=torch.bool, device=like.device)
        self._first = torch.full((), -1, dtype=torch.int64, device=like.device)
        self._terms = torch.zeros_like(like)

    def unread(self) -> dict[str, Any] | None:
        """The verdict not read yet, for a checkpoint (device tensors, no host read): ``first``
        (the step of the first non-finite call since the last read, -1 if none) and the names."""
        if self._first is None:
            return None
        return {"first": self._first.clone(), "names": list(self._names)}

    # ------------------------------------------------------------------ the read (one sync)
    def read(self) -> Finding | None:
        """Read the pending verdict (one host sync) and start afresh; ``None``: all finite."""
        if not self._calls:
            return None
        row = torch.cat([self._first.reshape(1), self._terms.to(torch.int64)]).tolist()
        names, self._calls = self._names, 0
        self._bad = self._first = self._terms = None
        if row[0] < 0:
            return None
        return Finding(row[0], tuple(n for n, flag in zip(names, row[1:]) if flag))
