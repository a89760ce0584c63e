"""LossBalancer: the step contract, closures and L-BFGS, state, term sets, schedules."""
import io

import pytest
import torch

from lossbalance import LossBalancer, LRAnnealing

from _models import PINN1D, TwoHeads


def raw_total(losses):
    return float(sum(v.detach() for v in losses.values()))


def test_three_term_pinn_adam_then_lbfgs():
    problem = PINN1D(seed=0)
    params = list(problem.model.parameters())
    adam = LossBalancer(torch.optim.Adam(params, lr=1e-2), LRAnnealing("pde", stat="mean"), update_every=5)
    start = raw_total(problem.losses())
    for _ in range(150):
        adam.step(problem.losses())
    after_adam = raw_total(problem.losses())
    assert after_adam < 0.5 * start
    assert adam.weights["dirichlet"] != 1.0 and adam.weights["neumann"] != 1.0

    lbfgs = LossBalancer(
        torch.optim.LBFGS(params, lr=1.0, max_iter=20, line_search_fn="strong_wolfe"),
        LRAnnealing("pde", stat="mean"), weights=adam.weights,
    )
    for _ in range(5):
        lbfgs.step(closure=problem.losses)
    assert raw_total(problem.losses()) < 0.5 * after_adam


def test_closure_updates_weights_once_and_the_optimizer_sees_the_weighted_total():
    problem = PINN1D(seed=1)
    params = list(problem.model.parameters())
    seen, calls = [], []

    class Spy(torch.optim.LBFGS):
        def step(self, closure):
            def wrapped():
                value = closure()
                seen.append(value)
                return value
            return super().step(wrapped)

    balancer = LossBalancer(Spy(params, max_iter=6, line_search_fn="strong_wolfe"), LRAnnealing("pde"))

    def closure():
        losses = problem.losses()
        calls.append({k: v.detach() for k, v in losses.items()})
        return losses

    for n in range(1, 4):
        seen.clear(), calls.clear()
        total = balancer.step(closure=closure)
        assert balancer._updates == n and balancer.step_count == n
        assert len(calls) == len(seen) > 1
        w = balancer.weights
        for value, losses in zip(seen, calls):  # every evaluation: the weighted total, fixed weights
            want = sum(w[k] * v for k, v in losses.items())
            torch.testing.assert_close(value, want.to(value.dtype))
        assert total is seen[0]


