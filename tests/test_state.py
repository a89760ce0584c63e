"""The balancer's state: versioned, validated first and committed at once; the closure path's
snapshot (no deep copy of the optimizer's history)."""
import copy

import pytest
import torch

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.balancer import STATE_FORMAT

from _models import PINN1D, TwoHeads


def trained(strategy="relobralo", steps=3):
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), strategy, history=5)
    for _ in range(steps):
        balancer.step(model.losses())
    return model, balancer


def _everything(model, balancer):
    return copy.deepcopy(
        (balancer.state_dict(), balancer.strategy.state_dict(), [p.detach().clone() for p in model.parameters()])
    )


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_the_state_carries_its_format_and_documented_keys():
    _, balancer = trained()
    state = balancer.state_dict()
    assert state["format"] == STATE_FORMAT == 2
    documented = {"format", "optimizer", "optimizer_type", "names", "optional", "weights", "lower", "upper", "step", "updates",
                  "skipped", "strategy_name", "strategy", "generator", "scaler", "frozen", "combiner", "pointwise",
                  "deferred"}
    assert set(state) == documented
    for key in documented:
        assert f"``{key}``" in LossBalancer.state_dict.__doc__


def _corrupt_generator(state):
    state["generator"] = torch.zeros(3, dtype=torch.uint8)


def _wrong_strategy_state(state):
    state["strategy"] = {"tables": "not a table"}


def _missing_key(state):
    del state["updates"]


def _wrong_weights(state):
    state["weights"] = torch.ones(5)


def _future_format(state):
    state["format"] = 99


def _wrong_optimizer(state):
    state["optimizer"]["param_groups"][0]["params"] = [0]


def _another_model(state):
    # the same layout, another width: it loaded, and the next step failed inside Adam
    entry = state["optimizer"]["state"][0]
    entry["exp_avg"] = torch.zeros(entry["exp_avg"].shape[0] + 1, *entry["exp_avg"].shape[1:])


@pytest.mark.parametrize(
    "corrupt, error",
    [(_corrupt_generator, ValueError), (_wrong_strategy_state, Exception), (_missing_key, KeyError),
     (_wrong_weights, ValueError), (_future_format, ValueError), (_wrong_optimizer, ValueError),
     (_another_model, ValueError)],
    ids=["generator", "strategy", "key set", "weights", "format", "optimizer", "another model"],
)
def test_a_bad_state_leaves_everything_exactly_as_it_was(corrupt, error):
    model, balancer = trained()
    good = _everything(model, balancer)
    state = copy.deepcopy(trained(steps=5)[1].state_dict())  # another run's state, then corrupted
    corrupt(state)
    with pytest.raises(error):
        balancer.load_state_dict(state)
    _assert_same(_everything(model, balancer), good)
    balancer.step(model.losses())  # and it still steps


def test_an_lbfgs_state_for_another_model_is_refused():
    # L-BFGS keeps flat vectors over all the parameters: another width loaded, and the next step failed
    def run(width):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        x = torch.rand(8, 2)
        balancer = LossBalancer(torch.optim.LBFGS(model.parameters(), max_iter=3), "static", frozen=True)
        balancer.step(closure=lambda: {"a": model(x).pow(2).mean(), "b": (model(x) - 1).pow(2).mean()})
        return balancer

    four, five = run(4), run(5)
    before = copy.deepcopy(five.state_dict())
    with pytest.raises(ValueError, match="another model: the optimizer's '(d|prev_flat_grad|old_dirs|old_stps)'"):
        five.load_state_dict(four.state_dict())
    _assert_same(five.state_dict(), before)
    five.load_state_dict(before)


def test_a_state_of_lossbalance_0_1_0_still_loads():
    model, balancer = trained(steps=4)
    old = balancer.state_dict()
    del old["format"]  # what 0.1.0 saved: the same keys without the format
    fresh_model, fresh = trained(steps=1)
    fresh.load_state_dict(old)
    assert fresh.step_count == 4 and fresh.weights == balancer.weights


def test_the_closure_snapshot_keeps_the_lbfgs_history_by_reference():
    """A failed L-BFGS call is undone without deep-copying the history: after the undo, the
    optimizer holds the very same history tensors (and lists equal to the old ones)."""
    problem = PINN1D(seed=1)
    optimizer = torch.optim.LBFGS(problem.model.parameters(), max_iter=3, history_size=5, line_search_fn="strong_wolfe")
    balancer = LossBalancer(optimizer, LRAnnealing("pde"), nonfinite="skip")
    for _ in range(2):
        balancer.step(closure=problem.losses)
    state = next(iter(optimizer.state.values()))
    history = list(state["old_dirs"])
    assert history, "L-BFGS has a history"
    calls = []

    def closure():  # NaN on every re-evaluation: the call is undone
        calls.append(1)
        losses = problem.losses()
        return losses if len(calls) == 1 else {**losses, "pde": losses["pde"] * float("nan")}

    assert torch.isnan(balancer.step(closure=closure))
    restored = next(iter(optimizer.state.values()))
    assert len(restored["old_dirs"]) == len(history)
    assert all(a is b for a, b in zip(restored["old_dirs"], history))


