"""Per-point weights kept per point id (issue 17): SA-PINN (McClenny & Braga-Neto 2023) and BRDR
(Chen, Howard & Stinis 2024/25), each against a naive per-point loop (SA-PINN: one scalar
parameter and one torch.optim.Adam(maximize=True) per point, its gradient by autograd); ids through
shuffles, mini-batches and resampling; checkpoints resumed bit for bit; wrong inputs change nothing."""
import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lossbalance import BRDR, RBA, SAPINN, Causal, LossBalancer, LRAnnealing, Residual

N = 30


class Problem:
    """A linear model on N points: residuals r = x @ w - y; point ids 200..200+N-1."""

    def __init__(self, seed=0, n=N):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
        self.x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        self.y = torch.randn(n, generator=g, dtype=torch.float64)
        self.ids = torch.arange(200, 200 + n)

    def r(self, rows=slice(None)):
        return self.x[rows] @ self.w - self.y[rows]


def batches(steps, seed=1, size=N - 10):
    """Shuffled mini-batches of a growing pool (new ids appear on the way, some ids skip steps)."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        pool = min(N, size + 2 * step)
        yield torch.randperm(pool, generator=g)[: size - (step % 3)]


def residual(problem, rows, kind):
    r = problem.r(rows)
    return Residual(r if kind == "residual" else r**2, ids=problem.ids[rows], kind=kind)


# ---------------------------------------------------------------- SA-PINN
MASKS = {"square": lambda lam: lam**2, "identity": lambda lam: lam, "sigmoid": torch.sigmoid}


class NaiveSAPINN:
    """One scalar parameter and its own Adam (maximize=True) per point id; the value
    mean_i m(lambda_i) l_i and its gradient by autograd, a step only for the batch's points."""

    def __init__(self, mask, init, lr=5e-3, betas=(0.9, 0.999)):
        self.mask, self.init, self.lr, self.betas = MASKS[mask], init, lr, betas
        self.lam, self.opt = {}, {}

    def value(self, losses, ids):
        """The value with the weights before the ascent; then one Adam step per point of the batch."""
        for i in map(int, ids):
            if i not in self.lam:
                self.lam[i] = torch.tensor(float(self.init(i)), dtype=torch.float64, requires_grad=True)
                self.opt[i] = torch.optim.Adam([self.lam[i]], lr=self.lr, betas=self.betas, maximize=True)
        n = len(ids)
        weights = [self.mask(self.lam[int(i)].detach().clone()) for i in ids]
        ascent = sum(self.mask(self.lam[int(i)]) * losses[k].detach() for k, i in enumerate(ids)) / n
        for i in map(int, ids):
            self.opt[i].zero_grad()
        ascent.backward()
        for i in map(int, ids):
            self.opt[i].step()
        return sum(weights[k] * losses[k] for k in range(n)) / n


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("kind", ["loss", "residual"])
def test_sa_pinn_matches_a_naive_loop_over_points(mask, kind):
    problem, twin = Problem(), Problem()
    weighting = SAPINN(mask, init=0.5, lr=0.05, betas=(0.8, 0.9))
    balancer = LossBalancer(torch.optim.SGD([problem.w], lr=0.05), "static", pointwise={"pde": weighting})
    optimizer = torch.optim.SGD([twin.w], lr=0.05)
    naive = NaiveSAPINN(mask, init=lambda i: 0.5, lr=0.05, betas=(0.8, 0.9))
    for rows in batches(7):
        total = balancer.step({"pde": residual(problem, rows, kind)})
        optimizer.zero_grad()
        reference = naive.value(twin.r(rows) ** 2, problem.ids[rows])
        reference.backward()
        optimizer.step()
        torch.testing.assert_close(total, reference.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(problem.w, twin.w, rtol=1e-12, atol=0)
    state = balancer.state_dict()["pointwise"]["pde"]
    assert state["ids"].tolist() == sorted(naive.lam)
    expected = torch.stack([naive.lam[i].detach() for i in sorted(naive.lam)])
    torch.testing.assert_close(state["lambdas"], expected, rtol=1e-12, atol=1e-15)
    assert float(state["lambdas"].min()) > 0.5  # every point seen went up (the ascent), none down
    assert int(state["steps"].max()) == 7 and int(state["steps"].min()) < 7  # per point: some skipped steps


def test_sa_pinn_new_points_draw_scale_times_uniform_in_id_order():
    problem = Problem()
    balancer = LossBalancer([problem.w], "static", pointwise={"ic": SAPINN(scale=100.0, seed=5, lr=1e-12)})
    generator, seen = torch.Generator().manual_seed(5), []
    for rows in batches(4):
        new = sorted(set(problem.ids[rows].tolist()) - set(seen))
        draws = 100.0 * torch.rand(len(new), generator=generator, dtype=torch.float64)
        balancer.backward({"ic": residual(problem, rows, "residual")})
        state = balancer.state_dict()["pointwise"]["ic"]
        for i, draw in zip(new, draws):
            stored = state["lambdas"][state["ids"].tolist().index(i)]
            torch.testing.assert_close(stored, draw, rtol=1e-9, atol=0)  # lr=1e-12: hardly moved
        seen += new
    assert 0 < float(state["lambdas"].min()) and float(state["lambdas"].max()) < 100


def test_sa_pinn_the_same_points_in_another_order_get_the_same_weights():
    a, b = Problem(), Problem()
    ba = LossBalancer([a.w], "static", pointwise={"pde": SAPINN()})
    bb = LossBalancer([b.w], "static", pointwise={"pde": SAPINN()})
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        perm = torch.randperm(N, generator=g)
        ba.backward({"pde": Residual(a.r(), ids=a.ids, kind="residual")})
        bb.backward({"pde": Residual(b.r(perm), ids=b.ids[perm], kind="residual")})
        torch.testing.assert_close(a.w.grad, b.w.grad, rtol=1e-12, atol=1e-15)
    sa, sb = ba.state_dict()["pointwise"]["pde"], bb.state_dict()["pointwise"]["pde"]
    for key in ("ids", "lambdas", "m", "v", "steps", "generator"):
        assert torch.equal(sa[key], sb[key]), key


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=8), st.sampled_from(list(MASKS)), st.floats(0, 5))
def test_sa_pinn_closed_form_gradient_is_autograds_and_the_ascent_never_lowers_a_weight(rs, mask, init):
    r = torch.tensor(rs, dtype=torch.float64)
    weighting = SAPINN(mask, init=init)
    ids = torch.arange(len(rs))
    lam = torch.full((len(rs),), init, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad((MASKS[mask](lam) * r**2).mean(), lam)
    _, slope = weighting.masked(lam.detach())
    torch.testing.assert_close(slope * r**2 / len(rs), expected, rtol=1e-12, atol=1e-300)
    _, _, state = weighting.reduce(r**2, ids, weighting.initial_state(), True)
    assert bool((state["lambdas"] >= init).all())
    moved = state["lambdas"] > init
    assert bool(moved[expected > 1e-6].all()) and not bool(moved[expected == 0].any())  # up where its gradient is > 0


# ---------------------------------------------------------------- BRDR
def naive_brdr_step(table, losses, ids, step, beta_c=0.999, beta_w=0.999, max_gap=10):
    """The authors' update on dicts {id: [e, w, last_seen]}: then mean(w_i l_i)."""
    l = losses.detach()
    rows = [table.get(int(i), [0.0, 1.0, 0]) for i in ids]
    gaps = [min(step - row[2], max_gap) for row in rows]
    e = [row[0] + (1 - beta_c**d) * (float(l[k]) ** 2 - row[0]) for k, (row, d) in enumerate(zip(rows, gaps))]
    irdr = [float(l[k]) / (math.sqrt(e[k] / (1 - beta_c**step)) + 1e-14) for k in range(len(ids))]
    mean = sum(irdr) / len(irdr)
    w = [row[1] + (1 - beta_w**d) * (irdr[k] / mean - row[1]) for k, (row, d) in enumerate(zip(rows, gaps))]
    for k, i in enumerate(map(int, ids)):
        table[i] = [e[k], w[k], step]
    return sum(w[k] * losses[k] for k in range(len(ids))) / len(ids)


@pytest.mark.parametrize("kind", ["loss", "residual"])
def test_brdr_matches_a_naive_loop_through_gaps_and_new_points(kind):
    problem, twin = Problem(), Problem()
    balancer = LossBalancer(torch.optim.SGD([problem.w], lr=0.05), "static",
                            pointwise={"pde": BRDR(beta_c=0.9, beta_w=0.8, max_gap=3)})
    optimizer = torch.optim.SGD([twin.w], lr=0.05)
    table = {}
    for step, rows in enumerate(batches(9), start=1):
        total = balancer.step({"pde": residual(problem, rows, kind)})
        optimizer.zero_grad()
        reference = naive_brdr_step(table, twin.r(rows) ** 2, problem.ids[rows], step, 0.9, 0.8, 3)
        reference.backward()
        optimizer.step()
        torch.testing.assert_close(total, reference.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(problem.w, twin.w, rtol=1e-12, atol=0)
    state = balancer.state_dict()["pointwise"]["pde"]
    assert state["ids"].tolist() == sorted(table) and state["step"] == 9
    torch.testing.assert_close(state["weights"], torch.tensor([table[i][1] for i in sorted(table)], dtype=torch.float64))
    assert state["last_seen"].tolist() == [table[i][2] for i in sorted(table)]
    assert len(set(state["last_seen"].tolist())) > 1  # some points skipped steps: the gaps were exercised


def naive_pooled_brdr_step(tables, terms, step, beta_c, beta_w, max_gap):
    """The authors' BRDRMaster: each term's irdr first (preUpdate), then one mean over the points
    of all terms (updateK: sum of the irdr sums / total batch size), then each term's weights."""
    decayed = {}
    for name, (losses, ids) in terms.items():
        l, table = losses.detach(), tables.setdefault(name, {})
        rows = [table.get(int(i), [0.0, 1.0, 0]) for i in ids]
        gaps = [min(step - row[2], max_gap) for row in rows]
        e = [row[0] + (1 - beta_c**d) * (float(l[k]) ** 2 - row[0]) for k, (row, d) in enumerate(zip(rows, gaps))]
        irdr = [float(l[k]) / (math.sqrt(e[k] / (1 - beta_c**step)) + 1e-14) for k in range(len(ids))]
        decayed[name] = rows, gaps, e, irdr
    everything = [x for _, _, _, irdr in decayed.values() for x in irdr]
    mean = sum(everything) / len(everything)
    values = {}
    for name, (losses, ids) in terms.items():
        rows, gaps, e, irdr = decayed[name]
        w = [row[1] + (1 - beta_w**d) * (irdr[k] / mean - row[1]) for k, (row, d) in enumerate(zip(rows, gaps))]
        for k, i in enumerate(map(int, ids)):
            tables[name][i] = [e[k], w[k], step]
        values[name] = sum(w[k] * losses[k] for k in range(len(ids))) / len(ids)
    return values


def test_brdr_pools_the_irdr_mean_over_every_brdr_term_as_the_authors():
    """Two BRDR terms on different points (mini-batches, gaps): the default pool="all" matches the
    authors' pooled mean; pool="term" matches the per-term loop, and the two differ."""
    problem, twin = Problem(), Problem()
    half = N // 2
    balancer = LossBalancer(torch.optim.SGD([problem.w], lr=0.05), "static",
                            pointwise={"pde": BRDR(beta_c=0.9, beta_w=0.8, max_gap=3), "bc": BRDR(beta_c=0.9, beta_w=0.8, max_gap=3)})
    per_term = LossBalancer([problem.w], "static",  # no optimizer: backward() only, on the same residuals
                            pointwise={n: BRDR(beta_c=0.9, beta_w=0.8, max_gap=3, pool="term") for n in ("pde", "bc")})
    optimizer = torch.optim.SGD([twin.w], lr=0.05)
    tables, own = {}, {"pde": {}, "bc": {}}
    for step, rows in enumerate(batches(6, size=half), start=1):
        pde, bc = rows, rows + half if bool((rows + half < N).all()) else rows
        def terms():
            return {"pde": (problem.r(pde) ** 2, problem.ids[pde]), "bc": (3.0 * problem.r(bc) ** 2, problem.ids[bc])}

        separate = per_term.backward({n: Residual(v, ids=i) for n, (v, i) in terms().items()})
        alone = {n: naive_brdr_step(own[n], v.detach(), i, step, 0.9, 0.8, 3) for n, (v, i) in terms().items()}
        total = balancer.step({n: Residual(v, ids=i) for n, (v, i) in terms().items()})
        reference = naive_pooled_brdr_step(tables, {"pde": (twin.r(pde) ** 2, problem.ids[pde]),
                                                    "bc": (3.0 * twin.r(bc) ** 2, problem.ids[bc])}, step, 0.9, 0.8, 3)
        optimizer.zero_grad()
        sum(reference.values()).backward()
        optimizer.step()
        torch.testing.assert_close(total, sum(reference.values()).detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(separate, sum(alone.values()), rtol=1e-12, atol=0)
    assert float((total - separate).abs()) > 1e-6 * float(total)  # pooling changed the weights


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(0.01, 10), min_size=5, max_size=5), min_size=1, max_size=6), st.floats(0, 0.99))
def test_brdr_full_batch_weights_keep_mean_one(history, beta_w):
    """With every point in every batch (d_i = 1), mean_i w_i stays 1: the update moves it by
    (1 - beta_w) (mean(irdr / mean irdr) - mean w) = (1 - beta_w) (1 - mean w)."""
    weighting, ids = BRDR(beta_c=0.5, beta_w=beta_w), torch.arange(5)
    state = weighting.initial_state()
    for losses in history:
        _, _, state = weighting.reduce(torch.tensor(losses, dtype=torch.float64), ids, state, True)
        assert float(state["weights"].mean()) == pytest.approx(1.0, rel=1e-12)
        assert bool((state["weights"] > 0).all())


