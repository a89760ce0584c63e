"""Pointwise weights on a PINN step, as a ratio to the plain step (issue 17: causal and RBA weights
under 1.05x; SA-PINN's extra Adam step reported).

The workload: a 2-50-50-50-1 tanh MLP, the Poisson residual ``u_xx + u_yy - f`` (second
derivatives by autograd) on 1024 interior points with ``t = y`` as the time coordinate and stable
ids ``0..1023``, and a boundary MSE on 128 points; SGD(lr=1e-6). ``plain`` is the user's own step,
``zero_grad(); (mean(r^2) + bc).backward(); step()``, and the baseline of every row (paired with
itself it shows the noise of the run). The other variants are ``LossBalancer(opt, "static",
pointwise=...).step({"pde": Residual(r, t=t, ids=ids, kind="residual"), "bc": bc})``: ``residual``
without a weighting (the term's mean), then ``Causal(chunks=32, eps=1)``, ``RBA()``, ``SAPINN()``
(its closed-form Adam ascent included) and ``BRDR()``; ``causal_ftz`` is Causal with subnormal
floats flushed to zero during its steps (``torch.set_flush_denormal``; its weights reach the
subnormal range, which x86 CPUs compute slowly). Nothing here asserts a timing;
``benchmarks/table.py`` renders the rows (``pointwise_table``).
"""
from __future__ import annotations

import pytest
import torch
import workloads as W

from lossbalance import BRDR, RBA, SAPINN, Causal, LossBalancer, Residual

ITERATIONS = 10
WEIGHTINGS = {
    "residual": lambda: None, "causal": lambda: Causal(chunks=32, eps=1.0), "rba": RBA, "sa_pinn": SAPINN, "brdr": BRDR,
}
FLUSHED = {"causal_ftz": "causal"}  # the same weighting, subnormal floats flushed to zero during its steps
VARIANTS = ["plain", *WEIGHTINGS, *FLUSHED]


class Poisson:
    """A fresh model, its points and optimizer (seed 0); ``terms()`` are r (per point) and the bc loss."""

    def __init__(self):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        self.model = W.mlp((2,) + (W.WIDTH,) * W.DEPTH + (1,))
        self.interior = torch.rand(W.N_INTERIOR, 2, generator=g)
        side = torch.rand(W.N_BOUNDARY, 1, generator=g)
        self.boundary = torch.cat([side, torch.zeros_like(side)], 1)
        self.t, self.ids = self.interior[:, 1].clone(), torch.arange(W.N_INTERIOR)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=W.LR)

    def terms(self):
        return W.laplacian_residual(self.model, self.interior), self.model(self.boundary).pow(2).mean()


def plain_step(p: Poisson):
    def step():
        p.optimizer.zero_grad()
        r, bc = p.terms()
        total = r.pow(2).mean() + bc
        total.backward()
        p.optimizer.step()
        return total

    return step


def pointwise_step(p: Poisson, variant: str):
    weighting = WEIGHTINGS[FLUSHED.get(variant, variant)]()
    balancer = LossBalancer(p.optimizer, "static", pointwise={} if weighting is None else {"pde": weighting})

    def step():
        r, bc = p.terms()
        return balancer.step({"pde": Residual(r, t=p.t, ids=p.ids, kind="residual"), "bc": bc})

    if variant not in FLUSHED:
        return step

    def flushed():  # Causal's weights exp(-eps sum L_j) reach the subnormal range (slow on x86 CPUs)
        torch.set_flush_denormal(True)
        try:
            return step()
        finally:
            torch.set_flush_denormal(False)

    return flushed


@pytest.mark.parametrize("variant", VARIANTS)
def test_pointwise(measure, variant):
    p = Poisson()
    step = plain_step(p) if variant == "plain" else pointwise_step(p, variant)
    measure.benchmark.group = "pointwise-poisson"
    measure(step, baseline=plain_step(Poisson()), iterations=ITERATIONS, suite="pointwise", workload="poisson",
            variant=variant, points=W.N_INTERIOR, params=sum(q.numel() for q in p.model.parameters()))
