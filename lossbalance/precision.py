"""Precision: full precision (nothing to do) or float16 mixed precision with a ``GradScaler``.

Under a ``torch.amp.GradScaler`` the terms are multiplied by the scale before any backward pass
(so float16 gradients do not underflow), the gradient statistics are divided by it before the
strategy sees them, a step whose per-term gradients overflow keeps the weights (the scaler then
skips the optimizer step and lowers the scale), and the optimizer is stepped through the scaler.
The balancer never asks which of the two it holds.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .stats import GradStats

__all__ = ["FullPrecision", "ScaledPrecision", "make_precision"]


class FullPrecision:
    """No scaling: the terms as they are, ``optimizer.step()``."""

    scaler = None
    scaled = False  # whether overflow is the scaler's business (no NaN/Inf check of the gradients)

    def scale(self, terms: list[Tensor], values: Tensor) -> list[Tensor]:
        """The terms to differentiate (``values``: their detached values, for dtype and device)."""
        return terms

    def unscale(self, stats: GradStats) -> GradStats:
        return stats

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class ScaledPrecision(FullPrecision):
    """Loss scaling with ``scaler`` (an enabled ``torch.amp.GradScaler``)."""

    scaled = True

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler
        self._scale: Tensor | None = None

    def scale(self, terms: list[Tensor], values: Tensor) -> list[Tensor]:
        self._scale = self.scaler.scale(values.new_ones(()))
        return [self._scale * t for t in terms]

    def unscale(self, stats: GradStats) -> GradStats:
        assert self._scale is not None
        return stats.unscaled(self._scale)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.scaler.load_state_dict(state)


def make_precision(scaler: torch.amp.GradScaler | None) -> FullPrecision:
    """The precision for ``scaler=`` (a disabled scaler is full precision)."""
    return ScaledPrecision(scaler) if scaler is not None and scaler.is_enabled() else FullPrecision()
