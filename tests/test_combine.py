"""Gradient combiners: WeightedSum, PCGrad, ConFIG, the torchjd adapter and make_combiner.

References written here are deliberately naive (plain Python floats and loops, the paper's
formulas as printed); the hand-computed examples carry their derivation in a comment.
"""
import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from lossbalance.combine import (
    CallableCombiner, Combiner, ConFIG, PCGrad, TorchJD, WeightedSum, available_combiners, make_combiner,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# random gradient matrices with structure: independent rows, zero rows, exact (power-of-two)
# parallel copies, near-parallel copies, exactly opposite copies, extreme scales


@st.composite
def grad_matrices(draw, k_min=2, k_max=6, opposite=True, zero=True, dtypes=(torch.float32, F64), etas=(1e-3, 1e-6)):
    """A (K, P) matrix, P > K, whose rows admit a conflict-free direction (see ConFIG's docstring).

    Every row is an independent Gaussian direction, or derived from an earlier independent row:
    a positive power-of-two multiple (exactly parallel, also after rounding to float32), a
    near-parallel copy (relative noise ``etas``: 1e-3 or 1e-6), or at most one exactly opposite copy (a
    negative power of two; then no other copies of that row). Rows are scaled by 10^e,
    e in [-30, 30]; copies by 2^e.
    """
    k = draw(st.integers(k_min, k_max))
    p = draw(st.integers(k + 1, k + 5))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = torch.randn(k, p, generator=gen, dtype=F64)
    kinds = ["independent", "parallel", "near"] + (["opposite"] if opposite else []) + (["zero"] if zero else [])
    rows: list[torch.Tensor] = []
    sources: dict[int, set[str]] = {}  # independent row index -> kinds of copies made of it
    for i in range(k):
        kind = "independent" if i == 0 else draw(st.sampled_from(kinds))
        if kind == "zero":
            rows.append(torch.zeros(p, dtype=F64))
            continue
        if kind != "independent":
            if kind == "opposite":
                usable = [j for j, made in sources.items() if not made]
            else:
                usable = [j for j, made in sources.items() if "opposite" not in made]
            if not usable:
                kind = "independent"
            else:
                j = draw(st.sampled_from(sorted(usable)))
                sources[j].add(kind)
                two = 2.0 ** draw(st.integers(-20, 20))
                if kind == "parallel":
                    rows.append(rows[j] * two)
                elif kind == "opposite":
                    rows.append(rows[j] * -two)
                else:
                    eta = draw(st.sampled_from(etas))
                    noise = base[i] * rows[j].norm() / base[i].norm()
                    rows.append((rows[j] + eta * noise) * two)
                continue
        scale = 10.0 ** draw(st.integers(-30, 30))
        sources[i] = set()
        rows.append(base[i] * scale)
    return torch.stack(rows).to(dtype)


@st.composite
def plain_matrices(draw, k_min=1, k_max=6):
    """Gaussian (K, P) rows with random scales 10^e, e in [-30, 30], some rows zero, P in 1..8."""
    k = draw(st.integers(k_min, k_max))
    p = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    g = torch.randn(k, p, generator=gen, dtype=F64)
    scales = torch.tensor([10.0 ** draw(st.integers(-30, 30)) for _ in range(k)], dtype=F64)
    zero = torch.tensor([draw(st.integers(0, 5)) == 0 for _ in range(k)])
    g = g * scales[:, None]
    g[zero] = 0.0
    return g.to(dtype)


def rows_f(g):
    return [[float(v) for v in row] for row in g.to(F64)]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def norm(a):
    return math.sqrt(dot(a, a))


def total_norm(g):
    return sum(norm(r) for r in rows_f(g))


def tol_for(g, f32=1e-5, f64=1e-9):
    return f32 if g.dtype == torch.float32 else f64


# ---------------------------------------------------------------------------------------------
# WeightedSum


@SETTINGS
@given(plain_matrices())
def test_weighted_sum_is_the_sum(g):
    out = WeightedSum()(g)
    assert out.dtype == g.dtype and out.shape == (g.shape[1],)
    assert torch.equal(out, g.sum(0))


# ---------------------------------------------------------------------------------------------
# PCGrad


def naive_pcgrad(g, generator, order="random"):
    """Algorithm 1 of Yu et al. (2020) with explicit loops over Python floats.

    g_i^PC = g_i; for j in the order (j != i): if g_i^PC . g_j < 0,
    g_i^PC -= (g_i^PC . g_j) / ||g_j||^2 g_j (projection onto the ORIGINAL g_j); return the rows
    and their sum. The order is drawn exactly as documented: one torch.randperm(K, generator)
    per term i, in term order ("random"), one for all ("shared"), or 0..K-1 ("fixed").
    """
    rows = rows_f(g)
    k, p = len(rows), len(rows[0])
    if order == "fixed":
        perms = [list(range(k))] * k
    elif order == "shared":
        perm = torch.randperm(k, generator=generator).tolist()
        perms = [perm] * k
    else:
        perms = [torch.randperm(k, generator=generator).tolist() for _ in range(k)]
    projected = []
    for i in range(k):
        gi = list(rows[i])
        for j in perms[i]:
            if j == i:
                continue
            gj = rows[j]
            d = dot(gi, gj)
            if d < 0:
                nn = dot(gj, gj)
                gi = [gi[t] - d / nn * gj[t] for t in range(p)]
        projected.append(gi)
    return projected, [sum(r[t] for r in projected) for t in range(p)]


@SETTINGS
@given(st.one_of(plain_matrices(k_min=2), grad_matrices()), st.integers(0, 2**31 - 1),
       st.sampled_from(["random", "shared", "fixed"]))
def test_pcgrad_matches_naive_reference(g, seed, order):
    # scales 10^-30..10^30: the naive squares stay inside the float64 range
    out = PCGrad(order=order)(g, generator=torch.Generator().manual_seed(seed))
    _, ref = naive_pcgrad(g, torch.Generator().manual_seed(seed), order)
    scale = total_norm(g)
    assert out.dtype == g.dtype
    for a, b in zip(out.tolist(), ref):
        assert abs(a - b) <= tol_for(g) * scale


@SETTINGS
@given(grad_matrices(k_min=2, k_max=2), st.integers(0, 2**31 - 1))
def test_pcgrad_two_terms_projected_pair_never_conflicts(g, seed):
    # g1^PC . g2^PC = -(g1 . g2)(1 - cos^2) >= 0 when they conflict; untouched otherwise
    pc = PCGrad().project(g, generator=torch.Generator().manual_seed(seed))
    a, b = rows_f(pc)
    n1, n2 = (norm(r) for r in rows_f(g))
    assert dot(a, b) >= -tol_for(g, 1e-6, 1e-12) * n1 * n2
    assert torch.isfinite(pc).all()


def test_pcgrad_hand_two_terms():
    # g1 = (1, 0), g2 = (-1, 1): g1 . g2 = -1 < 0
    # g1^PC = g1 - (-1)/||g2||^2 g2 = (1, 0) + (-1, 1)/2 = (0.5, 0.5)
    # g2^PC = g2 - (-1)/||g1||^2 g1 = (-1, 1) + (1, 0)   = (0, 1)
    # sum = (0.5, 1.5)  (for two terms the order cannot matter)
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    for order in ("random", "shared", "fixed"):
        pc = PCGrad(order=order).project(g, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(pc, torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=F64))
        torch.testing.assert_close(PCGrad(order=order)(g, generator=torch.Generator()), torch.tensor([0.5, 1.5], dtype=F64))


def test_pcgrad_hand_three_terms_fixed_order():
    # g1 = (1, 0), g2 = (-1, 1), g3 = (0, -1), order j = 0, 1, 2 skipping i:
    # i=1: g1.g2 = -1 -> (1,0) + (-1,1)/2 = (0.5, 0.5); (0.5,0.5).g3 = -0.5 -> + 0.5 (0,-1) = (0.5, 0)
    # i=2: g2.g1 = -1 -> (-1,1) + (1,0) = (0, 1); (0,1).g3 = -1 -> + (0,-1) = (0, 0)
    # i=3: g3.g1 = 0 (no conflict); g3.g2 = -1 -> (0,-1) + (-1,1)/2 = (-0.5, -0.5)
    # sum = (0, -0.5)
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]], dtype=F64)
    pc = PCGrad(order="fixed").project(g)
    torch.testing.assert_close(pc, torch.tensor([[0.5, 0.0], [0.0, 0.0], [-0.5, -0.5]], dtype=F64), atol=1e-15, rtol=0)
    torch.testing.assert_close(PCGrad(order="fixed")(g), torch.tensor([0.0, -0.5], dtype=F64), atol=1e-15, rtol=0)
    # the order matters here: visiting g3 before g2 for i=1 leaves g1^PC = (0.5, 0.5) (g1.g3 = 0);
    # over a few seeds the random order must produce more than one result
    results = {tuple(round(v, 12) for v in PCGrad()(g, generator=torch.Generator().manual_seed(s)).tolist())
               for s in range(20)}
    assert len(results) > 1 and (0.0, -0.5) in results


