"""The strategy protocol, the record a strategy sees, and the registry of short names."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Collection, Iterable, Sequence

import torch
from torch import Tensor

from ..registry import Registry, did_you_mean
from ..stats import GradStats
from ..validation import warn_user

__all__ = ["StepRecord", "Strategy", "register", "available_strategies", "make_strategy"]


@dataclass(frozen=True)
class StepRecord:
    """What a strategy sees of one update step (read-only).

    ``names``: the terms present, in the balancer's canonical order; ``losses`` (K,) their
    detached values; ``weights`` (K,) their current weights; ``step``: the balancer's step
    counter (0 on the first step); ``update``: how many updates came before this one;
    ``grads``: per-term gradient statistics (``None`` for strategies that need none);
    ``generator``: the balancer's random generator (the only source of randomness allowed);
    ``traces``: (K,) the terms' NTK statistics for strategies with ``needs_traces``
    (:mod:`lossbalance.ntk`), ``None`` otherwise.
    """

    names: tuple[str, ...]
    losses: Tensor
    weights: Tensor
    step: int
    update: int
    grads: GradStats | None
    generator: torch.Generator
    traces: Tensor | None = None


class Strategy(ABC):
    """A weighting strategy: turns a :class:`StepRecord` into new weights.

    A strategy owns its state and serialises it; it never touches ``.grad`` or the optimizer.
    Subclasses set ``name`` (the registry's short name), ``needs_gradients``, ``needs_traces``
    (the NTK traces of the residual terms in ``record.traces``, with ``trace_options``, a
    :class:`lossbalance.ntk.TraceOptions`), and ``fixed`` when
    ``update`` would always return the current weights (the balancer then never calls it).
    Optionally ``observe(names, losses)``: the detached loss values after the model's step, which
    ``LossBalancer.observe`` / ``step(after=)`` pass on (used by ``famo``).
    """

    name: ClassVar[str] = ""
    needs_gradients: ClassVar[bool] = False
    needs_traces: ClassVar[bool] = False
    fixed: ClassVar[bool] = False

    def validate_terms(self, names: Sequence[str]) -> None:
        """Raise ``KeyError`` naming what is wrong if the strategy cannot work on these terms."""

    def declare_terms(self, terms: Collection[str], optional: Collection[str]) -> None:
        """When the balancer is built: its declared terms (``terms=``) and the ``optional=`` ones.
        Raise ``ValueError`` if a term the strategy needs on every update is optional."""

    @abstractmethod
    def update(self, record: StepRecord) -> Tensor:
        """Return the new (K,) weights for ``record.names``."""

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the state: later updates must not change it (copy tensors and dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def checkpoint(self) -> Any:
        """What :meth:`rollback` needs to undo the next update (the balancer takes one before an
        update that may still fail). Default: :meth:`state_dict`; a strategy whose updates
        replace its tensors instead of changing them in place may return something cheaper."""
        return self.state_dict()

    def rollback(self, checkpoint: Any) -> None:
        """Go back to the state :meth:`checkpoint` returned."""
        self.load_state_dict(checkpoint)

    def options(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this strategy."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


_REGISTRY = Registry("strategy")
register = _REGISTRY.register  # class decorator: make a strategy available under its name


class StrayKeys:
    """The keys of a per-term option dict (``FAMO(min_losses=)``, ``UncertaintyWeighting(init_log_var=)``)
    that name none of the terms seen so far: each warned once, since a misspelt name would
    silently leave its term at the default (a term may still appear later: no error)."""

    def __init__(self, option: str, consequence: str):
        self.option, self.consequence = option, consequence
        self._seen: set[str] = set()
        self._warned: set[str] = set()

    def declare(self, names: Iterable[str]) -> None:
        """Terms known to exist (``terms=``, ``optional=``) before any step passes them."""
        self._seen.update(names)

    def note(self, keys: Iterable[str], names: Iterable[str]) -> None:
        """Record the terms ``names`` as seen; warn about the ``keys`` not seen (once each)."""
        self._seen.update(names)
        stray = sorted(set(keys) - self._seen - self._warned)
        if stray:
            self._warned.update(stray)
            warn_user(f"{self.option} names term(s) {stray}, which the steps so far do not pass (their "
                      f"terms: {sorted(self._seen)}): {self.consequence}")


def available_strategies() -> list[str]:
    """The registered short names."""
    return _REGISTRY.names()


def make_strategy(strategy: str | Strategy, **options: Any) -> Strategy:
    """A strategy object from a short name (with options) or the object itself."""
    if isinstance(strategy, Strategy):
        if options:
            raise TypeError("options go to the strategy's constructor when a strategy object is given")
        return strategy
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a short name or a Strategy object, got {type(strategy).__name__}")
    if strategy not in _REGISTRY:
        hint = did_you_mean(strategy.lower(), list(_REGISTRY))
        raise ValueError(f"unknown strategy {strategy!r}.{hint} Known: {', '.join(available_strategies())}")
    return _REGISTRY[strategy](**options)
