"""Uncertainty weighting (Kendall, Gal & Cipolla 2018)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Collection, Mapping

import torch
from torch import Tensor

from .base import StepRecord, Strategy, StrayKeys, register
from .learned import LearnedScalars, optimizer_option, optimizer_settings

__all__ = ["UncertaintyWeighting"]


@register
class UncertaintyWeighting(Strategy):
    r"""Homoscedastic-uncertainty weighting with learned log-variances.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018 (arXiv 1705.07115). Each term has a learnable
    ``s_i = log sigma_i^2``; the joint objective is::

        J(theta, s) = sum_i 0.5 exp(-s_i) L_i(theta) + 0.5 s_i,       lambda_i = 0.5 exp(-s_i)

    The ``s_i`` are owned by this strategy and trained by an optimizer of its own (default
    ``torch.optim.Adam``, ``lr = 1e-3``, the usual model learning rate; options ``optimizer`` (a
    class or the name of one in ``torch.optim``; not L-BFGS), ``lr`` and ``optimizer_options``
    (further keyword arguments, e.g. ``betas``; the same option as GradNorm's, checked when the
    strategy is built), from the closed-form gradient::

        dJ / ds_i = 0.5 - 0.5 exp(-s_i) L_i

    so no autograd pass through the model is needed: the update costs a plain step, and the
    model may use any optimizer, L-BFGS included. At update ``t`` the returned weights are
    ``0.5 exp(-s_i(t))`` and then ``s`` takes one step of its optimizer on the same losses: the
    model and ``s`` both move along the gradient of ``J`` at ``(theta_t, s_t)``, as if ``s`` were
    an extra parameter group of the model's optimizer. For constant losses the ``s_i`` converge
    to the optimum ``s_i = log L_i`` (weight ``0.5 / L_i``, weighted term 0.5). With
    ``LossBalancer(..., update_every=n)`` ``s`` steps on update steps only.

    Initial value: ``init_log_var = 0`` (weight 0.5), as NVIDIA PhysicsNeMo and the authors'
    example code (yaringal/multi-task-learning-example, ``Constant(0.)``; it minimises
    ``exp(-s) L + s``, twice ``J``: weight ``exp(-s)``, same optimum); LibMTL's ``UW`` (same
    ``J`` as here) starts at ``s = -0.5`` (weight ``0.5 e^0.5 = 0.82``): ``init_log_var=-0.5``.
    A dict gives one value per term name (0 for terms it does not name; a key that names none of
    the terms of the steps so far warns once, as a likely typo). Unlike the other
    strategies the weights do not start from the balancer's initial weights; its
    ``min_weight``/``max_weight`` clamp what is applied but do not feed back into ``s``.

    The total that ``LossBalancer.step`` returns is ``sum_i lambda_i L_i``, without the
    regulariser ``0.5 sum_i s_i``: the regulariser does not depend on the model's parameters
    (it adds nothing to their gradient, nor to what an L-BFGS line search on the model sees,
    since ``s`` is held fixed during a step), and the balancer's total is, for every strategy,
    the weighted sum that was differentiated. :meth:`regularizer` gives ``0.5 sum_i s_i`` to
    log the full objective.

    Numerics: the gradient is clamped to ``+-sqrt(finfo.max) / 16`` (so that Adam's squared
    gradient cannot overflow; with Adam the magnitude barely matters), ``s`` is kept within
    ``+-(log(finfo.max) - 2)`` and the weights within ``[finfo.tiny, finfo.max]``: finite and
    positive for loss scales 1e-30 .. 1e30 in float32 and float64. The ``s_i`` take the dtype and
    device of the losses at the term's first update. Losses must be non-negative (the optimum
    is ``log L_i``); a term that stays exactly 0 has its ``s`` fall by about ``lr`` per update
    (Adam) and its weight grow until the clamp above -- the method's optimum is ``s = -inf``.

    ``optimizer_kwargs=`` is the deprecated name of ``optimizer_options`` (lossbalance 0.1.0): it
    is still accepted, with a ``DeprecationWarning``, and ``options()`` exports
    ``optimizer_options``.

    ``state_dict()`` holds the ``s_i`` and the optimizer's state (Adam moments and step counts),
    so a resumed run continues bit for bit.
    """

    name = "uncertainty"
    needs_gradients = False

    def __init__(
        self,
        init_log_var: float | Mapping[str, float] = 0.0,
        *,
        lr: float = 1e-3,
        optimizer: str | type[torch.optim.Optimizer] = "Adam",
        optimizer_options: Mapping[str, Any] | None = None,
        optimizer_kwargs: Mapping[str, Any] | None = None,
    ):
        values = init_log_var.values() if isinstance(init_log_var, Mapping) else [init_log_var]
        for value in values:
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"init_log_var must be a finite float or a dict of them, got {init_log_var!r}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr (learning rate of the log-variances) must be finite and > 0, got {lr!r}")
        if optimizer_kwargs is not None:
            if optimizer_options is not None:
                raise ValueError("give optimizer_options only: optimizer_kwargs is its deprecated name")
            warnings.warn(
                "UncertaintyWeighting(optimizer_kwargs=...) is deprecated: it is called optimizer_options now "
                "(as in GradNorm)", DeprecationWarning, stacklevel=2,
            )
            optimizer_options = optimizer_kwargs
        cls, options = optimizer_settings(optimizer, lr, optimizer_options, what="the log-variances")
        self.init_log_var = dict(init_log_var) if isinstance(init_log_var, Mapping) else float(init_log_var)
        self.lr = float(lr)
        self.optimizer_name = optimizer_option(optimizer)
        self.optimizer_options = options
        self._log_vars = LearnedScalars(cls, self.lr, options)  # term -> s_i, trained by its own optimizer
        self._stray = StrayKeys("UncertaintyWeighting(init_log_var=...)", "a misspelt name starts its term at s = 0")

    def declare_terms(self, terms: Collection[str], optional: Collection[str]) -> None:
        self._stray.declare([*terms, *optional])

    def options(self) -> dict[str, Any]:
        return {
            "init_log_var": self.init_log_var, "lr": self.lr,
            "optimizer": self.optimizer_name, "optimizer_options": dict(self.optimizer_options),
        }

    # ------------------------------------------------------------------ the learnable s_i
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the log-variances (``None`` before the first update); e.g. for a scheduler."""
        return self._log_vars.optimizer

    @property
    def log_vars(self) -> dict[str, float]:
        """The current ``s_i = log sigma_i^2`` per term (for reporting; syncs with the device)."""
        return {n: float(s.detach()) for n, s in self._log_vars.params.items()}

    def regularizer(self) -> Tensor | None:
        """``0.5 * sum_i s_i`` over the known terms: add it to the balancer's total to log ``J``."""
        if not self._log_vars.params:
            return None
        return 0.5 * self._log_vars.values(self._log_vars.params).sum()

    def _initial(self, name: str, names: tuple[str, ...]) -> float:
        """The starting ``s`` of a new term (the terms of its first step: a dict's typo warns)."""
        if isinstance(self.init_log_var, dict):
            self._stray.note(self.init_log_var, names)
            return float(self.init_log_var.get(name, 0.0))
        return self.init_log_var

    def update(self, record: StepRecord) -> Tensor:
        names, losses = record.names, record.losses.detach()
        self._log_vars.ensure(names, lambda n: losses.new_full((), self._initial(n, names)))
        s = self._log_vars.values(names)
        out = torch.finfo(losses.dtype)
        weights = (0.5 * torch.exp(-s)).to(losses.dtype).clamp(out.tiny, out.max)
        info = torch.finfo(s.dtype)
        limit = math.sqrt(info.max) / 16

        def gradient(current: Tensor) -> tuple[Tensor, Tensor]:
            scaled = torch.exp(-current) * losses.to(current.dtype)
            return (0.5 * scaled + 0.5 * current).sum(), (0.5 - 0.5 * scaled).clamp(-limit, limit)

        self._log_vars.step(names, gradient)
        bound = math.log(info.max) - 2
        self._log_vars.assign(names, self._log_vars.values(names).clamp(-bound, bound))
        return weights

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = self._log_vars.state_dict()
        return {"names": state["order"], "log_vars": state["values"], "optimizer": state["optimizer"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._log_vars.load_state_dict(
            {"order": state["names"], "values": state["log_vars"], "optimizer": state.get("optimizer")}
        )
