"""L-BFGS through ``balancer.step(closure=...)`` against a plain closure step (issue 13, item 6).

The disjoint workload widened to about 1e6 parameters, ``torch.optim.LBFGS(history_size=50,
max_iter=1)``, warmed up until the history is full (the case where a deep copy of the optimizer's
state cost 2x: 50 + 50 history tensors of P floats). The plain step is the closure a PyTorch user
writes: ``zero_grad(); sum(w_i L_i).backward(); return total``.
"""
from __future__ import annotations

from typing import Callable

import torch

import workloads as W

PARAMS = 1e6
HISTORY = 50
LR = 1e-6  # tiny steps: 60 warm-up steps stay finite on the wide model


def workload(params: float = PARAMS) -> W.Workload:
    w = W.make("disjoint", width=W.width_for(params))
    w.optimizer = torch.optim.LBFGS(w.params, lr=LR, history_size=HISTORY, max_iter=1)
    return w


def plain(w: W.Workload) -> Callable[[], object]:
    opt, weights = w.optimizer, w.weights

    def closure():
        opt.zero_grad()
        total = sum(weights[n] * loss for n, loss in w.losses().items())
        total.backward()
        return total

    return lambda: opt.step(closure)


def balanced(w: W.Workload, strategy: str = "static", update_every: int = 1) -> Callable[[], object]:
    from lossbalance import LossBalancer, LRAnnealing

    strat = LRAnnealing(reference=w.reference) if strategy == "lra" else strategy
    lb = LossBalancer(w.optimizer, strat, weights=w.weights, update_every=update_every)
    return lambda: lb.step(closure=w.losses)


def warmed(step: Callable[[], object], steps: int = HISTORY + 10) -> Callable[[], object]:
    """``step`` after enough steps to fill L-BFGS's history."""
    for _ in range(steps):
        step()
    return step
