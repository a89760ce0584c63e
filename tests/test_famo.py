"""Tests for lossbalance.strategies.famo (FAMO, Liu, Liu, Jin, Stone & Liu 2023)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from _strategy_checks import (
    F64, NAMES, check_finite_and_positive, check_permutation_invariance, check_resume_bit_identical,
    check_runs_on_meta_device, check_trains_with_lbfgs, loss_sequences, make_record,
    tiny_pinn,
)
from _strategy_checks import drive as _drive
from lossbalance import LossBalancer
from lossbalance.strategies.base import StepRecord, available_strategies, make_strategy
from lossbalance.strategies.famo import FAMO

EPS = 1e-8


def drive(strategy, names, sequence, dtype=F64):
    """Direct ``update()`` calls; FAMO does not read the weights passed in."""
    return _drive(strategy, names, sequence, dtype=dtype, feedback=False)


# ----------------------------------------------------------------------------- the authors' code, restated
class AuthorsFAMO:
    """Cranial-XIX/FAMO ``famo.py`` (and LibMTL's FAMO), restated with the same torch calls:
    logits ``w`` (0), ``Adam([w], lr, weight_decay)``, ``get_weighted_loss`` before the step,
    ``update(curr_loss)`` after it."""

    def __init__(self, k, lr=0.025, gamma=1e-3, dtype=F64):
        self.min_losses = torch.zeros(k, dtype=dtype)
        self.w = torch.zeros(k, dtype=dtype, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)

    def get_weighted_loss(self, losses):
        self.prev_loss = losses
        z = F.softmax(self.w, -1)
        D = losses - self.min_losses + EPS
        c = (z / D).sum().detach()
        return (D.log() * z / c).sum()

    def update(self, curr_loss):
        delta = (self.prev_loss - self.min_losses + EPS).log() - (curr_loss - self.min_losses + EPS).log()
        with torch.enable_grad():
            d = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()


def toy(seed=0):
    """Two tasks on a linear model (float64), fixed points: L1 = (x1.w - 1)^2, L2 = 3 (x2.w + 2)^2 + 0.5."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(2, 1, bias=False).double()
    x1, x2 = torch.tensor([[1.0, 0.5]], dtype=F64), torch.tensor([[-0.3, 1.0]], dtype=F64)

    def losses():
        return {"a": (model(x1) - 1).pow(2).sum(), "b": 3 * (model(x2) + 2).pow(2).sum() + 0.5}

    return model, losses


def authors_run(steps, lr=0.1, gamma=1e-3):
    """The authors' loop on the toy with SGD: weights used at each step, and the final parameters."""
    model, losses = toy()
    famo = AuthorsFAMO(2, gamma=gamma)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    weights = []
    for _ in range(steps):
        terms = losses()
        L = torch.stack([terms["a"], terms["b"]])
        z = F.softmax(famo.w.detach(), -1)
        D = L.detach() + EPS
        weights.append(((z / D) / (z / D).sum()).tolist())
        opt.zero_grad()
        famo.get_weighted_loss(L).backward()
        opt.step()
        with torch.no_grad():
            new = losses()
            famo.update(torch.stack([new["a"], new["b"]]))
    return weights, [p.detach().clone() for p in model.parameters()], famo.w.detach().clone()


# ----------------------------------------------------------------------------- API
def test_registry_options_and_repr() -> None:
    assert "famo" in available_strategies()
    assert FAMO.name == "famo" and FAMO.needs_gradients is False and FAMO.fixed is False
    assert isinstance(make_strategy("famo", lr=0.1), FAMO)
    default = FAMO()
    assert default.options() == {"lr": 0.025, "weight_decay": 1e-3, "min_losses": 0.0, "eps": 1e-8}
    assert FAMO(**default.options()).options() == default.options()
    assert repr(default) == "FAMO(lr=0.025, weight_decay=0.001, min_losses=0.0, eps=1e-08)"
    assert FAMO(**FAMO.OFFICIAL).weight_decay == 0.01
    assert default.logits == {}


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0.0}, {"lr": math.nan}, {"weight_decay": -1.0}, {"eps": 0.0}, {"eps": math.inf},
     {"min_losses": math.nan}, {"min_losses": {"a": math.inf}}],
)
def test_invalid_options(kwargs) -> None:
    with pytest.raises(ValueError):
        FAMO(**kwargs)


