"""LRAnnealing against an independent, deliberately naive reference (plain Python floats)."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbalance import LossBalancer, LRAnnealing

from _models import PINN1D, mlp


def naive_lra(grads_by_term, params, weights, reference, *, alpha, stat, weighted, layerwise, bias, eps):
    """One LRA update worked out entry by entry from lists of floats."""
    chosen = [j for j, p in enumerate(params) if bias or p.dim() >= 2]

    def entries(term, j):
        return [abs(v) for v in grads_by_term[term][j].reshape(-1).tolist()]

    def mean_of(term):
        if layerwise:
            per = [sum(entries(term, j)) / len(entries(term, j)) for j in chosen]
            return sum(per) / len(per)
        flat = [v for j in chosen for v in entries(term, j)]
        return sum(flat) / len(flat)

    if stat == "max":
        numerator = max(v for j in chosen for v in entries(reference, j))
    else:
        numerator = mean_of(reference)
    new = {}
    for term, w in weights.items():
        if term == reference:
            new[term] = w
            continue
        denominator = mean_of(term) * (w if weighted else 1.0)
        new[term] = (1 - alpha) * w + alpha * numerator / (denominator + eps)
    return new


VARIANTS = {
    "authors": dict(alpha=0.1, stat="max", weighted=True, layerwise=True, bias=False, eps=0.0),
    "paper_alg1": dict(alpha=0.1, stat="max", weighted=False, layerwise=True, bias=False, eps=0.0),
    "max_over_all_params": dict(alpha=0.3, stat="max", weighted=True, layerwise=False, bias=True, eps=0.0),
    "physicsnemo": dict(alpha=0.01, stat="mean", weighted=False, layerwise=False, bias=True, eps=1e-8),
}


def make_strategy(name, reference="pde"):
    if name == "physicsnemo":
        return LRAnnealing.physicsnemo(reference=reference)
    v = VARIANTS[name]
    return LRAnnealing(
        reference, alpha=v["alpha"], stat=v["stat"], weighted_denominator=v["weighted"],
        layerwise_mean=v["layerwise"], include_bias=v["bias"], eps=v["eps"],
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("update_every", [1, 2])
def test_matches_naive_reference_over_three_updates(variant, update_every):
    problem = PINN1D(seed=2)
    params = list(problem.model.parameters())
    balancer = LossBalancer(
        torch.optim.Adam(params, lr=1e-2), make_strategy(variant), update_every=update_every,
        weights={"dirichlet": 2.0},
    )
    expected = {"pde": 1.0, "dirichlet": 2.0, "neumann": 1.0}
    updates = 0
    for step in range(3 * update_every):
        losses = problem.losses()
        if step % update_every == 0:
            grads = {k: torch.autograd.grad(v, params, retain_graph=True, materialize_grads=True) for k, v in losses.items()}
            expected = naive_lra(grads, params, expected, "pde", **VARIANTS[variant])
            updates += 1
        balancer.step(losses)
        got = balancer.weights
        for term in expected:
            assert got[term] == pytest.approx(expected[term], rel=2e-5), (variant, step, term)
    assert updates == 3
    assert balancer.weights["pde"] == 1.0


def test_physicsnemo_preset_options():
    s = LRAnnealing.physicsnemo(reference="pde")
    assert s.options() == {
        "reference": "pde", "alpha": 0.01, "stat": "mean", "weighted_denominator": False,
        "layerwise_mean": False, "include_bias": True, "over": "scope", "eps": 1e-8,
    }


def test_authors_defaults():
    s = LRAnnealing("pde")
    assert (s.alpha, s.stat, s.weighted_denominator, s.layerwise_mean, s.include_bias) == (0.1, "max", True, True, False)


def converged_weighted_grad(scale, weighted):
    """Frozen parameters (lr = 0), 300 updates: the EMA reaches its fixed point."""
    problem = PINN1D(seed=4)
    params = list(problem.model.parameters())
    balancer = LossBalancer(
        torch.optim.SGD(params, lr=0.0), LRAnnealing("pde", weighted_denominator=weighted)
    )
    for _ in range(300):
        losses = problem.losses()
        balancer.step({k: v if k == "pde" else scale * v for k, v in losses.items()})
    w = balancer.weights
    losses = problem.losses()
    return {
        k: torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            w[k] * (v if k == "pde" else scale * v), params, materialize_grads=True)])
        for k, v in losses.items()
    }


@settings(max_examples=4, deadline=None)
@given(scale=st.floats(1e-3, 1e3))
def test_scale_invariance_of_the_paper_formula(scale):
    """Paper's Alg. 1 (unweighted denominator): lambda* = max/mean, so c * lambda* is constant."""
    base = converged_weighted_grad(1.0, weighted=False)
    scaled = converged_weighted_grad(scale, weighted=False)
    for k in base:
        torch.testing.assert_close(scaled[k], base[k], rtol=1e-4, atol=1e-7)


