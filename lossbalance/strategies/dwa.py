"""Dynamic weight average (Liu, Johns & Davison 2019)."""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .base import StepRecord, register
from .history import LossTables, RemembersLosses
from .numerics import safe_ratio, safe_softmax

__all__ = ["DWA"]


@register
class DWA(RemembersLosses):
    r"""Dynamic weight average: weight each term by how slowly its loss fell lately.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
    (arXiv 1803.10704). With ``K`` terms and ``L_i(t)`` the loss of term ``i`` at update
    ``t``::

        w_i(t - 1) = L_i(t - 1) / L_i(t - 2)
        lambda(t)  = K * softmax( w(t - 1) / T ),          T = temperature = 2

    and ``lambda`` = the current weights (1 by default) for the first two updates. The weights
    of update ``t`` depend on the two *previous* updates only, not on ``L(t)``: one update of lag,
    by design (the paper's form). ``t - 1`` is the previous update (n steps back with
    ``LossBalancer(..., update_every=n)``).

    In the paper and in LibMTL (``LibMTL.weighting.DWA``, same formula, ``T = 2``, equal weights
    for epochs 0 and 1) ``L(t)`` is the average loss over an epoch and the weights change once
    per epoch. ``LossBalancer`` shows a strategy only the losses of its update steps, so here
    ``L(t)`` is the loss of one step; with noisy (mini-batch) losses use a larger
    ``update_every`` and expect noisier ratios than with epoch averages.

    Terms that come and go: state is kept per term name; a term enters the softmax once it has
    been present at two earlier updates (until then it keeps its current weight); ``K`` is the
    number of terms in the softmax.

    Numerics: ``0 / 0`` counts as a ratio of 1 and ``x / 0`` as ``+inf``; the softmax is
    :func:`~lossbalance.strategies.numerics.safe_softmax` (logits clamped to ``+-finfo.max / 4``,
    max subtracted, exponent floored at ``log(finfo.tiny)``), so the weights are finite and
    positive for loss scales 1e-30 .. 1e30 in float32 and float64. The ratios make the weights
    invariant to a fixed rescaling of any term.
    """

    name = "dwa"
    needs_gradients = False

    def __init__(self, temperature: float = 2.0):
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        self.temperature = float(temperature)
        self._history = LossTables("older", "newer")  # L_i(t-2), L_i(t-1)

    def options(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def update(self, record: StepRecord) -> Tensor:
        names, losses = record.names, record.losses.detach().clone()
        weights = record.weights.clone()
        older, newer = self._history["older"], self._history["newer"]
        ready, select = self._history.known("older", names, losses.device)
        if ready:
            ratio = safe_ratio(self._history.stack("newer", names, ready), self._history.stack("older", names, ready))
            weights[select] = safe_softmax(ratio / self.temperature, len(ready))
        older.update((n, newer[n]) for n in names if n in newer)
        self._history.put("newer", names, losses)
        return weights
