"""UPGrad, MGDA and DCGD: against torchjd (skipped without it), naive references and hand computations.

The naive references enumerate every active set with plain Python floats and Gaussian
elimination (exact for small K, independent of the combiners' active-set solver); the
hand-computed examples carry their derivation in a comment.
"""
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from lossbalance import LossBalancer
from lossbalance.combine import DCGD, MGDA, ConFIG, UPGrad, available_combiners, make_combiner

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64


@st.composite
def matrices(draw, k_min=2, k_max=8, p_max=12, dtypes=(F64,), scales=(-3, 3), conflict=True):
    """Gaussian (K, P) rows scaled by 10^e; with ``conflict`` some rows are pushed against row 0."""
    k = draw(st.integers(k_min, k_max))
    p = draw(st.integers(1, p_max))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    g = torch.randn(k, p, generator=gen, dtype=F64)
    if conflict:
        push = torch.tensor([0.0] + [draw(st.sampled_from([0.0, 0.5, 1.5])) for _ in range(k - 1)], dtype=F64)
        g = g - push[:, None] * g[0]
    scale = torch.tensor([10.0 ** draw(st.integers(*scales)) for _ in range(k)], dtype=F64)
    return (g * scale[:, None]).to(draw(st.sampled_from(dtypes)))


def rows_f(g):
    return [[float(v) for v in row] for row in g.to(F64)]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def gram_f(g):
    r = rows_f(g)
    return [[dot(a, b) for b in r] for a in r]


def solve_f(m, rhs):
    """Gaussian elimination with partial pivoting on lists; None if singular."""
    n = len(rhs)
    a = [row[:] + [v] for row, v in zip(m, rhs)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(a[r][c]))
        if abs(a[piv][c]) < 1e-13:
            return None
        a[c], a[piv] = a[piv], a[c]
        for r in range(n):
            if r != c:
                f = a[r][c] / a[c][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c])]
    return [a[i][n] / a[i][i] for i in range(n)]


def naive_nnqp(a, b):
    """min x^T a x + 2 b^T x over x >= 0: every free set, the feasible stationary point of least value."""
    k = len(b)
    best, best_val = None, math.inf
    for size in range(k + 1):
        for free in itertools.combinations(range(k), size):
            sol = solve_f([[a[i][j] for j in free] for i in free], [-b[i] for i in free]) if free else []
            if sol is None or any(v < -1e-12 for v in sol):
                continue
            x = [0.0] * k
            for i, v in zip(free, sol):
                x[i] = v
            val = dot(x, [dot(row, x) for row in a]) + 2 * dot(b, x)
            if val < best_val:
                best, best_val = x, val
    return best


def naive_upgrad(g, reg_eps):
    """Proposition 1 of Quinton & Rey as printed: v_i = argmin_{v >= e_i/K} v^T A v, d = J^T sum_i v_i."""
    gram = gram_f(g)
    k = len(gram)
    tr = sum(gram[i][i] for i in range(k))
    a = [[gram[i][j] / tr + (reg_eps if i == j else 0.0) for j in range(k)] for i in range(k)]
    total = [0.0] * k
    for i in range(k):
        u = [1.0 / k if j == i else 0.0 for j in range(k)]
        x = naive_nnqp(a, [dot(row, u) for row in a])  # v = u + x, x >= 0
        total = [t + uj + xj for t, uj, xj in zip(total, u, x)]
    return [sum(total[i] * r[t] for i, r in enumerate(rows_f(g))) for t in range(g.shape[1])]


def naive_mgda(g):
    """min alpha^T G alpha on the simplex: for every support S solve G_SS alpha = lam 1, sum alpha = 1."""
    gram = gram_f(g)
    k = len(gram)
    best, best_val = None, math.inf
    for size in range(1, k + 1):
        for s in itertools.combinations(range(k), size):
            m = [[gram[i][j] for j in s] + [-1.0] for i in s] + [[1.0] * size + [0.0]]
            sol = solve_f(m, [0.0] * size + [1.0])
            if sol is None or any(v < -1e-12 for v in sol[:size]):
                continue
            alpha = [0.0] * k
            for i, v in zip(s, sol[:size]):
                alpha[i] = v
            val = dot(alpha, [dot(row, alpha) for row in gram])
            if val < best_val:
                best, best_val = alpha, val
    return [sum(best[i] * r[t] for i, r in enumerate(rows_f(g))) for t in range(g.shape[1])]


