"""Traps found by using lossbalance as a demanding PINN user would (issue 14): each test fails on
the code before the fix. The distributed ones are in test_distributed.py, torch.compile in
test_compile.py, config types and scopes in test_config.py / test_scope.py."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lossbalance import LossBalancer, LRAnnealing

from _models import PINN1D, TwoHeads, grads_of

warnings.filterwarnings("ignore", message="LRAnnealing: no reference")


def _snapshot(balancer, params):
    return (copy.deepcopy(balancer.state_dict()), [p.detach().clone() for p in params], grads_of(params))


def _assert_unchanged(balancer, params, before):
    state, values, grads = before
    after = balancer.state_dict()
    assert after["step"] == state["step"] and after["updates"] == state["updates"]
    assert after["names"] == state["names"] and torch.equal(after["weights"], state["weights"])
    assert torch.equal(after["generator"], state["generator"])
    for p, v, g in zip(params, values, grads):
        assert torch.equal(p.detach(), v)
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))


# ---------------------------------------------------------------- 1. freezing mid-run
@pytest.mark.parametrize("strategy", ["lra", "static"])
def test_a_parameter_frozen_mid_run_stops_moving_as_in_plain_pytorch(strategy):
    problem = PINN1D(seed=0)
    first = problem.model[0].weight
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), strategy, update_every=2)
    for _ in range(3):
        balancer.step(problem.losses())
    first.requires_grad_(False)
    frozen = first.detach().clone()
    for _ in range(5):
        balancer.step(problem.losses())
    assert first.grad is None
    assert torch.equal(first.detach(), frozen)  # before the fix it moved by 0.046 (Adam's momentum)
    first.requires_grad_(True)  # and it trains again once unfrozen
    balancer.step(problem.losses())
    assert first.grad is not None and not torch.equal(first.detach(), frozen)


# ---------------------------------------------------------------- 2. freezing inside a scope
def test_freezing_a_scoped_parameter_gives_the_same_error_every_time_and_changes_nothing():
    model = TwoHeads()
    params = list(model.parameters())
    balancer = LossBalancer(torch.optim.Adam(params, lr=1e-2), LRAnnealing("a"), scope={"b": model.b.parameters()})
    balancer.step(model.losses())
    model.b.weight.requires_grad_(False)
    before = _snapshot(balancer, params)
    for _ in range(2):  # before the fix the second identical call passed with stale scopes
        with pytest.raises(ValueError, match="scope of term 'b' names a parameter the optimizer does not hold"):
            balancer.step(model.losses())
        _assert_unchanged(balancer, params, before)


# ---------------------------------------------------------------- 4. activation checkpointing
class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(2, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 1)
        self.reentrant = reentrant
        self.x = torch.randn(16, 2)

    def losses(self):
        out = self.c(checkpoint(self.b, self.a(self.x), use_reentrant=self.reentrant))
        return {"a": out.pow(2).mean(), "b": (out - 1).abs().mean()}


@pytest.mark.parametrize("strategy", ["static", "lra"])
def test_a_reentrant_checkpoint_is_refused_with_the_fix(strategy):
    model = _Checkpointed(reentrant=True)
    params = list(model.parameters())
    balancer = LossBalancer(torch.optim.SGD(params, lr=0.1), strategy)
    before = _snapshot(balancer, params)
    with pytest.raises(ValueError, match="'a' goes through torch.utils.checkpoint.*use_reentrant=False"):
        balancer.step(model.losses())
    _assert_unchanged(balancer, params, before)


@pytest.mark.parametrize("strategy", ["static", "lra"])
def test_a_non_reentrant_checkpoint_trains_every_layer_exactly(strategy):
    model = _Checkpointed(reentrant=False)
    params = list(model.parameters())
    balancer = LossBalancer(torch.optim.SGD(params, lr=0.0), strategy)
    balancer.backward(model.losses())
    got = grads_of(params)
    weights = balancer.weights
    total = sum(weights[k] * v for k, v in model.losses().items())
    for g, want in zip(got, torch.autograd.grad(total, params)):
        torch.testing.assert_close(g, want)


# ---------------------------------------------------------------- 5. parameters of a second optimizer
def _pinn_terms(net, lam, sa, x):
    u = net(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return {"pde": (sa * (du - lam * u)).pow(2).mean(), "bc": u[0].pow(2).sum()}


@pytest.mark.parametrize("strategy", ["static", "lra", "lra-lean"])
def test_parameters_of_another_optimizer_get_what_total_backward_gives_them(strategy):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    lam, sa = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.ones(16, 1))  # PDE coefficient, SA weights
    x = torch.linspace(0, 1, 16).reshape(-1, 1).requires_grad_()  # collocation points: not a Parameter
    memory = "lean" if strategy.endswith("lean") else "keep"
    balancer = LossBalancer(torch.optim.SGD(net.parameters(), lr=0.0), strategy.split("-")[0], memory=memory)
    balancer.step(_pinn_terms(net, lam, sa, x))
    weights = balancer.weights
    total = sum(weights[k] * v for k, v in _pinn_terms(net, lam, sa, x).items())
    want_lam, want_sa = torch.autograd.grad(total, [lam, sa])
    torch.testing.assert_close(lam.grad, want_lam)
    torch.testing.assert_close(sa.grad, want_sa)
    assert x.grad is None  # collocation points stay untouched
    lam.grad = torch.ones(())  # accumulated, as backward() does, not overwritten
    terms = _pinn_terms(net, lam, sa, x)
    second = torch.autograd.grad(sum(weights[k] * v for k, v in terms.items()), lam, retain_graph=True)[0]
    balancer.step(terms)
    torch.testing.assert_close(lam.grad, 1 + second)


def test_a_coefficient_with_its_own_optimizer_trains_like_the_plain_loop():
    """An inverse problem: the PDE coefficient has its own Adam; the net's Adam is balanced with
    fixed weights, so the two loops must agree step for step."""
    def run(balanced):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        lam, sa = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.ones(16, 1))
        x = torch.linspace(0, 1, 16).reshape(-1, 1).requires_grad_()
        opt_net, opt_lam = torch.optim.Adam(net.parameters(), 1e-2), torch.optim.Adam([lam], 1e-1)
        opt_sa = torch.optim.Adam([sa], 1e-2, maximize=True)  # self-adaptive weights ascend
        balancer = LossBalancer(opt_net, "static") if balanced else None
        for _ in range(5):
            opt_lam.zero_grad(), opt_sa.zero_grad()
            terms = _pinn_terms(net, lam, sa, x)
            if balanced:
                balancer.step(terms)
            else:
                opt_net.zero_grad()
                sum(terms.values()).backward()
                opt_net.step()
            opt_lam.step(), opt_sa.step()
        return lam.detach(), sa.detach()

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want)
    assert run(True)[0].item() != 0.5


# ---------------------------------------------------------------- 6. typos in per-term options
@pytest.mark.parametrize("option", ["weights", "min_weight", "max_weight"])
def test_a_per_term_option_naming_an_unknown_term_raises_at_construction(option):
    model = TwoHeads()
    with pytest.raises(KeyError, match=rf"{option} names term\(s\) \['bs'\].*neither in terms="):
        LossBalancer(torch.optim.Adam(model.parameters()), "static", terms=["a", "b"], **{option: {"bs": 100.0}})


@pytest.mark.parametrize("option", ["weights", "min_weight", "max_weight"])
def test_a_per_term_option_naming_an_unknown_term_raises_on_the_first_step_before_any_change(option):
    model = TwoHeads()
    params = list(model.parameters())
    balancer = LossBalancer(torch.optim.Adam(params), "lra", **{option: {"bs": 100.0}})
    before = _snapshot(balancer, params)
    for _ in range(2):
        with pytest.raises(KeyError, match=r"names the term 'bs', which is not among the terms \['a', 'b'\]"):
            balancer.step(model.losses())
        _assert_unchanged(balancer, params, before)
    assert balancer.weights == {}


def test_a_per_term_option_for_an_optional_term_is_accepted():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.Adam(model.parameters()), "static", weights={"c": 3.0}, optional=["c"])
    balancer.step(model.losses())
    balancer.step({**model.losses(), "c": model.losses()["a"] * 2})
    assert balancer.weights["c"] == 3.0


# ---------------------------------------------------------------- 8. sparse gradients
def test_sparse_gradients_on_a_gradient_step_are_refused_clearly_and_change_nothing():
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1)
    params = list(emb.parameters())
    balancer = LossBalancer(torch.optim.SparseAdam(params), "lra")
    out = head(emb(torch.tensor([1, 2, 2, 5])))
    before = _snapshot(balancer, params)
    with pytest.raises(ValueError, match="sparse=False"):
        balancer.step({"a": out.pow(2).mean(), "b": out.abs().mean()})
    _assert_unchanged(balancer, params, before)


def test_sparse_gradients_on_plain_steps_keep_working_with_sparse_adam():
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1)
    balancer = LossBalancer(torch.optim.SparseAdam(list(emb.parameters())), "static")
    before = emb.weight.detach().clone()
    out = head(emb(torch.tensor([1, 2, 2, 5])))
    balancer.step({"a": out.pow(2).mean(), "b": out.abs().mean()})
    moved = (emb.weight.detach() != before).any(1)
    assert moved[[1, 2, 5]].all() and not moved[[0, 3, 4]].any()


# ---------------------------------------------------------------- 9. L-BFGS without a closure
def test_lbfgs_without_a_closure_raises_first_saying_a_closure_is_needed():
    problem = PINN1D()
    params = list(problem.model.parameters())
    balancer = LossBalancer(torch.optim.LBFGS(params), "lra")
    before = _snapshot(balancer, params)
    with pytest.raises(TypeError, match=r"LBFGS.step needs a closure: call balancer.step\(closure="):
        balancer.step(problem.losses())
    _assert_unchanged(balancer, params, before)


# ---------------------------------------------------------------- 10. the stale term is named
def test_a_term_built_once_outside_the_loop_is_named_on_a_plain_step():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), "static")
    stale = model.losses()["b"]  # built once: its graph is freed by the first step
    balancer.step({"a": model.losses()["a"], "b": stale})
    with pytest.raises(RuntimeError, match="while differentiating term 'b': build the loss dict anew"):
        balancer.step({"a": model.losses()["a"], "b": stale})


def test_an_autograd_error_that_is_not_a_freed_graph_keeps_its_own_message():
    x = nn.Parameter(torch.ones(3))

    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("the custom backward is broken")

    balancer = LossBalancer(torch.optim.SGD([x], lr=0.1), "lra")
    with pytest.raises(RuntimeError, match="while differentiating term 'a'. the custom backward is broken") as info:
        balancer.step({"a": Broken.apply(x).sum(), "b": x.pow(2).sum()})
    assert "anew" not in str(info.value)


# ---------------------------------------------------------------- 12. tensor subclasses
class Labelled(torch.Tensor):
    """Like PINA's LabelTensor: every result must carry the labels of its first argument."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if isinstance(out, Labelled):
            out._labels = args[0]._labels  # AttributeError when args[0] is not labelled
        return out


