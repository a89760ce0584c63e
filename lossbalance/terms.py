"""The declared loss terms: their canonical order, weights, bounds, and which may be absent.

``TermTable`` is the balancer's book of terms. Terms are declared with ``terms=`` (and
``optional=``), by :meth:`TermTable.add`, or by their first appearance in a step's dict; the
canonical order is the declaration order (in a distributed run, rank 0's order for the terms
of the first dict, so that every rank agrees: :mod:`lossbalance.distributed`). Per-term options (``weights=``, ``min_weight=``,
``max_weight=`` and ``scope=`` given as dicts) must name declared or optional terms: a typo
raises, naming it and the known terms, instead of silently running at the default.
"""
from __future__ import annotations

from typing import Any, Collection, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor

from .validation import check_key_set

__all__ = ["TermTable", "Active", "Bound"]

Bound = float | Mapping[str, float] | None


class Active(NamedTuple):
    """The last resolution of a key tuple: the present terms in canonical order."""

    keys: tuple[str, ...]
    names: tuple[str, ...]


class TermTable:
    """Names, weights ``(N,)``, bounds ``(N,)`` and the optional set of the declared terms."""

    def __init__(
        self,
        *,
        weights: Mapping[str, float] | None,
        min_weight: Bound,
        max_weight: Bound,
        optional: Iterable[str],
        dtype: torch.dtype,
        device: torch.device,
        named: Mapping[str, Collection[str]] | None = None,
    ):
        self.initial = dict(weights or {})
        self.named = dict(named or {})  # other per-term options, checked with these (e.g. pointwise=)
        self.bounds = (min_weight, max_weight)
        self.optional = set(optional)
        self.names: list[str] = []
        self.weights = torch.zeros(0, dtype=dtype, device=device)
        self.lower = self.weights.clone()
        self.upper = self.weights.clone()
        self.bounded = False  # whether any term has a min_weight > 0 or a finite max_weight
        self._active: Active | None = None  # caches, dropped whenever the table changes
        self._indexed: tuple[tuple[str, ...], Tensor] | None = None
        self._check_bounds()

    def _check_bounds(self) -> None:
        """At construction: ``min_weight <= max_weight`` for every term the bounds name and for
        the terms they do not (before any term is declared)."""
        named = {n for bound in self.bounds if isinstance(bound, Mapping) for n in bound}
        for name in sorted(named) + [None]:
            lower, upper = self._bound(0, name), self._bound(1, name)
            which = f"term {name!r}" if name is not None else "every term (the defaults)"
            if not (0 <= lower < float("inf")) or not upper > 0:  # NaN fails both
                raise ValueError(f"{which}: min_weight must be a finite number >= 0 and max_weight a number > 0, "
                                 f"got {lower} and {upper}")
            if lower > upper:
                raise ValueError(f"{which}: min_weight {lower} > max_weight {upper}")

    # ------------------------------------------------------------------ declaring
    def initial_weight(self, name: str) -> float:
        """A term's weight before it is declared: ``weights=``, else 1."""
        return float(self.initial.get(name, 1.0))

    def add(self, name: str, weight: float | None = None, *, optional: bool = False) -> None:
        """Declare a term with its initial weight (default: ``weights=`` or 1)."""
        if not isinstance(name, str):
            raise TypeError(f"term names must be strings, got {name!r}")
        if name in self.names:
            raise ValueError(f"term {name!r} is already declared")
        value = self.initial_weight(name) if weight is None else float(weight)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"the initial weight of term {name!r} must be finite and positive, got {value}")
        lower, upper = self._bound(0, name), self._bound(1, name)  # checked when built (_check_bounds)
        self.names.append(name)
        self.weights = _extended(self.weights, value)
        self.lower = _extended(self.lower, lower)
        self.upper = _extended(self.upper, upper)
        self.bounded = self.bounded or lower > 0 or upper < float("inf")
        if optional:
            self.optional.add(name)
        self._active = self._indexed = None

    def remove(self, name: str) -> None:
        """Forget a term and its weight."""
        if name not in self.names:
            raise KeyError(f"term {name!r} is not declared; declared: {self.names}")
        keep = [i for i, n in enumerate(self.names) if n != name]
        self.names.remove(name)
        self.weights, self.lower, self.upper = (t[keep] for t in (self.weights, self.lower, self.upper))
        self.optional.discard(name)
        self._active = self._indexed = None

    def _bound(self, which: int, name: str | None) -> float:
        bound = self.bounds[which]
        default = 0.0 if which == 0 else float("inf")
        if isinstance(bound, Mapping):
            return float(bound.get(name, default))
        return default if bound is None else float(bound)

    def check_option_names(self, known: Collection[str], scope: Collection[str] = (), *, declared: bool) -> None:
        """Raise ``KeyError`` if a per-term option names a term outside ``known`` and ``optional``
        (``declared``: ``known`` is ``terms=``; else the keys of the first step)."""
        options = {"scope": scope, "weights": self.initial, **self.named}
        options.update({key: b for key, b in zip(("min_weight", "max_weight"), self.bounds) if isinstance(b, Mapping)})
        for option, names in options.items():
            stray = [n for n in names if n not in known and n not in self.optional]
            if not stray:
                continue
            fix = "check the spelling, or declare a term that appears later with optional=[name]"
            if declared:
                raise KeyError(f"{option} names term(s) {stray} that are neither in terms= nor in optional=: {fix}")
            raise KeyError(f"{option} names the term {stray[0]!r}, which is not among the terms {list(known)}: {fix}")

    # ------------------------------------------------------------------ resolving a step's keys
    def resolve(self, keys: tuple[str, ...], scope: Collection[str] = ()) -> tuple[str, ...]:
        """The present terms in canonical order; validates the key set without changing anything."""
        if self._active is not None and self._active.keys == keys:
            return self._active.names
        if not self.names:
            self.check_option_names(keys, scope, declared=False)
            return keys
        check_key_set(keys, self.names, self.optional)
        new = [n for n in keys if n not in self.names]
        names = tuple(n for n in self.names if n in keys) + tuple(new)
        self._active = Active(keys, names)
        return names

    def index(self, names: tuple[str, ...]) -> Tensor | None:
        """Register the terms of ``names`` not declared yet; the indices of ``names`` in the
        weights (``None``: all the declared terms, in their order)."""
        if self._indexed is not None and self._indexed[0] == names:
            return self._indexed[1]
        for name in names:
            if name not in self.names:
                self.add(name)
        every = list(names) == self.names
        index = None if every else torch.tensor([self.names.index(n) for n in names], device=self.weights.device)
        self._indexed = (names, index)
        return index

    def present(self, index: Tensor | None) -> Tensor:
        """The weights of the terms at ``index`` (from :meth:`index`)."""
        return self.weights if index is None else self.weights[index]

    def set_present(self, index: Tensor | None, weights: Tensor) -> None:
        """New weights for the terms at ``index``: a new tensor, never a change in place (so
        that a reference to the old one is a snapshot)."""
        self.weights = weights if index is None else self.weights.index_put((index,), weights)

    # ------------------------------------------------------------------ weights
    def sanitize(self, new: Tensor, old: Tensor, index: Tensor | None) -> Tensor:
        """Bound the strategy's weights; a non-finite or non-positive weight keeps its old value."""
        limits = torch.finfo(old.dtype)
        if new.dtype == old.dtype:  # finite and positive: 0 < new <= max (NaN fails both tests)
            new = torch.where((new > 0) & (new <= limits.max), new, old).clamp_min(limits.tiny)
        else:  # in float64 first: a value beyond the weights' range clamps to their max
            new = new.to(torch.float64)
            new = torch.where(torch.isfinite(new) & (new > 0), new, old).clamp(limits.tiny, limits.max).to(old.dtype)
        if not self.bounded:
            return new
        lower, upper = (self.lower, self.upper) if index is None else (self.lower[index], self.upper[index])
        return torch.minimum(torch.maximum(new, lower), upper)

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the weights and bounds (the parameters moved)."""
        if self.weights.device != device or self.weights.dtype != dtype:
            self.weights, self.lower, self.upper = (t.to(device, dtype) for t in (self.weights, self.lower, self.upper))
            self._indexed = None

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights.tolist()))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names), "optional": sorted(self.optional), "weights": self.weights.clone(),
            "lower": self.lower.clone(), "upper": self.upper.clone(),
        }

    def checked_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The tensors of a saved state, on this table's device and dtype; raises before any change."""
        names = list(state["names"])
        if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"corrupt state: the term names {names} are not distinct strings")
        n = len(names)
        like = dict(device=self.weights.device, dtype=self.weights.dtype)
        tensors = {
            "weights": state["weights"], "lower": state.get("lower", torch.zeros(n)),
            "upper": state.get("upper", torch.full((n,), float("inf"))),
        }
        for key, value in tensors.items():
            if not isinstance(value, Tensor) or value.shape != (n,):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"corrupt state: {n} term names but {key} of shape {shape}")
        checked = {key: value.to(**like).clone() for key, value in tensors.items()}
        return {"names": names, "optional": set(state.get("optional", ())), **checked}

    def commit(self, checked: Mapping[str, Any]) -> None:
        """Take over a state returned by :meth:`checked_state` (cannot fail)."""
        self.names = checked["names"]
        self.optional = checked["optional"]
        self.weights, self.lower, self.upper = checked["weights"], checked["lower"], checked["upper"]
        self.bounded = bool((self.lower > 0).any() | torch.isfinite(self.upper).any())
        self._active = self._indexed = None


def _extended(t: Tensor, value: float) -> Tensor:
    return torch.cat([t, t.new_full((1,), value)])
