"""Per-term loss values that loss-value strategies remember from one update to the next."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .base import Strategy

__all__ = ["LossTables", "RemembersLosses"]


class LossTables:
    """Named tables ``{term name: loss value}`` (e.g. ``L(0)``, ``L(t-1)``), kept by term name so
    that terms may come and go; ``state_dict`` is a snapshot (cloned tensors)."""

    def __init__(self, *tables: str):
        self.tables: dict[str, dict[str, Tensor]] = {table: {} for table in tables}

    def __getitem__(self, table: str) -> dict[str, Tensor]:
        return self.tables[table]

    def known(self, table: str, names: Sequence[str], device: torch.device) -> tuple[list[int], slice | Tensor]:
        """Positions in ``names`` of the terms ``table`` holds, and an index selecting them."""
        rows = [i for i, name in enumerate(names) if name in self.tables[table]]
        select = slice(None) if len(rows) == len(names) else torch.tensor(rows, device=device)
        return rows, select

    def stack(self, table: str, names: Sequence[str], rows: Sequence[int]) -> Tensor:
        """The remembered values of ``names[i]`` for ``i`` in ``rows``, as one tensor."""
        return torch.stack([self.tables[table][names[i]] for i in rows])

    def put(self, table: str, names: Sequence[str], values: Tensor, *, first_only: bool = False) -> None:
        """Remember ``values[i]`` as the value of ``names[i]`` (``first_only``: of names not held yet)."""
        held = self.tables[table]
        for name, value in zip(names, values.unbind()):
            if not (first_only and name in held):
                held[name] = value

    def state_dict(self) -> dict[str, Any]:
        return {table: {name: value.clone() for name, value in values.items()} for table, values in self.tables.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tables = {table: {name: value.clone() for name, value in state[table].items()} for table in self.tables}

    def shallow(self) -> dict[str, dict[str, Tensor]]:
        """The tables as they are, without copying the tensors (:meth:`put` replaces a value,
        never changes one in place, so this is a snapshot)."""
        return {table: dict(values) for table, values in self.tables.items()}


class RemembersLosses(Strategy):
    """A loss-value strategy whose whole state is the loss values it remembers in ``_history``."""

    _history: LossTables

    def state_dict(self) -> dict[str, Any]:
        return self._history.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history.load_state_dict(state)

    def checkpoint(self) -> dict[str, dict[str, Tensor]]:
        return self._history.shallow()

    def rollback(self, checkpoint: dict[str, dict[str, Tensor]]) -> None:
        self._history.tables = {table: dict(values) for table, values in checkpoint.items()}
