"""Tests for lossbalance.strategies.softadapt (SoftAdapt, Heydari, Thompson & Mehmood 2019)."""
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
from lossbalance.strategies.softadapt import SoftAdapt

VARIANTS = ["difference", "normalized", "loss_weighted", "ratio"]


# ----------------------------------------------------------------------------- reference
def naive_softadapt(sequence, variant, beta, normalize_to_k=True, eps=1e-8):
    """Deliberately naive reference in plain floats."""
    k = len(sequence[0])
    lam, previous, out = [1.0] * k, None, []
    for losses in sequence:
        if previous is not None:
            s = [losses[i] - previous[i] for i in range(k)]
            if variant == "difference":
                z = [beta * v for v in s]
            elif variant == "normalized":
                total = sum(abs(v) for v in s)
                z = [beta * v / total if total > 0 else 0.0 for v in s]
            elif variant == "loss_weighted":
                z = [math.log((losses[i] + previous[i]) / 2) + beta * s[i] for i in range(k)]
            else:
                z = [beta * losses[i] / (previous[i] + eps) for i in range(k)]
            top = max(z)
            e = [math.exp(v - top) for v in z]
            c = k if normalize_to_k else 1
            lam = [c * v / sum(e) for v in e]
        previous = list(losses)
        out.append(list(lam))
    return out


# ----------------------------------------------------------------------------- API
def test_registry_options_and_repr() -> None:
    assert "softadapt" in available_strategies()
    assert SoftAdapt.name == "softadapt" and SoftAdapt.needs_gradients is False
    assert isinstance(make_strategy("softadapt", variant="normalized"), SoftAdapt)
    default = SoftAdapt()
    assert default.options() == {"beta": 0.1, "variant": "difference", "normalize_to_k": True, "eps": 1e-8}
    assert SoftAdapt(**default.options()).options() == default.options()
    assert repr(default) == "SoftAdapt(beta=0.1, variant='difference', normalize_to_k=True, eps=1e-08)"
    assert SoftAdapt(variant="ratio").beta == 1.0  # PhysicsNeMo has no beta
    assert SoftAdapt(variant="loss_weighted").beta == 0.1
    assert SoftAdapt.physicsnemo().options() == {"beta": 1.0, "variant": "ratio", "normalize_to_k": True, "eps": 1e-8}


@pytest.mark.parametrize("kwargs", [{"variant": "slopes"}, {"beta": math.nan}, {"beta": math.inf}, {"eps": -1.0}])
def test_invalid_options(kwargs) -> None:
    with pytest.raises(ValueError):
        SoftAdapt(**kwargs)


# ----------------------------------------------------------------------------- hand-computed numbers
# L(0) = [1, 2, 4], L(1) = [3, 1, 4]: s = [2, -1, 0]
HAND = {
    # 3 softmax(0.1 s) = 3 [e^.2, e^-.1, 1] / (e^.2 + e^-.1 + 1)
    ("difference", True): [1.1720814998094473, 0.868299331182794, 0.9596191690077591],
    ("difference", False): [0.3906938332698157, 0.28943311039426467, 0.3198730563359197],
    # sum |s| = 3: 3 softmax(0.1 [2/3, -1/3, 0])
    ("normalized", True): [1.0562099429773355, 0.9556982777075204, 0.988091779315144],
    # f = (L(1) + L(0)) / 2 = [2, 1.5, 4]: 3 f exp(0.1 s) / sum(f exp(0.1 s))
    ("loss_weighted", True): [0.9395331580726806, 0.5220174618261587, 1.5384493801011605],
    # beta = 1, eps = 0: 3 softmax([3, 0.5, 1])
    ("ratio", True): [2.4642270583953776, 0.20227607469735878, 0.3334968669072634],
}


