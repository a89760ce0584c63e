"""Tests for lossbalance.strategies.uncertainty (Kendall, Gal & Cipolla 2018)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _strategy_checks import (
    F64, NAMES, check_finite_and_positive, check_matches_reference, check_permutation_invariance,
    check_resume_bit_identical, check_runs_on_meta_device, check_trains_with_adam, check_trains_with_lbfgs,
    loss_sequences, make_record, tiny_pinn,
)
from _strategy_checks import drive as _drive
from lossbalance import LossBalancer
from lossbalance.strategies.base import available_strategies, make_strategy
from lossbalance.strategies.uncertainty import UncertaintyWeighting


def drive(strategy, names, sequence, dtype=F64):
    """Direct ``update()`` calls; the weights passed in stay 1 (the strategy does not read them)."""
    return _drive(strategy, names, sequence, dtype=dtype, feedback=False)


# ----------------------------------------------------------------------------- reference
class NaiveAdam:
    """Adam on one scalar in plain floats (torch defaults: betas 0.9/0.999, eps 1e-8)."""

    def __init__(self, value: float, lr: float):
        self.value, self.lr, self.m, self.v, self.t = value, lr, 0.0, 0.0, 0

    def step(self, g: float) -> None:
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        m_hat = self.m / (1 - 0.9**self.t)
        v_hat = self.v / (1 - 0.999**self.t)
        self.value -= self.lr * m_hat / (math.sqrt(v_hat) + 1e-8)


def naive_uncertainty(sequence, lr, init=0.0):
    """Weights 0.5 exp(-s) before the step, then one Adam step on dJ/ds = 0.5 - 0.5 exp(-s) L."""
    k = len(sequence[0])
    s = [NaiveAdam(init, lr) for _ in range(k)]
    out = []
    for losses in sequence:
        out.append([0.5 * math.exp(-a.value) for a in s])
        for a, L in zip(s, losses):
            a.step(0.5 - 0.5 * math.exp(-a.value) * L)
    return out, [a.value for a in s]


# ----------------------------------------------------------------------------- API
def test_registry_options_and_repr() -> None:
    assert "uncertainty" in available_strategies()
    assert UncertaintyWeighting.name == "uncertainty" and UncertaintyWeighting.needs_gradients is False
    assert isinstance(make_strategy("uncertainty", lr=0.1), UncertaintyWeighting)
    default = UncertaintyWeighting()
    assert default.options() == {"init_log_var": 0.0, "lr": 1e-3, "optimizer": "Adam", "optimizer_options": {}}
    assert UncertaintyWeighting(**default.options()).options() == default.options()
    assert repr(default) == "UncertaintyWeighting(init_log_var=0.0, lr=0.001, optimizer='Adam', optimizer_options={})"
    assert default.optimizer is None and default.regularizer() is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0}, {"lr": -1.0}, {"lr": math.nan}, {"init_log_var": math.inf}, {"init_log_var": {"a": math.nan}},
        {"optimizer": "NoSuchOptimizer"}, {"optimizer": int}, {"optimizer": "LBFGS"},
        {"optimizer_options": {"lr": 0.1}}, {"optimizer_options": {"not_an_option": 1}},
    ],
)
def test_invalid_options(kwargs) -> None:
    with pytest.raises(ValueError):
        UncertaintyWeighting(**kwargs)


def test_optimizer_class_and_kwargs() -> None:
    s = UncertaintyWeighting(lr=0.5, optimizer=torch.optim.SGD, optimizer_options={"momentum": 0.9})
    drive(s, ["a", "b"], [[1.0, 2.0]])
    assert isinstance(s.optimizer, torch.optim.SGD)
    assert [g["lr"] for g in s.optimizer.param_groups] == [0.5, 0.5]
    assert all(g["momentum"] == 0.9 for g in s.optimizer.param_groups)


# ----------------------------------------------------------------------------- hand-computed numbers
def test_hand_computed_sgd() -> None:
    # SGD, lr = 0.1, s(0) = 0, constant L = [1, 4]:
    # update 0: weights 0.5 exp(0) = [0.5, 0.5]; dJ/ds = 0.5 - 0.5 L = [0, -1.5]; s(1) = [0, 0.15]
    # update 1: weights [0.5, 0.5 e^-0.15 = 0.43035398821]; dJ/ds = [0, 0.5 - 2 e^-0.15 = -1.22141595285]
    #   s(2) = [0, 0.27214159529]
    # update 2: weights [0.5, 0.5 e^-0.27214159529 = 0.38087319688]
    s = UncertaintyWeighting(lr=0.1, optimizer="SGD")
    out = drive(s, ["a", "b"], [[1.0, 4.0]] * 3)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.5], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(out[1], torch.tensor([0.5, 0.4303539882125289], dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(out[2], torch.tensor([0.5, 0.3808731968777672], dtype=F64), rtol=1e-14, atol=0)
    assert s.log_vars["b"] == pytest.approx(0.15 + 0.12214159528501156 + 0.10234927875110689, rel=1e-13)
    assert s.regularizer().item() == pytest.approx(0.5 * s.log_vars["b"], rel=1e-13)


def test_initial_log_var() -> None:
    w = drive(UncertaintyWeighting(-0.5), ["a", "b"], [[1.0, 2.0]])[0]  # LibMTL's start
    assert w.tolist() == pytest.approx([0.8243606353500641] * 2, rel=1e-15)
    w = drive(UncertaintyWeighting({"b": math.log(0.5)}), ["a", "b"], [[1.0, 2.0]])[0]
    assert w.tolist() == pytest.approx([0.5, 1.0], rel=1e-15)


@pytest.mark.parametrize("update_every", [1, 2])
def test_balancer_matches_naive_adam_reference(update_every: int) -> None:
    final = []

    def reference(sequence):
        expected, s = naive_uncertainty(sequence, 0.05)
        final.extend(s)
        return expected

    balancer, expected = check_matches_reference(UncertaintyWeighting(lr=0.05), reference, steps=24,
                                                 update_every=update_every, rel=1e-10, lr=1e-2)
    log_vars = balancer.strategy.log_vars
    assert [log_vars[n] for n in NAMES] == pytest.approx(final, rel=1e-10, abs=1e-12)
    assert max(abs(w - 0.5) for w in expected[-1]) > 0.05


def test_total_is_the_weighted_sum_without_the_regulariser() -> None:
    model, losses = tiny_pinn(2)
    strategy = UncertaintyWeighting(lr=0.1)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-4), strategy)
    terms = losses()
    total = balancer.step(terms)
    assert total.item() == pytest.approx(0.5 * sum(v.item() for v in terms.values()), rel=1e-6)
    reg = strategy.regularizer().item()  # 0.5 sum s(1): s moved after the first update
    assert reg != 0.0
    s1 = strategy.log_vars
    terms = losses()
    total = balancer.step(terms)
    w = balancer.weights  # the weights applied at this step: 0.5 exp(-s(1))
    assert w == pytest.approx({n: 0.5 * math.exp(-v) for n, v in s1.items()}, rel=1e-6)
    assert total.item() == pytest.approx(sum(w[n] * v.item() for n, v in terms.items()), rel=1e-6)
    assert total.item() != pytest.approx(sum(w[n] * v.item() for n, v in terms.items()) + reg, rel=1e-6)


@pytest.mark.parametrize("optimizer,lr", [("Adam", 0.05), ("SGD", 1.0)])
def test_log_vars_converge_to_log_of_constant_losses(optimizer: str, lr: float) -> None:
    losses = [0.1, 4.0, 25.0]
    s = UncertaintyWeighting(lr=lr, optimizer=optimizer)
    drive(s, ["a", "b", "c"], [losses] * 1500)
    assert list(s.log_vars.values()) == pytest.approx([math.log(v) for v in losses], abs=1e-3)
    w = s.update(make_record(["a", "b", "c"], losses, update=1500))
    assert w.tolist() == pytest.approx([0.5 / v for v in losses], rel=2e-3)


def test_terms_that_come_and_go() -> None:
    s = UncertaintyWeighting(lr=0.1, optimizer="SGD")
    drive(s, ["a", "b"], [[4.0, 4.0]])
    w = s.update(make_record(["b", "c"], [4.0, 1.0], update=1))  # "a" absent: its s stays put
    assert s.log_vars["a"] == pytest.approx(0.15) and s.log_vars["b"] != pytest.approx(0.15)
    assert w.tolist() == pytest.approx([0.5 * math.exp(-0.15), 0.5])  # "c" starts at s = 0
    assert len(s.optimizer.param_groups) == 3


# ----------------------------------------------------------------------------- numerics (hypothesis)
@settings(max_examples=60, deadline=None)
@given(seq=loss_sequences(min_len=1, max_len=6), dtype=st.sampled_from([torch.float32, F64]),
       optimizer=st.sampled_from(["Adam", "SGD"]), lr=st.sampled_from([1e-3, 1.0, 100.0]))
def test_weights_finite_and_positive_for_extreme_scales(seq, dtype, optimizer, lr) -> None:
    s = UncertaintyWeighting(lr=lr, optimizer=optimizer)
    check_finite_and_positive(s, seq, dtype, feedback=False)
    assert all(math.isfinite(v) for v in s.log_vars.values())
    names = [f"t{i}" for i in range(len(seq[0]))]
    w = s.update(make_record(names, seq[-1], update=len(seq), dtype=dtype))
    assert torch.isfinite(w).all() and (w > 0).all()


@settings(max_examples=30, deadline=None)
@given(seq=loss_sequences(min_terms=2, min_len=1, max_len=6), data=st.data(),
       dtype=st.sampled_from([torch.float32, F64]))
def test_permutation_invariance(seq, data, dtype) -> None:
    perm = data.draw(st.permutations(range(len(seq[0]))))
    # the terms are independent: bit for bit
    check_permutation_invariance(lambda: UncertaintyWeighting(lr=0.1), seq, perm, dtype, exact=True, feedback=False)


def test_runs_on_the_meta_device() -> None:
    check_runs_on_meta_device([UncertaintyWeighting(), UncertaintyWeighting(optimizer="SGD")])


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_bit_identical() -> None:
    full, resumed, _ = check_resume_bit_identical(lambda: UncertaintyWeighting(lr=0.05), n=10, steps_after_save=3)
    sa, sc = full.strategy.state_dict(), resumed.strategy.state_dict()
    assert sa["names"] == sc["names"]
    for n_ in sa["names"]:
        assert torch.equal(sa["log_vars"][n_], sc["log_vars"][n_])
    for key, state in sa["optimizer"]["state"].items():
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[field], sc["optimizer"]["state"][key][field])


def test_state_dict_is_a_copy() -> None:
    s = UncertaintyWeighting(lr=0.1)
    drive(s, ["a"], [[2.0]])
    state = s.state_dict()
    before = state["log_vars"]["a"].clone()
    drive(s, ["a"], [[2.0]] * 3)
    assert torch.equal(state["log_vars"]["a"], before)
    assert state["optimizer"]["state"][0]["step"].item() == 1.0


# ----------------------------------------------------------------------------- training
def test_trains_tiny_pinn_with_adam() -> None:
    check_trains_with_adam(UncertaintyWeighting(), model_seed=6, below=0.1)


def test_trains_tiny_pinn_with_lbfgs() -> None:
    balancer, _ = check_trains_with_lbfgs(UncertaintyWeighting(lr=0.05), model_seed=7, below=0.1)
    assert balancer.strategy.log_vars["pde"] != 0.0  # the s moved although the model used L-BFGS


def test_optimizer_kwargs_is_the_deprecated_name_of_optimizer_options() -> None:
    with pytest.warns(DeprecationWarning, match="optimizer_options"):
        old = UncertaintyWeighting(lr=0.5, optimizer="SGD", optimizer_kwargs={"momentum": 0.9})
    new = UncertaintyWeighting(lr=0.5, optimizer="SGD", optimizer_options={"momentum": 0.9})
    assert old.options() == new.options() == {
        "init_log_var": 0.0, "lr": 0.5, "optimizer": "SGD", "optimizer_options": {"momentum": 0.9},
    }
    sequence = [[1.0, 2.0], [0.5, 3.0], [0.25, 4.0]]
    torch.testing.assert_close(drive(old, ["a", "b"], sequence), drive(new, ["a", "b"], sequence), rtol=0, atol=0)
    with pytest.warns(DeprecationWarning):
        rebuilt = UncertaintyWeighting(lr=0.5, optimizer="SGD", optimizer_kwargs={"momentum": 0.9})
    rebuilt.load_state_dict(new.state_dict())  # a state saved by either form loads into the other
    torch.testing.assert_close(drive(rebuilt, ["a", "b"], [[2.0, 1.0]]), drive(new, ["a", "b"], [[2.0, 1.0]]),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="optimizer_options only"):
        UncertaintyWeighting(optimizer_options={}, optimizer_kwargs={})


def test_a_0_1_0_config_with_optimizer_kwargs_still_builds() -> None:
    model = torch.nn.Linear(1, 1)
    config = {"strategy": "uncertainty", "strategy_options": {"optimizer": "SGD", "optimizer_kwargs": {"momentum": 0.9}}}
    with pytest.warns(DeprecationWarning, match="optimizer_kwargs"):
        balancer = LossBalancer.from_config(torch.optim.Adam(model.parameters()), config)
    exported = balancer.config()["strategy_options"]
    assert exported["optimizer_options"] == {"momentum": 0.9} and "optimizer_kwargs" not in exported


@pytest.mark.parametrize("cls", ["uncertainty", "gradnorm"])
def test_optimizer_options_checked_alike_in_both_learned_strategies(cls) -> None:
    # Same option name, same exception type, same message for the same mistake.
    with pytest.raises(ValueError, match="give the learning rate of the .* as lr=, not in optimizer_options"):
        make_strategy(cls, optimizer_options={"lr": 0.1})
    with pytest.raises(ValueError, match="optimizer_options: cannot build Adam"):
        make_strategy(cls, optimizer_options={"not_an_option": 1})
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer subclass"):
        make_strategy(cls, optimizer="NoSuchOptimizer")
    assert make_strategy(cls, optimizer=torch.optim.SGD).options()["optimizer"] == "SGD"


def test_an_init_log_var_key_naming_no_term_warns_once() -> None:
    """A misspelt key in ``init_log_var`` would silently start its term at s = 0 (LibMTL users
    copy s = -0.5): it warns, once, naming the key and the terms seen; the named terms start
    where asked."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    x = torch.randn(8, 2)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2),
                            UncertaintyWeighting(init_log_var={"clss": -0.5, "reg": -0.5}))

    def losses():
        out = model(x)
        return {"reg": out[:, 0].pow(2).mean(), "cls": out[:, 1].pow(2).mean()}

    with pytest.warns(UserWarning, match=r"init_log_var.*\['clss'\].*\['cls', 'reg'\]"):
        balancer.step(losses())
    assert balancer.weights["reg"] == pytest.approx(0.5 * math.exp(0.5))
    assert balancer.weights["cls"] == pytest.approx(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer.step(losses())
    right = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2),
                         UncertaintyWeighting(init_log_var={"cls": -0.5}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right.step(losses())


def test_an_init_log_var_key_for_a_declared_optional_term_does_not_warn() -> None:
    model = torch.nn.Linear(2, 2)
    x = torch.randn(8, 2)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2),
                            UncertaintyWeighting(init_log_var={"c": 1.0}), terms=["a", "b"], optional=["c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(x)
        balancer.step({"a": out[:, 0].pow(2).mean(), "b": out[:, 1].pow(2).mean()})