def test_brdr_up_weights_the_point_whose_residual_decays_slowest():
    weighting, ids = BRDR(beta_c=0.9, beta_w=0.9), torch.arange(4)
    state = weighting.initial_state()
    for k in range(20):  # point 3 stays put, the others decay by 0.7 per step
        losses = torch.tensor([0.7**k, 2 * 0.7**k, 0.5 * 0.7**k, 1.0], dtype=torch.float64)
        _, _, state = weighting.reduce(losses, ids, state, True)
    w = state["weights"]
    assert float(w[3]) > 1.5 and bool((w[:3] < 1).all())


# ---------------------------------------------------------------- checkpoints, for every id-keyed weighting
WEIGHTINGS = {"sa_pinn": lambda: SAPINN(scale=10.0, lr=0.05), "brdr": lambda: BRDR(max_gap=4), "rba": lambda: RBA(eta=0.1)}


def _build(problem, make):
    return LossBalancer(torch.optim.Adam([problem.w], lr=1e-2), LRAnnealing("data", include_bias=True), pointwise={"pde": make()})


def _terms(problem, rows):
    return {"pde": residual(problem, rows, "residual"), "data": (problem.w**2).sum()}


def _assert_same_state(s1, s2):
    assert s1.keys() == s2.keys()
    for key, value in s1.items():
        assert torch.equal(value, s2[key]) if torch.is_tensor(value) else value == s2[key], key


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_a_checkpoint_resumes_per_point_weights_bit_for_bit(name):
    straight, resumed = Problem(), Problem()
    runs = list(batches(8))
    b1 = _build(straight, WEIGHTINGS[name])
    for rows in runs:
        b1.step(_terms(straight, rows))
    b2 = _build(resumed, WEIGHTINGS[name])
    for rows in runs[:4]:
        b2.step(_terms(resumed, rows))
    buffer = io.BytesIO()
    torch.save(b2.state_dict(), buffer)
    buffer.seek(0)
    fresh = Problem()
    with torch.no_grad():
        fresh.w.copy_(resumed.w)
    b3 = _build(fresh, WEIGHTINGS[name])
    b3.load_state_dict(torch.load(buffer, weights_only=False))
    for rows in runs[4:]:  # new ids still appear after the resume: SA-PINN draws from the restored generator
        b3.step(_terms(fresh, rows))
    assert torch.equal(fresh.w, straight.w)
    _assert_same_state(b1.state_dict()["pointwise"]["pde"], b3.state_dict()["pointwise"]["pde"])


