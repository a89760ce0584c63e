"""Tests for lossbalance.strategies.dwa (dynamic weight average, Liu, Johns & Davison 2019)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _strategy_checks import (
    F64, check_finite_and_positive, check_matches_reference, check_permutation_invariance,
    check_rescaling_invariance, check_resume_bit_identical, check_runs_on_meta_device, check_trains_with_adam,
    check_trains_with_lbfgs, drive, loss_sequences, make_record, positive_sequences, powers_of_two, tiny_pinn,
)
from lossbalance import LossBalancer
from lossbalance.strategies.base import available_strategies, make_strategy
from lossbalance.strategies.dwa import DWA


# ----------------------------------------------------------------------------- reference
def naive_dwa(sequence, temperature=2.0):
    """Deliberately naive reference (LibMTL's form on per-update losses), plain floats."""
    k = len(sequence[0])
    out = []
    for t in range(len(sequence)):
        if t < 2:
            out.append([1.0] * k)
            continue
        w = [sequence[t - 1][i] / sequence[t - 2][i] for i in range(k)]
        e = [math.exp(v / temperature) for v in w]
        out.append([k * v / sum(e) for v in e])
    return out


# ----------------------------------------------------------------------------- API
def test_registry_options_and_repr() -> None:
    assert "dwa" in available_strategies()
    assert DWA.name == "dwa" and DWA.needs_gradients is False
    assert make_strategy("dwa", temperature=1.0).temperature == 1.0
    assert DWA().options() == {"temperature": 2.0}
    assert DWA(**DWA(0.5).options()).options() == {"temperature": 0.5}
    assert repr(DWA()) == "DWA(temperature=2.0)"


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_invalid_temperature(temperature: float) -> None:
    with pytest.raises(ValueError):
        DWA(temperature)


# ----------------------------------------------------------------------------- hand-computed numbers
def test_hand_computed() -> None:
    # L(0) = [1, 1], L(1) = [0.5, 1], L(2) = [0.5, 0.25], L(3) = anything
    # updates 0 and 1: weights stay [1, 1]
    # update 2: w = L(1)/L(0) = [0.5, 1]; 2 softmax(w / 2) = 2 [1, e^.25] / (1 + e^.25)
    #   = [0.875646998, 1.124353002]
    # update 3: w = L(2)/L(1) = [1, 0.25]; 2 softmax([0.5, 0.125]) = 2 [e^.375, 1] / (1 + e^.375)
    #   = [1.185333200, 0.814666800]
    out = drive(DWA(), ["a", "b"], [[1.0, 1.0], [0.5, 1.0], [0.5, 0.25], [7.0, 0.001]])
    assert out[0].tolist() == [1.0, 1.0] and out[1].tolist() == [1.0, 1.0]
    torch.testing.assert_close(out[2], torch.tensor([0.875646998, 1.124353002], dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(out[3], torch.tensor([1.185333200, 0.814666800], dtype=F64), rtol=0, atol=1e-9)


def test_one_update_of_lag() -> None:
    """The weights of update t do not depend on L(t)."""
    base = [[1.0, 2.0, 3.0], [0.5, 2.5, 3.0], [0.4, 2.0, 1.0]]
    a = drive(DWA(), ["a", "b", "c"], base + [[1.0, 1.0, 1.0]])
    b = drive(DWA(), ["a", "b", "c"], base + [[1e6, 1e-6, 0.0]])
    assert torch.equal(a[-1], b[-1])


@pytest.mark.parametrize("update_every", [1, 3])
def test_balancer_matches_naive_reference(update_every: int) -> None:
    _, expected = check_matches_reference(DWA(0.5), lambda seq: naive_dwa(seq, 0.5), steps=24,
                                          update_every=update_every, rel=1e-12)
    assert max(abs(w - 1) for w in expected[-1]) > 1e-3


def test_first_two_updates_keep_initial_weights() -> None:
    model, losses = tiny_pinn(2)
    initial = {"pde": 0.5, "left": 3.0, "right": 1.0}
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), DWA(), weights=initial)
    for _ in range(2):
        balancer.step(losses())
        assert balancer.weights == pytest.approx(initial)
    balancer.step(losses())
    assert sum(balancer.weights.values()) == pytest.approx(3.0, rel=1e-6)


def test_terms_that_come_and_go() -> None:
    s = DWA(1.0)
    s.update(make_record(["a", "b"], [1.0, 1.0], [1.0, 1.0], 0))
    s.update(make_record(["a", "b", "c"], [2.0, 1.0, 5.0], [1.0, 1.0, 1.0], 1))
    w = s.update(make_record(["a", "b", "c"], [9.0, 9.0, 9.0], [1.0, 1.0, 4.0], 2))
    e = math.e
    # "c" has only one earlier appearance: keeps its weight; a, b: ratios [2, 1]
    assert w.tolist() == pytest.approx([2 * e / (e + 1), 2 / (e + 1), 4.0], rel=1e-12)
    w = s.update(make_record(["b", "c"], [1.0, 1.0], [1.0, 4.0], 3))  # "a" absent
    # b: L(2)/L(1) = 9; c: 9/5
    z = math.exp(9) + math.exp(1.8)
    assert w.tolist() == pytest.approx([2 * math.exp(9) / z, 2 * math.exp(1.8) / z], rel=1e-12)


# ----------------------------------------------------------------------------- numerics (hypothesis)
@settings(max_examples=60, deadline=None)
@given(seq=loss_sequences(min_len=3, max_len=6), dtype=st.sampled_from([torch.float32, F64]),
       temperature=st.sampled_from([2.0, 1e-3, 1e3]))
def test_weights_finite_and_positive_for_extreme_scales(seq, dtype, temperature) -> None:
    check_finite_and_positive(DWA(temperature), seq, dtype)


@settings(max_examples=40, deadline=None)
@given(seq=loss_sequences(min_terms=2, min_len=3, max_len=6), data=st.data(),
       dtype=st.sampled_from([torch.float32, F64]))
def test_permutation_invariance(seq, data, dtype) -> None:
    check_permutation_invariance(DWA, seq, data.draw(st.permutations(range(len(seq[0])))), dtype)


@settings(max_examples=40, deadline=None)
@given(seq=positive_sequences(min_len=3), powers=powers_of_two)
def test_invariant_to_rescaling_each_term(seq, powers) -> None:
    check_rescaling_invariance(DWA, seq, [2.0**p for p in powers])


def test_runs_on_the_meta_device() -> None:
    check_runs_on_meta_device([DWA()])


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_bit_identical() -> None:
    check_resume_bit_identical(DWA, n=9, update_every=2)


# ----------------------------------------------------------------------------- training
def test_trains_tiny_pinn_with_adam() -> None:
    check_trains_with_adam(DWA(), model_seed=6, below=0.1)


def test_trains_tiny_pinn_with_lbfgs() -> None:
    check_trains_with_lbfgs(DWA(), model_seed=7, below=0.1)