@pytest.mark.parametrize(("options", "needed"), [
    (dict(max_iter=1), False), (dict(max_iter=4), True), (dict(max_iter=1, line_search_fn="strong_wolfe"), True),
])
def test_a_closure_step_snapshots_only_when_the_optimizer_can_re_evaluate(monkeypatch, options, needed):
    """L-BFGS with one iteration and no line search calls the closure once, before it changes
    anything: no snapshot (no parameter copy); with re-evaluations the snapshot is taken."""
    import lossbalance.balancer as B
    from lossbalance.snapshot import take_snapshot

    taken = []

    def counting(*args):
        taken.append(1)
        return take_snapshot(*args)

    monkeypatch.setattr(B, "take_snapshot", counting)
    problem = PINN1D(seed=2)
    balancer = LossBalancer(torch.optim.LBFGS(problem.model.parameters(), **options), LRAnnealing("pde"))
    balancer.step(closure=problem.losses)
    assert bool(taken) == needed
    adam = LossBalancer(torch.optim.Adam(problem.model.parameters()), LRAnnealing("pde"))
    adam.step(closure=problem.losses)  # torch.optim's others evaluate the closure once, first
    assert len(taken) == int(needed)


def test_a_strategy_that_changes_record_weights_in_place_cannot_corrupt_the_undo_point():
    """The weights table is never changed in place and the undo point keeps a reference to it:
    the strategy gets a copy, so writing into ``record.weights`` changes nothing it does not return."""
    import torch
    from lossbalance import LossBalancer
    from lossbalance.strategies.base import Strategy

    class InPlace(Strategy):
        name = "in_place_test"
        needs_gradients = False

        def update(self, record):
            record.weights.mul_(3.0)  # writes into what it was given
            return torch.full_like(record.weights, float("nan"))  # refused: the old weights stay

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), InPlace(), weights={"a": 2.0, "b": 5.0})
    x = torch.ones(4, 1)
    balancer.step({"a": model(x).pow(2).mean(), "b": model(x).abs().mean()})
    assert balancer.weights == {"a": 2.0, "b": 5.0}


def test_str_subclass_term_names_save_and_resume_through_weights_only_load(tmp_path):
    """Term names as ``enum.StrEnum`` members or ``numpy.str_`` (``np.array(["pde", "bc"])``) are
    strings to every check; the saved state holds them as plain strings, so
    ``torch.load(weights_only=True)`` (torch's default) reads it and the run resumes bit for bit."""
    import enum

    from lossbalance import RBA, Residual

    class Term(enum.StrEnum):
        PDE = "pde"
        BC = "bc"

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), LRAnnealing(reference=Term.PDE),
                                weights={Term.BC: 10.0}, pointwise={Term.PDE: RBA()})
        return model, balancer

    x, ids = torch.linspace(0, 1, 16)[:, None], torch.arange(16)

    def step(model, balancer):
        out = model(x)
        balancer.step({Term.PDE: Residual(out[:, 0] - x[:, 0], ids=ids, kind="residual"), Term.BC: out[0, 0].pow(2)})

    model, balancer = build()
    for _ in range(3):
        step(model, balancer)
    path = tmp_path / "state.pt"
    torch.save({"model": model.state_dict(), "balancer": balancer.state_dict()}, path)
    for _ in range(3):
        step(model, balancer)

    saved = torch.load(path, weights_only=True)
    again, resumed = build()
    again.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["balancer"])
    for _ in range(3):
        step(again, resumed)
    assert resumed.weights == balancer.weights
    for a, b in zip(again.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert all(type(k) is str for k in saved["balancer"]["names"])


def test_an_optimizer_state_of_the_same_kind_loads_into_a_subclass_or_a_newer_flag_set():
    """The refusal of another optimizer's state looks at its hyper-parameters, not the class
    name: an Adam state loads into a balancer on an Adam subclass (a user's, Lightning's
    wrapper), a state without torch's newer flags (``fused``, ``capturable``) loads too, and an
    AdamW state into Adam's."""
    class MyAdam(torch.optim.Adam):
        pass

    def balancer(cls):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        return model, LossBalancer(cls(model.parameters(), lr=1e-2), "static")

    model, plain = balancer(torch.optim.Adam)
    x = torch.randn(4, 2)
    plain.step({"a": model(x).pow(2).mean()})
    state = plain.state_dict()
    old = copy.deepcopy(state)
    for group in old["optimizer"]["param_groups"]:
        for flag in ("fused", "capturable", "differentiable", "decoupled_weight_decay"):
            group.pop(flag, None)
    for cls, saved in ((MyAdam, state), (torch.optim.Adam, old), (torch.optim.AdamW, state)):
        _, other = balancer(cls)
        other.load_state_dict(saved)
        assert other.step_count == 1
    _, sgd = balancer(torch.optim.SGD)
    with pytest.raises(ValueError, match=r"not a SGD's: its parameter group 0 has no \['dampening', 'momentum'\]"):
        sgd.load_state_dict(state)
