"""Pointwise terms (issue 17, first slice): ``Residual`` per-point terms, causal weights (Wang,
Sankaran & Perdikaris 2022) and residual-based attention (Anagnostopoulos et al. 2024), each
against a naive hand-written reference; state round trips; wrong inputs change nothing."""
import copy
import io
import math
import warnings

import pytest
import torch

from lossbalance import BRDR, RBA, Causal, LossBalancer, LRAnnealing, Residual

warnings.filterwarnings("ignore", message="LRAnnealing: no reference")

N = 40


class Problem:
    """A linear model on N points with times t: residuals r = x @ w - y."""

    def __init__(self, seed=0, n=N):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
        self.x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        self.y = torch.randn(n, generator=g, dtype=torch.float64)
        self.t = torch.rand(n, generator=g, dtype=torch.float64)
        self.t[::7] = self.t[3]  # ties: the sort must be stable
        self.ids = torch.arange(100, 100 + n)

    def r(self, rows=slice(None)):
        return self.x[rows] @ self.w - self.y[rows]


# ---------------------------------------------------------------- causal weights
def naive_causal(losses, t, chunks, eps, split, cumulative, t_range=None):
    """w_k = exp(-eps sum_{j<k} L_j) (or j <= k), value = mean over the non-empty chunks of w_k L_k."""
    n = len(t)
    if split == "count":
        order = sorted(range(n), key=lambda i: float(t[i]))  # Python's sort is stable
        groups = [list(map(int, g)) for g in torch.tensor_split(torch.tensor(order), chunks)]
    else:
        lo, hi = (float(t.min()), float(t.max())) if t_range is None else t_range
        groups = [[] for _ in range(chunks)]
        for i in range(n):
            k = min(max(math.floor((float(t[i]) - lo) / (hi - lo) * chunks), 0), chunks - 1)
            groups[k].append(i)
    chunk_losses = [None if not g else sum(losses[i] for i in g) / len(g) for g in groups]
    total, count, seen, weights = 0.0, 0, 0.0, []
    for L in chunk_losses:
        if L is None:
            continue
        if cumulative == "inclusive":
            seen = seen + L.detach()
        w = torch.exp(-eps * seen) if torch.is_tensor(seen) else torch.tensor(1.0, dtype=L.dtype)
        if cumulative == "exclusive":
            seen = seen + L.detach()
        weights.append(w)
        total, count = total + w * L, count + 1
    return total / count, min(float(w) for w in weights)


VARIANTS = [("count", "exclusive"), ("count", "inclusive"), ("time", "exclusive"), ("time", "inclusive")]


