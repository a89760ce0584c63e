"""NTK weighting: traces against naive per-point loops, Hutchinson's estimate and its error, the
weights by hand, causal weights as jaxpi combines them, resume bit for bit, bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from _models import mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from lossbalance import BRDR, RBA, SAPINN, Causal, LossBalancer, NTKWeighting, Residual
from lossbalance.ntk import exact_trace, hutchinson_trace
from lossbalance.strategies.base import StepRecord

F64 = torch.float64


class Residuals:
    """-u'' = sin(pi x) on 12 interior points (times t = x), u = 0 on 2 boundary points: N_r != N_b."""

    def __init__(self, seed=0, dtype=torch.float32):
        self.model = mlp((1, 8, 8, 1), seed=seed, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(12, 1, generator=g, dtype=dtype)
        self.xb = torch.tensor([[0.0], [1.0]], dtype=dtype)

    def residuals(self) -> dict[str, torch.Tensor]:
        x = self.x.clone().requires_grad_(True)
        u = self.model(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        return {"pde": (d2u + torch.sin(math.pi * x)).reshape(-1), "bc": self.model(self.xb).reshape(-1)}

    def losses(self, kind="residual") -> dict[str, Residual]:
        r = self.residuals()
        values = r if kind == "residual" else {k: v.square() for k, v in r.items()}
        return {"pde": Residual(values["pde"], t=self.x.reshape(-1), kind=kind), "bc": Residual(values["bc"], kind=kind)}


def naive_diagonal(r: torch.Tensor, params) -> torch.Tensor:
    """K_pp = ||grad_theta r_p||^2, one backward per point."""
    rows = []
    for p in range(r.shape[0]):
        grads = torch.autograd.grad(r[p], params, retain_graph=True, allow_unused=True)
        rows.append(sum(g.to(F64).square().sum() for g in grads if g is not None))
    return torch.stack(rows)


def test_exact_trace_is_the_naive_loop_for_any_chunk() -> None:
    problem = Residuals(dtype=F64)
    params = list(problem.model.parameters())
    r = problem.residuals()["pde"]
    diagonal = naive_diagonal(r, params)
    c = torch.rand(12, generator=torch.Generator().manual_seed(1), dtype=F64)
    for chunk in (1, 5, 12, 100):
        assert torch.allclose(exact_trace(r, c, params, chunk).value, (c * diagonal).sum(), rtol=1e-12)
    scope = params[2:]  # the later layers only
    assert torch.allclose(exact_trace(r, torch.ones(12, dtype=F64), scope, 4).value, naive_diagonal(r, scope).sum(),
                          rtol=1e-12)


def test_hutchinson_is_unbiased_within_its_reported_error() -> None:
    problem = Residuals(dtype=F64)
    params = list(problem.model.parameters())
    r = problem.residuals()["pde"]
    c = torch.full((12,), 1 / 12, dtype=F64)
    exact = exact_trace(r, c, params, 12).value
    many = hutchinson_trace(r, c, params, 20000, 4096, torch.Generator().manual_seed(0))
    assert abs(float(many.value - exact)) < 4 * float(many.stderr)
    assert float(many.stderr) < 0.02 * float(exact)  # it did shrink: the test above has teeth
    # the reported error is calibrated: z-scores of 200 estimates from 128 probes each have mean ~0
    # (its standard error is 1 / sqrt(200) = 0.07) and spread ~1
    g = torch.Generator().manual_seed(1)
    z = torch.stack([(est.value - exact) / est.stderr for est in (hutchinson_trace(r, c, params, 128, 128, g) for _ in range(200))])
    assert abs(float(z.mean())) < 0.25 and 0.8 < float(z.std()) < 1.25


def test_hutchinson_single_probe_has_no_error_estimate() -> None:
    problem = Residuals(dtype=F64)
    r = problem.residuals()["bc"]
    one = hutchinson_trace(r, torch.ones(2, dtype=F64), list(problem.model.parameters()), 1, 8, torch.Generator())
    assert math.isnan(float(one.stderr)) and float(one.value) > 0


# -------------------------------------------------------------------------------- the weights
def record(traces, weights=None):
    k = len(traces)
    w = torch.ones(k) if weights is None else torch.tensor(weights)
    return StepRecord(tuple(f"t{i}" for i in range(k)), torch.ones(k), w, 0, 0, None, torch.Generator(),
                      torch.tensor(traces, dtype=F64))


def test_weights_by_hand() -> None:
    paper = NTKWeighting.ntk2022().update(record([1.0, 3.0]))
    assert torch.allclose(paper, torch.tensor([4.0, 4 / 3]))
    jaxpi = NTKWeighting.jaxpi().update(record([1.0, 3.0], [2.0, 1.0]))
    mean = 2.0
    hand = [0.9 * 2.0 + 0.1 * mean / (1.0 + 1e-5 * mean), 0.9 * 1.0 + 0.1 * mean / (3.0 + 1e-5 * mean)]
    assert torch.allclose(jaxpi, torch.tensor(hand), rtol=1e-6)
    kept = NTKWeighting().update(record([0.0, 2.0, math.inf], [5.0, 1.0, 7.0]))
    assert kept[0] == 5.0 and kept[2] == 7.0 and kept[1] == pytest.approx(1.0)  # zero / inf trace: weight kept


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(1e-6, 1e6), min_size=2, max_size=5), st.floats(1e-3, 1e3))
def test_weighted_traces_are_equal_and_scale_free(traces, scale) -> None:
    """lambda_i s_i = sum_j s_j for every term (alpha = 1), and scaling every trace changes nothing."""
    w = NTKWeighting().update(record(traces)).to(F64)
    s = torch.tensor(traces, dtype=F64)
    assert torch.allclose(w * s, s.sum().expand_as(s), rtol=1e-5)
    assert torch.allclose(NTKWeighting().update(record([scale * t for t in traces])).to(F64), w, rtol=1e-5)


@pytest.mark.parametrize("points", ["sum", "mean"])
def test_balancer_weights_from_naive_traces(points) -> None:
    """One step: lambda_i = sum_j s_j / s_i with s the naive trace (sum) or its mean per point."""
    problem = Residuals(dtype=F64)
    params = list(problem.model.parameters())
    balancer = LossBalancer(torch.optim.SGD(params, lr=0.0), NTKWeighting(points=points, chunk=5))
    r = problem.residuals()
    s = {k: naive_diagonal(v, params).sum() / (v.shape[0] if points == "mean" else 1) for k, v in r.items()}
    balancer.step(problem.losses())
    total = s["pde"] + s["bc"]
    for name in ("pde", "bc"):
        assert balancer.weights[name] == pytest.approx(float(total / s[name]), rel=1e-10)
        assert balancer.stats[name]["ntk_trace"] == pytest.approx(float(s[name]), rel=1e-12)
        assert balancer.stats[name]["ntk_trace_se"] == 0.0


@pytest.mark.parametrize("points", ["mean", "sum"])
def test_causal_weights_enter_as_jaxpi_combines_them(points) -> None:
    """jaxpi compute_diag_ntk: sort by t, diagonal reshaped (chunks, -1), mean per chunk, times the
    causal weights, then (compute_weights) the mean; here 12 points in 4 chunks of 3. "sum": the
    diagonal weighted by each point's causal weight, summed (12 times the mean here)."""
    problem = Residuals(dtype=F64)
    params = list(problem.model.parameters())
    eps = 0.5
    balancer = LossBalancer(torch.optim.SGD(params, lr=0.0), NTKWeighting(points=points, normalize="mean"),
                            pointwise={"pde": Causal(chunks=4, eps=eps)})
    r = problem.residuals()
    order = torch.argsort(problem.x.reshape(-1))
    chunk_diag = naive_diagonal(r["pde"], params)[order].reshape(4, 3).mean(1)
    chunk_loss = r["pde"].detach()[order].square().reshape(4, 3).mean(1)
    w = torch.exp(-eps * torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(chunk_loss, 0)[:-1]]))
    s_pde = (chunk_diag * w).mean() * (12 if points == "sum" else 1)
    s_bc = naive_diagonal(r["bc"], params).sum() / (1 if points == "sum" else 2)
    balancer.step(problem.losses())
    mean = (s_pde + s_bc) / 2
    assert balancer.stats["pde"]["ntk_trace"] == pytest.approx(float(s_pde), rel=1e-12)
    assert balancer.weights["pde"] == pytest.approx(float(mean / s_pde), rel=1e-10)
    assert balancer.weights["bc"] == pytest.approx(float(mean / s_bc), rel=1e-10)
    assert "causal_min" in balancer.stats["pde"]


