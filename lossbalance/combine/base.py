"""The combiner protocol, the wrapper for plain functions, the registry and :func:`make_combiner`."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from ..registry import Registry, did_you_mean

__all__ = ["Combiner", "CallableCombiner", "register", "available_combiners", "make_combiner"]


class Combiner(ABC):
    """Turns the ``(K, P)`` matrix of weighted per-term gradients into one ``(P,)`` direction.

    Subclasses set ``name`` (the short name :func:`make_combiner` knows them by) and
    ``needs_generator`` (``True`` if the combiner draws random numbers: the balancer then passes
    its own ``torch.Generator``) and ``takes_names`` (``True``: the balancer passes ``names=``, the
    terms of the rows, in order). ``options()`` returns the constructor arguments that rebuild the
    object (used by ``__repr__`` and the config export). Combiners here are stateless;
    ``state_dict``/``load_state_dict`` exist so stateful ones (momentum variants) fit the protocol.
    """

    name: ClassVar[str] = ""
    needs_generator: ClassVar[bool] = False
    takes_names: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        """Return the ``(P,)`` direction for the ``(K, P)`` matrix ``grads``."""

    def options(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this combiner."""
        return {}

    def declare_terms(self, names: Sequence[str]) -> None:
        """The balancer's declared terms (``terms=``), in their order, when it is built (nothing by default)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


def check_grads(grads: Tensor) -> None:
    """Raise unless ``grads`` is a floating-point ``(K, P)`` tensor."""
    if not isinstance(grads, Tensor):
        raise TypeError(f"grads must be a (K, P) tensor, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"grads must be a (K, P) matrix (one row per term), got shape {tuple(grads.shape)}")
    if not grads.is_floating_point():
        raise TypeError(f"grads must have a floating-point dtype, got {grads.dtype}")


def check_direction(out: Any, grads: Tensor, source: str) -> None:
    """Raise ``ValueError`` unless ``out`` (what ``source`` returned) is a ``(P,)`` tensor."""
    if not isinstance(out, Tensor) or tuple(out.shape) != (grads.shape[1],):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{source} returned {got}, expected a ({grads.shape[1]},) vector")


class CallableCombiner(Combiner):
    """Wraps a plain function ``f(grads: (K, P) Tensor) -> (P,) Tensor`` as a combiner."""

    name = "callable"

    def __init__(self, fn: Callable[[Tensor], Tensor], /):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def options(self) -> dict[str, Any]:
        return {"fn": self.fn}

    def __repr__(self) -> str:
        return f"CallableCombiner({getattr(self.fn, '__qualname__', self.fn)!s})"

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        check_grads(grads)
        out = self.fn(grads)
        check_direction(out, grads, f"combiner function {self!r}")
        return out


_COMBINERS = Registry("combiner")
register = _COMBINERS.register  # class decorator: make a combiner known to make_combiner under its name


def available_combiners() -> list[str]:
    """The short names :func:`make_combiner` knows."""
    return _COMBINERS.names()


def make_combiner(spec: str | Combiner | Callable[[Tensor], Tensor] = "sum", /, **options: Any) -> Combiner:
    """A :class:`Combiner` from a short name (with constructor options), an object or a function.

    Short names (case-insensitive): ``"sum"``, ``"pcgrad"``, ``"config"``, ``"upgrad"``, ``"mgda"``,
    ``"dcgd"``, ``"torchjd"``, and
    ``"torchjd:<Aggregator>"`` (e.g. ``"torchjd:MGDA"``). A :class:`Combiner` is returned as is; a
    torchjd aggregator object is wrapped in :class:`~lossbalance.combine.TorchJD`; any other
    callable ``f(grads) -> direction`` in :class:`CallableCombiner`. An unknown name raises
    ``ValueError`` listing the known ones, with the closest match.
    """
    if isinstance(spec, Combiner):
        if options:
            raise TypeError("options go to the combiner's constructor when a combiner object is given")
        return spec
    if isinstance(spec, str):
        return _combiner_named(spec, options)
    if callable(spec):
        return _combiner_of_function(spec, options)
    raise TypeError(f"combine must be a short name, a Combiner or a callable, got {type(spec).__name__}")


def _combiner_named(spec: str, options: dict[str, Any]) -> Combiner:
    """The registered combiner ``spec`` names (``"torchjd:<Aggregator>"`` included)."""
    key = spec.strip()
    if key.lower().startswith("torchjd:"):
        return _COMBINERS["torchjd"](key.split(":", 1)[1], **options)
    key = key.lower()
    if key == "torchjd" and "aggregator" not in options:
        raise ValueError("name the torchjd aggregator: make_combiner('torchjd:UPGrad'), or "
                         "make_combiner('torchjd', aggregator='MGDA')")
    if key not in _COMBINERS:
        hint = did_you_mean(key, list(_COMBINERS))
        raise ValueError(f"unknown combiner {spec!r}.{hint} Known: {', '.join(available_combiners())}")
    return _COMBINERS[key](**options)


def _combiner_of_function(fn: Callable[[Tensor], Tensor], options: dict[str, Any]) -> Combiner:
    """A torchjd aggregator object in the torchjd adapter, any other function in :class:`CallableCombiner`."""
    if options:
        raise TypeError("options cannot be given with a function")
    if type(fn).__module__.split(".")[0] == "torchjd":
        return _COMBINERS["torchjd"](fn)
    return CallableCombiner(fn)
