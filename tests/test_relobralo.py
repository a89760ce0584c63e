"""Tests for lossbalance.strategies.relobralo (ReLoBRaLo, Bischof & Kraus 2021)."""
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
from lossbalance.strategies.numerics import safe_softmax
from lossbalance.strategies.relobralo import ReLoBRaLo


# ----------------------------------------------------------------------------- reference
def naive_relobralo(sequence, alpha, expected_rho, tau, eps, seed, initial=None):
    """Deliberately naive reference (plain floats). Mirrors the documented draws: exactly one
    ``torch.rand((), dtype=float64)`` from the balancer's generator per update, the first included."""
    generator = torch.Generator().manual_seed(seed)
    k = len(sequence[0])
    lam = list(initial or [1.0] * k)
    first = previous = None
    out, rhos = [], []
    for losses in sequence:
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        if first is None:
            first, previous = list(losses), list(losses)
            out.append(list(lam))
            continue
        rho = 1.0 if u < expected_rho else 0.0
        rhos.append(rho)

        def bal(reference):
            ratios = [losses[i] / (tau * reference[i] + eps) for i in range(k)]
            top = max(ratios)
            e = [math.exp(r - top) for r in ratios]
            return [k * v / sum(e) for v in e]

        b0, bp = bal(first), bal(previous)
        lam = [alpha * (rho * lam[i] + (1 - rho) * b0[i]) + (1 - alpha) * bp[i] for i in range(k)]
        previous = list(losses)
        out.append(list(lam))
    return out, rhos


# ----------------------------------------------------------------------------- API
def test_registry_options_and_repr() -> None:
    assert "relobralo" in available_strategies()
    assert ReLoBRaLo.name == "relobralo" and ReLoBRaLo.needs_gradients is False
    s = make_strategy("relobralo", alpha=0.9)
    assert isinstance(s, ReLoBRaLo) and s.alpha == 0.9
    default = ReLoBRaLo()
    assert default.options() == {"alpha": 0.95, "expected_rho": 0.99, "tau": 1.0, "eps": 1e-8, "schedule": "paper"}
    assert ReLoBRaLo(**default.options()).options() == default.options()
    assert repr(default) == "ReLoBRaLo(alpha=0.95, expected_rho=0.99, tau=1.0, eps=1e-08, schedule='paper')"


@pytest.mark.parametrize(
    "kwargs", [{"alpha": 1.5}, {"alpha": -0.1}, {"expected_rho": 1.01}, {"tau": 0.0}, {"tau": math.inf}, {"eps": -1e-8}, {"schedule": "author"}]
)
def test_invalid_options(kwargs) -> None:
    with pytest.raises(ValueError):
        ReLoBRaLo(**kwargs)


