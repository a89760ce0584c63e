"""Tests for lossbalance.combine.momentum (M-ConFIG, Liu, Chu & Thuerey 2025) and its balancer path."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

from _strategy_checks import F64, NAMES, pinn_losses, tiny_pinn, unweighted
from lossbalance import LossBalancer
from lossbalance.combine import MomentumConFIG, make_combiner


# ----------------------------------------------------------------------------- naive reference
def naive_config(rows: list[torch.Tensor]) -> torch.Tensor:
    """ConFIG from the paper: x = pinv(U) 1 with unit rows U, g_u = x/|x|, g = (sum_i g_i . g_u) g_u."""
    U = torch.stack([r / r.norm() for r in rows])
    x = torch.linalg.pinv(U) @ torch.ones(len(rows), dtype=U.dtype)
    gu = x / x.norm()
    return sum(float(r @ gu) for r in rows) * gu


def naive_mconfig(model, losses, steps, lr, beta1=0.9, beta2=0.999, eps=1e-8, weights=None):
    """The paper's momentum algorithm, written out: term t mod K differentiated at step t, bias-corrected
    momenta, ConFIG, the pseudo second moment of the gradient that would give the combined momentum, SGD."""
    params = list(model.parameters())
    k = len(NAMES)
    m = [torch.zeros(sum(p.numel() for p in params), dtype=F64) for _ in range(k)]
    n = [0] * k
    mu_prev = v = None
    s = 0
    for t in range(steps):
        i = t % k
        g = torch.autograd.grad(losses()[NAMES[i]], params, allow_unused=True)
        g = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(g, params)])
        m[i] = beta1 * m[i] + (1 - beta1) * g
        n[i] += 1
        if 0 in n:
            continue  # no direction until every term has a momentum: SGD moves nothing
        s += 1
        rows = [(1.0 if weights is None else weights[j]) * m[j] / (1 - beta1 ** n[j]) for j in range(k)]
        gc = naive_config(rows)
        mu = gc * (1 - beta1**s)
        r = (mu - beta1 * (torch.zeros_like(mu) if mu_prev is None else mu_prev)) / (1 - beta1)
        mu_prev = mu
        v = (1 - beta2) * r**2 if v is None else beta2 * v + (1 - beta2) * r**2
        d = gc / ((v / (1 - beta2**s)).sqrt() + eps)
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= lr * d[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
    return [p.detach().clone() for p in params]


def sgd_balancer(model, strategy="static", **options):
    return LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), strategy, combine="mconfig", **options)


# ----------------------------------------------------------------------------- the update
@pytest.mark.parametrize("weights", [None, {"pde": 0.5, "left": 2.0, "right": 1.0}])
def test_matches_the_papers_algorithm(weights) -> None:
    steps = 8
    model, losses = tiny_pinn(1, F64, width=8)
    reference = copy.deepcopy(model)
    balancer = sgd_balancer(model, weights=weights)
    for _ in range(steps):
        balancer.step(losses())
    expected = naive_mconfig(reference, lambda: pinn_losses(reference, F64), steps, 1e-2,
                             weights=None if weights is None else [weights[n] for n in NAMES])
    moved = 0.0
    for p, q, p0 in zip(model.parameters(), expected, tiny_pinn(1, F64, width=8)[0].parameters()):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
        moved = max(moved, float((q - p0.detach()).abs().max()))
    assert moved > 1e-3  # not vacuous


def test_each_step_differentiates_exactly_one_term_in_turn() -> None:
    model, losses = tiny_pinn(2)
    balancer = sgd_balancer(model)
    seen = []
    before = [p.detach().clone() for p in model.parameters()]
    for t in range(7):
        terms = losses()
        for name, term in terms.items():
            term.register_hook(lambda g, name=name: seen.append((t, name)))
        balancer.step(terms)
        if t == 1:  # the first K - 1 = 2 steps have no direction: nothing moved
            assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
    assert seen == [(t, NAMES[t % 3]) for t in range(7)]
    assert balancer.combiner.counts == {"pde": 3, "left": 2, "right": 2} and balancer.combiner.steps == 5


def test_loss_gives_the_step_gradient_and_backward_the_same() -> None:
    model, losses = tiny_pinn(3)
    twin = copy.deepcopy(model)
    a, b = sgd_balancer(model), sgd_balancer(twin)
    for _ in range(4):
        a.zero_grad()
        total = a.loss(losses())
        total.backward()
        b.backward(pinn_losses(twin))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
        a.optimizer.step()
        b.optimizer.step()


def test_trains_tiny_pinn_with_sgd() -> None:
    model, losses = tiny_pinn(3)
    balancer = sgd_balancer(model)
    start = unweighted(losses)
    for _ in range(300):
        balancer.step(losses())
    assert unweighted(losses) < 0.01 * start


# ----------------------------------------------------------------------------- what it refuses, the warning
def test_refusals_and_the_adam_warning() -> None:
    model, _ = tiny_pinn(0)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="needs every term's gradient"):
        LossBalancer(torch.optim.SGD(params, lr=0.1), "lra", combine="mconfig")
    with pytest.raises(ValueError, match="diagnose_every"):
        LossBalancer(torch.optim.SGD(params, lr=0.1), "static", combine="mconfig", diagnose_every=5)
    with pytest.raises(ValueError, match="LBFGS"):
        LossBalancer(torch.optim.LBFGS(params), "static", combine="mconfig")
    with pytest.warns(UserWarning, match="pair it with plain torch.optim.SGD") as record:
        LossBalancer(torch.optim.AdamW(params), "static", combine="mconfig")
    assert len(record) == 1
    for adaptive in (torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta):  # no betas: silent before
        with pytest.warns(UserWarning, match=f"pair it with plain torch.optim.SGD.*around {adaptive.__name__}"):
            LossBalancer(adaptive(params), "static", combine="mconfig")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LossBalancer(torch.optim.SGD(params, lr=0.1, momentum=0.0), "relobralo", combine="mconfig")


def test_options_registry_and_config_round_trip() -> None:
    assert isinstance(make_combiner("mconfig", beta1=0.8), MomentumConFIG)
    with pytest.raises(ValueError):
        MomentumConFIG(beta1=1.0)
    with pytest.raises(ValueError):
        MomentumConFIG(eps=0.0)
    model, _ = tiny_pinn(0)
    balancer = sgd_balancer(model)
    config = balancer.config()
    assert config["combine"] == "mconfig" and config["combine_options"] == {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "solver": "gram"}
    rebuilt = LossBalancer.from_config(torch.optim.SGD(model.parameters(), lr=0.1), config)
    assert isinstance(rebuilt.combiner, MomentumConFIG)


def test_called_on_a_matrix_updates_every_row() -> None:
    c = MomentumConFIG()
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    d = c(g)
    # m^_i = g_i after one step; ConFIG of two orthogonal rows: mean norm 1.5 times (e1 + e2);
    # s = 1: mu = 0.1 g_c, r = g_c, v^ = g_c^2: d = g_c / (|g_c| + eps) = (1, 1) up to eps
    torch.testing.assert_close(d, torch.tensor([1.0, 1.0], dtype=F64), rtol=1e-8, atol=0)
    assert c.counts == {"0": 1, "1": 1}


# ----------------------------------------------------------------------------- state and undo
def test_resume_bit_identical() -> None:
    def fresh():
        model, losses = tiny_pinn(5)
        return model, losses, sgd_balancer(model)

    model_a, losses_a, a = fresh()
    for _ in range(10):
        a.step(losses_a())
    model_b, losses_b, b = fresh()
    for _ in range(5):
        b.step(losses_b())
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "balancer": b.state_dict()}, buffer)
    b.step(losses_b())  # the saved state must not alias the live momenta
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model_c, losses_c, c = fresh()
    model_c.load_state_dict(saved["model"])
    c.load_state_dict(saved["balancer"])
    for _ in range(5):
        c.step(losses_c())
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p.detach(), q.detach())
    assert a.combiner.counts == c.combiner.counts


def test_a_skipped_step_leaves_the_momenta_alone() -> None:
    model, losses = tiny_pinn(6)
    balancer = sgd_balancer(model, nonfinite="skip")
    for _ in range(4):
        balancer.step(losses())
    before = balancer.combiner.state_dict()
    bad = losses()
    bad["left"] = bad["left"] * math.nan
    assert math.isnan(balancer.step(bad).item()) and balancer.skipped == 1
    after = balancer.combiner.state_dict()
    assert before["counts"] == after["counts"] and before["steps"] == after["steps"]
    for name in before["momenta"]:
        assert torch.equal(before["momenta"][name], after["momenta"][name])
    assert torch.equal(before["v"], after["v"])


# ----------------------------------------------------------------------------- .grad where no term reaches
def test_parameters_no_term_reaches_keep_grad_none() -> None:
    """The library's contract (zeros would let AdamW's or SGD's weight decay move them). The output
    bias, which the "pde" term does not reach but the boundary terms do, has no gradient on step 0
    (only "pde" has a momentum) and one on every later step, "pde" steps included: the direction
    comes from every term's momentum."""
    model, losses = tiny_pinn(7)
    unused = torch.nn.Parameter(torch.ones(3))
    params = [*model.parameters(), unused]
    balancer = LossBalancer(torch.optim.SGD(params, lr=1e-2, weight_decay=0.1), "static", combine="mconfig")
    bias = list(model.parameters())[-1]
    for step in range(7):
        balancer.step(losses())
        assert unused.grad is None, step
        assert (bias.grad is not None) == (step > 0), step
    assert torch.equal(unused.detach(), torch.ones(3))
    balancer.zero_grad()
    balancer.loss(losses()).backward()
    assert unused.grad is None


def test_a_reevaluation_is_refused_before_anything_changes() -> None:
    # each mconfig evaluation differentiates the next term and moves its momenta: a second
    # evaluation of the same step would be a new step, so loss(..., reevaluation=True) refuses it
    model, losses = tiny_pinn(3)
    balancer = sgd_balancer(model)
    balancer.loss(losses()).backward()
    before = copy.deepcopy(balancer.state_dict())
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="reevaluation=True.*mconfig"):
        balancer.loss(losses(), reevaluation=True)
    after = balancer.state_dict()
    for key in ("combiner", "step", "updates", "weights", "generator"):
        assert str(after[key]) == str(before[key]), key
    assert all((p.grad is None and g is None) or torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