def close(out, ref, g, tol):
    scale = math.sqrt(sum(dot(r, r) for r in rows_f(g)))
    assert max(abs(a - b) for a, b in zip(out.to(F64).tolist(), ref)) <= tol * scale


# ---------------------------------------------------------------------------------------------
# UPGrad


@SETTINGS
@given(matrices())
def test_upgrad_matches_torchjd(g):
    torchjd = pytest.importorskip("torchjd.aggregation")
    ours = UPGrad()(g)
    theirs = torchjd.UPGrad()(g)
    close(ours, theirs.tolist(), g, 1e-9)


@SETTINGS
@given(matrices(dtypes=(torch.float32,)))
def test_upgrad_matches_torchjd_float32(g):
    # both form the Gramian in float32 (one matmul); the QP here is solved in float64
    torchjd = pytest.importorskip("torchjd.aggregation")
    ours = UPGrad()(g)
    assert ours.dtype == torch.float32
    close(ours, torchjd.UPGrad()(g).tolist(), g, 1e-4)


@SETTINGS
@given(matrices(k_max=5, p_max=6), st.sampled_from([1e-4, 1e-8]))
def test_upgrad_matches_naive_enumeration(g, reg_eps):
    close(UPGrad(reg_eps=reg_eps, norm_eps=0.0)(g), naive_upgrad(g, reg_eps), g, 1e-8)