def test_only_update_steps_compute_traces() -> None:
    problem = Residuals()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), 1e-3), "ntk", update_every=3)
    seen = []
    for _ in range(4):
        balancer.step(problem.losses())
        seen.append("ntk_trace" in balancer.stats["pde"])
    assert seen == [True, False, False, True]


def test_lbfgs_closure_updates_once_per_step() -> None:
    problem = Residuals()
    optimizer = torch.optim.LBFGS(problem.model.parameters(), lr=0.1, max_iter=3)
    balancer = LossBalancer(optimizer, "ntk")
    balancer.step(closure=problem.losses)
    assert balancer.state_dict()["updates"] == 1 and balancer.weights["bc"] != 1.0


# -------------------------------------------------------------------------------- checkpoints
def run(steps, state=None, seed=0):
    problem = Residuals(seed=3)
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=1e-2)
    balancer = LossBalancer(optimizer, NTKWeighting.jaxpi(trace="hutchinson", probes=4), update_every=2, seed=seed,
                            pointwise={"pde": Causal(chunks=3, eps=[0.1, 1.0])})
    if state is not None:
        problem.model.load_state_dict(state["model"])
        balancer.load_state_dict(state["balancer"])
    weights = []
    for _ in range(steps):
        balancer.step(problem.losses())
        weights.append(balancer.weights)
    return problem, balancer, weights


