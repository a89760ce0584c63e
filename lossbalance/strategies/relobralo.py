"""Relative loss balancing with random lookback (Bischof & Kraus 2021)."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .base import StepRecord, register
from .history import LossTables, RemembersLosses
from .numerics import safe_ratio, safe_softmax

__all__ = ["ReLoBRaLo"]

_SCHEDULES = ("paper", "authors")


@register
class ReLoBRaLo(RemembersLosses):
    r"""Relative loss balancing with random lookback (ReLoBRaLo).

    Bischof & Kraus, "Multi-Objective Loss Balancing for Physics-Informed Deep Learning",
    arXiv 2110.09813 (2021; extended journal version 2025, Elsevier, vol. 439, art. 117914).
    With ``K`` terms and ``L_i(t)`` the loss of term ``i`` at update ``t``::

        bal_i(t, t') = K * softmax_i( L_i(t) / (tau * L_i(t') + eps) )
        lambda(t)    = alpha * [ rho * lambda(t-1) + (1 - rho) * bal(t, 0) ]
                       + (1 - alpha) * bal(t, t-1),           rho ~ Bernoulli(expected_rho)

    ``t - 1`` is the previous *update* (with ``LossBalancer(..., update_every=n)`` that is n steps
    back), ``0`` the first update at which the term was present, and ``lambda(t-1)`` the weight
    currently in use (``record.weights``: the initial weights given to the balancer, after its
    ``min_weight``/``max_weight`` clamps). The weights computed from ``L(t)`` are applied to the
    same step's gradient. At the first update there is no history: the weights stay as they
    are (1 by default) and ``L(0)`` is stored.

    Defaults, as NVIDIA PhysicsNeMo-Sym's ``Relobralo`` and neuraloperator's
    ``neuralop.losses.meta_losses.Relobralo``: ``alpha = 0.95``, ``expected_rho = 0.99`` (their
    ``beta``), ``tau = 1``, ``eps = 1e-8`` (inside the ratio). Both also return weights 1 at their
    first call and store ``L(0)``; they draw ``rho`` from torch's *global* generator, so their
    runs are not reproducible from a seed of their own.

    ``schedule``: ``"paper"`` (default) uses the formula above from the second update on, with
    ``L(0)`` the loss at the term's first update. ``"authors"`` follows the authors' code
    (github.com/rbischof/relative_balancing, ``src/train.py`` and ``src/update_rules.py``,
    checked): its alpha schedule is ``[1, 0, alpha, alpha, ...]`` and it stores ``L(0)`` after the
    *second* step. Per term here: its first update keeps its weight (the authors' alpha = 1 with
    rho = 1), its second update is pure ``bal(t, t-1)`` (alpha = 0) and stores that step's loss as
    ``L(0)``, and from the third update on the formula above holds with that ``L(0)``. So at the
    second update the weights are ``K * softmax(L(1) / (tau * L(0) + eps))`` where ``"paper"``
    gives ``alpha * lambda + (1 - alpha) * bal``, about 1 with ``alpha = 0.999``. One difference
    remains: when the authors' first rho draw is 0 (only with ``expected_rho < 1``) their first
    step weights the terms by ``K * softmax(L(0) / (tau * 1 + eps))``, a softmax of the raw losses
    against their placeholder ``L(0) = 1``; here the first update always keeps the weights.

    The authors' code defaults to ``alpha = 0.999``, ``T = tau = 1.0``, ``rho = 1.0`` (no random
    lookback unless ``--rho`` is given), ``eps = 1e-12`` and the ``"authors"`` schedule: the
    ``bischof2021`` preset of :mod:`lossbalance.config`. The values the paper itself reports for
    its experiments could not be checked against the paper's text when this was written;
    third-party ports quote ``alpha = 0.999``, ``tau = 0.1`` with ``expected_rho`` of 0.99 or
    0.999 -- pass them explicitly if you want them: ``ReLoBRaLo(alpha=0.999, tau=0.1,
    expected_rho=0.999)``.

    Randomness: exactly one number is drawn per ``update()`` call, the first update and
    updates without history included, and whatever ``expected_rho`` is:
    ``u = torch.rand((), generator=record.generator, device=record.generator.device,
    dtype=torch.float64)``; ``rho = 1`` if ``u < expected_rho`` else ``0``. The generator is
    the balancer's (``LossBalancer(..., seed=)``, saved in its ``state_dict``), so runs and
    resumed runs are reproducible.

    Terms that come and go: state is kept per term name. A term seen for the first time keeps
    its current weight on that update (and stores its ``L(0)``); the other terms are balanced
    among themselves (``K`` is then the number of terms with history).

    Numerics: the ratios are computed as plain divisions (``0 / 0`` counts as 1, ``x / 0`` as
    ``+inf``) and the softmax is :func:`~lossbalance.strategies.numerics.safe_softmax`: logits
    clamped to ``+-finfo.max / 4``, max subtracted, exponent floored at ``log(finfo.tiny)``, so
    weights are finite and positive for loss scales from 1e-30 to 1e30 in float32 and float64.
    The ratios are invariant to a fixed rescaling of any term as long as ``tau * L`` is large
    against ``eps``; for losses near or below ``eps`` (1e-8) the ratios shrink towards 0 and the
    weights towards uniform -- set ``eps=0`` to remove that floor.
    """

    name = "relobralo"
    needs_gradients = False

    def __init__(
        self,
        *,
        alpha: float = 0.95,
        expected_rho: float = 0.99,
        tau: float = 1.0,
        eps: float = 1e-8,
        schedule: Literal["paper", "authors"] = "paper",
    ):
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be 'paper' or 'authors' (rbischof/relative_balancing), got {schedule!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= expected_rho <= 1.0:
            raise ValueError(
                f"expected_rho (the probability of keeping lambda(t-1)) must be in [0, 1], got {expected_rho}"
            )
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"tau (the softmax temperature) must be finite and > 0, got {tau}")
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        self.alpha = float(alpha)
        self.expected_rho = float(expected_rho)
        self.tau = float(tau)
        self.eps = float(eps)
        self.schedule = schedule
        # L_i(0) and L_i(t-1): the first and the last update at which the term was present
        self._history = LossTables("initial", "previous")

    def options(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha, "expected_rho": self.expected_rho, "tau": self.tau, "eps": self.eps,
            "schedule": self.schedule,
        }

    def _balance(self, losses: Tensor, reference: Tensor, k: int) -> Tensor:
        """``bal(t, t')`` for each row of ``reference`` (``L(t')``: (k,) or (rows, k))."""
        return safe_softmax(safe_ratio(losses, self.tau * reference + self.eps), k)

    def _mixing(self, fresh: list[bool], like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``alpha`` and ``1 - alpha`` per term: 0 and 1 for a term at its second update under
        the "authors" schedule (``fresh``), plain numbers when no term is."""
        if not any(fresh):
            return self.alpha, 1 - self.alpha
        mask = torch.tensor(fresh, device=like.device)
        alpha = like.new_full((len(fresh),), self.alpha).masked_fill(mask, 0.0)
        return alpha, like.new_full((len(fresh),), 1 - self.alpha).masked_fill(mask, 1.0)  # 1 - alpha, rounded once

    def update(self, record: StepRecord) -> Tensor:
        generator = record.generator
        u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64)
        rho = (u < self.expected_rho).to(record.losses.dtype)  # 0-dim: broadcasts as a scalar
        names, losses = record.names, record.losses.detach().clone()
        weights = record.weights.clone()
        old, select = self._history.known("previous", names, losses.device)
        if old:
            current = losses[select]
            held = self._history["initial"]
            # "authors": a term at its second update has no L(0) yet; alpha is 0 for it, and its
            # current loss stands in for L(0) in the lookback softmax of the others
            fresh = [names[i] not in held for i in old]
            initial = torch.stack([held.get(names[i], current[j]) for j, i in enumerate(old)])
            previous = self._history.stack("previous", names, old)
            k = len(old)
            # bal(t, 0) and bal(t, t-1) as the two rows of one softmax
            lookback, recent = self._balance(current, torch.stack([initial, previous]), k).unbind()
            alpha, beta = self._mixing(fresh, current)
            weights[select] = alpha * (rho * weights[select] + (1 - rho) * lookback) + beta * recent
        if self.schedule == "paper":
            self._history.put("initial", names, losses, first_only=True)
        elif old:
            self._history.put("initial", [names[i] for i in old], current, first_only=True)
        self._history.put("previous", names, losses)
        return weights