@pytest.mark.parametrize("name", ["sa_pinn", "brdr"])
def test_a_corrupt_saved_table_is_refused_and_changes_nothing(name):
    problem = Problem()
    balancer = _build(problem, WEIGHTINGS[name])
    balancer.step(_terms(problem, slice(None)))
    state = balancer.state_dict()
    before = copy.deepcopy(state["pointwise"])
    bad = copy.deepcopy(state)
    column = "lambdas" if name == "sa_pinn" else "weights"
    bad["pointwise"]["pde"][column] = bad["pointwise"]["pde"][column][:-1]
    with pytest.raises(ValueError, match="corrupt state: the .* state of term 'pde'"):
        balancer.load_state_dict(bad)
    _assert_same_state(balancer.state_dict()["pointwise"]["pde"], before["pde"])


# ---------------------------------------------------------------- forget_after: ids not seen for n steps dropped
FORGETTING = {"sa_pinn": lambda n: SAPINN(scale=10.0, forget_after=n), "brdr": lambda n: BRDR(forget_after=n),
              "rba": lambda n: RBA(eta=0.1, forget_after=n)}
COLUMNS = {"sa_pinn": ("lambdas", "m", "v", "steps"), "brdr": ("weights", "r4"), "rba": ("lambdas",)}


@pytest.mark.parametrize("name", list(FORGETTING))
@pytest.mark.parametrize("n", [1, 3])
def test_forget_after_drops_the_ids_unseen_for_n_steps_and_nothing_else(name, n):
    """A sliding window of ids (each id in two consecutive batches, never again): the table holds
    the ids of the last n batches, with the rows of a twin that forgets nothing."""
    a, b = Problem(), Problem()
    forgetful = LossBalancer([a.w], "static", pointwise={"pde": FORGETTING[name](n)})
    keeper = LossBalancer([b.w], "static", pointwise={"pde": FORGETTING[name](None)})
    windows = [torch.arange(3 * s, 3 * s + 6) for s in range(7)]
    for s, rows in enumerate(windows):
        forgetful.backward({"pde": residual(a, rows, "residual")})
        keeper.backward({"pde": residual(b, rows, "residual")})
        kept, full = forgetful.state_dict()["pointwise"]["pde"], keeper.state_dict()["pointwise"]["pde"]
        recent = sorted({int(i) for w in windows[max(0, s - n + 1): s + 1] for i in a.ids[w]})
        assert kept["ids"].tolist() == recent and kept["step"] == full["step"] == s + 1
        at = torch.searchsorted(full["ids"], kept["ids"])
        for key in (*COLUMNS[name], "last_seen"):
            assert torch.equal(kept[key], full[key][at]), key
    assert len(full["ids"]) == 24 > len(kept["ids"])