def test_resume_is_bit_for_bit() -> None:
    whole, _, weights = run(7)
    first, half, _ = run(3)
    state = copy.deepcopy({"model": first.model.state_dict(), "balancer": half.state_dict()})
    resumed, _, later = run(4, state)
    assert later == weights[3:]
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    other, _, _ = run(7, seed=1)  # the probes come from the balancer's generator: the seed matters
    assert not all(torch.equal(a, b) for a, b in zip(whole.model.parameters(), other.model.parameters()))


# -------------------------------------------------------------------------------- bad input
def snapshot(problem, balancer):
    return ([p.detach().clone() for p in problem.model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in problem.model.parameters()],
            copy.deepcopy(balancer.state_dict()))


def assert_unchanged(before, after) -> None:
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    a, b = before[2], after[2]
    assert a.keys() == b.keys()
    assert a["step"] == b["step"] and a["updates"] == b["updates"] and torch.equal(a["weights"], b["weights"])
    assert torch.equal(a["generator"], b["generator"]) and a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


@pytest.mark.parametrize("bad, error, message", [
    (lambda p: {**p.losses(), "bc": p.losses()["bc"].values.square().mean()}, TypeError,
     "'bc', got a scalar loss: pass lossbalance.Residual\\(r, kind='residual'\\)"),
    (lambda p: p.losses(kind="loss"), ValueError, "residuals r_i of loss term 'pde', got Residual\\(kind='loss'\\)"),
    (lambda p: {**p.losses(), "pde": Residual(p.losses()["pde"].values * math.nan, t=p.x.reshape(-1), kind="residual")},
     ValueError, "non-finite .*'pde'"),
])
@pytest.mark.parametrize("update_every", [1, 5], ids=["update step", "plain step"])
def test_bad_terms_name_the_term_and_change_nothing(bad, error, message, update_every) -> None:
    # on a plain step too: the terms trained until the next update, then raised (with warmup=N, late)
    problem = Residuals()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), 1e-2), NTKWeighting(trace="hutchinson"),
                            update_every=update_every)
    balancer.step(problem.losses())
    before = snapshot(problem, balancer)
    with pytest.raises(error, match=message):
        balancer.step(bad(problem))
    assert_unchanged(before, snapshot(problem, balancer))
    balancer.step(problem.losses())  # and it goes on


