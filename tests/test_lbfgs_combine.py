"""L-BFGS with combine= (issue 18, item 5): what L-BFGS sees, and the line search it refuses."""
from __future__ import annotations

import copy

import pytest
import torch

from _strategy_checks import NAMES, pinn_losses, term_grads, tiny_pinn, unweighted
from lossbalance import LossBalancer
from lossbalance.combine import ConFIG


class Recording(torch.optim.LBFGS):
    """L-BFGS that records, at each closure evaluation, the parameters, the value returned and .grad."""

    def step(self, closure):
        self.seen = getattr(self, "seen", [])

        def evaluate():
            value = closure()
            params = self.param_groups[0]["params"]
            self.seen.append(([p.detach().clone() for p in params], float(value), [p.grad.clone() for p in params]))
            return value

        return super().step(evaluate)


def test_lbfgs_sees_the_weighted_total_and_the_combined_direction() -> None:
    """At every evaluation, the value is sum_i lambda_i L_i (weights fixed for the step) and .grad is
    ConFIG of the weighted per-term gradients at that point."""
    model, losses = tiny_pinn(7)
    probe = copy.deepcopy(model)
    weights = {"pde": 0.5, "left": 2.0, "right": 1.0}
    opt = Recording(model.parameters(), lr=0.1, max_iter=4)
    balancer = LossBalancer(opt, "static", weights=weights, combine="config")
    for _ in range(2):
        balancer.step(closure=losses)
    assert len(opt.seen) >= 6
    params = list(probe.parameters())
    for values, total, grad in opt.seen:
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        terms = pinn_losses(probe)
        assert total == pytest.approx(sum(weights[n] * terms[n].item() for n in NAMES), rel=1e-6)
        rows = torch.stack([weights[n] * torch.cat([g.reshape(-1) for g in gs])
                            for n, gs in zip(NAMES, term_grads(terms, params))])
        expected = ConFIG()(rows.double()).float()
        got = torch.cat([g.reshape(-1) for g in grad])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_lbfgs_with_config_trains_end_to_end() -> None:
    model, losses = tiny_pinn(7)
    balancer = LossBalancer(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=20), "static", combine="config")
    start = unweighted(losses)
    for _ in range(10):
        assert torch.isfinite(balancer.step(closure=losses))
    assert unweighted(losses) < 0.7 * start


def test_a_line_search_with_a_combiner_is_refused() -> None:
    model, losses = tiny_pinn(0)
    with pytest.raises(ValueError, match="line_search_fn=None"):
        LossBalancer(torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe"), "static", combine="config")
    LossBalancer(torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe"), "static")  # the sum: fine
    balancer = LossBalancer(torch.optim.LBFGS(model.parameters()), "static", combine="pcgrad")
    balancer.optimizer.param_groups[0]["line_search_fn"] = "strong_wolfe"  # changed after building
    with pytest.raises(ValueError, match="not the gradient of the weighted total"):
        balancer.step(closure=losses)
