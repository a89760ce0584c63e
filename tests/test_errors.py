"""Bad input: a clear error naming the term and the fix, raised before anything changes."""
import copy

import pytest
import torch

from lossbalance import LossBalancer, LRAnnealing

from _models import PINN1D


def fresh():
    problem = PINN1D(seed=1)
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), LRAnnealing("pde"))
    balancer.step(problem.losses())  # optimizer state, weights and .grad all exist now
    return problem, balancer


def snapshot(problem, balancer):
    return (
        [p.detach().clone() for p in problem.model.parameters()],
        [p.grad.clone() for p in problem.model.parameters()],
        copy.deepcopy(balancer.optimizer.state_dict()),
        balancer.weights,
        balancer.step_count,
    )


def assert_unchanged(before, after):
    (p0, g0, o0, w0, s0), (p1, g1, o1, w1, s1) = before, after
    for a, b in zip(p0 + g0, p1 + g1):
        assert torch.equal(a, b)
    assert w0 == w1 and s0 == s1
    for key, state in o0["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(o1["state"][key][name]))


def with_term(**extra):
    def make(problem):
        losses = problem.losses()
        losses.update(extra)
        return losses
    return make


def replace(term, value):
    def make(problem):
        losses = problem.losses()
        losses[term] = value(losses[term]) if callable(value) else value
        return losses
    return make


def drop(term):
    def make(problem):
        losses = problem.losses()
        del losses[term]
        return losses
    return make


CASES = {
    "empty dict": (lambda p: {}, ValueError, "empty"),
    "not a dict": (lambda p: [p.losses()["pde"]], TypeError, "dict of named loss terms"),
    "non-string key": (lambda p: {**p.losses(), 3: p.losses()["pde"]}, TypeError, "key 3"),
    "python float": (replace("dirichlet", 0.5), TypeError, "'dirichlet' is a float"),
    "numpy-like list": (replace("dirichlet", [0.5]), TypeError, "'dirichlet' is a list"),
    "non-scalar": (replace("neumann", lambda v: v.expand(4)), ValueError, r"'neumann' has shape \(4,\).*mean"),
    "integer tensor": (replace("neumann", torch.tensor(3)), TypeError, "'neumann' has dtype torch.int64"),
    "no grad": (replace("pde", lambda v: v.detach()), ValueError, "'pde' does not require grad"),
    "nan": (replace("neumann", lambda v: v * float("nan")), ValueError, "non-finite loss value for term.*'neumann'"),
    "inf": (replace("pde", lambda v: v * float("inf")), ValueError, "'pde' = inf"),
    "unknown term": (with_term(extra=torch.ones((), requires_grad=True)), KeyError, "unknown term.*'extra'.*optional"),
    "missing term": (drop("neumann"), KeyError, "missing term.*'neumann'.*remove_term"),
    "no path to the parameters": (
        replace("dirichlet", lambda v: torch.ones((), requires_grad=True) * 2), ValueError,
        "'dirichlet' has no path to any balanced parameter",
    ),
    "other dtype": (replace("pde", lambda v: v.double()), None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_losses_change_nothing(case):
    make, error, message = CASES[case]
    problem, balancer = fresh()
    losses = make(problem)
    before = snapshot(problem, balancer)
    if error is None:  # accepted: a float64 term on float32 parameters is fine
        balancer.step(losses)
        return
    with pytest.raises(error, match=message):
        balancer.step(losses)
    assert_unchanged(before, snapshot(problem, balancer))
    with pytest.raises(error, match=message):
        balancer.backward(losses)
    assert_unchanged(before, snapshot(problem, balancer))


def test_graph_freed_by_the_users_backward():
    problem, balancer = fresh()
    losses = problem.losses()
    losses["neumann"].backward()
    before = snapshot(problem, balancer)
    with pytest.raises(RuntimeError, match="term 'neumann'"):
        balancer.step(losses)
    assert_unchanged(before, snapshot(problem, balancer))


def test_unreachable_term_on_a_non_update_step_is_caught_on_first_appearance():
    problem = PINN1D()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters()), "static", optional=["extra"])
    balancer.step(problem.losses())
    x = torch.rand(3, requires_grad=True)
    with pytest.raises(ValueError, match="'extra' has no path"):
        balancer.step({**problem.losses(), "extra": x.pow(2).sum()})


def test_step_needs_exactly_one_of_losses_and_closure():
    problem, balancer = fresh()
    with pytest.raises(TypeError, match="exactly one"):
        balancer.step()
    with pytest.raises(TypeError, match="exactly one"):
        balancer.step(problem.losses(), closure=problem.losses)


def test_closure_returning_the_wrong_type():
    problem, balancer = fresh()
    before = snapshot(problem, balancer)
    with pytest.raises(TypeError, match="closure must return the dict"):
        balancer.step(closure=lambda: sum(problem.losses().values()))
    assert_unchanged(before, snapshot(problem, balancer))


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        LossBalancer(PINN1D().model, "lra")


def test_optimizer_without_trainable_parameters():
    p = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        LossBalancer(torch.optim.SGD([p], lr=0.1), "lra")


def test_strategy_name_with_a_typo_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'lra'"):
        LossBalancer(torch.optim.SGD(PINN1D().model.parameters(), lr=0.1), "lar")


def test_reference_term_not_in_the_dict():
    problem, _ = fresh()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters()), LRAnnealing("residual"))
    with pytest.raises(KeyError, match="reference term 'residual'"):
        balancer.step(problem.losses())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(update_every=0), "update_every"),
        (dict(warmup=-1), "warmup"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(memory="small"), "memory"),
        (dict(weights={"pde": 0.0}, terms=["pde"]), "initial weight of term 'pde'"),
        (dict(probe=[torch.nn.Parameter(torch.zeros(1))]), "probe"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossBalancer(torch.optim.SGD(PINN1D().model.parameters(), lr=0.1), "lra", **kwargs)


def test_load_state_dict_with_another_key_set_then_step():
    problem, balancer = fresh()
    state = balancer.state_dict()
    state["names"] = ["pde", "dirichlet", "robin"]
    other = LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), LRAnnealing("pde"))
    other.load_state_dict(state)
    with pytest.raises(KeyError, match="unknown term.*'neumann'.*missing term.*'robin'"):
        other.step(problem.losses())