@pytest.mark.parametrize("variant,normalize", list(HAND))
def test_hand_computed(variant: str, normalize: bool) -> None:
    s = SoftAdapt(variant=variant, normalize_to_k=normalize, eps=0.0)
    out = drive(s, ["a", "b", "c"], [[1.0, 2.0, 4.0], [3.0, 1.0, 4.0]])
    assert out[0].tolist() == [1.0, 1.0, 1.0]  # first update: no history, current weights
    torch.testing.assert_close(out[1], torch.tensor(HAND[variant, normalize], dtype=F64), rtol=1e-12, atol=0)
    assert out[1].sum().item() == pytest.approx(3.0 if normalize else 1.0, rel=1e-12)


def test_ratio_variant_matches_physicsnemo_form() -> None:
    """PhysicsNeMo: exp(L/(prev + eps) - max(L/prev)) * K / (sum + eps)."""
    seq = [[0.3, 2.0, 5.0], [0.2, 2.5, 1.0], [0.25, 2.0, 1.5]]
    out = drive(SoftAdapt.physicsnemo(), ["a", "b", "c"], seq)
    eps = 1e-8
    for t in (1, 2):
        cur, prev = seq[t], seq[t - 1]
        normalizer = max(c / p for c, p in zip(cur, prev))
        lam = [math.exp(c / (p + eps) - normalizer) for c, p in zip(cur, prev)]
        want = [3 * v / (sum(lam) + eps) for v in lam]
        assert out[t].tolist() == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("update_every", [1, 2])
def test_balancer_matches_naive_reference(variant: str, update_every: int) -> None:
    _, expected = check_matches_reference(SoftAdapt(2.0, variant=variant),
                                          lambda seq: naive_softadapt(seq, variant, 2.0),
                                          steps=20, update_every=update_every, rel=1e-11)
    assert max(abs(w - 1) for w in expected[-1]) > 1e-3  # the weights did move


def test_first_update_keeps_initial_weights() -> None:
    model, losses = tiny_pinn(2)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), SoftAdapt(),
                            weights={"pde": 0.5, "left": 3.0, "right": 1.0})
    balancer.step(losses())
    assert balancer.weights == pytest.approx({"pde": 0.5, "left": 3.0, "right": 1.0})
    balancer.step(losses())
    assert sum(balancer.weights.values()) == pytest.approx(3.0, rel=1e-6)  # normalize_to_k


