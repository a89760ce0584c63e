"""Tests for GradNormRatio (gradient-norm balancing, Wang et al. 2023 / jaxpi)."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lossbalance.balancer import LossBalancer
from lossbalance.gradients import GradStats
from lossbalance.strategies.base import StepRecord, make_strategy
from lossbalance.strategies.gradnorm_ratio import GradNormRatio

F64 = torch.float64


# ---------------------------------------------------------------- helpers (independent of the engine)
def make_stats(rows: torch.Tensor, sizes: list[int], scope: list[list[bool]] | None = None) -> GradStats:
    """GradStats of the (K, P) per-term gradients ``rows`` split into tensors of ``sizes``."""
    k = rows.shape[0]
    parts = rows.split(sizes, dim=1)
    sum_abs = torch.stack([p.abs().sum(1) for p in parts], 1)
    max_abs = torch.stack([p.abs().amax(1) for p in parts], 1)
    sum_sq = torch.stack([torch.linalg.vector_norm(p, dim=1) for p in parts], 1).square()
    numel = torch.tensor(sizes, dtype=rows.dtype)
    matrix = torch.tensor([True] + [False] * (len(sizes) - 1))
    mask = torch.ones(k, len(sizes), dtype=torch.bool) if scope is None else torch.tensor(scope)
    return GradStats(sum_abs, max_abs, sum_sq, numel, matrix, mask, None)


def record(names, losses, weights, stats, step=0, update=0) -> StepRecord:
    return StepRecord(tuple(names), losses, weights, step, update, stats, torch.Generator().manual_seed(0))


def norm_record(norms: list[float], weights: list[float] | None = None, dtype=F64) -> StepRecord:
    """A record whose term i has a one-entry gradient of value norms[i] (so ||g_i|| = norms[i])."""
    k = len(norms)
    rows = torch.tensor(norms, dtype=dtype).reshape(k, 1)
    w = torch.ones(k, dtype=dtype) if weights is None else torch.tensor(weights, dtype=dtype)
    return record([f"t{i}" for i in range(k)], torch.ones(k, dtype=dtype), w, make_stats(rows, [1]))


class MLP(torch.nn.Module):
    def __init__(self, width: int = 16, dtype=torch.float32):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1, width), torch.nn.Tanh(),
            torch.nn.Linear(width, width), torch.nn.Tanh(),
            torch.nn.Linear(width, 1),
        ).to(dtype)

    def forward(self, x):
        return self.net(x)


def pinn_losses(model: torch.nn.Module, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """u'' = -pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0 (exact: sin(pi x))."""
    x = torch.linspace(0, 1, 32, dtype=dtype).reshape(-1, 1).requires_grad_(True)
    u = model(x)
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
    pde = (d2u + math.pi**2 * torch.sin(math.pi * x)).pow(2).mean()
    left = model(torch.zeros(1, 1, dtype=dtype)).pow(2).sum()
    right = model(torch.ones(1, 1, dtype=dtype)).pow(2).sum()
    return {"pde": pde, "left": left, "right": right}


def raw_total(model, dtype=torch.float32) -> float:
    return float(sum(v.detach() for v in pinn_losses(model, dtype).values()))


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
    rec = record(["a", "b"], torch.ones(2, dtype=F64), torch.ones(2, dtype=F64), stats)
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


def _reference_run(model, names, steps, lr, update_every, normalize, alpha):
    """Plain-Python GradNormRatio + SGD on a copy of the model: weights after every step."""
    params = list(model.parameters())
    w = [1.0] * len(names)
    history = []
    for step in range(steps):
        losses = pinn_losses(model, F64)
        grads = []
        for n in names:  # the pde term does not reach the output bias: a zero gradient there
            g = torch.autograd.grad(losses[n], params, retain_graph=True, allow_unused=True)
            grads.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
        norms = []
        for g in grads:
            sq = 0.0
            for tensor in g:
                for value in tensor.reshape(-1).tolist():
                    sq += value * value
            norms.append(math.sqrt(sq))
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
    torch.manual_seed(0)
    model = MLP(8, F64)
    ref = copy.deepcopy(model)
    names = ["pde", "left", "right"]
    lr, steps = 1e-3, 5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    bal = LossBalancer(opt, GradNormRatio(normalize=normalize), update_every=update_every)
    got = []
    for _ in range(steps):
        bal.step(pinn_losses(model, F64))
        got.append([bal.weights[n] for n in names])
    expected = _reference_run(ref, names, steps, lr, update_every, normalize, 0.1)
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
    rec = record([f"t{i}" for i in range(k)], losses, weights, make_stats(rows, [4, 3]))
    for _ in range(3):
        new = s.update(rec)
        assert new.dtype == dtype and new.shape == (k,)
        assert torch.isfinite(new).all() and (new > 0).all()
        rec = record(rec.names, losses, new, rec.grads)


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
    a = s.update(record(names, losses, weights, make_stats(rows, [3, 3])))
    idx = torch.tensor(perm)
    b = s.update(record([names[i] for i in perm], losses[idx], weights[idx], make_stats(rows[idx], [3, 3])))
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
    a = s.update(record(names, losses, weights, make_stats(rows, [2, 3])))
    c = 2.0**power
    b = s.update(record(names, losses * c, weights, make_stats(rows * c, [2, 3])))
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
        GradNormRatio().update(record(["a"], torch.ones(1), torch.ones(1), None))
    assert GradNormRatio().state_dict() == {}


def test_state_dict_round_trip_bit_identical():
    def build(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return LossBalancer(opt, GradNormRatio(), update_every=3)

    torch.manual_seed(1)
    model = MLP()
    start = copy.deepcopy(model.state_dict())
    bal = build(model)
    for _ in range(12):
        bal.step(pinn_losses(model))
    full_w, full_p = bal.weights, [p.detach().clone() for p in model.parameters()]

    model2 = MLP()
    model2.load_state_dict(start)
    bal2 = build(model2)
    for _ in range(6):
        bal2.step(pinn_losses(model2))
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "balancer": bal2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model3 = MLP()
    model3.load_state_dict(saved["model"])
    bal3 = build(model3)
    bal3.load_state_dict(saved["balancer"])
    for _ in range(6):
        bal3.step(pinn_losses(model3))
    assert bal3.weights == full_w
    for p, q in zip(model3.parameters(), full_p):
        assert torch.equal(p.detach(), q)


# ---------------------------------------------------------------- training
def test_trains_pinn_adam():
    torch.manual_seed(0)
    model = MLP()
    bal = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), GradNormRatio(), update_every=10)
    before = raw_total(model)
    for _ in range(150):
        bal.step(pinn_losses(model))
    after = raw_total(model)
    assert after < 0.2 * before
    assert all(math.isfinite(w) and w > 0 for w in bal.weights.values())
    assert bal.weights != {"pde": 1.0, "left": 1.0, "right": 1.0}


def test_trains_pinn_lbfgs():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
    bal = LossBalancer(opt, GradNormRatio())
    before = raw_total(model)
    seen = []
    for _ in range(10):
        bal.step(closure=lambda: pinn_losses(model))
        seen.append(bal.weights)
    after = raw_total(model)
    assert after < 0.5 * before
    assert seen[0] != seen[-1]
    assert all(math.isfinite(w) and w > 0 for w in seen[-1].values())