def test_upgrad_hand_two_terms():
    # g1 = (1, 0), g2 = (-1, 1): g1 . g2 = -1 < 0
    # pi(g1) = g1 - (g1.g2)/|g2|^2 g2 = (1, 0) + (-1, 1)/2 = (0.5, 0.5)   (. g1 = 0.5 >= 0)
    # pi(g2) = g2 - (g1.g2)/|g1|^2 g1 = (-1, 1) + (1, 0)   = (0, 1)       (. g2 = 1 >= 0)
    # mean = (0.25, 0.75); the ridge 1e-4 moves it by about 1e-4
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(UPGrad(reg_eps=1e-12)(g), torch.tensor([0.25, 0.75], dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(UPGrad()(g), torch.tensor([0.25, 0.75], dtype=F64), atol=3e-4, rtol=0)


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_upgrad_without_conflict_is_the_mean(k, p, seed):
    g = torch.rand(k, p, generator=torch.Generator().manual_seed(seed), dtype=F64)  # all dot products >= 0
    torch.testing.assert_close(UPGrad()(g), g.mean(0), rtol=1e-12, atol=1e-15)


@SETTINGS
@given(matrices(scales=(-30, 30)))
def test_upgrad_never_conflicts_without_the_ridge(g):
    # the ridge relaxes the constraint of row j by about reg_eps tr(G) / |g_j|^2 (relative)
    reg = 1e-14
    out = UPGrad(reg_eps=reg, norm_eps=0.0)(g)
    assert torch.isfinite(out).all()
    o = rows_f(out[None])[0]
    tr = sum(dot(r, r) for r in rows_f(g))
    for row in rows_f(g):
        n2 = dot(row, row)
        if n2 > 0:
            slack = 1e-6 * math.sqrt(dot(o, o) * n2) + 10 * reg * tr / n2 * math.sqrt(tr * n2)
            assert dot(o, row) >= -slack


def test_upgrad_edge_cases():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    z = torch.zeros(3, dtype=F64)
    torch.testing.assert_close(UPGrad()(a[None]), a)
    assert torch.equal(UPGrad()(torch.zeros(0, 3, dtype=F64)), z)
    assert torch.equal(UPGrad()(torch.zeros(2, 3, dtype=F64)), z)
    assert torch.equal(UPGrad(norm_eps=0.0)(torch.zeros(2, 3, dtype=F64)), z)
    # below norm_eps = 1e-4 in tr(G) torchjd falls back to the mean; norm_eps=0 keeps projecting
    small = 1e-3 * torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(UPGrad()(small), small.mean(0))
    torch.testing.assert_close(UPGrad(norm_eps=0.0, reg_eps=1e-12)(small), 1e-3 * torch.tensor([0.25, 0.75], dtype=F64))
    # float64 rows at 1e-200 and 1e200: finite, the same direction as at moderate scale
    ext = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64) * 1e200
    torch.testing.assert_close(UPGrad(reg_eps=1e-12)(ext), 1e200 * torch.tensor([0.25, 0.75], dtype=F64))
    bad = torch.stack([a, a])
    bad[0, 1] = float("nan")
    assert torch.isnan(UPGrad()(bad)).all() and torch.isnan(UPGrad()(bad.float())).all()
    leaf = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert not UPGrad()(leaf).requires_grad


def test_upgrad_options_and_validation():
    assert repr(UPGrad()) == "UPGrad(reg_eps=0.0001, norm_eps=0.0001, double=False)"
    assert UPGrad(**UPGrad(reg_eps=1e-6).options()).options() == {"reg_eps": 1e-6, "norm_eps": 1e-4, "double": False}
    with pytest.raises(ValueError, match="reg_eps must be a positive"):
        UPGrad(reg_eps=0.0)
    with pytest.raises(ValueError, match="norm_eps must be >= 0"):
        UPGrad(norm_eps=-1.0)
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.5, -2.0]])
    torch.testing.assert_close(UPGrad(double=True)(g), UPGrad()(g), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The float32 Gramian of UPGrad and MGDA (one matmul, as torchjd) against float64 references


@SETTINGS
@given(matrices(dtypes=(torch.float32,)))
@example(torch.tensor([[1.5410e-02], [-2.9343e-02], [-2.1788e+02], [-2.0207e-01], [-1.8550e+02]]))
def test_float32_gramian_matches_the_float64_naive_references(g):
    # A float32 Gramian carries errors of ~eps32 * ||J||_F^2 in its entries; where the answer is
    # near the zero vector (MGDA on a hull that contains 0, the example) they show as up to
    # ~sqrt(eps32) * ||J||_F in d: 1.0e-5 * ||J||_F was measured on the example, so 1e-4.
    exact = g.to(F64)  # the same numbers, every product exact in the references' float64
    close(UPGrad(norm_eps=0.0)(g), naive_upgrad(exact, 1e-4), g, 1e-4)
    if g.shape[0] <= 5:
        close(MGDA()(g), naive_mgda(exact), g, 1e-4)


@pytest.mark.parametrize("combiner", [UPGrad(norm_eps=0.0), MGDA()], ids=["upgrad", "mgda"])
def test_float32_gramian_at_many_parameters(combiner):
    # P = 200 000: the float32 sums of the Gramian against the float64 path (itself checked against
    # the naive references above), ||d32 - d64|| relative to ||J||_F
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(8, 200_000, generator=gen)
    g[1:] -= 0.5 * g[0]
    g[2] *= 1e-2
    ours, reference = combiner(g), combiner(g.to(F64))
    assert ours.dtype == torch.float32
    assert float(torch.linalg.vector_norm(ours.to(F64) - reference)) <= 1e-5 * float(torch.linalg.vector_norm(g.to(F64)))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("combiner", [UPGrad(norm_eps=0.0), MGDA()], ids=["upgrad", "mgda"])
def test_float32_gramian_out_of_range_is_formed_from_scaled_rows(combiner, scale):
    # the squares of 1e-30 underflow and those of 1e30 overflow in float32: the Gramian is formed
    # again from unit rows, and both combiners are positively homogeneous in J
    g = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5], [0.5, -2.0, 1.0]])
    out = combiner(g * scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.to(F64) / scale, combiner(g).to(F64), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# MGDA


@SETTINGS
@given(matrices(k_max=5, p_max=6))
def test_mgda_matches_naive_enumeration(g):
    close(MGDA()(g), naive_mgda(g), g, 1e-6)


@SETTINGS
@given(matrices(k_min=2, k_max=2))
def test_mgda_matches_torchjd_two_terms(g):
    # Frank-Wolfe with exact line search is exact on a segment: one step, then gamma = 0
    torchjd = pytest.importorskip("torchjd.aggregation")
    close(MGDA()(g), torchjd.MGDA()(g).tolist(), g, 1e-9)


@SETTINGS
@given(matrices(k_min=3))
def test_mgda_is_at_least_as_good_as_torchjd_frank_wolfe(g):
    # torchjd stops Frank-Wolfe at gamma < 1e-3: a point of the hull, of larger norm. For the
    # min-norm point d* and any hull point d: ||d - d*||^2 <= ||d||^2 - ||d*||^2.
    torchjd = pytest.importorskip("torchjd.aggregation")
    ours = MGDA()(g).to(F64)
    theirs = torchjd.MGDA()(g).to(F64)
    tr = float((g.to(F64) ** 2).sum())
    assert float(ours @ ours) <= float(theirs @ theirs) + 1e-10 * tr
    assert float((theirs - ours) @ (theirs - ours)) <= float(theirs @ theirs) - float(ours @ ours) + 1e-10 * tr


def test_mgda_grid_search_three_terms():
    # brute force over the simplex with step 1/300: the exact minimum is below every grid point
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        g = torch.randn(3, 4, generator=gen, dtype=F64)
        g[1] -= 1.2 * g[0]
        gram = gram_f(g)
        n = 300
        grid = min(dot(a, [dot(row, a) for row in gram])
                   for i in range(n + 1) for j in range(n + 1 - i) for a in [[i / n, j / n, (n - i - j) / n]])
        d = MGDA()(g)
        assert float(d @ d) <= grid + 1e-12
        assert float(d @ d) >= grid - 1e-3 * sum(gram[i][i] for i in range(3))


def test_mgda_hand_examples():
    # orthogonal unit rows: alpha = (1/2, 1/2), d = (0.5, 0.5)
    torch.testing.assert_close(MGDA()(torch.eye(2, dtype=F64)), torch.tensor([0.5, 0.5], dtype=F64))
    # g1 = (1, 0), g2 = (-1, 1): d(a) = a g1 + (1 - a) g2 = (2a - 1, 1 - a); |d|^2' = 4(2a-1) - 2(1-a) = 0
    # -> a = 0.6, d = (0.2, 0.4); d . g1 = d . g2 = |d|^2 = 0.2
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(MGDA()(g), torch.tensor([0.2, 0.4], dtype=F64))
    torch.testing.assert_close(MGDA().weights(g), torch.tensor([0.6, 0.4], dtype=F64))
    # parallel rows: the shorter one; opposite rows: 0 (a Pareto-stationary point)
    a = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    torch.testing.assert_close(MGDA()(torch.stack([a, 3 * a])), a)
    assert MGDA()(torch.stack([a, -3 * a])).abs().max() <= 1e-10  # ~reg_eps |J|
    # three at 120 degrees in the plane: 0 is in the hull
    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=F64)
    assert MGDA()(torch.stack([ang.cos(), ang.sin()], 1)).abs().max() <= 1e-10