@pytest.mark.parametrize("strategy", ["static", "lra"])
def test_losses_that_are_tensor_subclasses_are_accepted(strategy):
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), strategy)
    for _ in range(2):
        losses = {}
        for name, loss in model.losses().items():
            labelled = loss.as_subclass(Labelled)
            labelled._labels = [name]
            losses[name] = labelled
        total = balancer.step(losses)
        assert type(total) is torch.Tensor and torch.isfinite(total)


# ---------------------------------------------------------------- 14. an exception inside optimizer.step()
class _FailOnce(torch.optim.Adam):
    fail = False

    def step(self, closure=None):
        if self.fail:
            self.fail = False
            raise RuntimeError("the optimizer failed")
        return super().step(closure)


@pytest.mark.parametrize("strategy", ["lra", "relobralo", "static"])
def test_a_failing_optimizer_step_does_not_count_and_a_rerun_matches_an_uninterrupted_run(strategy):
    def run(interrupt):
        problem = PINN1D(seed=3)
        opt = _FailOnce(problem.model.parameters(), lr=1e-2)
        balancer = LossBalancer(opt, strategy, update_every=2, history=10)
        for step in range(5):
            if interrupt and step == 2:
                opt.fail = True
                with pytest.raises(RuntimeError, match="the optimizer failed"):
                    balancer.step(problem.losses())
            balancer.step(problem.losses())
        return balancer, [p.detach() for p in problem.model.parameters()]

    (a, pa), (b, pb) = run(True), run(False)
    assert a.step_count == b.step_count == 5
    assert a.weights == b.weights and a.history == b.history
    assert torch.equal(a.state_dict()["generator"], b.state_dict()["generator"])
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- 15. history reads are cheap
def test_history_entries_are_built_once_and_follow_the_steps():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), LRAnnealing("a"), history=3)
    for _ in range(2):
        balancer.step(model.losses())
    first = balancer.history
    assert [e["step"] for e in first] == [0, 1]
    assert all(a is b for a, b in zip(first, balancer.history))  # not rebuilt on every read
    for _ in range(3):
        balancer.step(model.losses())
    later = balancer.history
    assert [e["step"] for e in later] == [2, 3, 4]
    assert later[-1]["weights"] == balancer.weights and set(later[-1]) >= {"grad_norm", "cosine"}


