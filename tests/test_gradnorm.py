"""Tests for GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _strategy_checks import (
    F64, NAMES, assert_finite_positive, check_resume_bit_identical, check_trains_with_adam, check_trains_with_lbfgs,
    make_record, make_stats, norm_record, pinn_losses, py_norm, term_grads, tiny_pinn, train_with_sgd,
)
from lossbalance.balancer import LossBalancer
from lossbalance.strategies.base import make_strategy
from lossbalance.strategies.gradnorm import GradNorm


# ---------------------------------------------------------------- reference (independent of the engine)
def sign(x: float) -> float:
    return (x > 0) - (x < 0)


def reference_run(model, steps, outer_lr, inner, inner_lr, alpha, floor=1e-6, probe=None):
    """Plain-Python GradNorm (paper, closed-form gradient) + the weights' SGD/Adam by hand + outer SGD."""
    params = list(model.parameters())
    probe_index = None if probe is None else [i for i, p in enumerate(params) if any(p is q for q in probe)]
    k = len(NAMES)
    w = [1.0] * k
    initial = None
    m, v, t = [0.0] * k, [0.0] * k, 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    history = []
    for _ in range(steps):
        losses = pinn_losses(model, F64)
        grads = term_grads(losses, params)
        values = [float(losses[n].detach()) for n in NAMES]
        if initial is None:
            initial = list(values)
        if probe_index is None:
            norms = [py_norm(g) for g in grads]
        else:
            norms = [py_norm([g[i] for i in probe_index]) for g in grads]
        ratios = [values[i] / initial[i] for i in range(k)]
        mean_ratio = sum(ratios) / k
        r = [x / mean_ratio for x in ratios]
        G = [w[i] * norms[i] for i in range(k)]
        mean_G = sum(G) / k
        target = [mean_G * r[i] ** alpha for i in range(k)]
        d = [sign(G[i] - target[i]) * norms[i] for i in range(k)]
        if inner == "SGD":
            w = [w[i] - inner_lr * d[i] for i in range(k)]
        else:
            t += 1
            for i in range(k):
                m[i] = b1 * m[i] + (1 - b1) * d[i]
                v[i] = b2 * v[i] + (1 - b2) * d[i] * d[i]
                m_hat = m[i] / (1 - b1**t)
                v_hat = v[i] / (1 - b2**t)
                w[i] = w[i] - inner_lr * m_hat / (math.sqrt(v_hat) + eps)
        w = [max(x, floor) for x in w]
        total = sum(w)
        w = [k * x / total for x in w]
        with torch.no_grad():
            for j, p in enumerate(params):
                p -= outer_lr * sum(w[i] * grads[i][j] for i in range(k))
        history.append(list(w))
    return history


# ---------------------------------------------------------------- hand-computed numbers
def test_hand_numbers_direct_updates_sgd():
    s = GradNorm(alpha=1.5, lr=0.1, optimizer="SGD")
    names = ["a", "b"]
    # update 0: losses are L(0), so r = 1 and target = mean G = 2; G - target = (-1, 1); grad = (-1, 3)
    new = s.update(norm_record([1.0, 3.0], [1.0, 1.0], losses=[2.0, 5.0], names=names))
    w = [1.1, 0.7]
    w = [2 * x / sum(w) for x in w]
    assert new.tolist() == pytest.approx(w, rel=1e-14)
    assert new.sum().item() == pytest.approx(2.0, rel=1e-15)
    # update 1: L~ = (0.5, 1), r = (2/3, 4/3); G = w * (1, 3)
    new = s.update(norm_record([1.0, 3.0], w, losses=[1.0, 5.0], names=names, update=1))
    G = [w[0] * 1.0, w[1] * 3.0]
    mean_G = sum(G) / 2
    target = [mean_G * (2 / 3) ** 1.5, mean_G * (4 / 3) ** 1.5]
    d = [sign(G[0] - target[0]) * 1.0, sign(G[1] - target[1]) * 3.0]
    assert d == [1.0, -3.0]
    w = [w[0] - 0.1 * d[0], w[1] - 0.1 * d[1]]
    w = [2 * x / sum(w) for x in w]
    assert new.tolist() == pytest.approx(w, rel=1e-14)
    state = s.state_dict()
    assert {n: v.item() for n, v in state["initial"].items()} == {"a": 2.0, "b": 5.0}


def test_floor_keeps_weights_positive():
    s = GradNorm(lr=1.0, optimizer="SGD", floor=1e-6)
    new = s.update(norm_record([1.0, 3.0], [1.0, 1.0], losses=[1.0, 1.0], names=["a", "b"]))
    # the step gives (2, -2); -2 is raised to the floor before the renormalisation
    assert new.tolist() == pytest.approx([4 / (2 + 1e-6), 2e-6 / (2 + 1e-6)], rel=1e-14)
    assert (new > 0).all()