def test_a_forgotten_id_comes_back_as_a_new_point():
    a, b = Problem(), Problem()
    forgetful = LossBalancer([a.w], "static", pointwise={"pde": RBA(eta=0.1, forget_after=1)})
    fresh = LossBalancer([b.w], "static", pointwise={"pde": RBA(eta=0.1)})
    first, second = torch.arange(0, 10), torch.arange(10, 20)
    for rows in (first, second, first):
        forgetful.backward({"pde": residual(a, rows, "residual")})
    fresh.backward({"pde": residual(b, first, "residual")})
    kept, new = forgetful.state_dict()["pointwise"]["pde"], fresh.state_dict()["pointwise"]["pde"]
    assert torch.equal(kept["ids"], new["ids"]) and torch.equal(kept["lambdas"], new["lambdas"])
    assert kept["last_seen"].tolist() == [3] * 10


# ---------------------------------------------------------------- wrong inputs change nothing
def _wrong(problem, case):
    r = problem.r()
    terms = _terms(problem, slice(None))
    if case == "ids missing":
        terms["pde"] = Residual(r, kind="residual")
    elif case == "ids repeat":
        terms["pde"] = Residual(r, ids=problem.ids.clamp(max=210), kind="residual")
    elif case == "negative losses":  # kind="loss" given the residuals r_i instead of r_i**2
        terms["pde"] = Residual(r, ids=problem.ids)
    elif case == "scalar":
        terms["pde"] = r.pow(2).mean()
    elif case == "non-finite":
        terms["pde"] = Residual(torch.where(problem.ids == 205, math.nan, r), ids=problem.ids, kind="residual")
    return terms