@pytest.mark.parametrize("history", [100, 2])
def test_an_undone_step_leaves_a_full_history_too(history):
    # a full history had dropped its oldest row for the undone step's, and kept the undone one
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    balancer = LossBalancer(torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=3), "static", history=history,
                            nonfinite="skip")
    x = torch.randn(8, 2)
    for step in range(4):
        calls = []

        def closure():
            calls.append(1)
            u = net(x)
            a = (u**2).mean() * (float("nan") if step == 2 and len(calls) == 2 else 1.0)  # a re-evaluation: undone
            return {"a": a, "b": ((u - 1) ** 2).mean()}

        balancer.step(closure=closure)
    assert balancer.step_count == 3 and balancer.skipped == 1
    assert [e["step"] for e in balancer.history] == ([0, 1, 2] if history == 100 else [1, 2])
    assert all(v == v for e in balancer.history for v in e["losses"].values())  # no NaN row


def test_loading_a_state_drops_the_abandoned_runs_reports():
    # stats, diagnostics and history of the steps after the saved state stayed (weights 2.65 in stats, 1.28 loaded)
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), LRAnnealing("a"), history=10)
    for _ in range(3):
        balancer.step(model.losses())
    saved = copy.deepcopy(balancer.state_dict())
    for _ in range(3):
        balancer.step(model.losses())
    balancer.load_state_dict(saved)
    assert balancer.stats == {} and balancer.diagnostics is None and balancer.history == []
    balancer.step(model.losses())
    assert [e["step"] for e in balancer.history] == [3] and balancer.stats["b"]["weight"] == balancer.weights["b"]


