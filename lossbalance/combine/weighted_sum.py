"""The plain weighted sum, the default combiner."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Combiner, check_grads, register

__all__ = ["WeightedSum"]


@register
class WeightedSum(Combiner):
    r"""The plain sum of the (already weighted) gradients: ``sum_i lambda_i g_i``.

    This is what ``sum_i lambda_i L_i`` followed by one backward pass gives, and the default of
    :class:`~lossbalance.LossBalancer`. ``grads.sum(0)`` in the input dtype.
    """

    name = "sum"

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        check_grads(grads)
        with torch.no_grad():
            return grads.sum(0)