@SETTINGS
@given(matrices(scales=(-30, 30), dtypes=(torch.float32, F64)))
# float32 rows that differ by up to 1e24 in norm, one nearly zero: a ridge raised relative to
# tr(G) (rounding made the float32 Gramian indefinite) swamped the small rows, and d conflicted
@example(torch.tensor([[1.1720513546339215e-20, -4.097649594505612e-21, -5.234737709906246e-23],
                       [-13.939220428466797, 17.489059448242188, -6.1399149894714355],
                       [-4356.5107421875, -8572.5234375, -2408.46533203125],
                       [-12.779631614685059, 110.54983520507812, -143.78118896484375],
                       [-28175.95703125, 23669.4453125, 517.3258666992188],
                       [0.5559050440788269, 1.0861631631851196, -0.18818625807762146],
                       [-2018.19189453125, -227.4061737060547, -501.3232421875]]))
@example(torch.tensor([[109.9573974609375], [0.011154131032526493], [-1.4320579359118561e-30],
                       [-0.000974645372480154], [51.7554931640625], [-7.050556669156987e-18]]))
def test_mgda_never_conflicts(g):
    d = MGDA()(g)
    assert d.dtype == g.dtype and torch.isfinite(d).all()
    alpha = MGDA().weights(g)
    assert alpha.min() >= 0 and abs(float(alpha.sum()) - 1) < 1e-12
    # d* . g_j >= |d*|^2 >= |d|^2 - reg_eps |J|_F^2 and |d - d*| <= sqrt(reg_eps) |J|_F (the documented bound)
    o = rows_f(d[None])[0]
    frob = math.sqrt(sum(dot(r, r) for r in rows_f(g)))
    for row in rows_f(g):
        n = math.sqrt(dot(row, row))
        assert dot(o, row) >= dot(o, o) - 1e-12 * frob**2 - 1e-5 * math.sqrt(dot(o, o)) * n - 3e-6 * frob * n


