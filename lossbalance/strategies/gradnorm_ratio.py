"""Gradient-norm balancing (Wang et al. 2023, "An expert's guide to training PINNs"; jaxpi)."""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .base import StepRecord, Strategy, register

__all__ = ["GradNormRatio"]


@register
class GradNormRatio(Strategy):
    r"""Gradient-norm balancing: give every term's weighted gradient the same norm.

    Wang, Wang, Bai, Perdikaris et al., "An expert's guide to training physics-informed neural
    networks", arXiv 2308.08468 (2023), Section 4 / Algorithm 1 ("grad norm" weighting); reference
    code: PredictiveIntelligenceLab/jaxpi (``weighting.scheme = "grad_norm"``). With
    ``g_i = grad_theta L_i`` (the gradient of the *unweighted* term i)::

        lambda_hat_i = S / ||g_i||,        S = sum_j ||g_j||        (normalize="sum", the paper's eq.)
                                           S = mean_j ||g_j||       (normalize="mean", jaxpi's code)
        lambda_i    <- (1 - alpha) * lambda_i + alpha * lambda_hat_i      (alpha = 0.1)

    At the fixed point ``lambda_i ||g_i|| = S`` for every term: the weighted gradients all have
    the same norm. ``normalize="sum"`` makes that norm the sum of the raw norms (K times larger
    weights than ``"mean"``; equivalent to a K times larger learning rate at the start), ``"mean"``
    keeps weights near 1 when the terms are already balanced.

    Defaults: the paper's sum, ``alpha = 0.1`` (jaxpi's ``momentum = 0.9`` is the weight of the
    *old* value: ``lambda <- 0.9 lambda + 0.1 lambda_hat``), norms over all parameters (weights
    and biases, as jaxpi flattens the whole parameter tree). The EMA starts from the balancer's
    initial weights (1 by default, as jaxpi's ``init_weights``). The authors update the weights
    every 1000 steps (jaxpi ``update_every_steps = 1000``, step 0 included):
    ``LossBalancer(..., update_every=1000)``.

    Options:
        ``normalize``: ``"sum"`` (paper) or ``"mean"`` (jaxpi).
        ``alpha``: weight of the new value in the EMA, in (0, 1]; 1 means no smoothing.
        ``over``: take each term's norm over its own scope (``"scope"``, default) or over the
            parameters every term may train (``"shared"``); only matters with the balancer's
            ``scope=``. With the balancer's ``probe=`` the norms run over the probe.
        ``eps``: relative regulariser, ``lambda_hat_i = S / (||g_i|| + eps * mean_j ||g_j||)``;
            jaxpi uses ``1e-5`` (default here 0, the paper's formula).

    ``GradNormRatio.jaxpi()`` is the jaxpi variant: mean, ``eps = 1e-5``, ``alpha = 0.1``.

    Timing (differs from jaxpi): the balancer computes the new weights from the gradients of the
    current step and applies them to that same step. jaxpi's training loop first takes the step
    (``state = model.step(...)``) and then, when ``step % update_every_steps == 0``, updates the
    weights (``model.update_weights``, from the gradients at the parameters after the step), so
    its new weights take effect from the next step on: here every update's weights are applied
    one call earlier than in jaxpi, and are computed before the step rather than after it.

    Edge cases: a term whose gradient norm is zero (or not finite), or whose ratio is not finite,
    keeps its weight on that update (jaxpi would give it ``1 / eps`` or Inf); the sum/mean ``S``
    still counts it. Scaling every term by the same factor leaves the weights unchanged.
    """

    name = "gradnorm_ratio"
    needs_gradients = True

    def __init__(
        self,
        *,
        normalize: Literal["sum", "mean"] = "sum",
        alpha: float = 0.1,
        over: Literal["scope", "shared"] = "scope",
        eps: float = 0.0,
    ):
        if normalize not in ("sum", "mean"):
            raise ValueError(f"normalize must be 'sum' (paper) or 'mean' (jaxpi), got {normalize!r}")
        if not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha (weight of the new value in the EMA) must be in (0, 1], got {alpha!r}")
        if over not in ("scope", "shared"):
            raise ValueError(f"over must be 'scope' or 'shared', got {over!r}")
        if not isinstance(eps, (int, float)) or not 0.0 <= eps < float("inf"):
            raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
        self.normalize = normalize
        self.alpha = float(alpha)
        self.over = over
        self.eps = float(eps)

    @classmethod
    def jaxpi(cls) -> "GradNormRatio":
        """jaxpi's ``grad_norm`` weighting: ``mean_j ||g_j|| / (||g_i|| + 1e-5 mean_j ||g_j||)``, EMA 0.1;
        the new weights apply one call earlier than in jaxpi (see the class docstring, "Timing")."""
        return cls(normalize="mean", alpha=0.1, eps=1e-5)

    def options(self) -> dict[str, Any]:
        return {"normalize": self.normalize, "alpha": self.alpha, "over": self.over, "eps": self.eps}

    def update(self, record: StepRecord) -> Tensor:
        grads = record.grads
        if grads is None:
            raise RuntimeError("GradNormRatio needs per-term gradient statistics (record.grads is None)")
        weights = record.weights
        norms = grads.norm("all", over=self.over).to(weights.dtype)
        # Finite squared sums (the balancer checks them) bound every norm by sqrt(max float),
        # so the sum of K norms cannot overflow.
        total = norms.sum()
        mean = total / norms.numel()
        if self.normalize == "mean":
            total = mean
        denominator = norms + self.eps * mean if self.eps else norms
        target = total / denominator
        usable = (norms > 0) & torch.isfinite(norms) & torch.isfinite(target) & (target > 0)
        moved = (1 - self.alpha) * weights + self.alpha * target
        usable = usable & torch.isfinite(moved) & (moved > 0)
        return torch.where(usable, moved, weights)
