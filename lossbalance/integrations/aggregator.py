"""A PhysicsNeMo-style loss aggregator: an ``nn.Module`` mapping ``(losses, step)`` to one loss."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..balancer import LossBalancer

__all__ = ["BalancedAggregator"]


class BalancedAggregator(nn.Module):
    """``forward(losses: dict, step: int) -> Tensor``: ``balancer.loss(losses)``.

    The shape of the aggregators of NVIDIA PhysicsNeMo (Modulus) Sym, for training loops that
    call ``aggregator(losses, step)`` and then ``.backward()`` and ``optimizer.step()`` on the
    result. Build the balancer from the parameters (``LossBalancer(model.parameters(), "lra")``):
    the loop steps its own optimizer. The returned scalar's value is the weighted total; its
    backward accumulates exactly the balanced gradient (see :meth:`LossBalancer.loss`).

    ``step`` is accepted for the interface; the balancer counts its own steps (one per call), so
    it is not used. In evaluation mode (``aggregator.eval()``) or under ``torch.no_grad()`` (a
    validation pass) it returns :meth:`LossBalancer.evaluate`: the weighted total with the
    current weights, nothing advances. The aggregator holds no parameters; its ``state_dict`` carries the
    balancer's state (``extra_state``), so saving the aggregator with the model saves the weights.
    """

    def __init__(self, balancer: LossBalancer):
        super().__init__()
        if not isinstance(balancer, LossBalancer):
            raise TypeError(f"BalancedAggregator wraps a LossBalancer, got {type(balancer).__name__}")
        self.balancer = balancer

    def forward(self, losses: Mapping[str, Tensor], step: int | None = None) -> Tensor:
        if not self.training or not torch.is_grad_enabled():
            return self.balancer.evaluate(losses)
        return self.balancer.loss(losses)

    @property
    def weights(self) -> dict[str, float]:
        return self.balancer.weights

    def get_extra_state(self):
        return self.balancer.state_dict()

    def set_extra_state(self, state) -> None:
        self.balancer.load_state_dict(state)

    def extra_repr(self) -> str:
        return repr(self.balancer)