def test_mgda_two_rows_a_million_times_apart_do_not_conflict():
    # the ridge on the trace-normalised Gramian swamped the short row: g1 . d < 0
    g = torch.tensor([[1e-6, 0.0], [-1e2 * math.cos(1e-3), 1e2 * math.sin(1e-3)]], dtype=F64)
    d = MGDA(double=True)(g)
    assert float(g[0] @ d) >= 0  # was -9.9e-17: a conflict with the short row
    close(d, naive_mgda(g), g, 1e-12)  # (g[1] . d is a cancellation of two 1e-10 terms: its sign is rounding)


def test_mgda_edge_cases_and_options():
    z = torch.zeros(3, dtype=F64)
    assert torch.equal(MGDA()(torch.zeros(2, 3, dtype=F64)), z)
    assert torch.equal(MGDA()(torch.zeros(0, 3, dtype=F64)), z)
    bad = torch.ones(2, 3, dtype=F64)
    bad[1, 0] = float("inf")
    assert torch.isnan(MGDA()(bad)).all()
    assert repr(MGDA()) == "MGDA(reg_eps=1e-12, double=False)"
    with pytest.raises(ValueError, match="reg_eps"):
        MGDA(reg_eps=-1.0)
    assert set(available_combiners()) >= {"upgrad", "mgda", "dcgd"}
    assert isinstance(make_combiner("UPGrad"), UPGrad) and isinstance(make_combiner("mgda"), MGDA)


# ---------------------------------------------------------------------------------------------
# DCGD


def test_dcgd_hand_conflicting():
    # g_r = (1, 0), g_b = (-3, 4) (|g_b| = 5), g = (-2, 4): g . g_b = 22 > 0, g . g_r = -2 < 0
    # proj = g_b^perp = g_b - (g_r.g_b)/|g_r|^2 g_r = (-3, 4) + 3 (1, 0) = (0, 4)
    # g_r^perp = g_r - (g_r.g_b)/|g_b|^2 g_b = (1, 0) + 3/25 (-3, 4) = (0.64, 0.48)
    # avg = ((0.64, 0.48) + (0, 4)) / 2 = (0.32, 2.24)
    # center = (|g_r| + |g_b|)/2 (u_r + u_b) = 3 ((1, 0) + (-0.6, 0.8)) = (1.2, 2.4)
    g = torch.tensor([[1.0, 0.0], [-3.0, 4.0]], dtype=F64)
    torch.testing.assert_close(DCGD(variant="proj")(g), torch.tensor([0.0, 4.0], dtype=F64))
    torch.testing.assert_close(DCGD(variant="avg")(g), torch.tensor([0.32, 2.24], dtype=F64))
    torch.testing.assert_close(DCGD()(g), torch.tensor([1.2, 2.4], dtype=F64))
    # the other side: g_r = (-3, 4), g_b = (1, 0) (groups=[1]: row 1 is the PDE group):
    # g . g_b = -2 < 0 -> proj = g_r^perp = (-3, 4) + 3 (1, 0) = (0, 4)
    torch.testing.assert_close(DCGD(variant="proj", groups=[1])(g), torch.tensor([0.0, 4.0], dtype=F64))
    torch.testing.assert_close(DCGD(variant="avg", groups=[1])(g), torch.tensor([0.32, 2.24], dtype=F64))


def test_dcgd_hand_aligned_and_orthogonal():
    # aligned: g_r = (1, 0), g_b = (2, 1): g = (3, 1) is inside the cone -> proj = avg = g;
    # center = (1 + sqrt5)/2 ((1, 0) + (2, 1)/sqrt5)
    s5 = math.sqrt(5.0)
    g = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=F64)
    for v in ("proj", "avg"):
        torch.testing.assert_close(DCGD(variant=v)(g), torch.tensor([3.0, 1.0], dtype=F64))
    torch.testing.assert_close(DCGD()(g), (1 + s5) / 2 * torch.tensor([1 + 2 / s5, 1 / s5], dtype=F64))
    # orthogonal: g_r = (1, 0), g_b = (0, 2): proj = avg = (1, 2); center = 3/2 (1, 1)
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    for v in ("proj", "avg"):
        torch.testing.assert_close(DCGD(variant=v)(g), torch.tensor([1.0, 2.0], dtype=F64))
    torch.testing.assert_close(DCGD()(g), torch.tensor([1.5, 1.5], dtype=F64))
    # a conflict with the total still in the cone: g_r = (1, 0), g_b = (-0.5, 1): g = (0.5, 1),
    # g . g_r = 0.5, g . g_b = 0.75 -> proj = avg = g
    g = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=F64)
    for v in ("proj", "avg"):
        torch.testing.assert_close(DCGD(variant=v)(g), torch.tensor([0.5, 1.0], dtype=F64))