def test_liu2023_preset_is_the_authors_code() -> None:
    model = torch.nn.Linear(1, 1)
    balancer = LossBalancer.from_config(torch.optim.SGD(model.parameters(), lr=0.1), {"preset": "liu2023"})
    assert isinstance(balancer.strategy, FAMO)
    assert balancer.strategy.options() == {"lr": 0.025, "weight_decay": 0.01, "min_losses": 0.0, "eps": 1e-8}


# ----------------------------------------------------------------------------- hand-computed numbers
def test_hand_computed_two_terms() -> None:
    # weight_decay 0, eps = 1e-8, Adam (lr 0.025, betas 0.9/0.999, eps 1e-8) on logits xi = 0.
    # update 0: L = [1, 4], z = [1/2, 1/2], D = L + eps: w = (z/D) / sum(z/D) = [0.8, 0.2]
    # update 1: L = [0.5, 3]: delta = log(D_prev / D) = [log 2, log(4/3)] (+ O(eps));
    #   g = z (delta - z.delta) = [+(log 2 - log(4/3)) / 4, -(...)/4] = [+0.12770640, -0.12770640]
    #   Adam's first step moves by lr * g / (|g| + 1e-8) = -+0.025 (1 - 7.8e-8): xi = [-0.025, +0.025]
    #   z = softmax(xi) = [1/(1+e^0.05), e^0.05/(1+e^0.05)]; w = (z/D) / sum(z/D), D = [0.5, 3]
    s = FAMO(weight_decay=0.0)
    out = drive(s, ["a", "b"], [[1.0, 4.0], [0.5, 3.0], [0.4, 1.0]])
    assert out[0].tolist() == pytest.approx([0.8, 0.2], rel=1e-8)
    g = (math.log(2) - math.log(4 / 3)) / 4
    step = 0.025 * g / (g + 1e-8)
    za, zb = 1 / (1 + math.exp(2 * step)), math.exp(2 * step) / (1 + math.exp(2 * step))
    qa, qb = za / 0.5, zb / 3.0
    assert out[1].tolist() == pytest.approx([qa / (qa + qb), qb / (qa + qb)], rel=1e-7)
    # update 2: L = [0.4, 1]: delta = [log(0.5/0.4), log(3)]; g = z (delta - z.delta) with the new z;
    #   Adam's second step: m = 0.9 m1 + 0.1 g2, v = 0.999 v1 + 0.001 g2^2, bias-corrected
    d1, d2 = math.log(0.5 / 0.4), math.log(3.0)
    mean = za * d1 + zb * d2
    g2 = [za * (d1 - mean), zb * (d2 - mean)]
    g1 = [g, -g]
    xi = [-step, step]
    for i in range(2):
        m = 0.9 * 0.1 * g1[i] + 0.1 * g2[i]
        v = 0.999 * 0.001 * g1[i] ** 2 + 0.001 * g2[i] ** 2
        xi[i] -= 0.025 * (m / (1 - 0.9**2)) / (math.sqrt(v / (1 - 0.999**2)) + 1e-8)
    assert list(s.logits.values()) == pytest.approx(xi, rel=1e-6)
    e = [math.exp(x - max(xi)) for x in xi]
    z = [v / sum(e) for v in e]
    q = [z[0] / 0.4, z[1] / 1.0]
    assert out[2].tolist() == pytest.approx([q[0] / sum(q), q[1] / sum(q)], rel=1e-6)


def test_weights_are_the_gradient_of_the_famo_objective() -> None:
    """lambda_i = d/dL_i [sum_j z_j log D_j / c] with c detached: the weighted sum's gradient is the
    authors' objective's gradient."""
    s = FAMO(weight_decay=0.0, min_losses={"b": 0.25})
    seq = [[1.0, 4.0, 2.0], [0.7, 3.0, 2.5], [0.5, 1.0, 1.5]]
    out = drive(s, ["a", "b", "c"], seq)
    xi = torch.tensor(list(s.logits.values()), dtype=F64)
    L = torch.tensor(seq[-1], dtype=F64, requires_grad=True)
    z = torch.softmax(xi, 0)
    D = L - torch.tensor([0.0, 0.25, 0.0], dtype=F64) + EPS
    c = (z / D).sum().detach()
    (grad,) = torch.autograd.grad((z * D.log() / c).sum(), L)
    torch.testing.assert_close(out[-1], grad, rtol=1e-13, atol=0)
    assert out[-1].sum().item() == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize("source", ["after", "observe", "next step (fixed points)"])