@pytest.mark.parametrize("weighting", [RBA(), SAPINN(), BRDR()], ids=["rba", "sa_pinn", "brdr"])
def test_per_point_weights_other_than_causal_refused_at_construction(weighting) -> None:
    # refused on the first update before, after warmup= steps of training
    problem = Residuals()
    with pytest.raises(ValueError, match=f"'bc', which has {weighting.label} weights"):
        LossBalancer(torch.optim.Adam(problem.model.parameters(), 1e-2), "ntk", warmup=5, pointwise={"bc": weighting})


@pytest.mark.parametrize("options, message", [
    ({"points": "max"}, "points"), ({"trace": "lanczos"}, "trace"), ({"alpha": 0.0}, "alpha"),
    ({"eps": -1.0}, "eps"), ({"chunk": 0}, "chunk"), ({"probes": True}, "probes"), ({"normalize": "median"}, "normalize"),
])
def test_bad_options(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        NTKWeighting(**options)


def test_options_round_trip() -> None:
    strategy = NTKWeighting.jaxpi(trace="hutchinson", probes=8, chunk=4)
    assert NTKWeighting(**strategy.options()).options() == strategy.options()
    assert strategy.options()["eps"] == 1e-5 and strategy.options()["probes"] == 8


@pytest.mark.parametrize("options", [{"diagnose_every": 1}, {"combine": "pcgrad"}, {"memory": "lean", "diagnose_every": 0}])
def test_traces_with_per_term_gradients_on_the_same_step(options) -> None:
    """The traces are taken before the per-term gradients (which may free the graph)."""
    problem = Residuals()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), 1e-3), "ntk", **options)
    for _ in range(2):
        balancer.step(problem.losses())
    assert balancer.stats["pde"]["ntk_trace"] > 0


def test_no_host_reads_on_the_update_path() -> None:
    """Meta tensors hold no data: any .item()/float()/bool() of a tensor in the traces or the
    weights would raise (device-agnostic, no host syncs)."""
    generator = torch.Generator()
    layer = torch.nn.Linear(2, 1).to("meta")
    r = layer(torch.ones(10, 2, device="meta")).reshape(-1)
    c = torch.ones(10, device="meta")
    params = list(layer.parameters())
    for trace in (exact_trace(r, c, params, 3), hutchinson_trace(r, c, params, 4, 3, generator)):
        assert trace.value.device.type == "meta" and trace.stderr.device.type == "meta"
    for strategy in (NTKWeighting(), NTKWeighting.jaxpi()):
        for names in (("a", "b"), ("a", "b", "c")):
            k = len(names)
            traces = torch.ones(k, device="meta", dtype=F64)
            rec = StepRecord(names, torch.ones(k, device="meta"), torch.ones(k, device="meta"), 0, 0, None, generator, traces)
            assert strategy.update(rec).device.type == "meta"


def test_a_residual_reused_after_its_graph_was_freed_is_named_with_the_fix() -> None:
    # the trace's backward raised torch's bare "backward through the graph a second time"
    problem = Residuals()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), 1e-2), NTKWeighting(trace="exact"))
    losses = problem.losses()
    balancer.step(losses)
    before = snapshot(problem, balancer)
    with pytest.raises(RuntimeError, match="while differentiating term 'pde': build the loss dict anew"):
        balancer.step(losses)
    assert_unchanged(before, snapshot(problem, balancer))
