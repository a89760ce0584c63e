"""What the balancer reports about its steps: ``stats``, ``diagnostics`` and ``history``.

``StepLog`` keeps small frozen records of the last step, of the last step with per-term
gradients, and of the last ``history`` steps; the figures are turned into Python numbers only
when read, and each history entry only once (reading ``history`` costs the entries added since
the last read, not the whole list).
"""
from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from torch import Tensor

from .stats import GradStats

__all__ = ["StepLog", "LastStep", "Diagnosed", "HistoryRow", "LazyFigures"]


class LazyFigures:
    """Figures that cost more than a few tensor ops, computed at their first read: ``names``
    and a function giving them as one 1-D tensor. ``stats`` reads them (``float()``), a
    history row settles them into tensors (no host sync); a step nobody reads costs nothing."""

    __slots__ = ("names", "_compute", "_values")

    def __init__(self, names: tuple[str, ...], compute: Any) -> None:
        self.names, self._compute, self._values = names, compute, None

    def values(self) -> Tensor:
        if self._values is None:
            self._values, self._compute = self._compute(), None
        return self._values

    def items(self) -> list[tuple[str, Any]]:
        """``(name, 0-dim tensor)`` pairs, computing them now."""
        return list(zip(self.names, self.values().unbind()))


def _settled(figures: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """The pointwise figures with every :class:`LazyFigures` group replaced by its tensors."""
    if not figures:
        return figures
    return {term: dict(_flat(group)) for term, group in figures.items()}


def _flat(group: dict[str, Any]) -> list[tuple[str, Any]]:
    """A term's figures as ``(name, value)`` pairs, lazy groups expanded."""
    pairs = []
    for key, value in group.items():
        pairs.extend(value.items() if isinstance(value, LazyFigures) else [(key, value)])
    return pairs


class LastStep(NamedTuple):
    names: tuple[str, ...]
    values: Tensor
    weights: Tensor
    stats: GradStats | None
    pointwise: dict[str, dict[str, Any]] | None = None  # {term: {figure: 0-dim tensor or float}} (Residual terms)


class Diagnosed(NamedTuple):
    step: int
    names: tuple[str, ...]
    stats: GradStats  # its kept gradients live in the engine's buffer: valid until the next gradient step


class Figures(NamedTuple):
    norms: Tensor
    cosine: Tensor
    conflict_fraction: Tensor


class HistoryRow(NamedTuple):
    step: int
    names: tuple[str, ...]
    weights: Tensor
    values: Tensor
    figures: Figures | None
    pointwise: dict[str, dict[str, Any]] | None = None  # as LastStep.pointwise


class StepLog:
    """The records of the last steps (``history``: how many steps the history keeps)."""

    def __init__(self, history: int):
        self.last: LastStep | None = None
        self.diagnosed: Diagnosed | None = None
        self.rows: deque[HistoryRow] = deque(maxlen=history)
        self._entries: deque[dict[str, Any]] = deque(maxlen=history)
        self._added = 0  # rows appended since the entries were last brought up to date
        self.recorded = 0  # rows appended in all (a full history drops its oldest: len(rows) stops counting)

    @property
    def keeps_history(self) -> int:
        return self.rows.maxlen or 0

    def record(self, step: int, last: LastStep) -> None:
        """Record a finished step (the kept gradients' figures now: the buffer is reused next step)."""
        self.last = last
        kept = last.stats is not None and last.stats.gradients is not None
        if kept:
            self.diagnosed = Diagnosed(step, last.names, last.stats)
        if self.keeps_history:
            figures = _figures(last.stats) if kept else None
            self.rows.append(HistoryRow(step, last.names, last.weights, last.values, figures, _settled(last.pointwise)))
            self._added += 1
            self.recorded += 1

    def forget_since(self, recorded: int) -> None:
        """Take back the rows recorded since :attr:`recorded` was ``recorded`` (their steps were
        undone); the older rows a full history dropped for them stay dropped."""
        while self.recorded > recorded:
            self.recorded -= 1
            self._forget_last_row()

    def _forget_last_row(self) -> None:
        if self.rows:
            self.rows.pop()
            if self._added:
                self._added -= 1
            else:
                self._entries.pop()

    # ------------------------------------------------------------------ reading
    def stats(self) -> dict[str, dict[str, float]]:
        if self.last is None:
            return {}
        names, values, weights, grads, pointwise = self.last
        columns = {"loss": values, "weight": weights}
        if grads is not None:
            columns.update(grad_mean=grads.mean_abs(), grad_max=grads.max_abs_over(), grad_norm=grads.norm())
        table = {key: col.tolist() for key, col in columns.items()}
        stats = {name: {key: table[key][i] for key in table} for i, name in enumerate(names)}
        for name, figures in (pointwise or {}).items():  # e.g. causal_min, rba_max
            if name in stats:
                stats[name].update({key: float(v) for key, v in _flat(figures)})
        return stats

    def diagnostics(self) -> dict[str, Any] | None:
        if self.diagnosed is None:
            return None
        step, names, stats = self.diagnosed
        return {"step": step, "names": list(names), **_figure_dict(names, _figures(stats))}

    def history(self) -> list[dict[str, Any]]:
        """The entries (plain dicts, built once each; treat them as read-only)."""
        if self._added:
            fresh = list(self.rows)[max(0, len(self.rows) - self._added) :]
            self._entries.extend(_entry(row) for row in fresh)
            self._added = 0
        return list(self._entries)


def _figures(stats: GradStats) -> Figures:
    return Figures(stats.norm(), stats.cosine(), stats.conflict_fraction())


def _figure_dict(names: tuple[str, ...], figures: Figures) -> dict[str, Any]:
    norms, cosine, fraction = figures
    return {"grad_norm": dict(zip(names, norms.tolist())), "cosine": cosine.tolist(), "conflict_fraction": fraction.item()}


def _entry(row: HistoryRow) -> dict[str, Any]:
    entry = {
        "step": row.step, "weights": dict(zip(row.names, row.weights.tolist())),
        "losses": dict(zip(row.names, row.values.tolist())),
    }
    if row.figures is not None:
        entry.update(_figure_dict(row.names, row.figures))
    if row.pointwise:
        entry["pointwise"] = {name: {key: float(v) for key, v in figures.items()} for name, figures in row.pointwise.items()}
    return entry