# ---------------------------------------------------------------- the parameters moved (module.to)
@pytest.mark.parametrize("strategy", ["lra", "static", "relobralo", "gradnorm", "uncertainty", "famo", "mconfig", "pcgrad"])
@pytest.mark.parametrize("when", ["before the first step", "after some steps"])
def test_the_balancer_follows_its_parameters_to_another_dtype(strategy, when):
    """``model.to(...)`` moves the parameters in place (as Lightning does after the module and
    its balancer are built): the balancer follows them instead of writing stale-typed grads,
    the state of learned weights (GradNorm, uncertainty) and of momentum ConFIG included (both
    raised a dtype error after some steps)."""
    problem = PINN1D(seed=2)  # SGD: Adam's own float32 moments would refuse float64 grads, in plain PyTorch too
    combine = {"mconfig": "mconfig", "pcgrad": "pcgrad"}.get(strategy)
    options = {"strategy": "static", "combine": combine} if combine else {"strategy": strategy}
    balancer = LossBalancer(torch.optim.SGD(problem.model.parameters(), lr=1e-3), **options)
    if when == "after some steps":
        for _ in range(3):
            balancer.step(problem.losses())
    problem.model.double()
    problem.x = problem.x.double()
    for _ in range(3):
        balancer.step(problem.losses())
    assert all(p.grad.dtype == torch.float64 for p in problem.model.parameters())
    assert balancer._terms.weights.dtype == torch.float64
    assert all(torch.isfinite(torch.tensor(w)) for w in balancer.weights.values())
