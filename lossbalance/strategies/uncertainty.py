"""Uncertainty weighting (Kendall, Gal & Cipolla 2018)."""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
from torch import Tensor

from .base import StepRecord, Strategy, register

__all__ = ["UncertaintyWeighting"]


def _optimizer_class(optimizer: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    cls = getattr(torch.optim, optimizer, None) if isinstance(optimizer, str) else optimizer
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            "optimizer must be a torch.optim.Optimizer subclass or the name of one (e.g. 'Adam', 'SGD'), "
            f"got {optimizer!r}"
        )
    if issubclass(cls, torch.optim.LBFGS):
        raise ValueError(
            "the log-variances cannot be trained with LBFGS (it takes a single parameter group and the terms "
            "may come and go); use 'Adam' or 'SGD' for them -- the model itself may still use LBFGS"
        )
    return cls


@register
class UncertaintyWeighting(Strategy):
    r"""Homoscedastic-uncertainty weighting with learned log-variances.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018 (arXiv 1705.07115). Each term has a learnable
    ``s_i = log sigma_i^2``; the joint objective is::

        J(theta, s) = sum_i 0.5 exp(-s_i) L_i(theta) + 0.5 s_i,       lambda_i = 0.5 exp(-s_i)

    The ``s_i`` are owned by this strategy and trained by an optimizer of its own (default
    ``torch.optim.Adam``, ``lr = 1e-3``, the usual model learning rate; options ``optimizer`` (a
    class or the name of one in ``torch.optim``), ``lr`` and ``optimizer_kwargs``), from the
    closed-form gradient::

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
    A dict gives one value per term name (0 for terms it does not name). Unlike the other
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
        optimizer_kwargs: Mapping[str, Any] | None = None,
    ):
        values = init_log_var.values() if isinstance(init_log_var, Mapping) else [init_log_var]
        for value in values:
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"init_log_var must be a finite float or a dict of them, got {init_log_var!r}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be finite and > 0, got {lr}")
        kwargs = dict(optimizer_kwargs or {})
        if "lr" in kwargs:
            raise ValueError("pass the learning rate of the log-variances as lr=, not in optimizer_kwargs")
        self._optimizer_cls = _optimizer_class(optimizer)
        self.init_log_var = dict(init_log_var) if isinstance(init_log_var, Mapping) else float(init_log_var)
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.optimizer_kwargs = kwargs
        self._log_vars: dict[str, Tensor] = {}  # in order of first appearance = the optimizer's groups
        self._optimizer: torch.optim.Optimizer | None = None

    def options(self) -> dict[str, Any]:
        return {
            "init_log_var": self.init_log_var, "lr": self.lr,
            "optimizer": self.optimizer_name, "optimizer_kwargs": dict(self.optimizer_kwargs),
        }

    # ------------------------------------------------------------------ the learnable s_i
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the log-variances (``None`` before the first update); e.g. for a scheduler."""
        return self._optimizer

    @property
    def log_vars(self) -> dict[str, float]:
        """The current ``s_i = log sigma_i^2`` per term (for reporting; syncs with the device)."""
        return {n: float(s.detach()) for n, s in self._log_vars.items()}

    def regularizer(self) -> Tensor | None:
        """``0.5 * sum_i s_i`` over the known terms: add it to the balancer's total to log ``J``."""
        if not self._log_vars:
            return None
        return 0.5 * torch.stack([s.detach() for s in self._log_vars.values()]).sum()

    def _initial(self, name: str) -> float:
        if isinstance(self.init_log_var, dict):
            return float(self.init_log_var.get(name, 0.0))
        return self.init_log_var

    def _add(self, name: str, value: Tensor) -> None:
        s = value.detach().clone().requires_grad_(True)
        self._log_vars[name] = s
        if self._optimizer is None:
            self._optimizer = self._optimizer_cls([{"params": [s]}], lr=self.lr, **self.optimizer_kwargs)
        else:
            self._optimizer.add_param_group({"params": [s]})

    def update(self, record: StepRecord) -> Tensor:
        names, losses = record.names, record.losses.detach()
        for n in names:
            if n not in self._log_vars:
                self._add(n, losses.new_full((), self._initial(n)))
        s = torch.stack([self._log_vars[n].detach() for n in names])
        out = torch.finfo(losses.dtype)
        weights = (0.5 * torch.exp(-s)).to(losses.dtype).clamp(out.tiny, out.max)
        info = torch.finfo(s.dtype)
        present = {n: i for i, n in enumerate(names)}
        limit = math.sqrt(info.max) / 16

        def closure() -> Tensor:
            current = torch.stack([self._log_vars[n].detach() for n in names])
            scaled = torch.exp(-current) * losses.to(current.dtype)
            grads = (0.5 - 0.5 * scaled).clamp(-limit, limit)
            for n, p in self._log_vars.items():
                p.grad = grads[present[n]] if n in present else None
            return (0.5 * scaled + 0.5 * current).sum()

        assert self._optimizer is not None
        self._optimizer.step(closure)
        bound = math.log(info.max) - 2
        with torch.no_grad():
            for n in names:
                p = self._log_vars[n]
                p.clamp_(-bound, bound)
                p.grad = None
        return weights

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self._log_vars),
            "log_vars": {n: s.detach().clone() for n, s in self._log_vars.items()},
            "optimizer": None if self._optimizer is None else copy.deepcopy(self._optimizer.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._log_vars = {}
        self._optimizer = None
        for n in state["names"]:
            self._add(n, state["log_vars"][n])
        if self._optimizer is not None and state.get("optimizer") is not None:
            self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