def test_balancer_matches_the_authors_loop(source) -> None:
    """On fixed points all three sources give the authors' algorithm: the same weights at every
    step and the same parameters (float64, SGD). The lagged source learns at the next update, so
    its logits trail by the last step's update."""
    steps = 6
    expected, params, logits = authors_run(steps)
    model, losses = toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    balancer = LossBalancer(opt, FAMO())
    got = []
    for _ in range(steps):
        if source == "after":
            balancer.step(losses(), after=losses)
        elif source == "observe":
            balancer.backward(losses())
            opt.step()
            balancer.observe(losses())
        else:
            balancer.step(losses())
        got.append([balancer.weights["a"], balancer.weights["b"]])
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-12)
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=0)
    if source == "next step (fixed points)":
        balancer.strategy.observe(("a", "b"), torch.stack([v.detach() for v in losses().values()]))
    assert list(balancer.strategy.logits.values()) == pytest.approx(logits.tolist(), rel=1e-12)
    assert max(abs(w - 0.5) for w in got[-1]) > 0.1  # not vacuous: the weights moved


def test_after_is_called_once_per_update_step_only() -> None:
    model, losses = tiny_pinn(1)
    calls = []

    def after():
        calls.append(1)
        return losses()

    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-3), FAMO(), update_every=3)
    for _ in range(7):  # updates at 0, 3, 6
        balancer.step(losses(), after=after)
    assert len(calls) == 3
    with pytest.raises(TypeError, match="famo"):
        LossBalancer(torch.optim.Adam(model.parameters()), "relobralo").step(losses(), after=after)
    with pytest.raises(TypeError, match="famo"):
        LossBalancer(torch.optim.Adam(model.parameters()), "static").observe(losses())
    assert len(calls) == 3  # refused before anything ran


def test_one_weighted_backward_per_step() -> None:
    """FAMO needs no per-term gradients: the engine never differentiates the terms one by one."""
    model, losses = tiny_pinn(2)
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-3), FAMO())
    measured = []
    original = balancer._engine.measure
    balancer._engine.measure = lambda *a, **k: measured.append(1) or original(*a, **k)
    for _ in range(3):
        balancer.step(losses(), after=losses)
    assert measured == []


def test_loss_below_its_bound_is_floored() -> None:
    s = FAMO(min_losses={"a": 2.0})
    w = drive(s, ["a", "b"], [[1.0, 1.0], [1.5, 0.5]])
    # "a" is below its bound: D_a = eps, it takes (nearly) all the weight; everything finite
    assert w[0][0].item() == pytest.approx(1.0, rel=1e-7) and w[0][1].item() > 0
    assert all(math.isfinite(v) for v in s.logits.values())


def test_terms_that_come_and_go() -> None:
    s = FAMO(weight_decay=0.0)
    drive(s, ["a", "b"], [[1.0, 1.0]])
    w = s.update(make_record(["b", "c"], [0.5, 2.0], update=1))  # "a" absent: only "b" is judged
    assert s.logits["a"] == 0.0 and s.logits["c"] == 0.0
    assert s.logits["b"] == 0.0  # a single judged term: z (delta - z.delta) = 0
    assert w.tolist() == pytest.approx([0.8, 0.2], rel=1e-7)  # z uniform over b, c: (1/0.5) : (1/2)


# ----------------------------------------------------------------------------- numerics (hypothesis)
@settings(max_examples=60, deadline=None)
@given(seq=loss_sequences(min_len=1, max_len=6), dtype=st.sampled_from([torch.float32, F64]),
       lr=st.sampled_from([0.025, 1.0, 100.0]))
def test_weights_finite_and_positive_for_extreme_scales(seq, dtype, lr) -> None:
    s = FAMO(lr=lr)
    check_finite_and_positive(s, seq, dtype, feedback=False)
    assert all(math.isfinite(v) for v in s.logits.values())


@settings(max_examples=30, deadline=None)
@given(seq=loss_sequences(min_terms=2, min_len=1, max_len=6), data=st.data(),
       dtype=st.sampled_from([torch.float32, F64]))
