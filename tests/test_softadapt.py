"""Tests for lossbalance.strategies.softadapt (SoftAdapt, Heydari, Thompson & Mehmood 2019)."""
from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lossbalance import LossBalancer
from lossbalance.strategies.base import StepRecord, available_strategies, make_strategy
from lossbalance.strategies.softadapt import SoftAdapt

F64 = torch.float64
VARIANTS = ["difference", "normalized", "loss_weighted", "ratio"]


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
    model, losses = tiny_pinn(1, F64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    balancer = LossBalancer(opt, SoftAdapt(2.0, variant=variant), update_every=update_every, history=100)
    for _ in range(20):
        balancer.step(losses())
    names = ["pde", "left", "right"]
    hist = balancer.history
    sequence = [[h["losses"][n] for n in names] for h in hist if h["step"] % update_every == 0]
    expected = naive_softadapt(sequence, variant, 2.0)
    for h in hist:
        assert [h["weights"][n] for n in names] == pytest.approx(expected[h["step"] // update_every], rel=1e-11)
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
    s.update(record(["a", "b"], [1.0, 1.0], [1.0, 1.0], 0))
    w = s.update(record(["a", "b", "c"], [2.0, 1.0, 7.0], [1.0, 1.0, 4.0], 1))
    e = math.e
    assert w.tolist() == pytest.approx([2 * e / (e + 1), 2 / (e + 1), 4.0], rel=1e-12)
    w = s.update(record(["b", "c"], [1.0, 8.0], [1.0, 4.0], 2))  # "a" absent; "c": s = 1
    assert w.tolist() == pytest.approx([2 / (e + 1), 2 * e / (e + 1)], rel=1e-12)


# ----------------------------------------------------------------------------- numerics (hypothesis)
loss_value = st.one_of(
    st.just(0.0), st.builds(lambda m, e: m * 10.0**e, st.floats(0.1, 10.0), st.integers(-30, 30))
)


@st.composite
def sequences(draw, min_terms=1):
    k = draw(st.integers(min_terms, 5))
    n = draw(st.integers(2, 5))
    return [draw(st.lists(loss_value, min_size=k, max_size=k)) for _ in range(n)]


@settings(max_examples=80, deadline=None)
@given(seq=sequences(), dtype=st.sampled_from([torch.float32, F64]), variant=st.sampled_from(VARIANTS),
       beta=st.sampled_from([0.1, 1.0, 100.0, -5.0]), normalize=st.booleans(), eps=st.sampled_from([0.0, 1e-8]))
def test_weights_finite_and_positive_for_extreme_scales(seq, dtype, variant, beta, normalize, eps) -> None:
    names = [f"t{i}" for i in range(len(seq[0]))]
    for w in drive(SoftAdapt(beta, variant=variant, normalize_to_k=normalize, eps=eps), names, seq, dtype=dtype):
        assert w.dtype == dtype
        assert torch.isfinite(w).all() and (w > 0).all(), (seq, w)


@settings(max_examples=40, deadline=None)
@given(seq=sequences(min_terms=2), data=st.data(), variant=st.sampled_from(VARIANTS),
       dtype=st.sampled_from([torch.float32, F64]))
def test_permutation_invariance(seq, data, variant, dtype) -> None:
    k = len(seq[0])
    perm = data.draw(st.permutations(range(k)))
    names = [f"t{i}" for i in range(k)]
    a = drive(SoftAdapt(variant=variant), names, seq, dtype=dtype)
    b = drive(SoftAdapt(variant=variant), [names[p] for p in perm], [[L[p] for p in perm] for L in seq], dtype=dtype)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for wa, wb in zip(a, b):
        torch.testing.assert_close(wa[list(perm)], wb, rtol=rtol, atol=0)


positive = st.floats(0.01, 100.0)


@settings(max_examples=40, deadline=None)
@given(seq=st.lists(st.lists(positive, min_size=3, max_size=3), min_size=2, max_size=6),
       powers=st.lists(st.integers(-60, 60), min_size=3, max_size=3))
def test_ratio_invariant_to_rescaling_each_term(seq, powers) -> None:
    scaled = [[L[i] * 2.0 ** powers[i] for i in range(3)] for L in seq]
    a = drive(SoftAdapt(variant="ratio", eps=0.0), ["a", "b", "c"], seq)
    b = drive(SoftAdapt(variant="ratio", eps=0.0), ["a", "b", "c"], scaled)
    for wa, wb in zip(a, b):
        torch.testing.assert_close(wa, wb, rtol=1e-13, atol=0)


@settings(max_examples=40, deadline=None)
@given(seq=st.lists(st.lists(positive, min_size=3, max_size=3), min_size=2, max_size=6), power=st.integers(-60, 60))
def test_normalized_invariant_to_a_common_rescaling(seq, power) -> None:
    scaled = [[v * 2.0**power for v in L] for L in seq]
    a = drive(SoftAdapt(variant="normalized"), ["a", "b", "c"], seq)
    b = drive(SoftAdapt(variant="normalized"), ["a", "b", "c"], scaled)
    for wa, wb in zip(a, b):
        torch.testing.assert_close(wa, wb, rtol=1e-13, atol=0)


def test_runs_on_the_meta_device() -> None:
    """No data-dependent host reads (.item(), float(), bool() of a tensor) on the update path:
    meta tensors hold no data, so any such read would raise."""
    generator = torch.Generator().manual_seed(0)
    for strategy in [SoftAdapt(variant=v) for v in VARIANTS]:
        for t, names in enumerate([("a", "b"), ("a", "b"), ("a", "b", "c"), ("b", "c"), ("a", "b", "c")]):
            k = len(names)
            rec = StepRecord(names, torch.ones(k, device="meta"), torch.ones(k, device="meta"), t, t, None, generator)
            w = strategy.update(rec)
            assert w.device.type == "meta" and w.shape == (k,)


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("variant", ["difference", "loss_weighted"])
def test_state_dict_round_trip_bit_identical(variant: str) -> None:
    def fresh():
        model, losses = tiny_pinn(5)
        return model, losses, LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), SoftAdapt(variant=variant))

    n = 10
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


@pytest.mark.parametrize("variant", ["difference", "ratio"])
def test_trains_tiny_pinn_with_adam(variant: str) -> None:
    model, losses = tiny_pinn(6)
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), SoftAdapt(variant=variant))
    start = unweighted(losses)
    for _ in range(150):
        balancer.step(losses())
    assert unweighted(losses) < 0.1 * start


def test_trains_tiny_pinn_with_lbfgs() -> None:
    model, losses = tiny_pinn(7)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
    balancer = LossBalancer(opt, SoftAdapt())
    start = unweighted(losses)
    for _ in range(10):
        assert torch.isfinite(balancer.step(closure=losses))
    assert unweighted(losses) < 0.1 * start
