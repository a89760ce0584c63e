"""Fixed weights: the baseline every benchmark compares against."""
from __future__ import annotations

from torch import Tensor

from .base import StepRecord, Strategy, register

__all__ = ["Static"]


@register
class Static(Strategy):
    """Fixed weights: ``lambda_i = lambda_i(0)``, the initial weights given to the balancer (1 by default).

    Costs a plain step: one backward of ``sum_i lambda_i L_i``.
    """

    name = "static"
    fixed = True

    def update(self, record: StepRecord) -> Tensor:
        return record.weights
