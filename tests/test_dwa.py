"""Tests for lossbalance.strategies.dwa (dynamic weight average, Liu, Johns & Davison 2019)."""
from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lossbalance import LossBalancer
from lossbalance.strategies.base import StepRecord, available_strategies, make_strategy
from lossbalance.strategies.dwa import DWA

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def tiny_pinn(seed: int = 0, dtype: torch.dtype = torch.float32):
    """u'' = -pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0; MLP 1-16-16-1 tanh, 32 points."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).to(dtype)
    x = torch.linspace(0, 1, 32, dtype=dtype).reshape(-1, 1)
    zero, one = torch.zeros(1, 1, dtype=dtype), torch.ones(1, 1, dtype=dtype)

    def losses() -> dict[str, torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        u = model(xi)
        du = torch.autograd.grad(u.sum(), xi, create_graph=True)[0]
        d2u = torch.autograd.grad(du.sum(), xi, create_graph=True)[0]
        return {
            "pde": (d2u + math.pi**2 * torch.sin(math.pi * xi)).pow(2).mean(),
            "left": model(zero).pow(2).sum(),
            "right": model(one).pow(2).sum(),
        }

    return model, losses


def record(names, losses, weights, update, dtype=F64) -> StepRecord:
    return StepRecord(
        tuple(names), torch.tensor(losses, dtype=dtype), torch.tensor(weights, dtype=dtype), update, update, None,
        torch.Generator().manual_seed(0),
    )


def drive(strategy, names, sequence, dtype=F64):
    weights = [1.0] * len(names)
    out = []
    for t, losses in enumerate(sequence):
        new = strategy.update(record(names, losses, weights, t, dtype))
        weights = new.tolist()
        out.append(new)
    return out


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
    model, losses = tiny_pinn(1, F64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    balancer = LossBalancer(opt, DWA(0.5), update_every=update_every, history=100)
    for _ in range(24):
        balancer.step(losses())
    names = ["pde", "left", "right"]
    hist = balancer.history
    sequence = [[h["losses"][n] for n in names] for h in hist if h["step"] % update_every == 0]
    expected = naive_dwa(sequence, 0.5)
    for h in hist:
        assert [h["weights"][n] for n in names] == pytest.approx(expected[h["step"] // update_every], rel=1e-12)
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
    s.update(record(["a", "b"], [1.0, 1.0], [1.0, 1.0], 0))
    s.update(record(["a", "b", "c"], [2.0, 1.0, 5.0], [1.0, 1.0, 1.0], 1))
    w = s.update(record(["a", "b", "c"], [9.0, 9.0, 9.0], [1.0, 1.0, 4.0], 2))
    e = math.e
    # "c" has only one earlier appearance: keeps its weight; a, b: ratios [2, 1]
    assert w.tolist() == pytest.approx([2 * e / (e + 1), 2 / (e + 1), 4.0], rel=1e-12)
    w = s.update(record(["b", "c"], [1.0, 1.0], [1.0, 4.0], 3))  # "a" absent
    # b: L(2)/L(1) = 9; c: 9/5
    z = math.exp(9) + math.exp(1.8)
    assert w.tolist() == pytest.approx([2 * math.exp(9) / z, 2 * math.exp(1.8) / z], rel=1e-12)


# ----------------------------------------------------------------------------- numerics (hypothesis)
loss_value = st.one_of(
    st.just(0.0), st.builds(lambda m, e: m * 10.0**e, st.floats(0.1, 10.0), st.integers(-30, 30))
)


@st.composite
def sequences(draw, min_terms=1):
    k = draw(st.integers(min_terms, 5))
    n = draw(st.integers(3, 6))
    return [draw(st.lists(loss_value, min_size=k, max_size=k)) for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(seq=sequences(), dtype=st.sampled_from([torch.float32, F64]), temperature=st.sampled_from([2.0, 1e-3, 1e3]))
def test_weights_finite_and_positive_for_extreme_scales(seq, dtype, temperature) -> None:
    names = [f"t{i}" for i in range(len(seq[0]))]
    for w in drive(DWA(temperature), names, seq, dtype=dtype):
        assert w.dtype == dtype
        assert torch.isfinite(w).all() and (w > 0).all(), (seq, w)


@settings(max_examples=40, deadline=None)
@given(seq=sequences(min_terms=2), data=st.data(), dtype=st.sampled_from([torch.float32, F64]))
def test_permutation_invariance(seq, data, dtype) -> None:
    k = len(seq[0])
    perm = data.draw(st.permutations(range(k)))
    names = [f"t{i}" for i in range(k)]
    a = drive(DWA(), names, seq, dtype=dtype)
    b = drive(DWA(), [names[p] for p in perm], [[L[p] for p in perm] for L in seq], dtype=dtype)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for wa, wb in zip(a, b):
        torch.testing.assert_close(wa[list(perm)], wb, rtol=rtol, atol=0)


@settings(max_examples=40, deadline=None)
@given(seq=st.lists(st.lists(st.floats(0.01, 100.0), min_size=3, max_size=3), min_size=3, max_size=6),
       powers=st.lists(st.integers(-60, 60), min_size=3, max_size=3))
def test_invariant_to_rescaling_each_term(seq, powers) -> None:
    scaled = [[L[i] * 2.0 ** powers[i] for i in range(3)] for L in seq]
    a = drive(DWA(), ["a", "b", "c"], seq)
    b = drive(DWA(), ["a", "b", "c"], scaled)
    for wa, wb in zip(a, b):
        torch.testing.assert_close(wa, wb, rtol=1e-13, atol=0)


def test_runs_on_the_meta_device() -> None:
    """No data-dependent host reads (.item(), float(), bool() of a tensor) on the update path:
    meta tensors hold no data, so any such read would raise."""
    generator = torch.Generator().manual_seed(0)
    for strategy in [DWA()]:
        for t, names in enumerate([("a", "b"), ("a", "b"), ("a", "b", "c"), ("b", "c"), ("a", "b", "c")]):
            k = len(names)
            rec = StepRecord(names, torch.ones(k, device="meta"), torch.ones(k, device="meta"), t, t, None, generator)
            w = strategy.update(rec)
            assert w.device.type == "meta" and w.shape == (k,)


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_bit_identical() -> None:
    def fresh():
        model, losses = tiny_pinn(5)
        return model, losses, LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), DWA(), update_every=2)

    n = 9
    model_a, losses_a, bal_a = fresh()
    for _ in range(2 * n):
        bal_a.step(losses_a())
    model_b, losses_b, bal_b = fresh()
    for _ in range(n):
        bal_b.step(losses_b())
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "balancer": bal_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model_c, losses_c, bal_c = fresh()
    model_c.load_state_dict(saved["model"])
    bal_c.load_state_dict(saved["balancer"])
    for _ in range(n):
        bal_c.step(losses_c())
    assert bal_a.weights == bal_c.weights
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)


# ----------------------------------------------------------------------------- training
def unweighted(losses) -> float:
    return sum(v.item() for v in losses().values())


def test_trains_tiny_pinn_with_adam() -> None:
    model, losses = tiny_pinn(6)
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), DWA())
    start = unweighted(losses)
    for _ in range(150):
        balancer.step(losses())
    assert unweighted(losses) < 0.1 * start


def test_trains_tiny_pinn_with_lbfgs() -> None:
    model, losses = tiny_pinn(7)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
    balancer = LossBalancer(opt, DWA())
    start = unweighted(losses)
    for _ in range(10):
        assert torch.isfinite(balancer.step(closure=losses))
    assert unweighted(losses) < 0.1 * start