@st.composite
def grouped(draw):
    g = draw(matrices(k_max=6, scales=(-20, 20), dtypes=(torch.float32, F64)))
    k = g.shape[0]
    pde = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k - 1, unique=True))
    return g, pde


@SETTINGS
@given(grouped(), st.sampled_from(["center", "avg", "proj"]))
def test_dcgd_lies_in_the_dual_cone(case, variant):
    g, pde = case
    out = DCGD(variant=variant, groups=pde)(g)
    assert out.dtype == g.dtype and torch.isfinite(out).all()
    rest = [i for i in range(g.shape[0]) if i not in pde]
    o = rows_f(out[None])[0]
    for group in (pde, rest):
        s = rows_f(g[group].to(F64).sum(0)[None])[0]
        assert dot(o, s) >= -1e-5 * math.sqrt(dot(o, o) * dot(s, s))


@SETTINGS
@given(grouped())
def test_dcgd_center_is_config_of_the_group_sums(case):
    g, pde = case
    rest = [i for i in range(g.shape[0]) if i not in pde]
    pair = torch.stack([g[pde].to(F64).sum(0), g[rest].to(F64).sum(0)])
    torch.testing.assert_close(DCGD(groups=pde)(g.to(F64)), ConFIG()(pair))
    for v in ("avg", "proj"):
        torch.testing.assert_close(DCGD(variant=v, groups=pde)(g.to(F64)), DCGD(variant=v)(pair))


def test_dcgd_groups():
    g = torch.tensor([[1.0, 0.0], [-3.0, 1.0], [0.0, 3.0]], dtype=F64)
    terms = ["pde", "bc", "ic"]
    by_name = DCGD(variant="proj", groups=["pde"], terms=terms)
    assert by_name.rows(3) == ([0], [1, 2])
    torch.testing.assert_close(by_name(g), DCGD(variant="proj")(g))
    pair = DCGD(groups=[["bc"], ["pde", "ic"]], terms=terms)
    assert pair.rows(3) == ([1], [0, 2])
    rebuilt = make_combiner("dcgd", **pair.options())
    assert rebuilt.options() == pair.options() and rebuilt.rows(3) == ([1], [0, 2])
    assert make_combiner("dcgd", **by_name.options()).rows(3) == ([0], [1, 2])
    assert DCGD().options() == {"variant": "center", "groups": [0], "terms": None, "double": True}
    with pytest.raises(ValueError, match="two groups.*3 groups"):
        DCGD(groups=[[0], [1], [2]])
    with pytest.raises(ValueError, match=r"empty group.*PDE=\[0\]"):
        DCGD()(g[:1])
    with pytest.raises(ValueError, match="empty group"):
        DCGD(groups=[0, 1, 2])(g)
    with pytest.raises(ValueError, match=r"rows \[0\] in both"):
        DCGD(groups=[[0], [0, 1, 2]])(g)
    with pytest.raises(ValueError, match=r"rows \[2\] in neither"):
        DCGD(groups=[[0], [1]])(g)
    with pytest.raises(ValueError, match="out of range for 3 rows"):
        DCGD(groups=[5])(g)
    with pytest.raises(ValueError, match="'wall' is not a known term name"):
        DCGD(groups=["wall"], terms=terms)
    with pytest.raises(ValueError, match="no terms= given"):
        DCGD(groups=["pde"])(g)  # a bare matrix: the names of its rows are unknown
    with pytest.raises(ValueError, match="names a term twice"):
        DCGD(groups=["pde"], terms=["pde", "pde", "ic"])
    with pytest.raises(ValueError, match="got 2 rows but terms= names 3"):
        by_name(g[:2])
    with pytest.raises(TypeError, match="groups must be"):
        DCGD(groups="pde")
    with pytest.raises(ValueError, match="variant must be"):
        DCGD(variant="mean")