# ----------------------------------------------------------------------------- hand-computed numbers
def test_hand_computed_two_terms() -> None:
    # alpha = 0.5, tau = 1, eps = 0, rho always 1 (expected_rho = 1).
    # update 0: L = [1, 1] -> weights stay [1, 1], L(0) = L(prev) = [1, 1]
    # update 1: L = [2, 1]: ratios to L(0) and to L(prev) are both [2, 1];
    #   bal = 2 softmax([2, 1]) = [2e/(e+1), 2/(e+1)] = [1.462117157, 0.537882843]
    #   lambda = 0.5 [1, 1] + 0.5 bal = [1.231058579, 0.768941421]
    # update 2: L = [2, 4]: ratios to L(0) = [2, 4], to L(prev) = [1, 4]
    #   bal(2,1) = 2 softmax([1, 4]) = [2/(1+e^3), 2e^3/(1+e^3)] = [0.094851746, 1.905148254]
    #   lambda = 0.5 lambda(1) + 0.5 bal(2,1) = [0.662955162, 1.337044838]
    s = ReLoBRaLo(alpha=0.5, expected_rho=1.0, eps=0.0)
    out = drive(s, ["a", "b"], [[1.0, 1.0], [2.0, 1.0], [2.0, 4.0]])
    assert out[0].tolist() == [1.0, 1.0]
    torch.testing.assert_close(out[1], torch.tensor([1.231058579, 0.768941421], dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(out[2], torch.tensor([0.662955162, 1.337044838], dtype=F64), rtol=0, atol=1e-9)
    # rho always 0 (expected_rho = 0): update 2 looks back to L(0) = [1, 1] instead of lambda(1)
    #   bal(2,0) = 2 softmax([2, 4]) = [2/(1+e^2), 2e^2/(1+e^2)] = [0.238405844, 1.761594156]
    #   lambda(1) = 0.5 bal(1,0) + 0.5 bal(1,0) = [1.462117157, 0.537882843]
    #   lambda(2) = 0.5 bal(2,0) + 0.5 bal(2,1) = [0.166628795, 1.833371205]
    s = ReLoBRaLo(alpha=0.5, expected_rho=0.0, eps=0.0)
    out = drive(s, ["a", "b"], [[1.0, 1.0], [2.0, 1.0], [2.0, 4.0]])
    torch.testing.assert_close(out[1], torch.tensor([1.462117157, 0.537882843], dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(out[2], torch.tensor([0.166628795, 1.833371205], dtype=F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("update_every", [1, 3])
def test_balancer_matches_naive_reference(update_every: int) -> None:
    """Through LossBalancer on the tiny PINN (float64): every step's weights against the reference,
    with E[rho] = 0.5 so that both lookback branches occur; t-1 is the previous *update*."""
    rhos = []

    def reference(sequence):
        expected, drawn = naive_relobralo(sequence, 0.8, 0.5, 0.5, 1e-8, seed=123)
        rhos.extend(drawn)
        return expected

    strategy = ReLoBRaLo(alpha=0.8, expected_rho=0.5, tau=0.5, eps=1e-8)
    _, expected = check_matches_reference(strategy, reference, steps=36, update_every=update_every, rel=1e-12,
                                          abs=0, lr=1e-2, seed=123)
    assert 0.0 in rhos and 1.0 in rhos  # both branches exercised
    # at least one weight moved far from 1: the test is not vacuous
    assert max(abs(w - 1) for w in expected[-1]) > 0.05


def test_first_update_keeps_the_balancers_initial_weights() -> None:
    model, losses = tiny_pinn(2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    balancer = LossBalancer(opt, ReLoBRaLo(), weights={"pde": 0.1, "left": 10.0, "right": 2.0})
    balancer.step(losses())
    assert balancer.weights == pytest.approx({"pde": 0.1, "left": 10.0, "right": 2.0})
    balancer.step(losses())
    # lambda(t-1) is the weight in use: with rho = 1 the EMA starts from the initial weights
    w = balancer.weights
    assert w["left"] > 5.0 and w["pde"] < 0.5


def test_lambda_prev_is_the_clamped_weight_in_use() -> None:
    seq = [[1.0, 1.0], [1.0, 1e6], [1.0, 1e6]]
    names = ["a", "b"]
    s = ReLoBRaLo(alpha=0.9, expected_rho=1.0, eps=0.0)
    generator = torch.Generator().manual_seed(0)
    s.update(make_record(names, seq[0], [1.0, 1.0], 0, generator=generator))
    w1 = s.update(make_record(names, seq[1], [1.0, 1.0], 1, generator=generator))
    # the balancer clamps b to 1.5; that clamped value is lambda(t-1) of the next update
    w2 = s.update(make_record(names, seq[2], [w1[0].item(), 1.5], 2, generator=generator))
    bal_prev = [1.0, 1.0]  # ratios [1, 1] to the previous losses
    assert w2[1].item() == pytest.approx(0.9 * 1.5 + 0.1 * bal_prev[1], rel=1e-12)


# ----------------------------------------------------------------------------- randomness
def test_random_lookback_reproducible_from_the_balancer_seed() -> None:
    def run(seed: int) -> list[dict[str, float]]:
        model, losses = tiny_pinn(3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        balancer = LossBalancer(opt, ReLoBRaLo(alpha=0.5, expected_rho=0.5), seed=seed, history=50)
        for _ in range(20):
            balancer.step(losses())
        return [h["weights"] for h in balancer.history]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_exactly_one_draw_per_update() -> None:
    model, losses = tiny_pinn(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    balancer = LossBalancer(opt, ReLoBRaLo(), update_every=2, seed=5)
    for _ in range(9):  # updates at steps 0, 2, 4, 6, 8
        balancer.step(losses())
    mirror = torch.Generator().manual_seed(5)
    for _ in range(5):
        torch.rand((), generator=mirror, dtype=torch.float64)
    assert torch.equal(balancer.generator.get_state(), mirror.get_state())
    # the global generator is untouched by the strategy
    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    drive(ReLoBRaLo(), ["a", "b"], [[1.0, 2.0], [2.0, 1.0], [3.0, 1.0]])
    assert torch.equal(before, torch.random.get_rng_state())


# ----------------------------------------------------------------------------- terms that come and go
def test_new_term_keeps_its_weight_and_others_balance_among_themselves() -> None:
    s = ReLoBRaLo(alpha=0.0, eps=0.0)  # alpha = 0: lambda = bal(t, t-1)
    generator = torch.Generator().manual_seed(0)
    s.update(make_record(["a", "b"], [1.0, 1.0], [1.0, 1.0], 0, generator=generator))
    w = s.update(make_record(["a", "b", "c"], [2.0, 1.0, 5.0], [1.0, 1.0, 3.0], 1, generator=generator))
    e = math.e
    assert w.tolist() == pytest.approx([2 * e / (e + 1), 2 / (e + 1), 3.0], rel=1e-12)
    w = s.update(make_record(["a", "c"], [2.0, 10.0], [1.0, 3.0], 2, generator=generator))  # "b" absent
    assert w.tolist() == pytest.approx([2 / (1 + e), 2 * e / (1 + e)], rel=1e-12)  # ratios [1, 2]
    w = s.update(make_record(["a", "b", "c"], [2.0, 3.0, 10.0], [1.0, 1.0, 1.0], 3, generator=generator))
    # "b" compares with its last appearance (update 1, L = 1): ratios [1, 3, 1]
    z = 2 * math.exp(0) + math.exp(2)
    assert w.tolist() == pytest.approx([3 / z, 3 * math.exp(2) / z, 3 / z], rel=1e-12)


# ----------------------------------------------------------------------------- numerics (hypothesis)
@settings(max_examples=60, deadline=None)
@given(seq=loss_sequences(), dtype=st.sampled_from([torch.float32, F64]), expected_rho=st.sampled_from([0.0, 0.5, 1.0]),
       eps=st.sampled_from([0.0, 1e-8]))
def test_weights_finite_and_positive_for_extreme_scales(seq, dtype, expected_rho, eps) -> None:
    check_finite_and_positive(ReLoBRaLo(expected_rho=expected_rho, eps=eps), seq, dtype)


@settings(max_examples=40, deadline=None)
@given(seq=loss_sequences(min_terms=2), data=st.data(), dtype=st.sampled_from([torch.float32, F64]))
def test_permutation_invariance(seq, data, dtype) -> None:
    perm = data.draw(st.permutations(range(len(seq[0]))))
    check_permutation_invariance(lambda: ReLoBRaLo(expected_rho=0.5), seq, perm, dtype, seed=3)


@settings(max_examples=40, deadline=None)
@given(seq=positive_sequences(min_len=2), powers=powers_of_two)
def test_invariant_to_rescaling_each_term(seq, powers) -> None:
    """With eps = 0 the ratios are unchanged by a fixed rescaling of any term (powers of 2: exact)."""
    check_rescaling_invariance(lambda: ReLoBRaLo(expected_rho=0.5, eps=0.0), seq, [2.0**p for p in powers], seed=9)


def test_safe_softmax_guards() -> None:
    for dtype in (torch.float32, F64):
        info = torch.finfo(dtype)
        z = torch.tensor([math.inf, -math.inf, math.nan, 0.0, info.max, -info.max], dtype=dtype)
        w = safe_softmax(z, 6)
        assert torch.isfinite(w).all() and (w > 0).all()
        torch.testing.assert_close(safe_softmax(torch.tensor([1.0, 2.0], dtype=dtype), 2),
                                   2 * torch.softmax(torch.tensor([1.0, 2.0], dtype=dtype), 0))


def test_runs_on_the_meta_device() -> None:
    check_runs_on_meta_device([ReLoBRaLo(), ReLoBRaLo(expected_rho=0.0)])


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_bit_identical() -> None:
    full, resumed, _ = check_resume_bit_identical(lambda: ReLoBRaLo(alpha=0.7, expected_rho=0.5), n=11,
                                                  update_every=2, seed=17)
    assert torch.equal(full.generator.get_state(), resumed.generator.get_state())


# ----------------------------------------------------------------------------- training
def test_trains_tiny_pinn_with_adam() -> None:
    check_trains_with_adam(ReLoBRaLo(), model_seed=6, below=0.1)


def test_trains_tiny_pinn_with_lbfgs() -> None:
    check_trains_with_lbfgs(ReLoBRaLo(), model_seed=7, below=0.1)


# ---------------------------------------------------------------- the authors' schedule (rbischof/relative_balancing)
def _bal(losses, reference, tau=1.0, eps=1e-12):
    """K * softmax(L / (tau * L_ref + eps)) in plain floats."""
    z = [l / (tau * r + eps) for l, r in zip(losses, reference)]
    e = [math.exp(v - max(z)) for v in z]
    return [len(z) * v / sum(e) for v in e]


AUTHORS = [[1.0, 2.0, 3.0], [0.9, 1.0, 2.5], [0.8, 0.9, 2.0], [0.7, 0.95, 1.5]]


def test_authors_schedule_by_hand_without_lookback():
    # train.py: alpha = [1, 0, 0.999, ...], rho = 1 (--rho 1.), lam = l = l0 = 1 at the start.
    s = ReLoBRaLo(alpha=0.999, expected_rho=1.0, tau=1.0, eps=1e-12, schedule="authors")
    out = [w.tolist() for w in drive(s, ["f", "b1", "b2"], AUTHORS)]
    L0, L1, L2, L3 = AUTHORS
    w1 = _bal(L1, L0)                                   # alpha = 0: pure bal(1, 0)
    w2 = [0.999 * a + 0.001 * b for a, b in zip(w1, _bal(L2, L1))]
    w3 = [0.999 * a + 0.001 * b for a, b in zip(w2, _bal(L3, L2))]
    assert out[0] == [1.0, 1.0, 1.0]
    for got, want in zip(out[1:], [w1, w2, w3]):
        assert got == pytest.approx(want, rel=1e-14)
    # the paper's schedule at the same step: alpha already 0.999, the weights barely move
    paper = drive(ReLoBRaLo(alpha=0.999, expected_rho=1.0, eps=1e-12), ["f", "b1", "b2"], AUTHORS[:2])[1].tolist()
    assert paper == pytest.approx([0.999 + 0.001 * b for b in w1], rel=1e-14)
    assert max(abs(a - b) for a, b in zip(paper, out[1])) > 0.1


def test_authors_schedule_takes_the_lookback_reference_from_the_second_step():
    # rho = 0 always: the lookback term is bal(t, 0) with L(0) = the losses of the *second* step
    s = ReLoBRaLo(alpha=0.999, expected_rho=0.0, tau=1.0, eps=1e-12, schedule="authors")
    out = [w.tolist() for w in drive(s, ["f", "b1", "b2"], AUTHORS)]
    L0, L1, L2, L3 = AUTHORS
    assert out[1] == pytest.approx(_bal(L1, L0), rel=1e-14)
    assert out[2] == pytest.approx(_bal(L2, L1), rel=1e-14)  # 0.999 * bal(2, L(0) = L1) + 0.001 * bal(2, 1)
    assert out[3] == pytest.approx([0.999 * a + 0.001 * b for a, b in zip(_bal(L3, L1), _bal(L3, L2))], rel=1e-14)
    paper = drive(ReLoBRaLo(alpha=0.999, expected_rho=0.0, eps=1e-12), ["f", "b1", "b2"], AUTHORS)[3].tolist()
    assert paper == pytest.approx([0.999 * a + 0.001 * b for a, b in zip(_bal(L3, L0), _bal(L3, L2))], rel=1e-14)


def test_authors_schedule_per_term_for_a_term_that_joins_late():
    s = ReLoBRaLo(alpha=0.5, expected_rho=1.0, eps=0.0, schedule="authors")
    drive(s, ["a"], [[1.0], [2.0], [3.0]])
    state = s.state_dict()
    assert set(state["initial"]) == {"a"} and float(state["initial"]["a"]) == 2.0
    generator = torch.Generator().manual_seed(0)
    s.update(make_record(["a", "b"], [4.0, 5.0], [1.0, 1.0], generator=generator))     # b: first update
    w = s.update(make_record(["a", "b"], [4.0, 6.0], [1.0, 1.0], generator=generator)).tolist()  # b: second
    # a: alpha 0.5 on its weight 1; b: alpha 0, pure bal over both terms; K = 2
    bal = _bal([4.0, 6.0], [4.0, 5.0], eps=0.0)
    assert w == pytest.approx([0.5 * 1.0 + 0.5 * bal[0], bal[1]], rel=1e-14)
    assert float(s.state_dict()["initial"]["b"]) == 6.0


def test_bischof2021_preset_uses_the_authors_schedule():
    from lossbalance.config import PRESETS
    assert PRESETS["bischof2021"]["strategy_options"]["schedule"] == "authors"
    model = torch.nn.Linear(1, 1)
    balancer = LossBalancer.from_config(torch.optim.SGD(model.parameters(), lr=0.0), {"preset": "bischof2021"})
    weights = []
    for losses in AUTHORS[:2]:
        out = model(torch.ones(1, 1)).sum() * 0
        balancer.step({name: out + value for name, value in zip(["f", "b1", "b2"], losses)})
        weights.append(list(balancer.weights.values()))
    assert weights[1] == pytest.approx(_bal(AUTHORS[1], AUTHORS[0]), rel=1e-6)
