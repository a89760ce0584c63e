"""GradNorm: learned loss weights (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""
from __future__ import annotations

import math
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from .base import StepRecord, Strategy, register
from .learned import LearnedScalars, optimizer_option, optimizer_settings

__all__ = ["GradNorm"]


@register
class GradNorm(Strategy):
    r"""GradNorm: learn the weights so that every term trains at the same relative rate.

    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018 (PMLR 80; arXiv 1711.02257), Eq. (1)-(2) and
    Algorithm 1. On every update, with ``w_i`` the current weights (``sum_i w_i = K``) and ``g_i``
    the gradient of the unweighted term i over the shared parameters W::

        G_i      = ||grad_W (w_i L_i)|| = w_i ||g_i||
        L~_i     = L_i(t) / L_i(0)                  L_i(0): the term's loss at its first update
        r_i      = L~_i / mean_j L~_j               (relative inverse training rate)
        target_i = mean_j(G_j) * r_i ** alpha       (a constant: no gradient flows through it)
        L_grad   = sum_i |G_i - target_i|
        dL_grad / dw_i = sign(w_i ||g_i|| - target_i) * ||g_i||       (closed form)
        w        <- one step of the weights' own optimizer on that gradient
        w_i      <- K * max(w_i, floor) / sum_j max(w_j, floor)      (renormalise: sum w_i = K)

    The gradient of ``L_grad`` is formed in closed form from the gradient norms: no second-order
    graph, and nothing is written into the model's ``.grad`` (the model sees only
    ``sum_i w_i g_i``, as with every strategy). The weights have their own optimizer, so they train
    whatever optimizer the balancer wraps (L-BFGS included: one update per ``step`` call).

    W, the parameters the norms run over: the paper takes the last shared layer, to save compute.
    Here the norms run over the parameters the balancer's statistics run over: all balanced
    parameters by default, or the balancer's ``probe=`` subset, e.g.
    ``LossBalancer(opt, GradNorm(), probe=model.last_shared.parameters())`` for the paper's choice.
    ``over="shared"`` restricts each term's norm to the parameters every term may train (with the
    balancer's ``scope=``); ``"scope"`` (default) takes each term's norm over its own scope.

    Defaults and choices: ``alpha = 1.5`` (the paper uses 0.12 to 3 depending on the task;
    larger values pull harder towards equal training rates, 0 equalises the gradient norms);
    the weights have an optimizer of their own, ``torch.optim.Adam`` with ``lr = 0.025`` (our
    choice, not checked against the learning rates of the paper's experiments; the paper's
    Algorithm 1 only says the weights take a gradient step on ``L_grad``), configurable with
    ``optimizer=`` (a ``torch.optim`` class or its name, e.g. ``"SGD"``; not L-BFGS), ``lr=`` and
    ``optimizer_options=`` (further keyword arguments, e.g. ``betas``).
    ``floor = 1e-6``: a weight that the step would take below it is raised to it before the
    renormalisation, so every weight stays positive (the paper does not say how it keeps them
    positive). The first update starts from the balancer's initial weights (1 by default, as in
    the paper); the balancer's ``min_weight``/``max_weight`` clamps apply after the renormalisation
    and the next update starts from the clamped weights.

    Timing: the balancer applies the new weights on the step that computed them; the paper's
    Algorithm 1 steps the network with ``w(t)`` and uses ``w(t+1)`` from the next step on (a one-step
    lag). The paper updates on every step (``update_every=1``).

    Differences from public implementations (the paper is followed here): ``gradnorm-pytorch``
    0.2.3 uses the target ``mean(G) * r ** -alpha``, takes a mean of ``|G_i - target_i|`` instead
    of the sum, defaults ``alpha`` to 0 and backpropagates second-order terms into the model's
    ``.grad``; PhysicsNeMo hard-codes the second-to-last parameter tensor as W.

    Edge cases: ``L_i(0)`` is the first positive loss value of a term (a term that starts at zero
    has ``L~_i = 1`` until it becomes positive); ``r_i`` is computed in log space, so loss scales
    from 1e-30 to 1e30 neither overflow nor underflow into NaN; a zero current loss gives
    ``r_i = 0``; if every loss is zero, ``r_i = 1``. A term with a zero (or non-finite) gradient
    norm gets a zero gradient for its weight. The state (``L_i(0)`` and the weights' optimizer
    state per term name) is saved by ``state_dict``; a resumed run continues bit for bit.
    """

    name = "gradnorm"
    needs_gradients = True

    def __init__(
        self,
        alpha: float = 1.5,
        *,
        lr: float = 0.025,
        optimizer: type[torch.optim.Optimizer] | str = torch.optim.Adam,
        optimizer_options: Mapping[str, Any] | None = None,
        over: Literal["scope", "shared"] = "scope",
        floor: float = 1e-6,
    ):
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha < float("inf"):
            raise ValueError(f"alpha (the asymmetry) must be finite and >= 0, got {alpha!r}")
        if not isinstance(lr, (int, float)) or not 0.0 < lr < float("inf"):
            raise ValueError(f"lr (learning rate of the weights) must be finite and > 0, got {lr!r}")
        if over not in ("scope", "shared"):
            raise ValueError(f"over must be 'scope' or 'shared', got {over!r}")
        if not isinstance(floor, (int, float)) or not 0.0 < floor < 1.0:
            raise ValueError(f"floor must be in (0, 1), got {floor!r}")
        cls, options = optimizer_settings(optimizer, lr, optimizer_options, what="the weights")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.optimizer_options = options
        self.over = over
        self.floor = float(floor)
        self._weights = LearnedScalars(cls, self.lr, options)  # term -> w_i, trained by its own optimizer
        self._initial: dict[str, Tensor] = {}     # term -> L_i(0)

    def options(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha, "lr": self.lr, "optimizer": optimizer_option(self.optimizer),
            "optimizer_options": dict(self.optimizer_options), "over": self.over, "floor": self.floor,
        }

    # ------------------------------------------------------------------ per-term state
    def _prepare(self, names: tuple[str, ...], weights: Tensor, losses: Tensor) -> Tensor:
        """Create what new terms need; return the (K,) initial losses L_i(0)."""
        # The weights' values are overwritten from ``weights`` before every step: they start at 0.
        self._weights.ensure(names, lambda _: weights.new_zeros(()))
        initial = []
        for i, name in enumerate(names):
            current = losses[i]
            first = self._initial.get(name)
            if first is None:
                first = current.clone()
            else:
                # L_i(0) is the first positive value: replace a stored non-positive one.
                first = first.to(current)
                first = torch.where(first > 0, first, current)
            self._initial[name] = first
            initial.append(first)
        return torch.stack(initial)

    # ------------------------------------------------------------------ the update
    def update(self, record: StepRecord) -> Tensor:
        grads = record.grads
        if grads is None:
            raise RuntimeError("GradNorm needs per-term gradient statistics (record.grads is None)")
        names, weights = record.names, record.weights
        k = len(names)
        losses = record.losses.to(weights.dtype)
        initial = self._prepare(names, weights, losses)
        norms = grads.norm("all", over=self.over).to(weights.dtype)

        # r_i ** alpha in log space: log L~_i = log L_i - log L_i(0); log r_i = log L~_i - log mean L~.
        minus_inf = torch.full_like(losses, float("-inf"))
        log_loss = torch.where(losses > 0, losses.clamp_min(torch.finfo(losses.dtype).tiny).log(), minus_inf)
        log_initial = initial.clamp_min(torch.finfo(losses.dtype).tiny).log()
        log_ratio = torch.where(initial > 0, log_loss - log_initial, torch.zeros_like(losses))
        log_mean = torch.logsumexp(log_ratio, 0) - math.log(k)
        log_r = torch.where(torch.isfinite(log_mean), log_ratio - log_mean, torch.zeros_like(losses))
        if self.alpha == 0:
            rate = torch.ones_like(losses)
        else:
            rate = torch.where(log_r > float("-inf"), (self.alpha * log_r).exp(), torch.zeros_like(losses))

        gnorm = weights * norms                           # G_i = ||grad_W (w_i L_i)||
        target = (gnorm / k).sum() * rate                 # mean_j G_j * r_i ** alpha, a constant
        step = torch.sign(gnorm - target) * norms         # d L_grad / d w_i
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))

        self._weights.assign(names, weights)
        self._weights.step(names, lambda _: (None, step))
        moved = self._weights.values(names)
        moved = torch.where(torch.isfinite(moved), moved, weights)
        big = torch.finfo(moved.dtype).max / (2 * k)
        moved = moved.clamp(self.floor, big)
        new = (k * moved / moved.sum()).clamp_min(torch.finfo(moved.dtype).tiny)
        self._weights.assign(names, new)
        return new

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # The weights' values are not saved: every update starts from the balancer's weights.
        weights = self._weights.state_dict()
        return {
            "initial": {name: value.detach().clone() for name, value in self._initial.items()},
            "order": weights["order"],
            "optimizer": weights["optimizer"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"initial", "order", "optimizer"} - set(state)
        if missing:
            raise KeyError(f"not a GradNorm state_dict: missing {sorted(missing)}")
        self._initial = {name: value.detach().clone() for name, value in state["initial"].items()}
        # No values: the weights are re-created (dtype and device of the weights) at the next update.
        self._weights.load_state_dict({"order": state["order"], "optimizer": state["optimizer"]})