def test_dcgd_edge_cases():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    z = torch.zeros(3, dtype=F64)
    for v in ("center", "avg", "proj"):
        # a zero group gradient: the other one; an exactly opposite pair: g = 0 is in the cone
        # (proj, avg) or the bisector vanishes (center)
        torch.testing.assert_close(DCGD(variant=v)(torch.stack([a, z])), a)
        torch.testing.assert_close(DCGD(variant=v)(torch.stack([z, a])), a)
        assert DCGD(variant=v)(torch.stack([a, -a])).abs().max() <= 1e-12
        bad = torch.stack([a, a])
        bad[0, 0] = float("nan")
        assert torch.isnan(DCGD(variant=v)(bad)).any()
    # extreme scales (float64 squares overflow): g_r = 1e200 (1, 0), g_b = 1e200 (-3, 4) -> as above
    g = torch.tensor([[1.0, 0.0], [-3.0, 4.0]], dtype=F64) * 1e200
    torch.testing.assert_close(DCGD(variant="proj")(g), 1e200 * torch.tensor([0.0, 4.0], dtype=F64))
    torch.testing.assert_close(DCGD(variant="avg")(g), 1e200 * torch.tensor([0.32, 2.24], dtype=F64))


def test_dcgd_in_a_balancer_groups_by_the_balancers_row_names():
    """The balancer passes the rows' names: ``groups=["pde"]`` is the pde row whatever the order of
    the terms, without ``terms=``, and with an optional term absent; a ``terms=`` that does not
    match the balancer's rows raises naming both, before anything changes."""
    def grads(combiner, order, present=None, optional=()):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
        x = torch.linspace(-1, 1, 16, dtype=F64)[:, None]
        u = model(x)
        terms = {"pde": (u - torch.sin(3 * x)).pow(2).mean(), "bc": (u[[0, -1]] - 1).pow(2).mean(), "ic": (u[5] + 0.5).pow(2).sum()}
        balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "static", terms=order, optional=optional,
                                combine=combiner)
        balancer.backward({n: terms[n] for n in (present or order)})
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), model

    reference, _ = grads(DCGD(groups=[0]), ["pde", "bc", "ic"])
    for order in (["pde", "bc", "ic"], ["bc", "pde", "ic"], ["ic", "bc", "pde"]):
        got, _ = grads(DCGD(groups=["pde"]), order)
        torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-14)
    absent, _ = grads(DCGD(groups=["pde"]), ["bc", "ic", "pde"], present=["ic", "pde"], optional=["bc"])
    expected, _ = grads(DCGD(groups=["pde"]), ["ic", "pde"])
    torch.testing.assert_close(absent, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"terms=\['bc', 'pde', 'ic'\].*rows \['pde', 'bc', 'ic'\]"):
        grads(DCGD(groups=["pde"], terms=["bc", "pde", "ic"]), ["pde", "bc", "ic"])
    with pytest.raises(ValueError, match="'wall' is not among the terms"):
        grads(DCGD(groups=["wall"]), ["pde", "bc", "ic"])
    # no groups=: the first term of the first step, named in a warning (it was silent), pinned by
    # name, so that an optional first term's absence does not hand the PDE group to another term
    default = DCGD()
    with pytest.warns(UserWarning, match=r"DCGD: no groups given, using the first term 'bc' as the PDE group"):
        got, _ = grads(default, ["bc", "pde", "ic"])
    torch.testing.assert_close(got, grads(DCGD(groups=["bc"]), ["bc", "pde", "ic"])[0], rtol=0, atol=0)
    assert default.options()["groups"] == ["bc"]
    with pytest.warns(UserWarning, match="'pde'"):
        grads(DCGD(), ["pde", "bc", "ic"])
    # terms= declares the order: its first term, pinned when the balancer is built, so that an
    # optional first term absent on the first step is not replaced by the next one (a clear error)
    declared = DCGD()
    with pytest.warns(UserWarning, match=r"first term 'pde' as the PDE group and the others \(\['bc', 'ic'\]\)"):
        with pytest.raises(ValueError, match="'pde' is not among the terms"):
            grads(declared, ["pde", "bc", "ic"], present=["bc", "ic"], optional=["pde"])
    assert declared.groups == (["pde"],)