CASES = {
    "ids missing": (ValueError, "'pde' has {} weights: pass stable point ids"),
    "ids repeat": (ValueError, "'pde': the point ids of its Residual repeat"),
    "negative losses": (ValueError, "'pde' has {} weights and negative per-point losses"),
    "scalar": (TypeError, "'pde' has pointwise weights .* passed as a scalar"),
    "non-finite": (ValueError, "non-finite loss value for term\\(s\\) 'pde'"),
}


@pytest.mark.parametrize("name", ["sa_pinn", "brdr"])
@pytest.mark.parametrize("case", list(CASES))
def test_wrong_terms_raise_naming_the_term_and_change_nothing(name, case):
    problem = Problem()
    balancer = _build(problem, WEIGHTINGS[name])
    for rows in batches(2):
        balancer.step(_terms(problem, rows))
    state, w = copy.deepcopy(balancer.state_dict()), problem.w.detach().clone()
    error, message = CASES[case]
    for _ in range(2):
        with pytest.raises(error, match=message.format("SA-PINN" if name == "sa_pinn" else "BRDR")):
            balancer.step(_wrong(problem, case))
        after = balancer.state_dict()
        assert after["step"] == state["step"] and torch.equal(after["weights"], state["weights"])
        _assert_same_state(after["pointwise"]["pde"], state["pointwise"]["pde"])
        assert torch.equal(problem.w.detach(), w)


