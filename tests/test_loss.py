"""``LossBalancer.loss()``: the balanced loss for frameworks that own the backward, and the
balancer built from parameters alone (issue 16, items 1 and 2)."""
import copy
import io
import warnings

import pytest
import torch

from lossbalance import LossBalancer, LRAnnealing

from _models import PINN1D, TwoHeads, grads_of

warnings.filterwarnings("ignore", message="LRAnnealing: no reference")

SETUPS = {  # name: balancer options (on TwoHeads: terms a, b)
    "update": dict(strategy=LRAnnealing("a")),
    "plain": dict(strategy="static", weights={"a": 2.0, "b": 0.5}),
    "every-3": dict(strategy=LRAnnealing("a"), update_every=3),
    "pcgrad": dict(strategy=LRAnnealing("a"), combine="pcgrad"),
    "scoped": dict(strategy=LRAnnealing("a"), scope="b"),
    "scoped-plain": dict(strategy="static", scope="b"),
    "lean": dict(strategy=LRAnnealing("a"), memory="lean"),
    "relobralo": dict(strategy="relobralo"),
}


def build(name, model, params=None):
    options = dict(SETUPS[name])
    strategy = options.pop("strategy")
    if options.pop("scope", None):
        options["scope"] = {"b": list(model.b.parameters())}
    target = params if params is not None else torch.optim.SGD(model.parameters(), lr=1e-2)
    return LossBalancer(target, strategy, **options)


@pytest.mark.parametrize("name", list(SETUPS))
def test_loss_backward_gives_bit_for_bit_the_grad_of_backward(name):
    a, b = TwoHeads(seed=1), TwoHeads(seed=1)
    by_backward, by_loss = build(name, a), build(name, b)
    for _ in range(4):
        total = by_backward.backward(a.losses())
        for p in b.parameters():
            p.grad = None
        loss = by_loss.loss(b.losses())
        assert torch.equal(loss.detach(), total)
        loss.backward()
        for ga, gb in zip(grads_of(a.parameters()), grads_of(b.parameters())):
            assert (ga is None) == (gb is None)
            assert ga is None or torch.equal(ga, gb)
        by_backward.optimizer.step(), by_loss.optimizer.step()
    assert by_backward.weights == by_loss.weights and by_backward.step_count == by_loss.step_count == 4


def test_micro_batches_accumulate_and_the_loss_stays_valid_across_calls():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.0), LRAnnealing("a"), combine="pcgrad")
    params = list(model.parameters())
    first = balancer.loss(model.losses())
    d1 = [g.clone() for g in torch.autograd.grad(first, params, retain_graph=True)]
    second = balancer.loss(model.losses())  # rewrites the engine's buffer: `first` must not change
    d2 = [g.clone() for g in torch.autograd.grad(second, params, retain_graph=True)]
    balancer.backward(model.losses())  # and so does a backward() in between
    model.zero_grad()
    first.backward()
    second.backward()
    assert not all(torch.equal(a, b) for a, b in zip(d1, d2))
    for p, g1, g2 in zip(params, d1, d2):
        torch.testing.assert_close(p.grad, g1 + g2)


def test_parameters_no_term_reaches_keep_grad_none():
    model = TwoHeads()
    unused = torch.nn.Parameter(torch.ones(3))
    balancer = LossBalancer(torch.optim.AdamW([*model.parameters(), unused], lr=1e-2), LRAnnealing("a"))
    for _ in range(2):
        balancer.loss(model.losses()).backward()
        assert unused.grad is None
        balancer.optimizer.step()
    assert torch.equal(unused.detach(), torch.ones(3))  # AdamW's decay would have moved it on zeros


def test_loss_runs_the_hooks_updates_stats_and_counts_the_step():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), LRAnnealing("a"))
    seen = []
    balancer.register_step_hook(lambda b: seen.append(b.step_count))
    balancer.loss(model.losses()).backward()
    balancer.loss(model.losses())
    assert seen == [1, 2] and balancer.step_count == 2
    assert set(balancer.stats) == {"a", "b"} and "grad_norm" in balancer.stats["b"]


def test_a_skipped_step_returns_nan_whose_backward_adds_nothing():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), LRAnnealing("a"), nonfinite="skip")
    balancer.loss(model.losses()).backward()
    before = grads_of(model.parameters())
    losses = model.losses()
    loss = balancer.loss({"a": losses["a"], "b": losses["b"] * float("nan")})
    assert torch.isnan(loss) and balancer.skipped == 1 and balancer.step_count == 1
    loss.backward()
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)


def test_loss_with_a_scaler_is_refused():
    model = TwoHeads()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), "static", scaler=scaler)
    with pytest.raises(TypeError, match="loss\\(\\) cannot be used with scaler="):
        balancer.loss(model.losses())
    assert balancer.step_count == 0