def test_pcgrad_reproducible_and_leaves_global_rng_alone():
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    g[1] = -g[0] + 0.1 * g[1]
    g[3] = -g[2] + 0.1 * g[3]
    state = torch.get_rng_state()
    a = PCGrad()(g, generator=torch.Generator().manual_seed(123))
    torch.manual_seed(999)  # the global RNG must not matter
    b = PCGrad()(g, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    torch.manual_seed(0)
    torch.set_rng_state(state)
    before = torch.get_rng_state()
    PCGrad()(g, generator=torch.Generator().manual_seed(5))
    assert torch.equal(before, torch.get_rng_state())
    # the generator advances: one randperm per term
    gen = torch.Generator().manual_seed(7)
    PCGrad()(g, generator=gen)
    ref = torch.Generator().manual_seed(7)
    for _ in range(5):
        torch.randperm(5, generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_pcgrad_needs_a_generator_unless_fixed():
    g = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="generator"):
        PCGrad()(g)
    with pytest.raises(ValueError, match="generator"):
        PCGrad(order="shared")(g)
    PCGrad(order="fixed")(g)
    with pytest.raises(ValueError, match="order"):
        PCGrad(order="sorted")
    assert PCGrad.needs_generator and not ConFIG.needs_generator and not WeightedSum.needs_generator


@SETTINGS
@given(st.integers(2, 6), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_pcgrad_without_conflict_is_the_sum(k, p, seed):
    g = torch.rand(k, p, generator=torch.Generator().manual_seed(seed), dtype=F64)  # all dot products >= 0
    torch.testing.assert_close(PCGrad()(g, generator=torch.Generator()), g.sum(0), rtol=1e-12, atol=0)


def test_pcgrad_zero_and_opposite_rows():
    g = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 3.0]], dtype=F64)
    with_zero = PCGrad(order="fixed").project(g)
    assert torch.isfinite(with_zero).all()
    assert torch.equal(with_zero[1], torch.zeros(3, dtype=F64))
    torch.testing.assert_close(with_zero[[0, 2]], PCGrad(order="fixed").project(g[[0, 2]]))
    # exactly opposite: g2 = -2 g1; g1^PC = g1 - (-2|g1|^2)/(4|g1|^2)(-2 g1) = 0, g2^PC = 0
    opp = torch.tensor([[1.0, -2.0, 0.5], [-2.0, 4.0, -1.0]], dtype=torch.float32)
    assert PCGrad()(opp, generator=torch.Generator()).abs().max() <= 1e-12
    # tiny and huge scales in float32 (1e-30 squared underflows in float32) still project
    tiny = torch.tensor([[1.0, 0.0], [-1.0, 1.0]]) * torch.tensor([[1e-30], [1e30]])
    out = PCGrad()(tiny, generator=torch.Generator())
    # g1^PC = g1 - (g1.g2)/|g2|^2 g2 = 1e-30 * (0.5, 0.5); g2^PC = g2 + 1e30 (1, 0) = 1e30 (0, 1)
    pc = PCGrad().project(tiny, generator=torch.Generator())
    torch.testing.assert_close(pc[0], torch.tensor([0.5e-30, 0.5e-30]), rtol=1e-6, atol=0)
    # (the sum is accurate norm-wise, ~1e-16 * 1e30 per entry: 0.5e-30 next to 1e30 is below that)
    torch.testing.assert_close(pc[1], torch.tensor([0.0, 1e30]), rtol=1e-6, atol=1e24)
    torch.testing.assert_close(out, pc.sum(0), rtol=1e-6, atol=1e24)
    # float64 rows at 1e-200 and 1e200 (squares under/overflow even in float64)
    ext = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64) * torch.tensor([[1e-200], [1e200]], dtype=F64)
    pc = PCGrad().project(ext, generator=torch.Generator())
    torch.testing.assert_close(pc[0], torch.tensor([0.5e-200, 0.5e-200], dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(pc[1], torch.tensor([0.0, 1e200], dtype=F64), rtol=1e-12, atol=1e186)
    assert PCGrad()(torch.zeros(2, 3), generator=torch.Generator()).eq(0).all()


# ---------------------------------------------------------------------------------------------
# ConFIG


def naive_config_two(g1, g2):
    """The paper's formula for two gradients, worked through with floats (no zero rows)."""
    n1, n2 = norm(g1), norm(g2)
    u1 = [v / n1 for v in g1]
    u2 = [v / n2 for v in g2]
    c = dot(u1, u2)
    x = [(a + b) / (1 + c) for a, b in zip(u1, u2)]  # solves u1.x = u2.x = 1 in span(u1, u2)
    nx = norm(x)
    gu = [v / nx for v in x]
    length = dot(g1, gu) + dot(g2, gu)
    return [length * v for v in gu]


@SETTINGS
@given(grad_matrices())
def test_config_never_conflicts(g):
    out = ConFIG()(g)
    assert out.dtype == g.dtype and torch.isfinite(out).all()
    o = rows_f(out[None])[0]
    no = norm(o)
    for row in rows_f(g):
        assert dot(o, row) >= -1e-6 * no * norm(row)


@SETTINGS
@given(grad_matrices(k_min=2, k_max=2))
def test_config_closed_form_equals_general_form(g):
    closed = ConFIG(closed_form=True)(g).to(F64)
    general = ConFIG(closed_form=False)(g).to(F64)
    scale = total_norm(g)
    # near-parallel rows (noise 1e-6) have condition number ~1e6: the general form is accurate
    # to about 1e-16 * 1e6 relative; the closed form has no such amplification
    assert (closed - general).abs().max() <= tol_for(g, 1e-6, 1e-7) * scale
    assert torch.isfinite(closed).all()


@SETTINGS
@given(grad_matrices(k_min=2, k_max=2, opposite=False, zero=False, dtypes=(F64,)))
def test_config_two_terms_matches_naive_formula(g):
    a, b = rows_f(g)
    ref = naive_config_two(a, b)
    out = ConFIG()(g).tolist()
    for x, y in zip(out, ref):
        assert abs(x - y) <= 1e-8 * (norm(a) + norm(b))


@SETTINGS
@given(st.one_of(grad_matrices(k_min=3, etas=(1e-3,)), grad_matrices(k_min=3, opposite=False)),
       st.randoms(use_true_random=False))
def test_config_permutation_invariant(g, rnd):
    # Without an exact solution (an opposite pair) least squares amplifies rounding by the
    # condition number squared: near-parallel rows at 1e-6 (kappa ~ 1e6) would move the result
    # by ~1e-4 relative in any floating-point implementation, so that combination is excluded.
    perm = list(range(g.shape[0]))
    rnd.shuffle(perm)
    a = ConFIG()(g).to(F64)
    b = ConFIG()(g[perm]).to(F64)
    # near-parallel rows (noise 1e-6, condition number up to ~1e7): rounding ~1e-16 * kappa
    assert (a - b).abs().max() <= tol_for(g, 1e-6, 1e-7) * total_norm(g)


@SETTINGS
@given(grad_matrices(k_min=2, opposite=False, zero=False, dtypes=(F64,)),
       st.lists(st.integers(-10, 10), min_size=6, max_size=6), st.integers(-10, 10))
def test_config_scaling(g, row_exp, common_exp):
    # the direction depends on the unit vectors only; the update is positively homogeneous
    scales = torch.tensor([2.0 ** e for e in row_exp[: g.shape[0]]], dtype=F64)
    d0 = ConFIG().direction(g)
    d1 = ConFIG().direction(g * scales[:, None])
    torch.testing.assert_close(d0, d1, rtol=0, atol=1e-9)
    c = 2.0 ** common_exp
    torch.testing.assert_close(ConFIG()(g * c), c * ConFIG()(g), rtol=1e-9, atol=0)


def test_config_hand_examples():
    # orthogonal: g1 = (1, 0), g2 = (0, 2): u = e1, e2; x = (1, 1); g_u = (1, 1)/sqrt2;
    # length = (1 + 2)/sqrt2; g = 3/2 (1, 1) = (1.5, 1.5)   [= (|g1| + |g2|)/2 (u1 + u2)]
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    for cf in (True, False):
        torch.testing.assert_close(ConFIG(closed_form=cf)(g), torch.tensor([1.5, 1.5], dtype=F64))
    # conflicting: g1 = (1, 0), g2 = (-3, 4) (|g2| = 5): u2 = (-0.6, 0.8); u1 + u2 = (0.4, 0.8)
    # g_u = (1, 2)/sqrt5; length = (1 + (-3 + 8))/sqrt5 = 6/sqrt5; g = 6/5 (1, 2) = (1.2, 2.4)
    # check: g.g1 = 1.2 > 0, g.g2 = -3.6 + 9.6 = 6 > 0  [= (1 + 5)/2 (0.4, 0.8)]
    g = torch.tensor([[1.0, 0.0], [-3.0, 4.0]], dtype=F64)
    for cf in (True, False):
        torch.testing.assert_close(ConFIG(closed_form=cf)(g), torch.tensor([1.2, 2.4], dtype=F64))
    # three terms in 3D: g1 = e1, g2 = e2, g3 = (-1, -1, 1) (|g3| = sqrt3, u3 = g3/sqrt3)
    # U x = 1: x1 = 1, x2 = 1, (-x1 - x2 + x3)/sqrt3 = 1  ->  x = (1, 1, 2 + sqrt3)
    # |x|^2 = 2 + (2 + sqrt3)^2 = 9 + 4 sqrt3; sum_i g_i . x = 1 + 1 + (-2 + 2 + sqrt3) = 2 + sqrt3
    # g = (sum_i g_i . x) x / |x|^2 = (2 + sqrt3)/(9 + 4 sqrt3) (1, 1, 2 + sqrt3)
    s3 = math.sqrt(3.0)
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 1.0]], dtype=F64)
    ref = (2 + s3) / (9 + 4 * s3) * torch.tensor([1.0, 1.0, 2 + s3], dtype=F64)
    torch.testing.assert_close(ConFIG()(g), ref)
    torch.testing.assert_close(ConFIG()(g.float()), ref.float())
    # the update makes the same angle with every term: u_i . g_u = 1/|x| for all i
    d = ConFIG().direction(g)
    cosines = [float(d @ row / row.norm()) for row in g]
    assert max(cosines) - min(cosines) < 1e-12
    assert abs(cosines[0] - 1 / math.sqrt(9 + 4 * s3)) < 1e-12