@pytest.mark.parametrize("name", ["sa_pinn", "brdr"])
def test_a_skipped_step_and_lbfgs_reevaluations_leave_the_table_alone(name):
    problem = Problem()
    balancer = LossBalancer(torch.optim.Adam([problem.w], lr=1e-2), "static", nonfinite="skip",
                            pointwise={"pde": WEIGHTINGS[name]()})
    balancer.step(_terms(problem, slice(None)))
    before = copy.deepcopy(balancer.state_dict()["pointwise"]["pde"])
    assert math.isnan(balancer.step(_wrong(problem, "non-finite"))) and balancer.skipped == 1
    _assert_same_state(balancer.state_dict()["pointwise"]["pde"], before)
    lbfgs = LossBalancer(torch.optim.LBFGS([problem.w], lr=0.1, max_iter=4), "static", pointwise={"pde": WEIGHTINGS[name]()})
    calls = []

    def closure():
        calls.append(1)
        return {"pde": Residual(problem.r(), ids=problem.ids, kind="residual")}

    lbfgs.step(closure=closure)
    state = lbfgs.state_dict()["pointwise"]["pde"]
    assert len(calls) > 1 and (state["steps"].max() if name == "sa_pinn" else state["step"]) == 1  # one update


# Every evaluation of one step sees one objective (L-BFGS compares them): before the fix the
# re-evaluations used the state the first evaluation committed, so SA-PINN's ascent and Causal's
# next eps changed the value at the same parameters.
ONE_OBJECTIVE = {**WEIGHTINGS, "causal": lambda: Causal(chunks=3, eps=[1e-6, 1e-5, 1.0])}


def _timed(problem):
    return {"pde": Residual(problem.r(), t=problem.x[:, 0], ids=problem.ids, kind="residual")}


@pytest.mark.parametrize("name", ["sa_pinn", "causal"])
def test_a_refused_call_leaves_the_held_reevaluation_state(name):
    """loss(); a call refused (duplicate ids, times of the wrong length); loss(reevaluation=True): the refused call
    dropped the held states before its checks, so the re-evaluation weighted the points as the
    next step would (SA-PINN after its ascent, Causal's next eps)."""
    problem = Problem()
    balancer = LossBalancer([problem.w], "static", pointwise={"pde": ONE_OBJECTIVE[name]()})
    first = balancer.loss(_timed(problem))
    duplicate_ids = Residual(problem.r(), t=problem.x[:, 0], ids=torch.zeros_like(problem.ids), kind="residual")
    short_times = Residual(problem.r(), t=problem.x[:2, 0], ids=problem.ids, kind="residual")
    with pytest.raises(ValueError, match="'pde'"):
        balancer.loss({"pde": short_times if name == "causal" else duplicate_ids})
    assert float(balancer.loss(_timed(problem), reevaluation=True)) == float(first.detach())


class _TwiceAtTheSamePoint(torch.optim.SGD):
    """SGD that evaluates its closure twice before moving (as a line search may): both values kept."""

    def step(self, closure=None):
        self.values = [float(closure()), float(closure())]
        return super().step()


@pytest.mark.parametrize("name", list(ONE_OBJECTIVE))
def test_every_evaluation_of_a_step_sees_the_objective_of_its_first(name):
    problem = Problem()
    balancer = LossBalancer([problem.w], "static", pointwise={"pde": ONE_OBJECTIVE[name]()})
    for _ in range(3):  # loss() then loss(reevaluation=True) at the same parameters (a framework's L-BFGS)
        first = balancer.loss(_timed(problem))
        assert float(balancer.loss(_timed(problem), reevaluation=True)) == float(first.detach())
        first.backward()
        with torch.no_grad():
            problem.w -= 0.05 * problem.w.grad
        problem.w.grad = None
    if name == "causal":
        assert balancer.state_dict()["pointwise"]["pde"]["eps_index"] == 2  # the annealing steps were taken
    problem = Problem()
    optimizer = _TwiceAtTheSamePoint([problem.w], lr=0.05)
    balancer = LossBalancer(optimizer, "static", pointwise={"pde": ONE_OBJECTIVE[name]()})
    for _ in range(3):  # step(closure=): the first evaluation and a re-evaluation before the move
        balancer.step(closure=lambda: _timed(problem))
        assert optimizer.values[0] == optimizer.values[1]


