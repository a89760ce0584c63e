"""Fixed weights: the baseline every benchmark compares against."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from torch import Tensor

from .base import StepRecord, Strategy, register

if TYPE_CHECKING:
    from ..balancer import LossBalancer

__all__ = ["Static", "static_from"]


@register
class Static(Strategy):
    """Fixed weights: ``lambda_i = lambda_i(0)``, the initial weights given to the balancer (1 by default).

    ``weights``: optional ``{term: weight}`` that the balancer takes as its initial weights
    (merged with its own ``weights=``, which win per term), so that ``LossBalancer(opt,
    Static(weights={...}))`` is a complete fixed-weight baseline; :func:`static_from` builds it
    from a trained balancer. Costs a plain step: one backward of ``sum_i lambda_i L_i``.
    """

    name = "static"
    fixed = True

    def __init__(self, weights: Mapping[str, float] | None = None):
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(f"weights must be a dict {{term: weight}}, got {type(weights).__name__}")
            for name, value in weights.items():
                if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"weights must map term names to Python numbers, got {name!r}: {value!r} "
                                    f"({type(value).__name__}; for a tensor use float(value))")
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"weights must map term names to finite weights >= 0, got {name!r}: {value!r}")
        self.weights = None if weights is None else {name: float(value) for name, value in weights.items()}

    def options(self) -> dict[str, Any]:
        return {} if self.weights is None else {"weights": dict(self.weights)}

    def update(self, record: StepRecord) -> Tensor:
        return record.weights


def static_from(balancer: "LossBalancer", *, as_dict: bool = False) -> Static | dict[str, float]:
    """The weights a balancer has learned, as fixed weights for a rerun (the adaptive run's
    static baseline): ``LossBalancer(optimizer, static_from(trained))``, or with
    ``as_dict=True`` the plain ``{term: weight}`` (for ``weights=`` or a config file).

    The weights are those in use now (``balancer.weights``, after its clamps), for every declared
    term. To stop adapting within the same run instead, call ``balancer.freeze()``.
    """
    weights = dict(balancer.weights)
    return weights if as_dict else Static(weights=weights)
