"""SoftAdapt (Heydari, Thompson & Mehmood 2019)."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .base import StepRecord, register
from .history import LossTables, RemembersLosses
from .numerics import safe_ratio, safe_softmax

__all__ = ["SoftAdapt"]

_VARIANTS = ("difference", "normalized", "loss_weighted", "ratio")


@register
class SoftAdapt(RemembersLosses):
    r"""SoftAdapt: weight each term by a softmax of how its loss changed since the last update.

    Heydari, Thompson & Mehmood, "SoftAdapt: Techniques for Adaptive Loss Weighting of Neural
    Networks with Multi-Part Loss Functions", arXiv 1912.12355 (2019). With ``s_i = L_i(t) -
    L_i(t-1)`` the change of term ``i`` since the previous *update* (``t - 1`` is the previous
    update, n steps back with ``LossBalancer(..., update_every=n)``; the difference is not
    divided by n)::

        variant="difference" (paper, default):  lambda = c * softmax(beta * s)
        variant="normalized":                   lambda = c * softmax(beta * s / sum_j |s_j|)
        variant="loss_weighted":                lambda_i = c * f_i exp(beta s_i) / sum_j f_j exp(beta s_j)
        variant="ratio":                        lambda = c * softmax(beta * L(t) / (L(t-1) + eps))

    with ``c = K`` (the number of terms) when ``normalize_to_k=True`` (the default) and ``c = 1``
    (the paper's convex weights) when ``normalize_to_k=False``. The terms whose loss grows (or
    falls slowest) get the largest weights.

    - ``beta`` (default 0.1, the paper's and the reference package's value; 1.0 for
      ``"ratio"``, which has none in PhysicsNeMo): sharpness. ``beta > 0`` favours the
      worst-performing terms, ``beta < 0`` the best, ``beta = 0`` gives equal weights.

      **Trap on PINN loss scales** (with the default ``"difference"`` and ``"loss_weighted"``):
      ``beta * s`` is in the units of the losses. PINN losses are often O(1e2..1e4) at the start
      and move by hundreds between updates, so ``beta * s`` differs between terms by tens to
      hundreds, the softmax saturates and a weight flips between ``K`` and the dtype's smallest
      normal number (1e-38 in float32) from one update to the next. The fix: ``variant="ratio"``
      (``L(t) / L(t-1)``, scale-free per term, PhysicsNeMo's PINN default: weights within
      ``K * softmax`` of ratios near 1) or ``variant="normalized"`` (slopes in ``[-1, 1]``, so
      any two weights differ by at most ``exp(2 |beta|)``; take ``beta`` of order 1 there), or a
      ``beta`` of the order of ``1 / |s|``. The paper's formula stays the default because it is
      what the class names (the reference package's README example, losses up to 1.5e3, shows
      and intends weights near 0, 3.9e-22, for a fast-falling term); the loss-weighted
      variant, which the reference package recommends, does *not* avoid the trap (its logits are
      ``log f + beta s``).
    - ``"normalized"``: slopes divided by the sum of their absolute values (scale-free: a common
      rescaling of all losses leaves the weights unchanged). The reference package
      (``softadapt``, ``NormalizedSoftAdapt``) divides by the *signed* sum ``sum_j s_j``, which
      reverses the ranking whenever the losses fall overall; that form is not offered.
    - ``"loss_weighted"``: ``f_i`` is the mean of the loss values the slope is taken from,
      ``(L_i(t) + L_i(t-1)) / 2``, as the reference package's ``LossWeightedSoftAdapt`` does
      with its window (here of two points); computed as ``softmax(log f + beta s)``, with
      ``f`` floored at the dtype's smallest normal number (losses must be non-negative).
    - ``"ratio"``: NVIDIA PhysicsNeMo-Sym's and neuraloperator's ``SoftAdapt``,
      ``K * softmax(L(t) / (L(t-1) + eps))``, ``eps = 1e-8``: use
      ``SoftAdapt(variant="ratio")`` (``beta`` then defaults to 1, ``normalize_to_k`` to True),
      or the preset ``SoftAdapt.physicsnemo()``.

    ``normalize_to_k=True`` is the default here (unlike the paper) so that switching from static
    weights 1, or from the first update (which keeps the current weights, 1 by default), does
    not silently divide the effective learning rate by ``K``.

    The paper's slopes are finite differences over the last few iterations (the reference
    package uses up to 5-point stencils over a user-chosen window); here the slope is the
    first-order difference between consecutive updates, and the window is the balancer's
    ``update_every``. ``LossBalancer`` only shows strategies the losses of update steps.

    First update (no history): the current weights are kept and ``L(0)`` is stored. A term
    seen for the first time keeps its current weight on that update; the others are balanced
    among themselves (``K`` = the number of terms with history).

    Numerics: :func:`~lossbalance.strategies.numerics.safe_softmax` (logits clamped to
    ``+-finfo.max / 4``, max subtracted, exponent floored at ``log(finfo.tiny)``): weights are
    finite and positive for loss scales 1e-30 .. 1e30 in float32 and float64; ``0 / 0`` in the
    ratio counts as 1. Note that ``"difference"`` and ``"loss_weighted"`` are not scale-free
    (that is the paper's formula: ``beta * s`` depends on the units of the losses); ``"ratio"``
    is invariant to rescaling any one term (while ``L >> eps``), ``"normalized"`` to a common
    rescaling of all terms.
    """

    name = "softadapt"
    needs_gradients = False

    def __init__(
        self,
        beta: float | None = None,
        *,
        variant: Literal["difference", "normalized", "loss_weighted", "ratio"] = "difference",
        normalize_to_k: bool = True,
        eps: float = 1e-8,
    ):
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, _VARIANTS))}; got {variant!r}")
        if beta is None:
            beta = 1.0 if variant == "ratio" else 0.1
        if not math.isfinite(beta):
            raise ValueError(f"beta must be finite, got {beta}")
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        self.beta = float(beta)
        self.variant = variant
        self.normalize_to_k = bool(normalize_to_k)
        self.eps = float(eps)
        self._history = LossTables("previous")  # L_i(t-1)

    @classmethod
    def physicsnemo(cls) -> "SoftAdapt":
        """PhysicsNeMo-Sym / neuraloperator ``SoftAdapt``: ``K * softmax(L(t) / (L(t-1) + 1e-8))``."""
        return cls(1.0, variant="ratio", normalize_to_k=True, eps=1e-8)

    def options(self) -> dict[str, Any]:
        return {"beta": self.beta, "variant": self.variant, "normalize_to_k": self.normalize_to_k, "eps": self.eps}

    def _logits(self, current: Tensor, previous: Tensor) -> Tensor:
        if self.variant == "ratio":
            return self.beta * safe_ratio(current, previous + self.eps)
        slope = current - previous
        if self.variant == "normalized":
            total = slope.abs().sum().clamp_min(torch.finfo(slope.dtype).tiny)
            return self.beta * (slope / total)
        if self.variant == "loss_weighted":
            mean = (0.5 * current + 0.5 * previous).clamp_min(torch.finfo(slope.dtype).tiny)
            return mean.log() + self.beta * slope
        return self.beta * slope

    def update(self, record: StepRecord) -> Tensor:
        names, losses = record.names, record.losses.detach().clone()
        weights = record.weights.clone()
        old, select = self._history.known("previous", names, losses.device)
        if old:
            previous = self._history.stack("previous", names, old)
            scale = len(old) if self.normalize_to_k else 1
            weights[select] = safe_softmax(self._logits(losses[select], previous), scale)
        self._history.put("previous", names, losses)
        return weights