def test_config_equal_norms_gives_the_sum():
    # two equal-norm gradients: g = |g|/2 * 2 (u1 + u2) ... = g1 + g2, at any angle
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        a, b = torch.randn(2, 5, generator=gen, dtype=F64)
        b = b * (a.norm() / b.norm())
        g = torch.stack([a, b])
        for cf in (True, False):
            torch.testing.assert_close(ConFIG(closed_form=cf)(g), a + b)
    # K orthonormal-direction gradients of equal norm: x = sum u_i, g = sum g_i
    q, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=F64))
    g = 3.0 * q.mT  # 4 orthogonal rows of norm 3
    torch.testing.assert_close(ConFIG()(g), g.sum(0))


def test_config_edge_cases():
    z = torch.zeros(3, dtype=F64)
    a = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    b = torch.tensor([0.3, 0.1, -1.0], dtype=F64)
    for cf in (True, False):
        c = ConFIG(closed_form=cf)
        # one zero gradient is ignored: the update is the other gradient (conflictfree's closed form: NaN)
        torch.testing.assert_close(c(torch.stack([a, z])), a)
        torch.testing.assert_close(c(torch.stack([z, a])), a)
        assert torch.equal(c(torch.stack([z, z])), z)
        # exactly opposite pair: zero vector, any scales
        assert torch.equal(c(torch.stack([a, -4.0 * a])), z)
        assert torch.equal(c(torch.stack([a, -a]).float()), z.float())
        # opposite up to rounding (3a/|3a| != a/|a| in the last bits): still zero, not a random direction
        assert c(torch.stack([a, -3.0 * a])).abs().max() <= 1e-12
        # parallel: the sum
        torch.testing.assert_close(c(torch.stack([a, 3.0 * a])), 4.0 * a)
    # an opposite pair and a third term: the update is orthogonal to the pair, positive on the third
    out = ConFIG()(torch.stack([a, -2.0 * a, b]))
    assert abs(float(out @ a)) <= 1e-12 * float(out.norm() * a.norm())
    assert float(out @ b) > 0
    # float64 rows at 1e-200 and 1e200 (squares under/overflow in float64): units unchanged,
    # g = (|g1| + |g2|)/2 (u1 + u2) = (1e-200 + 5e200)/2 (0.4, 0.8) = 1e200 (1, 2) to 1e-400
    ext = torch.tensor([[1.0, 0.0], [-3.0, 4.0]], dtype=F64) * torch.tensor([[1e-200], [1e200]], dtype=F64)
    for cf in (True, False):
        torch.testing.assert_close(ConFIG(closed_form=cf)(ext), torch.tensor([1e200, 2e200], dtype=F64), rtol=1e-12, atol=0)
    # one term: the gradient itself; no terms: zeros
    torch.testing.assert_close(ConFIG()(a[None]), a)
    assert torch.equal(ConFIG()(torch.zeros(0, 3, dtype=F64)), z)
    # non-finite input gives non-finite output, no exception
    bad = torch.stack([a, b])
    bad[0, 1] = float("nan")
    assert torch.isnan(ConFIG()(bad)).all() and torch.isnan(ConFIG(closed_form=False)(bad)).all()
    bad[0, 1] = float("inf")
    assert torch.isnan(ConFIG()(torch.cat([bad, b[None]]))).all()
    # more terms than dimensions (K > P), three at 120 degrees in the plane: 1 is orthogonal
    # to the range of U (u1 + u2 + u3 = 0), no direction helps all three -> zero
    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=F64)
    star = torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([[1.0], [2.0], [5.0]], dtype=F64)
    assert ConFIG()(star).abs().max() <= 1e-12