def test_alpha_zero_equalises_gradient_norms():
    s = GradNorm(alpha=0.0, lr=0.01, optimizer="SGD")
    w = torch.ones(2, dtype=F64)
    for u in range(400):
        w = s.update(norm_record([1.0, 4.0], w.tolist(), losses=[1.0, 0.3 / (u + 1)], names=["a", "b"],
                                 update=u))
    # fixed point of alpha = 0: w_a * 1 = w_b * 4 with w_a + w_b = 2, up to the step size
    assert w.tolist() == pytest.approx([1.6, 0.4], abs=0.05)


def test_term_appearing_later_gets_its_own_initial_loss():
    s = GradNorm(lr=0.1, optimizer="SGD")
    s.update(norm_record([1.0, 2.0], [1.0, 1.0], losses=[4.0, 4.0], names=["a", "b"]))
    new = s.update(norm_record([1.0, 2.0, 2.0], [1.0, 1.0, 1.0], losses=[2.0, 4.0, 8.0], names=["a", "b", "c"],
                               update=1))
    # L~ = (0.5, 1, 1): c's L(0) is its first value; r = (0.6, 1.2, 1.2)
    G = [1.0, 2.0, 2.0]
    mean_G = 5 / 3
    r = [0.5 / (2.5 / 3), 1 / (2.5 / 3), 1 / (2.5 / 3)]
    d = [sign(G[i] - mean_G * r[i] ** 1.5) * G[i] for i in range(3)]
    w = [1 - 0.1 * x for x in d]
    w = [3 * x / sum(w) for x in w]
    assert new.tolist() == pytest.approx(w, rel=1e-14)
    assert s.state_dict()["initial"]["c"].item() == 8.0


def test_zero_losses_and_norms_never_nan():
    s = GradNorm()
    # L(0) = 0 for a: L~_a = 1 until a becomes positive, and then its first positive value is L(0)
    new = s.update(norm_record([0.0, 1.0], [1.0, 1.0], losses=[0.0, 1.0], names=["a", "b"]))
    assert torch.isfinite(new).all() and (new > 0).all()
    new = s.update(norm_record([0.0, 0.0], new.tolist(), losses=[0.0, 0.0], names=["a", "b"], update=1))
    assert torch.isfinite(new).all() and (new > 0).all()
    new = s.update(norm_record([2.0, 1.0], new.tolist(), losses=[3.0, 0.5], names=["a", "b"], update=2))
    assert torch.isfinite(new).all() and (new > 0).all()
    assert s.state_dict()["initial"]["a"].item() == 3.0
    new = s.update(norm_record([float("inf"), 1.0], new.tolist(), losses=[1.0, 1.0], names=["a", "b"],
                               update=3))
    assert torch.isfinite(new).all() and (new > 0).all()


@pytest.mark.parametrize("inner,inner_lr", [("SGD", 1e-4), ("SGD", 0.5), ("Adam", 0.025)])
def test_balancer_matches_naive_reference(inner, inner_lr):
    outer_lr, steps = 1e-3, 4
    strategy = GradNorm(alpha=1.5, lr=inner_lr, optimizer=inner)
    model, ref, got = train_with_sgd(strategy, model_seed=0, steps=steps, lr=outer_lr)
    expected = reference_run(ref, steps, outer_lr, inner, inner_lr, 1.5)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-10)
        assert sum(g) == pytest.approx(3.0, rel=1e-13)
    assert len({tuple(g) for g in got}) == steps          # the weights move on every update
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_probe_is_the_shared_layer_W():
    # probe: the last hidden layer (model[2]), the paper's W
    _, ref, got = train_with_sgd(GradNorm(lr=1e-3, optimizer="SGD"), model_seed=2, steps=3, probe_layer=2)
    expected = reference_run(ref, 3, 1e-3, "SGD", 1e-3, 1.5, probe=list(ref[2].parameters()))
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-10)


def test_model_grad_is_only_the_weighted_sum():
    model, losses = tiny_pinn(3, F64, width=8)
    bal = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), GradNorm())
    for _ in range(2):
        bal.step(losses())
    bal.backward(losses())                                 # an update, no optimizer step
    w = bal.weights
    grads = term_grads(losses(), list(model.parameters()))
    for j, p in enumerate(model.parameters()):
        expected = sum(w[n] * grads[i][j] for i, n in enumerate(NAMES))
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(exponents=st.lists(st.integers(-30, 30), min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float32, F64]), seed=st.integers(0, 2**16),
       inner=st.sampled_from(["Adam", "SGD"]), alpha=st.sampled_from([0.0, 0.12, 1.5, 3.0]))
def test_weights_finite_positive_any_scale(exponents, dtype, seed, inner, alpha):
    k = len(exponents)
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([10.0**e for e in exponents], dtype=F64)
    s = GradNorm(alpha, optimizer=inner, lr=0.025 if inner == "Adam" else 1.0)
    weights = torch.ones(k, dtype=dtype)
    names = [f"t{i}" for i in range(k)]
    for u in range(3):
        rows = (torch.randn(k, 7, generator=gen, dtype=F64) * scale[:, None]).to(dtype)
        losses = (scale * torch.rand(k, generator=gen, dtype=F64) ** (u + 1)).to(dtype)
        weights = s.update(make_record(names, losses, weights, u, grads=make_stats(rows, [4, 3])))
        assert_finite_positive(weights, dtype, shape=(k,))
        assert weights.sum().item() == pytest.approx(k, rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(2, 5), data=st.data())