def test_permutation_invariance(seq, data, dtype) -> None:
    perm = data.draw(st.permutations(range(len(seq[0]))))
    # Adam normalises the logits' gradient z_i (d_i - z.d): where it is 0 in exact arithmetic (e.g.
    # symmetric deltas), the rounding of z.d (about 1e-15, its order depends on the term order)
    # becomes a step of up to lr * 1e-15 / eps_adam, so the weights agree to ~1e-8, not to rounding
    rtol = 1e-5 if dtype == torch.float32 else 1e-7
    check_permutation_invariance(lambda: FAMO(lr=0.1), seq, perm, dtype, feedback=False, rtol=rtol)


def test_permutation_invariance_example_with_a_zero_gradient_in_exact_arithmetic() -> None:
    seq = [[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1e-18, 0.0]]
    for perm in ([0, 1, 2, 4, 3], [4, 3, 2, 1, 0]):
        check_permutation_invariance(lambda: FAMO(lr=0.1), seq, perm, F64, feedback=False, rtol=1e-7)


def test_runs_on_the_meta_device() -> None:
    check_runs_on_meta_device([FAMO(), FAMO(min_losses={"a": 0.5})])


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_bit_identical() -> None:
    full, resumed, saved = check_resume_bit_identical(lambda: FAMO(lr=0.05), n=10, steps_after_save=3)
    assert set(saved["balancer"]["strategy"]["pending"]) == set(NAMES)  # the last step is still to be judged
    sa, sc = full.strategy.state_dict(), resumed.strategy.state_dict()
    for name in sa["names"]:
        assert torch.equal(sa["logits"][name], sc["logits"][name])
        assert torch.equal(sa["pending"][name], sc["pending"][name])


def test_state_dict_is_a_copy() -> None:
    s = FAMO()
    drive(s, ["a", "b"], [[2.0, 1.0], [1.0, 1.0]])
    state = s.state_dict()
    before = state["logits"]["a"].clone(), state["pending"]["a"].clone()
    drive(s, ["a", "b"], [[0.5, 2.0]] * 3)
    assert torch.equal(state["logits"]["a"], before[0]) and torch.equal(state["pending"]["a"], before[1])


# ----------------------------------------------------------------------------- training
def test_trains_tiny_pinn_with_adam() -> None:
    """FAMO descends on sum_i z_i log L_i: with Adam the geometric mean of the terms falls by orders
    of magnitude and every term falls, but the boundary terms, which can reach 0, take the weight
    (lambda_i ~ 1/L_i) and the residual barely moves in 150 steps (the method, see the docstring)."""
    model, losses = tiny_pinn(6)
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), FAMO())
    start = {k: v.item() for k, v in losses().items()}
    for _ in range(150):
        balancer.step(losses())
    end = {k: v.item() for k, v in losses().items()}
    assert all(end[k] < start[k] for k in NAMES)
    assert sum(math.log(end[k] + EPS) - math.log(start[k] + EPS) for k in NAMES) / 3 < math.log(1e-2)
    assert balancer.weights["pde"] < 1e-3


def test_trains_tiny_pinn_with_lbfgs() -> None:
    """L-BFGS with the closure (one update per step, on its first evaluation): the boundary terms
    fall to ~1e-10, the residual to about half, the logits learn between the steps."""
    balancer, _ = check_trains_with_lbfgs(FAMO(), model_seed=7, below=0.7)
    logits = balancer.strategy.logits
    assert logits["pde"] > 0.1 and logits["left"] < -0.1  # the slow term gains logit


# ----------------------------------------------------------------------------- the logits' Adam
def _torch_adam_reference(calls, lr, weight_decay, dtype):
    """``torch.optim.Adam`` with one parameter group per term (added at its first call), stepped
    with ``.grad`` on the named terms only: the reference for ``VectorAdam``."""
    params, opt = {}, None
    for names, grads in calls:
        for name in names:
            if name not in params:
                params[name] = torch.zeros((), dtype=dtype, requires_grad=True)
                if opt is None:
                    opt = torch.optim.Adam([params[name]], lr=lr, weight_decay=weight_decay)
                else:
                    opt.add_param_group({"params": [params[name]]})
        for name, p in params.items():
            p.grad = torch.tensor(grads[names.index(name)], dtype=dtype) if name in names else None
        opt.step()
    return {n: p.detach() for n, p in params.items()}


