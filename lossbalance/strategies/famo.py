"""FAMO: fast adaptive multitask optimization (Liu, Liu, Jin, Stone & Liu 2023)."""
from __future__ import annotations

import math
from typing import Any, Collection, Mapping, Sequence

import torch
from torch import Tensor

from .base import StepRecord, Strategy, StrayKeys, register
from .learned import VectorAdam

__all__ = ["FAMO"]


@register
class FAMO(Strategy):
    r"""Fast adaptive multitask optimization: softmax logits learned from the log-loss decrease.

    Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
    (arXiv 2306.03792); checked against the authors' ``famo.py`` (github.com/Cranial-XIX/FAMO:
    ``set_min_losses``, ``get_weighted_loss``, ``update``) and LibMTL's ``weighting/FAMO.py``.
    With logits ``xi`` (one per term, 0 at the start), ``z = softmax(xi)`` and the gaps
    ``D_i = L_i - L_i^min + eps``, the model's step minimises::

        sum_i z_i log D_i / c,        c = sum_j z_j / D_j   (held constant, "detached")

    whose gradient is ``sum_i z_i / (c D_i) grad L_i``: the weight applied to ``L_i`` is::

        lambda_i = z_i / (D_i c) = (z_i / D_i) / sum_j (z_j / D_j)      (sum_i lambda_i = 1)

    so one backward of the weighted sum, as for every loss-value strategy: the cost of a plain
    step. The weights sum to 1 (a convex combination of the terms' gradients of ``log L_i``,
    rescaled): switching from static weights 1 divides the step by about K; scale the learning
    rate. After the model's step the logits take one Adam step on::

        delta_i = log D_i(before the step) - log D_i(after the step)
        d xi_j  = sum_i delta_i dz_i/dxi_j = z_j (delta_j - sum_i z_i delta_i)

    (the softmax Jacobian applied to ``delta``; the authors' ``autograd.grad(softmax(w), w,
    grad_outputs=delta)``). A term whose log-loss fell less than the z-weighted average gains
    weight.

    **Where "after the step" comes from.** The authors re-evaluate the losses on the same batch
    under ``torch.no_grad()`` after ``optimizer.step()``. A PINN's residual needs input
    gradients, so there is no cheap no-grad re-forward. Two sources here:

    - default, no extra cost: the next update's losses. At update ``t`` the logits first learn
      from ``delta = log D(t-1) - log D(t)``, with ``L(t)`` the losses of this update's dict and
      ``L(t-1)`` those of the previous update, then the weights are computed from the new
      logits and ``L(t)``. With a fixed batch (full-batch PINNs, fixed collocation points) this
      is *exactly* the authors' algorithm: their re-evaluation at ``theta_t`` is this step's
      forward, only the logit update moves from the end of one step to the start of the next.
      With resampled points ``delta`` also holds the change of batch (one step of lag: the
      logits judge the step from ``theta_(t-1)`` by losses on the new points). With
      ``LossBalancer(..., update_every=n)`` ``delta`` spans the n steps between two updates.
    - exact, one extra forward per step: ``balancer.step(losses, after=closure)`` (or
      ``balancer.observe(closure())`` after your own ``optimizer.step()``), the closure
      rebuilding the loss dict on the same points at the new parameters (gradients enabled,
      so a PINN can differentiate with respect to its inputs; its graph is dropped). The
      logits then learn at once (:meth:`observe`) and the next update does not learn again.
      The extra forward is a full forward with its graph (for a PINN, its input derivatives):
      on the tiny 1-D PINN of the tests (width 64, CPU) a step costs 1.4 times the step without
      it. Only after steps that updated the weights.

    The total ``LossBalancer.step`` returns is ``sum_i lambda_i L_i``, not the objective above
    (the balancer's total is always the weighted sum that was differentiated). The authors'
    optional gradient clipping (``max_norm``) is not part of the strategy: clip between
    ``balancer.backward(losses)`` and ``optimizer.step()``.

    Defaults, LibMTL's: ``lr = 0.025`` (the logits' Adam), ``weight_decay = 1e-3`` (Adam's L2
    term on the logits, the authors' ``gamma``), ``eps = 1e-8``, ``min_losses = 0``. The
    authors' ``famo.py`` uses ``weight_decay = 0.01``: the ``liu2023`` preset of
    :mod:`lossbalance.config` (or ``FAMO(**FAMO.OFFICIAL)``). ``min_losses``: the lower bounds
    ``L_i^min`` (the authors' ``set_min_losses``), a float or a dict per term name (0 for terms
    it does not name).

    Numerics: a loss below its bound would make ``log D`` undefined; the gap is floored,
    ``D_i = max(L_i - L_i^min, 0) + eps`` (documented floor, no error: checking would cost a host
    sync per update): such a term counts as being at its minimum and its weight becomes large.
    Give true lower bounds. The weights are computed as ``softmax(xi - log D)``, which is
    ``(z / D) / c`` without a product or quotient that could overflow, and floored at
    ``finfo.tiny``: finite and positive for losses from 0 to 1e30 in float32 and float64. The logits take the dtype and device of the losses at a
    term's first update.

    Behaviour to expect: the step descends on ``sum_i z_i log L_i``, so a term's weight grows as
    ``1 / L_i``: terms that can be driven to 0 (e.g. a PINN's boundary terms at a few points)
    take the weight, and the others move only once the logits, at about ``lr`` per update, have
    shifted (a factor ``e`` in ``z`` takes ~40 Adam updates at the default ``lr``). On the tiny
    1-D Poisson PINN of the tests (Adam, 150 steps) the boundary terms fall to ~1e-9 and the
    residual by ~4 %. Setting ``min_losses`` to a known floor (noise level, discretisation
    error) or raising ``eps`` limits that pull.

    Terms that come and go: a term's logit is created (0) at its first update; the softmax runs
    over the terms present; ``delta`` over the terms present at both ends of the step (the
    others' logits stay as they are). ``min_weight``/``max_weight`` of the balancer clamp what
    is applied but do not feed back into the logits.

    ``state_dict()`` holds the logits, their Adam state and the pending ``log D`` of the last
    update (the step not yet judged): a resumed run continues bit for bit.
    """

    name = "famo"
    needs_gradients = False
    OFFICIAL = {"lr": 0.025, "weight_decay": 0.01, "eps": 1e-8}  # Cranial-XIX/FAMO famo.py

    def __init__(
        self,
        *,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: float | Mapping[str, float] = 0.0,
        eps: float = 1e-8,
    ):
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr (learning rate of the logits) must be finite and > 0, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be finite and > 0 (it keeps log D finite), got {eps!r}")
        bounds = min_losses.values() if isinstance(min_losses, Mapping) else [min_losses]
        for value in bounds:
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"min_losses must be a finite float or a dict of them, got {min_losses!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.eps = float(eps)
        self.min_losses = dict(min_losses) if isinstance(min_losses, Mapping) else float(min_losses)
        self._logits = VectorAdam(self.lr, weight_decay=self.weight_decay)
        self._bounds: tuple[tuple[str, ...], Tensor] | None = None  # the L_i^min of the last names
        self._stray = StrayKeys("FAMO(min_losses=...)", "a misspelt name gives its term the bound 0")
        self._pending: tuple[tuple[str, ...], Tensor] | None = None  # log D of the last update, until judged

    def declare_terms(self, terms: Collection[str], optional: Collection[str]) -> None:
        self._stray.declare([*terms, *optional])

    def options(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "min_losses": self.min_losses, "eps": self.eps}

    # ------------------------------------------------------------------ reporting
    @property
    def logits(self) -> dict[str, float]:
        """The current logits ``xi_i`` per term (for reporting; syncs with the device)."""
        if self._logits.value is None:
            return {}
        return dict(zip(self._logits.names, self._logits.value.tolist()))

    # ------------------------------------------------------------------ the method
    def _bound(self, name: str) -> float:
        if isinstance(self.min_losses, dict):
            return float(self.min_losses.get(name, 0.0))
        return self.min_losses

    def _gap(self, names: tuple[str, ...], losses: Tensor) -> Tensor:
        """``D_i = max(L_i - L_i^min, 0) + eps`` of the present terms."""
        if self.min_losses == 0.0:
            return losses.clamp_min(0) + self.eps
        if self._bounds is None or self._bounds[0] != names or self._bounds[1].dtype != losses.dtype:
            self._warn_stray_bounds(names)
            self._bounds = names, torch.tensor([self._bound(n) for n in names], dtype=losses.dtype, device=losses.device)
        return (losses - self._bounds[1]).clamp_min(0) + self.eps

    def _warn_stray_bounds(self, names: tuple[str, ...]) -> None:
        """Warn once per ``min_losses`` key that names none of the terms seen so far (a typo?)."""
        if isinstance(self.min_losses, dict):
            self._stray.note(self.min_losses, names)

    def _learn(self, names: tuple[str, ...], log_gap: Tensor) -> None:
        """One Adam step of the logits on ``delta = pending log D - log_gap`` (terms in both)."""
        (before, pending), self._pending = self._pending, None
        if before == names:
            judged, delta = names, pending - log_gap
        else:
            judged = tuple(n for n in names if n in before)
            if not judged:
                return
            now = [names.index(n) for n in judged]
            then = [before.index(n) for n in judged]
            delta = pending[torch.tensor(then, device=pending.device)] - log_gap[torch.tensor(now, device=log_gap.device)]
        xi = self._logits.values(judged)
        z = torch.softmax(xi, 0)
        d = delta.to(xi.dtype)
        self._logits.step(judged, z * (d - torch.dot(z, d)))

    def observe(self, names: Sequence[str], losses: Tensor) -> None:
        """The losses after the model's step (same points, new parameters): the logits learn now.

        ``LossBalancer.observe`` and ``step(..., after=)`` call it; without it the next update
        learns from its own losses (see the class docstring). Does nothing when no update is
        pending (e.g. a second call)."""
        if self._pending is not None:
            names = tuple(names)
            self._learn(names, self._gap(names, losses.detach()).log())

    def update(self, record: StepRecord) -> Tensor:
        names, losses = tuple(record.names), record.losses.detach()
        gap = self._gap(names, losses)
        log_gap = gap.log()
        if self._pending is not None:  # the previous update's step, judged by this update's losses
            self._learn(names, log_gap)
        self._logits.ensure(names, losses)
        # (z_i / D_i) / sum_j (z_j / D_j) with z = softmax(xi) is softmax(xi - log D): one stable softmax
        weights = torch.softmax(self._logits.values(names).to(losses.dtype) - log_gap, 0)
        self._pending = names, log_gap
        return weights.clamp_min(torch.finfo(losses.dtype).tiny)

    # ------------------------------------------------------------------ state
    def checkpoint(self) -> Any:
        """References: an update replaces the logits, their Adam state and the pending ``log D``."""
        return self._logits.snapshot(), self._pending

    def rollback(self, checkpoint: Any) -> None:
        logits, self._pending = checkpoint
        self._logits.restore(logits)

    def state_dict(self) -> dict[str, Any]:
        state = self._logits.state_dict()
        pending = {} if self._pending is None else dict(zip(self._pending[0], self._pending[1].clone().unbind()))
        return {
            "names": state["order"], "logits": state["values"],
            "adam": {key: state[key] for key in ("exp_avg", "exp_avg_sq", "steps")}, "pending": pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._logits.load_state_dict({"order": state["names"], "values": state["logits"], **state["adam"]})
        pending = state.get("pending") or {}
        self._pending = (tuple(pending), torch.stack([v.clone() for v in pending.values()])) if pending else None