def test_bad_input_to_loss_gets_the_errors_of_step_and_changes_nothing():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), LRAnnealing("a"))
    balancer.loss(model.losses())
    with pytest.raises(ValueError, match="loss term 'b' has shape"):
        balancer.loss({"a": model.losses()["a"], "b": torch.ones(2, requires_grad=True)})
    with pytest.raises(KeyError, match="missing term"):
        balancer.loss({"a": model.losses()["a"]})
    assert balancer.step_count == 1


def test_loss_under_no_grad_is_refused_before_anything_changes():
    # it took the step (counter, weights, strategy state) and returned a scalar without a graph
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), LRAnnealing("a"), update_every=2)
    balancer.loss(model.losses()).backward()
    before = copy.deepcopy(balancer.state_dict())
    losses = model.losses()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), pytest.raises(RuntimeError, match=r"under torch.no_grad\(\).*balancer.evaluate"):
            balancer.loss(losses)
    after = balancer.state_dict()
    assert after["step"] == before["step"] == 1
    assert balancer.weights == {n: float(w) for n, w in zip(before["names"], before["weights"])} and after["strategy"] == before["strategy"]
    balancer.loss(losses).backward()  # the same dict, with gradients enabled: the step is taken
    assert balancer.step_count == 2


# ---------------------------------------------------------------- no optimizer
def test_a_balancer_from_parameters_serves_loss_and_backward_and_refuses_step():
    model = TwoHeads()
    balancer = LossBalancer(model.parameters(), LRAnnealing("a"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # the framework's own
    for _ in range(3):
        optimizer.zero_grad()
        balancer.loss(model.losses()).backward()
        optimizer.step()
    balancer.backward(model.losses())
    assert balancer.step_count == 4 and balancer.weights["b"] != 1.0
    before = (balancer.state_dict(), [p.detach().clone() for p in model.parameters()])
    with pytest.raises(TypeError, match="built from parameters, without an optimizer: step\\(\\) needs one"):
        balancer.step(model.losses())
    assert balancer.step_count == 4
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[1]))
    assert "parameters" in repr(balancer)


def test_param_group_dicts_and_a_state_through_weights_only_load():
    model = TwoHeads()
    groups = [{"params": model.trunk.parameters()}, {"params": [*model.a.parameters(), *model.b.parameters()], "lr": 0.1}]
    balancer = LossBalancer(groups, "relobralo", seed=3)
    for _ in range(3):
        balancer.loss(model.losses()).backward()
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["optimizer"] is None
    fresh = LossBalancer(model.parameters(), "relobralo")
    fresh.load_state_dict(state)
    assert fresh.weights == balancer.weights and fresh.step_count == 3
    assert torch.equal(fresh.loss(model.losses()).detach(), balancer.loss(model.losses()).detach())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.losses()["a"].backward()
    optimizer.step()
    kept = copy.deepcopy(optimizer.state_dict())
    with_optimizer = LossBalancer(optimizer, "relobralo")
    with pytest.warns(UserWarning, match="saved by a balancer without an optimizer: the balancer's part is loaded"):
        with_optimizer.load_state_dict(state)
    assert with_optimizer.weights == balancer.weights and with_optimizer.step_count == 3
    assert str(optimizer.state_dict()) == str(kept)


def test_what_is_not_parameters_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"model.parameters\(\)"):
        LossBalancer(PINN1D().model, "lra")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        LossBalancer([1, 2], "lra")


def test_a_reevaluation_holds_the_weights_and_does_not_advance_the_step():
    """``loss(..., reevaluation=True)``: the same step evaluated again (a framework's L-BFGS closure)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.linspace(0, 1, 8)[:, None]

    def terms():
        u = model(x)
        return {"pde": (u - x).pow(2).mean(), "bc": 10 * u[0].pow(2).sum()}

    hooked = []
    balancer = LossBalancer(model.parameters(), "relobralo", history=10)
    balancer.register_step_hook(lambda b: hooked.append(b.step_count))
    balancer.loss(terms()).backward()
    balancer.loss(terms()).backward()  # the second call updates the weights (relobralo has history now)
    weights, count, rows = balancer.weights, balancer.step_count, len(balancer.history)
    for p in model.parameters():
        p.grad = None
    total = balancer.loss(terms(), reevaluation=True)
    total.backward()
    again = [p.grad.clone() for p in model.parameters()]
    assert balancer.weights == weights and balancer.step_count == count and len(balancer.history) == rows
    assert hooked == [1, 2]
    # the same gradient as backward() with the held weights
    reference = LossBalancer(model.parameters(), "static", weights=weights)
    reference.backward(terms())
    for g, p in zip(again, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    expected = sum(weights[n] * v for n, v in terms().items())
    torch.testing.assert_close(total.detach(), expected.detach())


def _counting_losses(model, passes):
    """``model.losses()`` with a hook on the trunk's output that counts the backward passes through it."""
    h = model.trunk(model.x)
    h.register_hook(lambda grad: passes.append(1))
    return {"a": (model.a(h) - model.ya).pow(2).mean(), "b": (model.b(h) - model.yb).pow(2).mean()}