@pytest.mark.parametrize("split,cumulative", VARIANTS)
@pytest.mark.parametrize("kind", ["loss", "residual"])
def test_causal_weights_match_a_naive_loop_over_chunks(split, cumulative, kind):
    problem = Problem()
    t = problem.t.clone()
    t_range = None
    if split == "time":  # an empty interval, points outside the range and on its edges
        t = torch.where((t > 0.3) & (t < 0.45), t + 0.2, t)
        t[0], t[1], t_range = -0.1, 1.2, (0.0, 1.0)
    causal = Causal(chunks=7, eps=3.0, split=split, cumulative=cumulative, t_range=t_range)
    balancer = LossBalancer([problem.w], "static", pointwise={"pde": causal})
    r = problem.r()
    values = r if kind == "residual" else r**2
    total = balancer.backward({"pde": Residual(values, t=t, kind=kind)})
    reference, w_min = naive_causal(problem.r() ** 2, t, 7, 3.0, split, cumulative, t_range)
    (expected,) = torch.autograd.grad(reference, problem.w)
    torch.testing.assert_close(total, reference.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(problem.w.grad, expected, rtol=1e-12, atol=0)
    assert balancer.stats["pde"]["causal_min"] == pytest.approx(w_min, rel=1e-12)
    assert w_min < 1  # the weights did something


@pytest.mark.parametrize("split", ["count", "time"])
def test_causal_chunks_follow_a_time_tensor_changed_in_place(split):
    """The chunks of a fixed time tensor are computed once; the same tensor changed in place
    (new times: its version moves) is chunked again, as the naive loop on the new times."""
    problem = Problem()
    t = problem.t.clone()
    balancer = LossBalancer([problem.w], "static", pointwise={"pde": Causal(chunks=5, eps=2.0, split=split)})
    for step in range(3):
        if step == 2:
            t.copy_(1.0 - t)  # same object, reversed order in time
        total = balancer.backward({"pde": Residual(problem.r() ** 2, t=t)})
        reference, w_min = naive_causal(problem.r() ** 2, t, 5, 2.0, split, "exclusive")
        torch.testing.assert_close(total, reference.detach(), rtol=1e-12, atol=0)
        assert balancer.stats["pde"]["causal_min"] == pytest.approx(w_min, rel=1e-12)


def test_causal_annealing_follows_the_papers_rule():
    problem = Problem()
    schedule = [1e-2, 1e-1, 1.0, 10.0]
    balancer = LossBalancer([problem.w], "static", pointwise={"pde": Causal(chunks=4, eps=schedule, delta=0.99)})
    seen = []
    for scale in [1.0, 1.0, 1e-3, 1e-3, 1e-3, 1e-5, 1e-5]:
        r = problem.r()
        balancer.backward({"pde": Residual(scale * r**2, t=problem.t)})
        stats = balancer.stats["pde"]
        seen.append(stats["causal_eps"])
        L = [float(scale * (problem.r()[g].detach() ** 2).mean()) for g in torch.tensor_split(torch.argsort(problem.t, stable=True), 4)]
        expected_min = math.exp(-stats["causal_eps"] * sum(L[:-1]))  # exclusive: the last chunk's weight
        assert stats["causal_min"] == pytest.approx(expected_min, rel=1e-9)
    # eps 1e-2 at scale 1: min w = exp(-0.01 * sum L) > 0.99? decided by the figures themselves
    index, expected = 0, []
    for scale, eps in zip([1.0, 1.0, 1e-3, 1e-3, 1e-3, 1e-5, 1e-5], seen):
        expected.append(schedule[index])
        L = [float(scale * (problem.r()[g].detach() ** 2).mean()) for g in torch.tensor_split(torch.argsort(problem.t, stable=True), 4)]
        if math.exp(-schedule[index] * sum(L[:-1])) > 0.99 and index < len(schedule) - 1:
            index += 1
    assert seen == expected
    assert seen[0] == 1e-2 and seen[-1] == 10.0 and len(set(seen)) == 4  # it moved through the whole list
    assert balancer.stats["pde"]["causal_done"] == 1.0
    assert balancer.state_dict()["pointwise"]["pde"] == {"kind": "causal", "eps_index": 3}


# ---------------------------------------------------------------- RBA
def naive_rba_step(lam, r, ids, gamma=0.999, eta=1e-3, init=0.0):
    """One RBA step on a dict {id: lambda}: the updated multipliers, then mean((lambda_i r_i)^2)."""
    a = r.detach().abs()
    top = float(a.max())
    new = [gamma * lam.get(int(i), init) + eta * float(a[k]) / top for k, i in enumerate(ids)]
    for k, i in enumerate(ids):
        lam[int(i)] = new[k]
    weights = torch.tensor(new, dtype=r.dtype)
    return sum((weights[k] * r[k]) ** 2 for k in range(len(r))) / len(r)


def rba_batches(problem, steps, seed=1):
    """Shuffled, partly resampled batches: (rows, ids) per step (new ids appear on the way)."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randperm(N, generator=g)[: N - 8 + step]
        yield rows, problem.ids[rows]


def test_rba_matches_a_naive_loop_through_shuffles_and_new_points():
    problem = Problem()
    balancer = LossBalancer(torch.optim.SGD([problem.w], lr=0.05), "static", pointwise={"pde": RBA(gamma=0.9, eta=0.1)})
    twin = Problem()
    optimizer = torch.optim.SGD([twin.w], lr=0.05)
    lam = {}
    for rows, ids in rba_batches(problem, 6):
        total = balancer.step({"pde": Residual(problem.r(rows), ids=ids, kind="residual")})
        optimizer.zero_grad()
        reference = naive_rba_step(lam, twin.r(rows), ids, gamma=0.9, eta=0.1)
        reference.backward()
        optimizer.step()
        torch.testing.assert_close(total, reference.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(problem.w, twin.w, rtol=1e-12, atol=0)
    state = balancer.state_dict()["pointwise"]["pde"]
    assert state["ids"].tolist() == sorted(lam)
    torch.testing.assert_close(state["lambdas"], torch.tensor([lam[i] for i in sorted(lam)], dtype=torch.float64))
    assert balancer.stats["pde"]["rba_max"] == pytest.approx(max(lam[int(i)] for i in ids))


def test_rba_the_same_points_in_another_order_get_the_same_weights():
    a, b = Problem(), Problem()
    ba = LossBalancer([a.w], "static", pointwise={"pde": RBA()})
    bb = LossBalancer([b.w], "static", pointwise={"pde": RBA()})
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        perm = torch.randperm(N, generator=g)
        ba.backward({"pde": Residual(a.r(), ids=a.ids, kind="residual")})
        bb.backward({"pde": Residual(b.r(perm), ids=b.ids[perm], kind="residual")})
        torch.testing.assert_close(a.w.grad, b.w.grad, rtol=1e-12, atol=1e-15)
    sa, sb = ba.state_dict()["pointwise"]["pde"], bb.state_dict()["pointwise"]["pde"]
    assert torch.equal(sa["ids"], sb["ids"]) and torch.equal(sa["lambdas"], sb["lambdas"])
    assert float(sa["lambdas"].min()) > 0  # from lambda_0 = 0 (the authors' code)


# ---------------------------------------------------------------- checkpoints
def _terms(problem, rows, ids):
    r = problem.r(rows)
    return {"pde": Residual(r**2, t=problem.t[rows]), "bc": Residual(r, ids=ids, kind="residual"),
            "data": (problem.w**2).sum()}


def _build(problem):
    pointwise = {"pde": Causal(chunks=4, eps=[1e-3, 1e-2, 1e-1, 1.0]), "bc": RBA(gamma=0.9, eta=0.1)}
    return LossBalancer(torch.optim.Adam([problem.w], lr=1e-2), LRAnnealing("data", include_bias=True), pointwise=pointwise)


def test_a_checkpoint_resumes_causal_and_rba_bit_for_bit():
    straight, resumed = Problem(), Problem()
    b1, batches = _build(straight), list(rba_batches(straight, 8))
    for rows, ids in batches:
        b1.step(_terms(straight, rows, ids))
    b2 = _build(resumed)
    for rows, ids in batches[:4]:
        b2.step(_terms(resumed, rows, ids))
    buffer = io.BytesIO()
    torch.save(b2.state_dict(), buffer)
    buffer.seek(0)
    fresh_problem = Problem(seed=0)
    with torch.no_grad():
        fresh_problem.w.copy_(resumed.w)
    b3 = _build(fresh_problem)
    b3.load_state_dict(torch.load(buffer, weights_only=False))
    for rows, ids in batches[4:]:
        b3.step(_terms(fresh_problem, rows, ids))
    assert torch.equal(fresh_problem.w, straight.w)
    s1, s3 = b1.state_dict(), b3.state_dict()
    assert s1["pointwise"]["pde"] == s3["pointwise"]["pde"] and s1["pointwise"]["pde"]["eps_index"] > 0
    for key in ("ids", "lambdas"):
        assert torch.equal(s1["pointwise"]["bc"][key], s3["pointwise"]["bc"][key])
    assert torch.equal(s1["weights"], s3["weights"])


def test_loading_a_state_with_other_pointwise_weights_changes_nothing():
    problem = Problem()
    balancer = _build(problem)
    balancer.step(_terms(problem, slice(None), problem.ids))
    state = balancer.state_dict()
    other = LossBalancer(torch.optim.Adam([problem.w]), LRAnnealing("data", include_bias=True), pointwise={"bc": Causal()})
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="pointwise weights for term"):
        other.load_state_dict(state)
    bad = copy.deepcopy(state)
    bad["pointwise"]["pde"]["eps_index"] = 9
    with pytest.raises(ValueError, match="eps_index 9"):
        _build(Problem()).load_state_dict(bad)
    assert other.state_dict()["pointwise"] == before["pointwise"]


# ---------------------------------------------------------------- plain Residual terms and loss()
def test_a_residual_without_pointwise_weights_is_its_mean_or_sum():
    a, b = Problem(), Problem()
    ba, bb = LossBalancer([a.w], LRAnnealing("pde", include_bias=True)), LossBalancer([b.w], LRAnnealing("pde", include_bias=True))
    for _ in range(2):
        ba.backward({"pde": Residual(a.r(), kind="residual"), "bc": Residual(a.r().abs(), reduction="sum")})
        bb.backward({"pde": b.r().pow(2).mean(), "bc": b.r().abs().sum()})
        assert torch.equal(a.w.grad, b.w.grad)
    assert ba.weights == bb.weights


def test_loss_with_pointwise_terms_gives_the_grad_of_backward():
    a, b = Problem(), Problem()
    ba, bb = _build(a), _build(b)
    for rows, ids in rba_batches(a, 3):
        ba.backward(_terms(a, rows, ids))
        bb.zero_grad()
        bb.loss(_terms(b, rows, ids)).backward()
        assert torch.equal(a.w.grad, b.w.grad)
    assert torch.equal(ba.state_dict()["pointwise"]["bc"]["lambdas"], bb.state_dict()["pointwise"]["bc"]["lambdas"])


# ---------------------------------------------------------------- wrong inputs change nothing
def _state(balancer, problem):
    return copy.deepcopy(balancer.state_dict()), problem.w.detach().clone(), problem.w.grad.clone()


def _assert_unchanged(balancer, problem, before):
    state, w, grad = before
    after = balancer.state_dict()
    assert after["step"] == state["step"] and torch.equal(after["weights"], state["weights"])
    assert after["pointwise"]["pde"] == state["pointwise"]["pde"]
    for key in ("ids", "lambdas"):
        assert torch.equal(after["pointwise"]["bc"][key], state["pointwise"]["bc"][key])
    assert torch.equal(problem.w.detach(), w) and torch.equal(problem.w.grad, grad)


def _wrong(problem, case):
    r = problem.r()
    terms = _terms(problem, slice(None), problem.ids)
    if case == "values 2-D":
        terms["pde"] = Residual((r**2)[:, None], t=problem.t)
    elif case == "empty":
        terms["bc"] = Residual(r[:0], ids=problem.ids[:0], kind="residual")
    elif case == "t length":
        terms["pde"] = Residual(r**2, t=problem.t[:-1])
    elif case == "ids length":
        terms["bc"] = Residual(r, ids=problem.ids[:-2], kind="residual")
    elif case == "t missing":
        terms["pde"] = Residual(r**2)
    elif case == "ids missing":
        terms["bc"] = Residual(r, kind="residual")
    elif case == "ids repeat":
        terms["bc"] = Residual(r, ids=problem.ids.clamp(max=110), kind="residual")
    elif case == "rba on losses":
        terms["bc"] = Residual(r**2, ids=problem.ids)
    elif case == "scalar":
        terms["pde"] = r.pow(2).mean()
    elif case == "non-finite":
        terms["bc"] = Residual(torch.where(problem.ids == 105, math.nan, r), ids=problem.ids, kind="residual")
    return terms


CASES = {
    "values 2-D": (ValueError, "'pde': Residual values must be 1-D"),
    "empty": (ValueError, "'bc': Residual values are empty"),
    "t length": (ValueError, "'pde': Residual t has shape"),
    "ids length": (ValueError, "'bc': Residual ids has shape"),
    "t missing": (ValueError, "'pde' has causal weights: pass the per-point times"),
    "ids missing": (ValueError, "'bc' has RBA weights: pass stable point ids"),
    "ids repeat": (ValueError, "'bc': the point ids of its Residual repeat"),
    "rba on losses": (ValueError, "'bc' has RBA weights, which scale the residuals"),
    "scalar": (TypeError, "'pde' has pointwise weights .* passed as a scalar"),
    "non-finite": (ValueError, "non-finite loss value for term\\(s\\) 'bc'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wrong_pointwise_terms_raise_naming_the_term_and_change_nothing(case):
    problem = Problem()
    balancer = _build(problem)
    for rows, ids in rba_batches(problem, 2):
        balancer.step(_terms(problem, rows, ids))
    before = _state(balancer, problem)
    error, message = CASES[case]
    for _ in range(2):
        with pytest.raises(error, match=message):
            balancer.step(_wrong(problem, case))
        _assert_unchanged(balancer, problem, before)


def test_a_skipped_step_leaves_the_pointwise_state_as_it_was():
    problem = Problem()
    balancer = LossBalancer(torch.optim.Adam([problem.w], lr=1e-2), "static", nonfinite="skip",
                            pointwise={"pde": Causal(chunks=4, eps=[1e-3, 1.0]), "bc": RBA()})
    balancer.step(_terms(problem, slice(None), problem.ids))
    before = _state(balancer, problem)
    total = balancer.step(_wrong(problem, "non-finite"))
    assert math.isnan(total) and balancer.skipped == 1
    _assert_unchanged(balancer, problem, before)


@pytest.mark.parametrize("make", [
    lambda: Causal(chunks=0), lambda: Causal(eps=[]), lambda: Causal(split="grid"), lambda: Causal(cumulative="all"),
    lambda: Causal(delta=1.0), lambda: Causal(split="count", t_range=(0.0, 1.0)), lambda: RBA(gamma=1.0), lambda: RBA(eta=0.0), lambda: Residual(torch.ones(2), kind="r"),
])
def test_bad_options_are_refused_when_built(make):
    with pytest.raises(ValueError):
        make()


def test_an_lbfgs_step_advances_the_pointwise_state_once():
    problem = Problem()
    balancer = LossBalancer(torch.optim.LBFGS([problem.w], lr=0.1, max_iter=4), "static", pointwise={"bc": RBA(eta=0.1)})
    calls, lam = [], {}
    expected = naive_rba_step(lam, problem.r().detach(), problem.ids, eta=0.1)  # the first evaluation's update

    def closure():
        calls.append(1)
        return {"bc": Residual(problem.r(), ids=problem.ids, kind="residual")}

    total = balancer.step(closure=closure)
    assert len(calls) > 1  # L-BFGS re-evaluated it
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    state = balancer.state_dict()["pointwise"]["bc"]
    torch.testing.assert_close(state["lambdas"], torch.tensor([lam[i] for i in sorted(lam)], dtype=torch.float64))


def test_pointwise_weightings_travel_through_config_and_yaml():
    """config() exports pointwise=, from_config() rebuilds it (it was silently dropped before)."""
    import yaml

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    points = torch.rand(32, 2)
    ids = torch.arange(32)

    def terms():
        r = model(points)[:, 0] - points[:, 0]
        return {"pde": Residual(r, t=points[:, 1], ids=ids, kind="residual"), "bc": model(points[:4]).pow(2).mean()}

    pointwise = {"pde": Causal(chunks=4, eps=[1.0, 10.0], split="time", t_range=(0.0, 1.0))}
    first = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), "relobralo", pointwise=pointwise)
    config = yaml.safe_load(yaml.safe_dump(first.config()))
    assert config["pointwise"] == {"pde": {"kind": "causal", "chunks": 4, "eps": [1.0, 10.0], "split": "time",
                                           "cumulative": "exclusive", "delta": 0.99, "t_range": [0.0, 1.0]}}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    totals = [float(first.step(terms())) for _ in range(3)]
    model.load_state_dict(state)
    again = LossBalancer.from_config(torch.optim.SGD(model.parameters(), lr=1e-2), config)
    assert [float(again.step(terms())) for _ in range(3)] == totals
    rba = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), "static", pointwise={"pde": RBA(gamma=0.99)})
    assert rba.config()["pointwise"] == {"pde": {"kind": "rba", "gamma": 0.99, "eta": 1e-3, "init": 0.0}}


def test_a_bad_pointwise_config_names_the_term_and_the_choices():
    from lossbalance.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as error:
        parse_config({"pointwise": {"pde": {"kind": "casual"}, "bc": {"kind": "rba", "gama": 1.0}}})
    text = str(error.value)
    assert "pointwise.pde.kind must be one of [" in text and "'causal'" in text and "got 'casual'" in text
    assert "unknown pointwise.bc option 'gama' (did you mean 'gamma'?)" in text


def test_per_point_summaries_reach_stats_and_history_with_their_quantiles():
    """Issue 17, item 6: per-point weight summaries (min, quantiles, mean, max) in stats and in
    each history entry, equal to hand values from the naive loop's multipliers."""
    problem = Problem()
    balancer = LossBalancer(torch.optim.SGD([problem.w], lr=0.05), "static", history=10,
                            pointwise={"pde": RBA(gamma=0.9, eta=0.1)})
    lam = {}
    for rows, ids in rba_batches(problem, 3):
        r = problem.r(rows)
        naive_rba_step(lam, r.detach(), ids, gamma=0.9, eta=0.1)
        balancer.step({"pde": Residual(r, ids=ids, kind="residual")})
    values = sorted(lam[int(i)] for i in ids)

    def quantile(q):  # linear interpolation between the order statistics (numpy's default)
        position = q * (len(values) - 1)
        lo = math.floor(position)
        return values[lo] + (position - lo) * (values[min(lo + 1, len(values) - 1)] - values[lo])

    expected = {"rba_min": values[0], "rba_p10": quantile(0.1), "rba_p50": quantile(0.5),
                "rba_mean": sum(values) / len(values), "rba_p90": quantile(0.9), "rba_max": values[-1]}
    stats = {k: v for k, v in balancer.stats["pde"].items() if k.startswith("rba_")}
    assert stats == pytest.approx(expected, rel=1e-6)
    history = balancer.history
    assert len(history) == 3 and all("pointwise" in entry for entry in history)
    assert history[-1]["pointwise"]["pde"] == pytest.approx(stats)
    assert history[0]["pointwise"]["pde"] != history[-1]["pointwise"]["pde"]  # each step its own


def test_a_fixed_point_set_is_checked_once_and_in_place_changes_are_still_caught(monkeypatch):
    """Per-point weights keyed by ids on a fixed point set: the ids' uniqueness and their match
    with the stored table are verified once (no host read for them per step under check_every=); ids
    changed in place afterwards are checked again, and a repeat raises naming the term."""
    from test_deferred import host_reads

    problem = Problem()
    for weighting in (RBA(), BRDR()):
        balancer = LossBalancer(torch.optim.SGD([problem.w], lr=0.01), "static", check_every=50,
                                pointwise={"pde": weighting})
        kind = "residual" if isinstance(weighting, RBA) else "loss"

        def term():
            r = problem.r()
            return {"pde": Residual(r if kind == "residual" else r.square(), ids=problem.ids, kind=kind)}

        for _ in range(3):
            balancer.step(term())
        with host_reads(monkeypatch) as reads:
            for _ in range(3):
                balancer.step(term())
        # RBA: none; BRDR: one per step, the sign check of its per-point losses (new values each step)
        assert reads.count == (0 if kind == "residual" else 3), type(weighting).__name__
        problem.ids[1] = problem.ids[0]  # in place: same tensor object, new version
        before = balancer.state_dict()
        with pytest.raises(ValueError, match="'pde'.*repeat"):
            balancer.step(term())
        assert balancer.state_dict()["step"] == before["step"]
        problem.ids[1] = problem.ids[0] + 1


@pytest.mark.parametrize("split", ["count", "time"])
def test_causal_chunks_follow_times_refilled_where_pytorch_cannot_see_it(split):
    """A time buffer refilled through NumPy (or ``.data``) keeps its tensor object and version:
    the chunks still follow the new times, as the naive loop on them."""
    import numpy as np

    problem = Problem()
    buffer = problem.t.numpy().copy()
    t = torch.from_numpy(buffer)
    balancer = LossBalancer([problem.w], "static", pointwise={"pde": Causal(chunks=5, eps=2.0, split=split)})
    for step in range(3):
        if step == 1:
            buffer[:] = np.random.default_rng(1).random(len(buffer))
        if step == 2:
            t.data.copy_(1.0 - t)
        total = balancer.backward({"pde": Residual(problem.r() ** 2, t=t)})
        reference, w_min = naive_causal(problem.r() ** 2, t, 5, 2.0, split, "exclusive")
        torch.testing.assert_close(total, reference.detach(), rtol=1e-12, atol=0)
        assert balancer.stats["pde"]["causal_min"] == pytest.approx(w_min, rel=1e-12)


@pytest.mark.parametrize("split", ["count", "time"])
def test_causal_groups_times_once_while_they_hold_the_same_values(split, monkeypatch):
    """The grouping of a fixed point set is computed once (the sort, the counts), also from a
    fresh copy of the same times each step, and computed anew for new times; the weights stay
    those of the naive loop, a new ``eps`` included."""
    problem = Problem()
    causal = Causal(chunks=5, eps=[0.0, 2.0], split=split, delta=0.5)
    balancer = LossBalancer([problem.w], "static", pointwise={"pde": causal})
    calls = []
    real = Causal.chunk_index
    monkeypatch.setattr(Causal, "chunk_index", lambda self, t: calls.append(1) or real(self, t))
    times = [problem.t, problem.t.clone(), problem.t.clone(), 1.0 - problem.t, 1.0 - problem.t]
    seen = []
    for t in times:
        total = balancer.backward({"pde": Residual(problem.r() ** 2, t=t)})
        eps = balancer.stats["pde"]["causal_eps"]
        reference, w_min = naive_causal(problem.r() ** 2, t, 5, eps, split, "exclusive")
        torch.testing.assert_close(total, reference.detach(), rtol=1e-12, atol=0)
        assert balancer.stats["pde"]["causal_min"] == pytest.approx(w_min, rel=1e-12)
        seen.append(eps)
    assert seen == [0.0, 2.0, 2.0, 2.0, 2.0]  # annealed after the first step (all weights 1)
    assert len(calls) == 2  # the first times, then 1 - t


@pytest.mark.parametrize("split", ["count", "time"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_or_infinite_time_makes_the_causal_term_non_finite(split, bad):
    problem = Problem()
    t = problem.t.clone()
    t[3] = bad
    opt = torch.optim.SGD([problem.w], lr=0.1)
    balancer = LossBalancer(opt, "static", pointwise={"pde": Causal(chunks=5, split=split)})
    before = problem.w.detach().clone()
    with pytest.raises(ValueError, match="'pde'"):
        balancer.step({"pde": Residual(problem.r() ** 2, t=t)})
    assert torch.equal(problem.w.detach(), before) and balancer.state_dict()["step"] == 0


def test_a_pointwise_key_naming_no_term_raises_naming_it():
    problem = Problem()
    with pytest.raises(KeyError, match="pointwise.*'pdee'"):
        LossBalancer([problem.w], "static", terms=["pde", "bc"], pointwise={"pdee": Causal(chunks=5)})
    balancer = LossBalancer([problem.w], "static", pointwise={"pdee": Causal(chunks=5)})
    terms = {"pde": Residual(problem.r() ** 2, t=problem.t), "bc": problem.r()[0] ** 2}
    with pytest.raises(KeyError, match="pointwise.*'pdee'"):
        balancer.backward(terms)
    assert balancer.state_dict()["step"] == 0 and problem.w.grad is None
    LossBalancer([problem.w], "static", optional=["pdee"], pointwise={"pdee": Causal(chunks=5)}).backward(terms)
