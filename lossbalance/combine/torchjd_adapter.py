"""The adapter for any ``torchjd.aggregation`` aggregator (optional dependency)."""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import torch
from torch import Tensor

from ..registry import did_you_mean
from .base import Combiner, check_direction, check_grads, register

__all__ = ["TorchJD"]

_INSTALL_HINT = "pip install lossbalance[bench]  (or: pip install torchjd)"


def _torchjd_aggregation() -> ModuleType:
    """``torchjd.aggregation``, or an ImportError with the install hint."""
    try:
        from torchjd import aggregation  # noqa: PLC0415 (optional dependency, imported lazily)
    except ImportError as error:
        raise ImportError(f"the 'torchjd' combiner needs the optional dependency torchjd: {_INSTALL_HINT}") from error
    return aggregation


def _aggregator_named(name: str, kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    """``torchjd.aggregation.<name>(**kwargs)``; an unknown name raises ``ValueError`` listing the known ones."""
    aggregation = _torchjd_aggregation()
    known = sorted(n for n in dir(aggregation) if n[:1].isupper() and not n.startswith("_"))
    cls = getattr(aggregation, name, None)
    if cls is None or not callable(cls):
        hint = did_you_mean(name, known)
        raise ValueError(f"torchjd.aggregation has no aggregator {name!r}.{hint} Known: {', '.join(known)}")
    return cls(**kwargs)


@register
class TorchJD(Combiner):
    r"""Any ``torchjd.aggregation`` aggregator applied to the ``(K, P)`` gradient matrix.

    torchjd (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv
    2406.16232) calls the matrix of per-objective gradients a Jacobian and an *aggregator* maps it
    to one vector: ``TorchJD("UPGrad")``, ``TorchJD("MGDA")``, ``TorchJD("DualProj")``,
    ``TorchJD("ConFIG")``, ... (``make_combiner("torchjd:UPGrad")``) with constructor keyword
    arguments passed through, or ``TorchJD(aggregator_object)``. There is no default aggregator:
    name one. The rows it sees are the balancer's *weighted* gradients. torchjd is an optional
    dependency (``pip install lossbalance[bench]``), imported when the object is created from a
    name; some aggregators need torchjd's own extras (in torchjd 0.18 ``UPGrad`` and ``DualProj``
    need ``torchjd[quadprog_projector]``) and raise torchjd's ImportError saying so.

    Caveats from torchjd's source (none of them ours to fix): some aggregators draw from the
    global random generator (``PCGrad``, ``GradDrop``, ``Random``), so runs are not reproducible
    from the balancer's generator; ``UPGrad`` returns the *mean* of the projections (K times
    smaller than a sum of the same gradients), falls back silently to the plain mean when
    ``sum_i ||g_i||^2 < 1e-4`` and its regulariser biases mixed-scale cases by up to ~12 %.
    """

    name = "torchjd"

    def __init__(self, aggregator: str | Callable[[Tensor], Tensor], **kwargs: Any):
        if isinstance(aggregator, str):
            self.aggregator = _aggregator_named(aggregator, kwargs)
        elif kwargs:
            raise TypeError("keyword arguments go to the aggregator's constructor only when it is given by name")
        elif not callable(aggregator):
            raise TypeError(f"aggregator must be a torchjd aggregator or its name, got {type(aggregator).__name__}")
        else:
            self.aggregator = aggregator
        self._spec = aggregator
        self._kwargs = dict(kwargs)

    def options(self) -> dict[str, Any]:
        return {"aggregator": self._spec, **self._kwargs}

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        check_grads(grads)
        with torch.no_grad():
            out = self.aggregator(grads.detach())
        check_direction(out, grads, repr(self._spec))
        return out.to(grads.dtype)
