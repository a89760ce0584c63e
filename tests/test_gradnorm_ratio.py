"""Tests for GradNormRatio (gradient-norm balancing, Wang et al. 2023 / jaxpi)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _strategy_checks import (
    F64, NAMES, assert_finite_positive, check_resume_bit_identical, check_trains_with_adam, check_trains_with_lbfgs,
    make_record, make_stats, norm_record, pinn_losses, py_norm, term_grads, train_with_sgd,
)
from lossbalance.strategies.base import make_strategy
from lossbalance.strategies.gradnorm_ratio import GradNormRatio


# ---------------------------------------------------------------- hand-computed numbers
def test_hand_numbers_sum_mean():
    # ||g|| = 3, 4: sum 7, mean 3.5; weights start at 1; EMA 0.1 on the new value.
    new = GradNormRatio().update(norm_record([3.0, 4.0]))
    assert new.tolist() == pytest.approx([0.9 + 0.1 * 7 / 3, 0.9 + 0.1 * 7 / 4], rel=1e-15)
    new = GradNormRatio(normalize="mean").update(norm_record([3.0, 4.0]))
    assert new.tolist() == pytest.approx([0.9 + 0.1 * 3.5 / 3, 0.9 + 0.1 * 3.5 / 4], rel=1e-15)
    # alpha = 1: no smoothing, the weighted norms are all equal to the sum
    new = GradNormRatio(alpha=1.0).update(norm_record([1.0, 2.0, 5.0], [3.0, 3.0, 3.0]))
    assert new.tolist() == pytest.approx([8.0, 4.0, 1.6], rel=1e-15)
    # the EMA starts from the current weights
    new = GradNormRatio(alpha=0.5).update(norm_record([1.0, 3.0], [2.0, 0.5]))
    assert new.tolist() == pytest.approx([0.5 * 2 + 0.5 * 4, 0.5 * 0.5 + 0.5 * 4 / 3], rel=1e-15)


def test_jaxpi_preset_and_eps():
    s = GradNormRatio.jaxpi()
    assert s.options() == {"normalize": "mean", "alpha": 0.1, "over": "scope", "eps": 1e-5}
    new = s.update(norm_record([3.0, 4.0]))
    mean = 3.5
    assert new.tolist() == pytest.approx(
        [0.9 + 0.1 * mean / (3 + 1e-5 * mean), 0.9 + 0.1 * mean / (4 + 1e-5 * mean)], rel=1e-15
    )


def test_over_shared_uses_common_tensors():
    # two tensors of 2 and 1 entries; term 1 may train only the first tensor
    rows = torch.tensor([[3.0, 4.0, 12.0], [6.0, 8.0, 0.0]], dtype=F64)
    stats = make_stats(rows, [2, 1], scope=[[True, True], [True, False]])
    rec = make_record(["a", "b"], torch.ones(2, dtype=F64), torch.ones(2, dtype=F64), grads=stats)
    scope = GradNormRatio(alpha=1.0).update(rec)          # norms 13 and 10 over each scope
    assert scope.tolist() == pytest.approx([23 / 13, 23 / 10], rel=1e-15)
    shared = GradNormRatio(alpha=1.0, over="shared").update(rec)  # norms 5 and 10 over tensor 0
    assert shared.tolist() == pytest.approx([15 / 5, 15 / 10], rel=1e-15)


def test_zero_and_nonfinite_norms_keep_weight():
    new = GradNormRatio().update(norm_record([0.0, 2.0], [1.5, 1.0]))
    assert new[0].item() == 1.5                       # zero gradient: weight kept
    assert new[1].item() == pytest.approx(0.9 + 0.1 * 2 / 2)
    new = GradNormRatio(normalize="mean", eps=1e-5).update(norm_record([0.0, 0.0], [1.5, 0.7]))
    assert new.tolist() == [1.5, 0.7]
    new = GradNormRatio().update(norm_record([float("inf"), 2.0], [1.5, 0.7]))
    assert new.tolist() == [1.5, 0.7]                 # inf norm: sum is inf, every ratio unusable
    new = GradNormRatio().update(norm_record([1e-320, 2.0], [1.5, 0.7]))  # ratio overflows
    assert torch.isfinite(new).all() and new[0].item() == 1.5


def _reference_run(model, steps, lr, update_every, normalize, alpha):
    """Plain-Python GradNormRatio + SGD on a copy of the model: weights after every step."""
    params = list(model.parameters())
    w = [1.0] * len(NAMES)
    history = []
    for step in range(steps):
        grads = term_grads(pinn_losses(model, F64), params)
        norms = [py_norm(g) for g in grads]
        if step % update_every == 0:
            total = sum(norms)
            if normalize == "mean":
                total = total / len(norms)
            w = [(1 - alpha) * w_i + alpha * total / n_i for w_i, n_i in zip(w, norms)]
        with torch.no_grad():
            for j, p in enumerate(params):
                p -= lr * sum(w_i * g[j] for w_i, g in zip(w, grads))
        history.append(list(w))
    return history


@pytest.mark.parametrize("normalize,update_every", [("sum", 1), ("mean", 2)])
def test_balancer_matches_naive_reference(normalize, update_every):
    lr, steps = 1e-3, 5
    model, ref, got = train_with_sgd(GradNormRatio(normalize=normalize), model_seed=0, steps=steps, lr=lr,
                                     update_every=update_every)
    expected = _reference_run(ref, steps, lr, update_every, normalize, 0.1)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-11)
    assert got[0] != [1.0, 1.0, 1.0]
    if update_every == 2:
        assert got[1] == got[0] and got[3] == got[2] and got[2] != got[1]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- properties
scales = st.lists(st.integers(-30, 30), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(exponents=scales, dtype=st.sampled_from([torch.float32, F64]), seed=st.integers(0, 2**16),
       normalize=st.sampled_from(["sum", "mean"]), eps=st.sampled_from([0.0, 1e-5]))
def test_weights_finite_positive_any_scale(exponents, dtype, seed, normalize, eps):
    k = len(exponents)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(k, 7, generator=gen, dtype=F64)
    scale = torch.tensor([10.0**e for e in exponents], dtype=F64)
    rows = (base * scale[:, None]).to(dtype)
    losses = (scale * torch.rand(k, generator=gen, dtype=F64)).to(dtype)
    weights = torch.exp(torch.randn(k, generator=gen, dtype=F64)).to(dtype)
    s = GradNormRatio(normalize=normalize, eps=eps)
    rec = make_record([f"t{i}" for i in range(k)], losses, weights, grads=make_stats(rows, [4, 3]))
    for _ in range(3):
        new = s.update(rec)
        assert_finite_positive(new, dtype, shape=(k,))
        rec = make_record(rec.names, losses, new, grads=rec.grads)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(2, 5), data=st.data())
def test_permutation_invariance(seed, k, data):
    perm = data.draw(st.permutations(range(k)))
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, 6, generator=gen, dtype=F64) * torch.exp(3 * torch.randn(k, 1, generator=gen, dtype=F64))
    weights = torch.exp(torch.randn(k, generator=gen, dtype=F64))
    losses = torch.rand(k, generator=gen, dtype=F64)
    names = [f"t{i}" for i in range(k)]
    s = GradNormRatio()
    a = s.update(make_record(names, losses, weights, grads=make_stats(rows, [3, 3])))
    idx = torch.tensor(perm)
    b = s.update(make_record([names[i] for i in perm], losses[idx], weights[idx], grads=make_stats(rows[idx], [3, 3])))
    torch.testing.assert_close(b, a[idx], rtol=1e-14, atol=0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 5), power=st.integers(-40, 40),
       normalize=st.sampled_from(["sum", "mean"]))
def test_scale_invariance(seed, k, power, normalize):
    # scaling every term (hence every gradient) by the same 2**power leaves the weights unchanged
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, 5, generator=gen, dtype=F64)
    weights = torch.exp(torch.randn(k, generator=gen, dtype=F64))
    losses = torch.rand(k, generator=gen, dtype=F64)
    names = [f"t{i}" for i in range(k)]
    s = GradNormRatio(normalize=normalize)
    a = s.update(make_record(names, losses, weights, grads=make_stats(rows, [2, 3])))
    c = 2.0**power
    b = s.update(make_record(names, losses * c, weights, grads=make_stats(rows * c, [2, 3])))
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- API
def test_registry_options_repr_and_validation():
    s = make_strategy("gradnorm_ratio", normalize="mean")
    assert isinstance(s, GradNormRatio) and s.needs_gradients and s.name == "gradnorm_ratio"
    assert repr(GradNormRatio(**s.options())) == repr(s)
    assert "normalize='mean'" in repr(s)
    for bad in (dict(normalize="max"), dict(alpha=0.0), dict(alpha=1.5), dict(over="all"), dict(eps=-1.0),
                dict(eps=float("inf"))):
        with pytest.raises(ValueError):
            GradNormRatio(**bad)
    with pytest.raises(RuntimeError):
        GradNormRatio().update(make_record(["a"], torch.ones(1), torch.ones(1)))
    assert GradNormRatio().state_dict() == {}


def test_state_dict_round_trip_bit_identical():
    check_resume_bit_identical(GradNormRatio, n=6, model_seed=1, update_every=3)


# ---------------------------------------------------------------- training
def test_trains_pinn_adam():
    bal = check_trains_with_adam(GradNormRatio(), model_seed=0, below=0.2, update_every=10)
    assert all(math.isfinite(w) and w > 0 for w in bal.weights.values())
    assert bal.weights != {"pde": 1.0, "left": 1.0, "right": 1.0}


def test_trains_pinn_lbfgs():
    _, seen = check_trains_with_lbfgs(GradNormRatio(), model_seed=0, below=0.5)
    assert seen[0] != seen[-1]
    assert all(math.isfinite(w) and w > 0 for w in seen[-1].values())