def test_backward_then_manual_step_equals_step():
    runs = []
    for manual in (False, True):
        problem = PINN1D(seed=2)
        balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), LRAnnealing("pde"))
        for _ in range(3):
            if manual:
                balancer.backward(problem.losses())
                torch.nn.utils.clip_grad_norm_(problem.model.parameters(), 1e9)
                balancer.optimizer.step()
            else:
                balancer.step(problem.losses())
        runs.append(torch.cat([p.detach().reshape(-1) for p in problem.model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def make_run(seed=3):
    problem = PINN1D(seed=seed)
    opt = torch.optim.Adam(problem.model.parameters(), lr=1e-2)
    balancer = LossBalancer(opt, LRAnnealing("pde"), update_every=3, history=4)
    return problem, balancer


@pytest.mark.parametrize("n", [1, 4, 7])
def test_resume_is_bit_identical(n):
    problem, balancer = make_run()
    for _ in range(2 * n):
        balancer.step(problem.losses())
    straight = ([p.detach().clone() for p in problem.model.parameters()], balancer.weights)

    problem, balancer = make_run()
    for _ in range(n):
        balancer.step(problem.losses())
    buffer = io.BytesIO()
    torch.save({"model": problem.model.state_dict(), "balancer": balancer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    problem, balancer = make_run(seed=99)  # fresh objects, other initial values
    problem.model.load_state_dict(saved["model"])
    balancer.load_state_dict(saved["balancer"])
    problem.x = PINN1D(seed=3).x
    for _ in range(n):
        balancer.step(problem.losses())
    for a, b in zip(straight[0], problem.model.parameters()):
        assert torch.equal(a, b)
    assert straight[1] == balancer.weights


def test_gradient_penalty_term_built_with_create_graph():
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    params = list(critic.parameters())
    real, fake = torch.randn(32, 2) + 2, torch.randn(32, 2)

    def losses():
        x = torch.rand(32, 1) * real + (1 - torch.rand(32, 1)) * fake
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
        return {"wasserstein": critic(fake).mean() - critic(real).mean(), "penalty": (g.norm(dim=1) - 1).pow(2).mean()}

    balancer = LossBalancer(torch.optim.SGD(params, lr=1e-3), LRAnnealing("wasserstein", stat="mean"))
    torch.manual_seed(1)
    terms = losses()
    balancer.backward(terms)
    got = [p.grad.clone() for p in params]
    torch.manual_seed(1)
    terms = losses()
    w = balancer.weights
    want = torch.autograd.grad(w["wasserstein"] * terms["wasserstein"] + w["penalty"] * terms["penalty"], params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_shared_trunk_two_tasks_trains_both():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), LRAnnealing("a"), update_every=5)
    start = {k: v.item() for k, v in model.losses().items()}
    for _ in range(200):
        balancer.step(model.losses())
    end = {k: v.item() for k, v in model.losses().items()}
    assert end["a"] < start["a"] and end["b"] < 0.5 * start["b"]
    assert balancer.weights["b"] < 1.0  # the large-gradient task is damped


def test_schedule_update_every_warmup_frozen():
    problem = PINN1D()
    balancer = LossBalancer(torch.optim.SGD(problem.model.parameters(), lr=1e-3), LRAnnealing("pde"), update_every=3, warmup=2,
                            terms=["pde", "dirichlet", "neumann"])
    changed = []
    for _ in range(9):
        before = balancer.weights
        balancer.step(problem.losses())
        changed.append(before != balancer.weights)
    assert changed == [False, False, True, False, False, True, False, False, True]
    balancer.frozen = True
    before = balancer.weights
    for _ in range(4):
        balancer.step(problem.losses())
    assert balancer.weights == before


def test_bounds_clamp_updated_weights():
    problem = PINN1D()
    balancer = LossBalancer(
        torch.optim.SGD(problem.model.parameters(), lr=1e-3), LRAnnealing("pde", alpha=1.0),
        min_weight={"neumann": 1e6}, max_weight={"dirichlet": 0.01},
    )
    balancer.step(problem.losses())
    w = balancer.weights
    assert w == {"pde": 1.0, "dirichlet": pytest.approx(0.01), "neumann": 1e6}
    with pytest.raises(ValueError, match=r"every term \(the defaults\): min_weight 2.0 > max_weight 1.0"):
        LossBalancer(balancer.optimizer, "lra", min_weight=2.0, max_weight=1.0, terms=["pde"])


def test_bounds_travel_with_the_state():
    """A balancer built without bounds that loads a bounded state applies the loaded bounds."""
    problem = PINN1D()
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=1e-3)
    bounded = LossBalancer(optimizer, LRAnnealing("pde", alpha=1.0), max_weight={"dirichlet": 0.01})
    bounded.step(problem.losses())
    fresh = LossBalancer(optimizer, LRAnnealing("pde", alpha=1.0))
    fresh.load_state_dict(bounded.state_dict())
    fresh.step(problem.losses())
    assert fresh.weights["dirichlet"] == pytest.approx(0.01)
    unbounded = LossBalancer(optimizer, LRAnnealing("pde", alpha=1.0))
    unbounded.step(problem.losses())
    assert unbounded.weights["dirichlet"] > 0.1  # the bound above did bind


def test_optional_term_and_phase_changes():
    problem = PINN1D()
    balancer = LossBalancer(
        torch.optim.SGD(problem.model.parameters(), lr=1e-3), LRAnnealing("pde"), optional=["data"],
        weights={"data": 3.0},
    )
    balancer.step(problem.losses())
    x = torch.rand(8, 1)
    balancer.step({**problem.losses(), "data": (problem.model(x) - 0.1).pow(2).mean()})
    assert set(balancer.weights) == {"pde", "dirichlet", "neumann", "data"}
    kept = balancer.weights["data"]
    balancer.step(problem.losses())  # the optional term is absent: its weight is kept
    assert balancer.weights["data"] == kept
    balancer.remove_term("neumann")
    losses = problem.losses()
    del losses["neumann"]
    balancer.step(losses)
    assert "neumann" not in balancer.weights
    balancer.add_term("neumann", 2.0)
    assert balancer.weights["neumann"] == 2.0
    balancer.step(problem.losses())


def test_nonfinite_skip_changes_nothing_and_counts():
    problem = PINN1D()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), LRAnnealing("pde"), nonfinite="skip")
    balancer.step(problem.losses())
    params = [p.detach().clone() for p in problem.model.parameters()]
    weights, state = balancer.weights, balancer.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    losses = problem.losses()
    losses["pde"] = losses["pde"] * float("nan")
    total = balancer.step(losses)
    assert torch.isnan(total) and balancer.skipped == 1 and balancer.step_count == 1
    assert balancer.weights == weights
    assert torch.equal(balancer.optimizer.state_dict()["state"][0]["exp_avg"], state)
    for a, b in zip(params, problem.model.parameters()):
        assert torch.equal(a, b)


def test_history_stats_and_pass_through():
    problem = PINN1D()
    opt = torch.optim.SGD(problem.model.parameters(), lr=1e-3)
    balancer = LossBalancer(opt, LRAnnealing("pde"), history=3)
    scheduler = torch.optim.lr_scheduler.StepLR(balancer.optimizer, step_size=1, gamma=0.5)
    for _ in range(5):
        total = balancer.step(problem.losses())
        scheduler.step()
    assert [h["step"] for h in balancer.history] == [2, 3, 4]
    assert balancer.history[-1]["weights"] == balancer.weights
    assert balancer.param_groups[0]["lr"] == pytest.approx(1e-3 / 32)
    stats = balancer.stats
    assert set(stats) == {"pde", "dirichlet", "neumann"}
    assert {"loss", "weight", "grad_mean", "grad_max", "grad_norm"} <= set(stats["pde"])
    assert sum(s["loss"] * s["weight"] for s in stats.values()) == pytest.approx(total.item(), rel=1e-6)
    balancer.zero_grad()
    assert all(p.grad is None for p in problem.model.parameters())
    assert "LRAnnealing" in repr(balancer) and "update_every=1" in repr(balancer)


def test_a_skipped_backward_leaves_nothing_for_a_manual_optimizer_step():
    problem = PINN1D()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), LRAnnealing("pde"), nonfinite="skip")
    balancer.backward(problem.losses())
    balancer.optimizer.step()
    params = [p.detach().clone() for p in problem.model.parameters()]
    losses = problem.losses()
    losses["pde"] = losses["pde"] * float("nan")
    assert torch.isnan(balancer.backward(losses)) and balancer.skipped == 1
    assert all(p.grad is None for p in problem.model.parameters())
    balancer.optimizer.step()  # the usual manual step: must not re-apply the previous gradient
    for a, b in zip(params, problem.model.parameters()):
        assert torch.equal(a, b)