@settings(max_examples=40, deadline=None)
@given(
    calls=st.lists(
        st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True).flatmap(
            lambda names: st.tuples(st.just(names), st.lists(st.floats(-10, 10), min_size=len(names), max_size=len(names)))
        ),
        min_size=1, max_size=12,
    ),
    weight_decay=st.sampled_from([0.0, 1e-3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_vector_adam_equals_torch_adam_per_term(calls, weight_decay, dtype) -> None:
    """Terms that come and go step only when named (their own step counts); bit for bit where
    every named term has the same count, to rounding otherwise."""
    from lossbalance.strategies.learned import VectorAdam

    adam = VectorAdam(0.025, weight_decay=weight_decay)
    uniform = True
    for names, grads in calls:
        adam.ensure(names, torch.zeros((), dtype=dtype))
        counts = {adam.steps[adam.names.index(n)] for n in names}
        uniform &= len(counts) == 1
        adam.step(names, torch.tensor(grads, dtype=dtype))
    expected = _torch_adam_reference(calls, 0.025, weight_decay, dtype)
    got = dict(zip(adam.names, adam.value.unbind()))
    assert set(got) == set(expected)
    for name in expected:
        if uniform:
            assert torch.equal(got[name], expected[name]), name
        else:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)


def test_undo_restores_the_logits_from_references() -> None:
    """The balancer's undo point of an update is FAMO's references; a failed call puts back the
    logits, their Adam state and the pending log D exactly."""
    s = FAMO()
    drive(s, ["a", "b"], [[2.0, 1.0], [1.0, 1.5]])
    saved, point = s.state_dict(), s.checkpoint()
    drive(s, ["a", "b", "c"], [[0.5, 2.0, 1.0]] * 2)
    s.rollback(point)
    after = s.state_dict()
    assert after["names"] == saved["names"] == ["a", "b"]
    for key in ("logits", "pending"):
        assert all(torch.equal(after[key][n], saved[key][n]) for n in saved[key])
    assert after["adam"]["steps"] == saved["adam"]["steps"]


def test_after_refusals_say_the_step_stands_and_the_key_set_is_checked() -> None:
    """step(after=): a NaN, a missing or a misspelt term after the step raises, saying that the
    optimizer step was taken (it was); observe() checks the key set as a step does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.linspace(0, 1, 16)[:, None]

    def losses():
        u = model(x)
        return {"pde": (u - x).pow(2).mean(), "bc": u[0].pow(2).sum()}

    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "famo")
    balancer.step(losses())
    bad = {
        "nan": (ValueError, lambda: {k: v * float("nan") for k, v in losses().items()}),
        "missing": (KeyError, lambda: {"pde": losses()["pde"]}),
        "typo": (KeyError, lambda: {"pde": losses()["pde"], "bcc": losses()["bc"]}),
        "not a dict": (TypeError, lambda: losses()["pde"]),
        # a raw RuntimeError from reshape before (not named, and not said to stand)
        "not a scalar": (ValueError, lambda: {"pde": losses()["pde"], "bc": (model(x) - 1).pow(2).squeeze(-1)}),
        "a float": (TypeError, lambda: {"pde": losses()["pde"], "bc": 0.5}),
        "an integer tensor": (TypeError, lambda: {"pde": losses()["pde"], "bc": torch.tensor(1)}),
    }
    for error, closure in bad.values():
        before = [p.detach().clone() for p in model.parameters()]
        step = balancer.state_dict()["step"]
        with pytest.raises(error, match="the optimizer step was taken and stands") as raised:
            balancer.step(losses(), after=closure)
        assert "nothing was changed" not in str(raised.value)
        assert balancer.state_dict()["step"] == step + 1
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(KeyError, match="'bcc'"):
        balancer.observe({"pde": losses()["pde"], "bcc": losses()["bc"]})
    with pytest.raises(ValueError, match="loss term 'bc' has shape"):
        balancer.observe({"pde": losses()["pde"], "bc": (model(x) - 1).pow(2).squeeze(-1)})


def test_a_min_losses_key_naming_no_term_warns_once() -> None:
    strategy = FAMO(min_losses={"pdee": 1.0, "bc": 0.0})
    record = lambda: StepRecord(("pde", "bc"), torch.tensor([2.0, 1.0]), torch.ones(2), 0, 0, None, torch.Generator())  # noqa: E731
    with pytest.warns(UserWarning, match=r"\['pdee'\]"):
        strategy.update(record())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.update(record())
        FAMO(min_losses={"pde": 1.0}).update(record())