def test_permutation_invariance(seed, k, data):
    perm = data.draw(st.permutations(range(k)))
    idx = torch.tensor(perm)
    gen = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(k)]
    a, b = GradNorm(), GradNorm()
    wa = wb = torch.ones(k, dtype=F64)
    for u in range(3):
        rows = torch.randn(k, 6, generator=gen, dtype=F64) * torch.exp(2 * torch.randn(k, 1, generator=gen, dtype=F64))
        losses = torch.rand(k, generator=gen, dtype=F64)
        wa = a.update(make_record(names, losses, wa, u, grads=make_stats(rows, [3, 3])))
        wb = b.update(make_record([names[i] for i in perm], losses[idx], wb, u, grads=make_stats(rows[idx], [3, 3])))
        torch.testing.assert_close(wb, wa[idx], rtol=1e-12, atol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 4), data=st.data())
def test_invariant_to_each_terms_loss_unit(seed, k, data):
    # L~_i = L_i / L_i(0): multiplying a term's loss values (not its gradient) by a constant changes nothing
    units = data.draw(st.lists(st.integers(-20, 20), min_size=k, max_size=k))
    c = torch.tensor([2.0**e for e in units], dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(k)]
    a, b = GradNorm(), GradNorm()
    wa = wb = torch.ones(k, dtype=F64)
    for u in range(3):
        stats = make_stats(torch.randn(k, 5, generator=gen, dtype=F64), [2, 3])
        losses = torch.rand(k, generator=gen, dtype=F64)
        wa = a.update(make_record(names, losses, wa, u, grads=stats))
        wb = b.update(make_record(names, losses * c, wb, u, grads=stats))
        torch.testing.assert_close(wa, wb, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- API and state
def test_registry_options_repr_and_validation():
    s = make_strategy("gradnorm", alpha=0.5, optimizer="SGD", optimizer_options={"momentum": 0.9})
    assert isinstance(s, GradNorm) and s.needs_gradients and s.name == "gradnorm"
    assert repr(GradNorm(**s.options())) == repr(s)
    assert GradNorm().options()["lr"] == 0.025 and GradNorm().alpha == 1.5
    assert GradNorm().options()["optimizer"] == "Adam"            # plain data for config export
    assert GradNorm(optimizer=torch.optim.SGD).options()["optimizer"] == "SGD"
    assert repr(GradNorm()) == repr(GradNorm(**GradNorm().options()))
    for bad in (dict(alpha=-1.0), dict(lr=0.0), dict(floor=0.0), dict(floor=1.0), dict(over="all"),
                dict(optimizer=torch.optim.LBFGS), dict(optimizer_options={"lr": 1.0}),
                dict(optimizer_options={"not_an_option": 1}), dict(optimizer="NoSuchOptimizer"),
                dict(optimizer=torch.nn.Linear)):
        with pytest.raises(ValueError):
            GradNorm(**bad)
    with pytest.raises(RuntimeError):
        GradNorm().update(make_record(["a"], torch.ones(1), torch.ones(1)))
    with pytest.raises(KeyError):
        GradNorm().load_state_dict({"initial": {}})


def test_state_dict_round_trip_bit_identical():
    def loaded(balancer):
        # a state loaded but not yet used round-trips as well
        assert balancer.strategy.state_dict()["order"] == NAMES

    _, _, saved = check_resume_bit_identical(lambda: GradNorm(optimizer_options={"betas": (0.8, 0.99)}), n=5,
                                             model_seed=1, steps_after_save=3, on_load=loaded)
    assert set(saved["balancer"]["strategy"]) == {"initial", "order", "optimizer"}


def test_empty_state_round_trip():
    s = GradNorm()
    state = s.state_dict()
    assert state == {"initial": {}, "order": [], "optimizer": None}
    t = GradNorm()
    t.load_state_dict(state)
    new = t.update(norm_record([1.0, 2.0], [1.0, 1.0], losses=[1.0, 1.0], names=["a", "b"]))
    assert torch.isfinite(new).all()


# ---------------------------------------------------------------- training
def test_trains_pinn_adam():
    bal = check_trains_with_adam(GradNorm(), model_seed=0, below=0.2)
    w = bal.weights
    assert all(math.isfinite(x) and x > 0 for x in w.values())
    assert sum(w.values()) == pytest.approx(3.0, rel=1e-5)


def test_weights_train_under_lbfgs():
    _, seen = check_trains_with_lbfgs(GradNorm(), model_seed=0, below=0.5)
    assert len({tuple(w.values()) for w in seen}) == 10       # a new weight vector on every step
    assert all(sum(w.values()) == pytest.approx(3.0, rel=1e-5) for w in seen)
    assert all(x > 0 for x in seen[-1].values())