def test_normalized_constant_losses_give_equal_weights() -> None:
    out = drive(SoftAdapt(variant="normalized", eps=0.0), ["a", "b"], [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    assert out[-1].tolist() == [1.0, 1.0]


def test_new_term_keeps_its_weight() -> None:
    s = SoftAdapt(1.0)
    s.update(make_record(["a", "b"], [1.0, 1.0], [1.0, 1.0], 0))
    w = s.update(make_record(["a", "b", "c"], [2.0, 1.0, 7.0], [1.0, 1.0, 4.0], 1))
    e = math.e
    assert w.tolist() == pytest.approx([2 * e / (e + 1), 2 / (e + 1), 4.0], rel=1e-12)
    w = s.update(make_record(["b", "c"], [1.0, 8.0], [1.0, 4.0], 2))  # "a" absent; "c": s = 1
    assert w.tolist() == pytest.approx([2 / (e + 1), 2 * e / (e + 1)], rel=1e-12)


# ----------------------------------------------------------------------------- numerics (hypothesis)
@settings(max_examples=80, deadline=None)
@given(seq=loss_sequences(), dtype=st.sampled_from([torch.float32, F64]), variant=st.sampled_from(VARIANTS),
       beta=st.sampled_from([0.1, 1.0, 100.0, -5.0]), normalize=st.booleans(), eps=st.sampled_from([0.0, 1e-8]))
def test_weights_finite_and_positive_for_extreme_scales(seq, dtype, variant, beta, normalize, eps) -> None:
    check_finite_and_positive(SoftAdapt(beta, variant=variant, normalize_to_k=normalize, eps=eps), seq, dtype)


@settings(max_examples=40, deadline=None)
@given(seq=loss_sequences(min_terms=2), data=st.data(), variant=st.sampled_from(VARIANTS),
       dtype=st.sampled_from([torch.float32, F64]))
def test_permutation_invariance(seq, data, variant, dtype) -> None:
    perm = data.draw(st.permutations(range(len(seq[0]))))
    check_permutation_invariance(lambda: SoftAdapt(variant=variant), seq, perm, dtype)


@settings(max_examples=40, deadline=None)
@given(seq=positive_sequences(min_len=2), powers=powers_of_two)
def test_ratio_invariant_to_rescaling_each_term(seq, powers) -> None:
    check_rescaling_invariance(lambda: SoftAdapt(variant="ratio", eps=0.0), seq, [2.0**p for p in powers])


@settings(max_examples=40, deadline=None)
@given(seq=positive_sequences(min_len=2), power=st.integers(-60, 60))
def test_normalized_invariant_to_a_common_rescaling(seq, power) -> None:
    check_rescaling_invariance(lambda: SoftAdapt(variant="normalized"), seq, [2.0**power] * 3)


def test_runs_on_the_meta_device() -> None:
    check_runs_on_meta_device([SoftAdapt(variant=v) for v in VARIANTS])


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("variant", ["difference", "loss_weighted"])
def test_state_dict_round_trip_bit_identical(variant: str) -> None:
    check_resume_bit_identical(lambda: SoftAdapt(variant=variant), n=10)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("variant", ["difference", "ratio"])
def test_trains_tiny_pinn_with_adam(variant: str) -> None:
    check_trains_with_adam(SoftAdapt(variant=variant), model_seed=6, below=0.1)


def test_trains_tiny_pinn_with_lbfgs() -> None:
    check_trains_with_lbfgs(SoftAdapt(), model_seed=7, below=0.1)


# ---------------------------------------------------------------- PINN loss scales (the documented trap)
# Losses as a PINN trained with Adam gives them at the start: O(1e2..1e4), moving by hundreds and
# oscillating between updates.
PINN_SCALE = [[4.0e3, 9.0e2], [3.0e3, 1.2e3], [3.4e3, 4.0e2], [2.2e3, 1.1e3], [2.6e3, 3.0e2], [1.5e3, 6.0e2]]


def test_default_saturates_on_pinn_scale_losses():
    # What the docstring warns about: beta * s = 0.1 * (hundreds) saturates the softmax, and a
    # weight flips between K = 2 and the smallest normal float32 from one update to the next.
    bc = [float(w[1]) for w in drive(SoftAdapt(), ["pde", "bc"], PINN_SCALE, dtype=torch.float32)]
    assert bc[1::2] == pytest.approx([2.0] * 3) and max(bc[2::2]) < 1e-37


@pytest.mark.parametrize("strategy, low, high", [
    (SoftAdapt(variant="ratio"), 0.1, 1.9),  # K softmax(L(t) / L(t-1)): ratios 0.27 .. 2.75 here
    (SoftAdapt(1.0, variant="normalized"), 2 / (1 + math.e ** 2), 2 * math.e ** 2 / (1 + math.e ** 2)),
])
def test_the_documented_fixes_keep_the_weights_bounded(strategy, low, high):
    weights = torch.stack(drive(strategy, ["pde", "bc"], PINN_SCALE, dtype=torch.float32))
    assert bool(((weights >= low) & (weights <= high)).all()), weights


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4).flatmap(lambda k: st.lists(
    st.lists(st.floats(1e2, 1e4), min_size=k, max_size=k), min_size=2, max_size=6)), st.floats(0.1, 3.0))
def test_normalized_weights_differ_by_at_most_exp_2_beta(sequence, beta):
    # normalized slopes s_i / sum_j |s_j| lie in [-1, 1]: logits within [-beta, beta]
    for weights in drive(SoftAdapt(beta, variant="normalized"), [f"t{i}" for i in range(len(sequence[0]))], sequence):
        assert float(weights.max() / weights.min()) <= math.exp(2 * beta) * (1 + 1e-12)
        assert float(weights.sum()) == pytest.approx(len(weights), rel=1e-12)