@SETTINGS
@given(plain_matrices())
def test_config_extreme_scales_finite(g):
    # float32 rows from 1e-30 to 1e30 (squares underflow/overflow in float32): finite output;
    # the direction is that of the float64 computation on the same numbers
    out = ConFIG()(g)
    assert out.dtype == g.dtype and torch.isfinite(out).all()
    if g.dtype == torch.float32:
        torch.testing.assert_close(ConFIG().direction(g).to(F64), ConFIG().direction(g.to(F64)), rtol=0, atol=1e-6)


def test_config_options_and_validation():
    assert repr(ConFIG()) == "ConFIG(closed_form=True, rtol=None, double=True, solver='qr')"
    assert ConFIG(**ConFIG(rtol=1e-6).options()).options() == {"closed_form": True, "rtol": 1e-6, "double": True, "solver": "qr"}
    with pytest.raises(ValueError, match="rtol"):
        ConFIG(rtol=2.0)
    # double=False computes in float32 for float32 input: same answer to float32 accuracy
    g = torch.tensor([[1.0, 0.0], [-3.0, 4.0], [0.5, 0.5]])
    torch.testing.assert_close(ConFIG(double=False)(g), ConFIG()(g), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="matrix"):
        ConFIG()(torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        PCGrad(order="fixed")(torch.ones(2, 3, dtype=torch.long))
    # no graph is recorded
    leaf = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert not ConFIG()(leaf).requires_grad and not PCGrad(order="fixed")(leaf).requires_grad


# ---------------------------------------------------------------------------------------------
# make_combiner, callables, torchjd


def test_make_combiner():
    assert isinstance(make_combiner("sum"), WeightedSum)
    assert isinstance(make_combiner("PCGrad"), PCGrad)
    assert isinstance(make_combiner("config"), ConFIG)
    assert make_combiner("pcgrad", order="fixed").order == "fixed"
    c = ConFIG(rtol=1e-6)
    assert make_combiner(c) is c
    with pytest.raises(TypeError):
        make_combiner(c, rtol=1e-3)
    with pytest.raises(ValueError, match=r"Did you mean 'pcgrad'.*Known: config, dcgd, mconfig, mgda, pcgrad, sum, torchjd, upgrad"):
        make_combiner("pcgrd")
    with pytest.raises(ValueError, match="Known"):
        make_combiner("nonsense-xyz")
    with pytest.raises(ValueError, match="torchjd:UPGrad"):
        make_combiner("torchjd")
    with pytest.raises(TypeError):
        make_combiner(3)
    assert available_combiners() == ["config", "dcgd", "mconfig", "mgda", "pcgrad", "sum", "torchjd", "upgrad"]
    assert repr(make_combiner("pcgrad")) == "PCGrad(order='random', double=True)"


def test_callable_is_wrapped():
    def mean_rows(g):
        return g.mean(0)

    c = make_combiner(mean_rows)
    assert isinstance(c, CallableCombiner) and isinstance(c, Combiner)
    g = torch.randn(3, 5)
    assert torch.equal(c(g), g.mean(0))
    assert "mean_rows" in repr(c)
    with pytest.raises(ValueError, match="expected a \\(5,\\) vector"):
        make_combiner(lambda g: g)(g)


def test_torchjd_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchjd", None)  # makes `import torchjd` raise ImportError
    with pytest.raises(ImportError, match=r"pip install lossbalance\[bench\]"):
        TorchJD("MGDA")
    with pytest.raises(ImportError, match="torchjd"):
        make_combiner("torchjd:MGDA")


def test_torchjd_adapter():
    pytest.importorskip("torchjd")
    g = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    ours = ConFIG()(g)
    theirs = make_combiner("torchjd:ConFIG")(g)
    torch.testing.assert_close(theirs, ours)
    torch.testing.assert_close(make_combiner("torchjd", aggregator="Sum")(g), g.sum(0))
    from torchjd.aggregation import Mean

    c = make_combiner(Mean())
    assert isinstance(c, TorchJD)
    torch.testing.assert_close(c(g.float()), g.float().mean(0))
    with pytest.raises(ValueError, match="Did you mean 'MGDA'"):
        TorchJD("MGAD")
    assert TorchJD("Sum").options() == {"aggregator": "Sum"}


@SETTINGS
@given(grad_matrices())
def test_config_gram_solver_never_conflicts(g):
    """solver="gram" (momentum ConFIG's): the same guarantee on the same matrices as the QR solver."""
    out = ConFIG(solver="gram")(g)
    assert out.dtype == g.dtype and torch.isfinite(out).all()
    o = rows_f(out[None])[0]
    for row in rows_f(g):
        assert dot(o, row) >= -1e-6 * norm(o) * norm(row)


@SETTINGS
@given(st.integers(3, 8), st.integers(3, 60), st.sampled_from([torch.float32, F64]), st.integers(0, 2**31 - 1))
def test_config_gram_solver_equals_qr_solver(k, p, dtype, seed):
    """Random Gaussian rows (K <= P: full rank, well conditioned) and K > P (rank P): the Gramian
    gives the QR solver's update to float64 rounding times the squared condition number."""
    g = torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)
    g *= torch.logspace(-2, 2, k, dtype=F64).to(dtype)[:, None]  # norms over four decades
    qr, gram = ConFIG(closed_form=False)(g).to(F64), ConFIG(closed_form=False, solver="gram")(g).to(F64)
    scale = float(qr.norm()) + 1e-300
    assert float((qr - gram).norm()) <= (1e-5 if dtype == torch.float32 else 1e-8) * scale


def test_config_gram_solver_edge_cases():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    b = torch.tensor([0.3, 0.1, -1.0], dtype=F64)
    gram = ConFIG(solver="gram")
    # an opposite pair and a third term: orthogonal to the pair, positive on the third
    out = gram(torch.stack([a, -2.0 * a, b]))
    assert abs(float(out @ a)) <= 1e-7 * float(out.norm() * a.norm()) and float(out @ b) > 0
    # a zero row is ignored; three at 120 degrees in a plane (1 orthogonal to the range): zero
    torch.testing.assert_close(gram(torch.stack([a, torch.zeros(3, dtype=F64), b])), ConFIG()(torch.stack([a, b])))
    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=F64)
    star = torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([[1.0], [2.0], [5.0]], dtype=F64)
    assert gram(star).abs().max() <= 1e-7
    with pytest.raises(ValueError, match="solver"):
        ConFIG(solver="svd")