@pytest.mark.parametrize("name", list(ONE_OBJECTIVE))
def test_frozen_holds_the_pointwise_weights_too(name):
    problem = Problem()
    balancer = LossBalancer(torch.optim.SGD([problem.w], lr=0.05), "static", pointwise={"pde": ONE_OBJECTIVE[name]()})
    balancer.step(_timed(problem))
    held = copy.deepcopy(balancer.state_dict()["pointwise"]["pde"])
    balancer.freeze()
    for _ in range(3):
        balancer.step(_timed(problem))
    _assert_same_state(balancer.state_dict()["pointwise"]["pde"], held)
    assert balancer.step_count == 4
    balancer.unfreeze()
    balancer.step(_timed(problem))
    after = balancer.state_dict()["pointwise"]["pde"]
    assert after["eps_index"] == 2 if name == "causal" else after["step"] == 2


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_a_held_table_warns_once_about_points_it_does_not_hold(name):
    problem = Problem()
    balancer = LossBalancer(torch.optim.SGD([problem.w], lr=0.05), "static", pointwise={"pde": WEIGHTINGS[name]()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer.evaluate({"pde": residual(problem, slice(0, 20), "residual")})  # before the first step (a sanity check)
    balancer.step({"pde": residual(problem, slice(0, 20), "residual")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer.evaluate({"pde": residual(problem, slice(0, 20), "residual")})  # held points: no warning
        balancer.evaluate({"pde": residual(problem, slice(3, 9), "residual")})
    with pytest.warns(UserWarning, match=r"loss term 'pde': 10 of its 30 points .* table is held"):
        balancer.evaluate({"pde": residual(problem, slice(None), "residual")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer.evaluate({"pde": residual(problem, slice(None), "residual")})  # once per term


@pytest.mark.parametrize("make", [
    lambda: SAPINN("cube"), lambda: SAPINN(init=-1.0), lambda: SAPINN(init="normal"), lambda: SAPINN(scale=0.0),
    lambda: SAPINN(lr=0.0), lambda: SAPINN(betas=(1.0, 0.9)), lambda: SAPINN(eps=0.0),
    lambda: BRDR(beta_c=1.0), lambda: BRDR(beta_w=-0.1), lambda: BRDR(max_gap=0),
    lambda: SAPINN(forget_after=0), lambda: BRDR(forget_after=1.5), lambda: RBA(forget_after=True),
])
def test_bad_options_are_refused_when_built(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("weighting", ["rba", "sa_pinn", "brdr"])
def test_per_point_tables_keep_float32_under_bf16_residuals(weighting):
    """The tables were cast to the batch's dtype: one bf16 minibatch turned the whole table into
    bf16, where RBA's ``0.999 lambda + 1e-3 |r|/max|r|`` rounds away (its largest weight stuck at
    0.5 against 0.95 after 3000 steps). The tables keep float32, as optimizer states do under
    AMP; the term's value keeps the residuals' dtype."""
    from lossbalance import BRDR, RBA, SAPINN, Residual

    make = {"rba": RBA, "sa_pinn": SAPINN, "brdr": BRDR}[weighting]
    model = torch.nn.Linear(1, 1)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.0), "static", pointwise={"pde": make()})
    x = torch.linspace(0, 1, 20)[:, None]
    pool = torch.arange(20)
    for step in range(1000):
        ids = pool[(step % 2) * 10:(step % 2) * 10 + 10]  # minibatches of the pool
        r = (model(x[ids])[:, 0] + 1 + x[ids, 0]).to(torch.bfloat16)
        term = Residual(r, ids=ids, kind="residual")
        balancer.step({"pde": term, "bc": model(x[:1]).pow(2).sum()})
    state = balancer.state_dict()["pointwise"]["pde"]
    floats = [v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    if weighting == "rba":  # 500 updates per point: 1 - 0.999^500 = 0.394 for the largest |r|
        assert state["lambdas"].max().item() == pytest.approx(1 - 0.999 ** 500, rel=1e-3)
    out = model(x[:10])[:, 0].to(torch.bfloat16)
    value = balancer.evaluate({"pde": Residual(out, ids=pool[:10], kind="residual"), "bc": model(x[:1]).pow(2).sum()})
    assert torch.isfinite(value)


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_adam_hands_its_per_point_tables_over_to_an_lbfgs_balancer(name):
    """The README's Adam -> L-BFGS recipe with per-point weights: Adam's full state is refused
    by the L-BFGS balancer (torch.optim took Adam's groups into L-BFGS, whose next step then
    failed with KeyError 'max_iter'), its balancer's part loads without a warning, and the frozen
    L-BFGS phase weights the points as Adam left them; frozen with an empty table it warns."""
    problem = Problem()
    adam = LossBalancer(torch.optim.Adam([problem.w], lr=1e-2), "static", pointwise={"pde": WEIGHTINGS[name]()})
    for _ in range(3):
        adam.step({"pde": residual(problem, slice(None), "residual")})
    state = adam.state_dict()
    lbfgs = LossBalancer(torch.optim.LBFGS([problem.w], max_iter=2), "static", pointwise={"pde": WEIGHTINGS[name]()})
    before = copy.deepcopy(lbfgs.optimizer.state_dict())
    for saved in (state, {k: v for k, v in state.items() if k != "optimizer_type"}):  # also a state saved before the key
        with pytest.raises(ValueError, match=r"not a LBFGS's: its parameter group 0 has no \['history_size', .*'max_iter'.*'optimizer': None"):
            lbfgs.load_state_dict(saved)
        assert lbfgs.optimizer.state_dict() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lbfgs.load_state_dict({**state, "optimizer": None})
    lbfgs.freeze()
    expected = adam.evaluate({"pde": residual(problem, slice(None), "residual")})
    value = lbfgs.step(closure=lambda: {"pde": residual(problem, slice(None), "residual")})
    assert float(value) == pytest.approx(float(expected), rel=1e-12)
    _assert_same_state(lbfgs.state_dict()["pointwise"]["pde"], state["pointwise"]["pde"])

    cold = LossBalancer(torch.optim.LBFGS([problem.w], max_iter=2), "static", pointwise={"pde": WEIGHTINGS[name]()},
                        frozen=True)
    with pytest.warns(UserWarning, match=r"'pde': its .* table is empty and held.*load_state_dict"):
        cold.step(closure=lambda: {"pde": residual(problem, slice(None), "residual")})


def _sapinn_terms(w, x, y, ids, bc=0.0):
    return {"pde": Residual(x @ w - y, ids=ids, kind="residual"), "bc": (w ** 2).sum() + bc}


@pytest.mark.parametrize("how", ["skipped", "rolled back"])
def test_after_a_skipped_or_rolled_back_call_the_reevaluation_sees_the_committed_state(how):
    """A skipped step (nonfinite='skip') or a deferred rollback is still the start of a step:
    a re-evaluation then weights the points as the committed state does (what the skipped
    evaluation used), not as the step before it held them."""
    torch.manual_seed(0)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x, y, ids = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, dtype=torch.float64), torch.arange(30)
    if how == "skipped":
        balancer = LossBalancer([w], "static", pointwise={"pde": SAPINN(scale=10.0, lr=0.05)}, nonfinite="skip")
        balancer.loss(_sapinn_terms(w, x, y, ids)).backward()
        with torch.no_grad():
            w -= 0.05 * w.grad
        assert torch.isnan(balancer.loss(_sapinn_terms(w, x, y, ids, bc=float("nan"))))
    else:
        balancer = LossBalancer(torch.optim.SGD([w], lr=0.01), "static", pointwise={"pde": SAPINN(scale=10.0, lr=0.05)},
                                nonfinite="skip", check_every=4)
        for _ in range(4):
            balancer.step(_sapinn_terms(w, x, y, ids))
        balancer.check()
        balancer.step(_sapinn_terms(w, x, y, ids))
        balancer.step(_sapinn_terms(w, x, y, ids, bc=float("nan")))
        balancer.check()  # both calls undone
    expected = float(balancer.evaluate(_sapinn_terms(w, x, y, ids)))
    assert float(balancer.loss(_sapinn_terms(w, x, y, ids), reevaluation=True).detach()) == expected