@settings(max_examples=4, deadline=None)
@given(scale=st.floats(1e-2, 1e2))
def test_authors_code_fixed_point_is_the_square_root(scale):
    """Authors' code (lambda inside the denominator): lambda* = sqrt(max/mean), so the balanced
    gradient of a term scaled by c scales by sqrt(c)."""
    base = converged_weighted_grad(1.0, weighted=True)
    scaled = converged_weighted_grad(scale, weighted=True)
    torch.testing.assert_close(scaled["pde"], base["pde"])
    for k in ("dirichlet", "neumann"):
        torch.testing.assert_close(scaled[k], math.sqrt(scale) * base[k], rtol=1e-4, atol=1e-7)


@settings(max_examples=12, deadline=None)
@given(
    exponents=st.lists(st.integers(-20, 20), min_size=3, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    weighted=st.booleans(),
)
def test_weights_finite_and_positive_for_extreme_scales(exponents, dtype, weighted):
    problem = PINN1D(seed=5, dtype=dtype)
    balancer = LossBalancer(
        torch.optim.Adam(problem.model.parameters(), lr=1e-3), LRAnnealing("pde", weighted_denominator=weighted)
    )
    for _ in range(5):
        losses = problem.losses()
        balancer.step({k: v * 10.0**e for (k, v), e in zip(losses.items(), exponents)})
        w = torch.tensor(list(balancer.weights.values()), dtype=torch.float64)  # float32 would overflow at 5e38
        assert torch.isfinite(w).all() and (w > 0).all()
    for p in problem.model.parameters():
        assert torch.isfinite(p).all()


def test_zero_gradient_term_keeps_its_weight():
    model = mlp((1, 8, 1))
    x = torch.rand(16, 1)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.1), LRAnnealing("fit"))
    out = model(x)
    losses = {"fit": (out - 1).pow(2).mean(), "zero": 0.0 * out.sum()}
    balancer.step(losses)
    assert balancer.weights["zero"] == 1.0


def test_default_reference_is_the_first_term_with_a_warning():
    problem = PINN1D()
    balancer = LossBalancer(torch.optim.SGD(problem.model.parameters(), lr=0.1), "lra")
    with pytest.warns(UserWarning, match="reference='pde'"):
        balancer.step(problem.losses())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer.step(problem.losses())
    assert balancer.weights["pde"] == 1.0


def test_reference_missing_from_the_terms():
    problem = PINN1D()
    balancer = LossBalancer(torch.optim.SGD(problem.model.parameters(), lr=0.1), LRAnnealing("residual"))
    with pytest.raises(KeyError, match="'residual'"):
        balancer.step(problem.losses())
    assert balancer.weights == {}


def test_a_scope_without_weight_matrices_is_refused():
    model = mlp((1, 8, 1))
    coef = torch.nn.Parameter(torch.tensor(1.0))
    x = torch.rand(16, 1)
    balancer = LossBalancer(
        torch.optim.SGD([*model.parameters(), coef], lr=0.1), LRAnnealing("data"), scope={"pde": [coef]}
    )
    losses = {"data": (model(x) - 1).pow(2).mean(), "pde": (coef * model(x)).pow(2).mean()}
    with pytest.raises(ValueError, match=r"term\(s\) \['pde'\].*include_bias=True"):
        balancer.step(losses)
    assert balancer.weights == {}
    balancer = LossBalancer(
        torch.optim.SGD([*model.parameters(), coef], lr=0.1), LRAnnealing("data", include_bias=True),
        scope={"pde": [coef]},
    )
    balancer.step({"data": (model(x) - 1).pow(2).mean(), "pde": (coef * model(x)).pow(2).mean()})


def test_an_optional_reference_is_refused_when_built():
    """Every LRA update divides by the reference's gradient: declaring it optional= only failed
    on the first step it was absent (a KeyError mid-run); now at construction."""
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="reference term 'pde' is declared optional="):
        LossBalancer(torch.optim.SGD(model.parameters(), lr=0.1), LRAnnealing(reference="pde"), optional=["pde"])
    LossBalancer(torch.optim.SGD(model.parameters(), lr=0.1), LRAnnealing(reference="pde"), optional=["bc"])


def test_an_optional_reference_declared_later_is_refused_too():
    model = torch.nn.Linear(2, 1)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.1), LRAnnealing(reference="pde"), terms=["bc"])
    with pytest.raises(ValueError, match="reference term 'pde' is declared optional="):
        balancer.add_term("pde", optional=True)
    assert balancer.weights == {"bc": 1.0}
    balancer.add_term("pde")