@pytest.mark.parametrize("name, inside", [("plain", [0, 0, 0]), ("every-3", [2, 0, 0]), ("scoped-plain", [1, 1, 1])])
def test_a_call_without_per_term_gradients_leaves_the_only_backward_to_the_framework(name, inside):
    """Issue 16: "steps without an update stay one backward of the weighted sum". On such calls
    loss() does not differentiate the model itself: the framework's .backward() is the one pass
    through the graph. Update calls differentiate each term inside loss() (K = 2 passes through
    the trunk), and so does a scope on every call (its gradient is not the weighted sum's own:
    one pass through the trunk, as term b's scope is its head), and the surrogate's backward then
    does not pass through the model."""
    model = TwoHeads()
    balancer = build(name, model)
    for expected in inside:
        passes = []
        loss = balancer.loss(_counting_losses(model, passes))
        assert len(passes) == expected
        loss.backward()
        assert len(passes) == expected + (expected == 0)
        balancer.optimizer.step()
        model.zero_grad()


def test_a_parameter_listed_twice_is_balanced_once():
    """Parameters given twice (the no-optimizer mode, or an optimizer group: torch.optim only warns)
    get the gradient of ``backward()``, once, from ``loss()`` on update steps too; the statistics
    count each tensor once; a tensor in two groups is refused, as by torch.optim."""
    from lossbalance import LRAnnealing

    def run(params_of, update_every=1):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        x = torch.randn(8, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            balancer = LossBalancer(params_of(net), LRAnnealing(reference="pde"), update_every=update_every)
        grads = []
        for _ in range(3):
            net.zero_grad()
            u = net(x)
            balancer.loss({"pde": u.pow(2).mean(), "bc": (u - 1).pow(2).mean()}).backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        return grads, balancer.weights

    once, weights = run(lambda net: list(net.parameters()))
    last = lambda net: list(net[2].parameters())  # noqa: E731
    for params_of in (lambda net: [*net.parameters(), *last(net)], lambda net: [{"params": [*net.parameters(), *last(net)]}]):
        twice, twice_weights = run(params_of)
        assert twice_weights == weights
        for a, b in zip(once, twice):
            assert all(torch.equal(g, h) for g, h in zip(a, b))
    net = torch.nn.Linear(2, 1)
    with pytest.warns(UserWarning, match="more than once"):
        LossBalancer([*net.parameters(), net.weight], "lra")
    with pytest.raises(ValueError, match="more than one parameter group"):
        LossBalancer([{"params": list(net.parameters())}, {"params": [net.weight]}], "lra")


def test_evaluate_is_the_weighted_total_with_the_current_weights_and_advances_nothing():
    from lossbalance import RBA, Residual

    model = TwoHeads()
    ids = torch.arange(4)
    balancer = LossBalancer(model.parameters(), LRAnnealing(reference="a"), weights={"a": 2.0},
                            pointwise={"r": RBA()})

    def terms():
        losses = model.losses()
        return {**losses, "r": Residual(losses["a"] * torch.ones(4), ids=ids, kind="residual")}

    with torch.no_grad():  # before the first step: the initial weights; no gradient needed
        first = balancer.evaluate(terms())
    assert first.item() == pytest.approx(2.0 * model.losses()["a"].item() + model.losses()["b"].item() + 0.0)
    for _ in range(3):
        balancer.loss(terms()).backward()
    state, stats, history = balancer.state_dict(), balancer.stats, balancer.history
    with torch.no_grad():
        losses = model.losses()
        total = balancer.evaluate(terms())
    lam = state["pointwise"]["r"]["lambdas"]
    expected = sum(balancer.weights[n] * losses[n] for n in losses) + balancer.weights["r"] * (lam * losses["a"]).pow(2).mean()
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    assert str(balancer.state_dict()) == str(state) and balancer.stats == stats and balancer.history == history
    with pytest.raises(KeyError, match="'c'"):
        balancer.evaluate({**terms(), "c": torch.tensor(1.0)})
    balancer.evaluating = True
    assert torch.equal(balancer.loss(terms()), balancer.evaluate(terms())) and balancer.step_count == 3
