"""Tests for lossbalance.problems (reference PINN problems)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lossbalance.problems import (
    MLP,
    AllenCahn1D,
    PROBLEMS,
    Burgers1D,
    BurgersConFIG,
    Helmholtz2D,
    KleinGordon1D,
    Kovasznay2D,
    Poisson1D,
    Problem,
    Wave1D,
    make_problem,
)

F64 = torch.float64


class ExactModel(torch.nn.Module):
    """The exact / reference solution posing as a model."""

    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.problem = problem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.problem.exact(x)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (id, factory) -- every problem, plus the split-boundary Helmholtz variant
CASES = [
    ("helmholtz", lambda **kw: Helmholtz2D(**kw)),
    ("helmholtz_split", lambda **kw: Helmholtz2D(split_boundary=True, **kw)),
    ("burgers", lambda **kw: Burgers1D(**kw)),
    ("poisson", lambda **kw: Poisson1D(**kw)),
    ("wave", lambda **kw: Wave1D(**kw)),
    ("klein_gordon", lambda **kw: KleinGordon1D(**kw)),
    ("kovasznay", lambda **kw: Kovasznay2D(**kw)),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def factory(request):
    return request.param[1]


# ----------------------------------------------------------------------------- registry
def test_registry() -> None:
    assert PROBLEMS == {"helmholtz": Helmholtz2D, "burgers": Burgers1D, "burgers_config": BurgersConFIG,
                        "poisson": Poisson1D, "wave": Wave1D, "klein_gordon": KleinGordon1D,
                        "allen_cahn": AllenCahn1D, "kovasznay": Kovasznay2D}
    for name, cls in PROBLEMS.items():
        assert cls.name == name
        assert issubclass(cls, Problem)
        assert isinstance(make_problem(name), cls)
    assert make_problem("poisson", kappa=2.0).kappa == 2.0
    with pytest.raises(ValueError):
        make_problem("nope")


def test_term_names() -> None:
    assert Helmholtz2D().term_names == ("pde", "bc")
    assert Helmholtz2D(split_boundary=True).term_names == (
        "pde",
        "bc_bottom",
        "bc_top",
        "bc_left",
        "bc_right",
    )
    assert Burgers1D().term_names == ("pde", "ic", "bc")
    assert Poisson1D().term_names == ("pde", "bc")
    assert Kovasznay2D().term_names == ("momentum_x", "momentum_y", "continuity", "bc")


# ------------------------------------------------------------------------- exact = zero
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_solution_has_zero_losses(factory, seed: int) -> None:
    problem = factory(dtype=F64)
    batch = problem.sample(64, gen(seed))
    losses = problem.losses(ExactModel(problem), batch)
    assert tuple(losses) == problem.term_names
    for name, value in losses.items():
        assert value.dtype == F64
        # residuals are O(1e-13) or below although f and the derivatives are O(1e3)
        assert value.item() < 1e-20, (name, value.item())


def test_exact_solution_zero_residual_for_other_parameters() -> None:
    cases = [
        Helmholtz2D(a1=2.0, a2=3.0, k=5.0, dtype=F64),
        Helmholtz2D(a1=1.5, a2=0.5, split_boundary=True, dtype=F64),  # non-zero boundary data
        Poisson1D(kappa=0.3, freq=1.0, freq_hi=7.5, amp_hi=0.5, dtype=F64),
        Burgers1D(nu=0.05, dtype=F64),
    ]
    for problem in cases:
        losses = problem.losses(ExactModel(problem), problem.sample(32, gen(3)))
        assert all(v.item() < 1e-20 for v in losses.values()), (problem, losses)


def test_wrong_solution_has_nonzero_losses() -> None:
    problem = Helmholtz2D(a2=3.0, split_boundary=True, dtype=F64)  # non-zero on x = +-1
    wrong = Helmholtz2D(a2=3.0, k=2.0, dtype=F64)  # same u, other PDE
    assert problem.losses(ExactModel(wrong), problem.sample(32, gen(0)))["pde"].item() < 1e-20
    shifted = Helmholtz2D(a1=1.5, a2=3.0, dtype=F64)
    losses = problem.losses(ExactModel(shifted), problem.sample(32, gen(0)))
    assert losses["pde"].item() > 1.0
    assert losses["bc_left"].item() > 1e-3 and losses["bc_right"].item() > 1e-3


# --------------------------------------------------------------------------- real model
def test_losses_are_scalars_requiring_grad(factory) -> None:
    problem = factory()  # default dtype (float32)
    model = problem.make_model((16, 16), generator=gen(0))
    losses = problem.losses(model, problem.sample(32, gen(1)))
    assert tuple(losses) == problem.term_names
    for name, value in losses.items():
        assert value.dim() == 0, name
        assert value.requires_grad, name
        assert value.dtype == torch.float32
        assert torch.isfinite(value) and value.item() >= 0
    sum(losses.values()).backward()
    for param in model.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()
    # every term depends on the parameters on its own
    model.zero_grad()
    for name in problem.term_names:
        (grad,) = torch.autograd.grad(
            problem.losses(model, problem.sample(8, gen(2)))[name], model.linears[0].weight
        )
        assert grad.abs().sum() > 0, name


def test_losses_under_no_grad_are_detached_values(factory) -> None:
    problem = factory()
    model = problem.make_model((8,), generator=gen(0))
    batch = problem.sample(16, gen(0))
    with torch.no_grad():
        monitored = problem.losses(model, batch)
    expected = problem.losses(model, batch)
    assert tuple(monitored) == problem.term_names
    for name in problem.term_names:
        assert not monitored[name].requires_grad, name
        torch.testing.assert_close(monitored[name], expected[name].detach())


class ConstantModel(torch.nn.Module):
    """Ignores its input: u = c."""

    def __init__(self, value: float, requires_grad: bool = True) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(value, dtype=F64), requires_grad=requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c.expand(x.shape[0], 1)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_model_ignoring_its_input(requires_grad: bool) -> None:
    problem = Poisson1D(kappa=2.0, dtype=F64)
    batch = problem.sample(32, gen(0))
    losses = problem.losses(ConstantModel(0.5, requires_grad), batch)
    f = problem.source(batch["pde"])
    torch.testing.assert_close(losses["pde"], f.square().mean())  # u'' = 0, residual = -f
    torch.testing.assert_close(losses["bc"], torch.tensor(0.25, dtype=F64), atol=1e-14, rtol=0)
    burgers = Burgers1D(dtype=F64)
    bl = burgers.losses(ConstantModel(0.5, requires_grad), burgers.sample(8, gen(0)))
    assert bl["pde"].item() == 0.0 and abs(bl["bc"].item() - 0.25) < 1e-14


def test_helmholtz_bc_is_sum_of_edge_losses() -> None:
    joint, split = Helmholtz2D(a2=2.5, dtype=F64), Helmholtz2D(a2=2.5, split_boundary=True, dtype=F64)
    model = joint.make_model((8, 8), generator=gen(0))
    batch = joint.sample(32, gen(5))
    lj, ls = joint.losses(model, batch), split.losses(model, batch)
    torch.testing.assert_close(lj["pde"], ls["pde"])
    torch.testing.assert_close(lj["bc"], sum(ls[k] for k in ("bc_bottom", "bc_top", "bc_left", "bc_right")))


# ------------------------------------------------------------------------------ sampling
def test_sampling_reproducible(factory) -> None:
    problem = factory()
    a, b, c = problem.sample(64, gen(7)), problem.sample(64, gen(7)), problem.sample(64, gen(8))
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert any(not torch.equal(a[key], c[key]) for key in a)
    assert not torch.equal(a["pde"], c["pde"])
    # consecutive draws from one generator are fresh points
    g = gen(7)
    first, second = problem.sample(64, g), problem.sample(64, g)
    assert not torch.equal(first["pde"], second["pde"])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 200), case=st.sampled_from([c[1] for c in CASES]))
def test_sample_points_lie_where_they_should(seed: int, n: int, case) -> None:
    problem = case()
    batch = problem.sample(n, gen(seed))
    lo, hi = problem.lower, problem.upper
    for key, pts in batch.items():
        assert pts.dtype == problem.dtype and pts.device == problem.device
        assert pts.shape[1] == problem.input_dim
        assert ((pts >= lo) & (pts <= hi)).all(), key
    assert batch["pde"].shape == (n, problem.input_dim)
    if isinstance(problem, Helmholtz2D):
        assert (batch["bc_bottom"][:, 1] == -1).all() and (batch["bc_top"][:, 1] == 1).all()
        assert (batch["bc_left"][:, 0] == -1).all() and (batch["bc_right"][:, 0] == 1).all()
        assert all(batch[k].shape == (n, 2) for k in ("bc_bottom", "bc_top", "bc_left", "bc_right"))
    elif isinstance(problem, Burgers1D):
        assert batch["ic"].shape == batch["bc"].shape == (n, 2)
        assert (batch["ic"][:, 0] == 0).all()
        assert (batch["bc"][:, 1].abs() == 1).all()
        assert (batch["bc"][0::2, 1] == -1).all() and (batch["bc"][1::2, 1] == 1).all()
    elif isinstance(problem, (Wave1D, KleinGordon1D)):
        assert batch["ic"].shape == batch["bc"].shape == (n, 2)
        assert (batch["ic"][:, 0] == 0).all()
        assert (batch["bc"][0::2, 1] == 0).all() and (batch["bc"][1::2, 1] == 1).all()
    elif isinstance(problem, Kovasznay2D):
        bc = batch["bc"]
        assert bc.shape == batch["outlet"].shape == (n, 2) and (batch["outlet"][:, 0] == 1).all()
        on_edge = (bc[:, 0] == lo[0]) | (bc[:, 0] == hi[0]) | (bc[:, 1] == lo[1]) | (bc[:, 1] == hi[1])
        assert on_edge.all()
        assert (bc[0::4, 0] == lo[0]).all() and (bc[1::4, 0] == hi[0]).all()      # left, right,
        assert (bc[2::4, 1] == lo[1]).all() and (bc[3::4, 1] == hi[1]).all()      # bottom, top
    else:
        torch.testing.assert_close(batch["bc"], torch.tensor([[0.0], [1.0]]))


def test_sampling_is_uniform_over_the_domain() -> None:
    problem = Helmholtz2D(dtype=F64)
    pts = problem.sample(20000, gen(0))["pde"]
    torch.testing.assert_close(pts.mean(0), torch.zeros(2, dtype=F64), atol=0.03, rtol=0)
    torch.testing.assert_close(pts.var(0), torch.full((2,), 1 / 3, dtype=F64), atol=0.02, rtol=0)


def test_sampling_without_generator() -> None:
    batch = Burgers1D().sample(5)
    assert batch["pde"].shape == (5, 2)
    with pytest.raises(ValueError):
        Poisson1D().sample(0)


# --------------------------------------------------------------------------- relative l2
def test_relative_l2(factory) -> None:
    problem = factory(dtype=F64)
    exact_err = problem.relative_l2(ExactModel(problem))
    assert exact_err.dim() == 0 and not exact_err.requires_grad
    assert exact_err.item() < 1e-12
    model = problem.make_model((20, 20), generator=gen(0))
    err = problem.relative_l2(model)
    assert not err.requires_grad
    assert 0.3 < err.item() < 10.0
    # fixed grid: same value again; a coarser grid gives a similar value
    assert problem.relative_l2(model).item() == err.item()
    assert abs(problem.relative_l2(model, n=41).item() - err.item()) < 0.3 * err.item()


def test_relative_l2_of_scaled_solution() -> None:
    problem = Helmholtz2D(dtype=F64)

    def half(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * problem.exact(x)

    torch.testing.assert_close(problem.relative_l2(half), torch.tensor(0.5, dtype=F64))


def test_evaluation_grids() -> None:
    pts, u = Helmholtz2D().evaluation_data()
    assert pts.shape == (100 * 100, 2) and u.shape == (100 * 100,)
    assert Poisson1D().evaluation_points().shape == (1001, 1)
    burgers = Burgers1D()
    assert burgers.evaluation_points().shape == (100 * 256, 2)
    assert burgers.evaluation_points(11).shape == (121, 2)


# -------------------------------------------------------------------------------- models
def test_model_init_reproducible(factory) -> None:
    problem = factory()
    m1 = problem.make_model(generator=gen(3))
    m2 = problem.make_model(generator=gen(3))
    m3 = problem.make_model(generator=gen(4))
    assert m1.layers == (problem.input_dim, 50, 50, 50, problem.output_dim)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["linears.0.weight"], s3["linears.0.weight"])
    x = problem.sample(10, gen(0))["pde"]
    assert m1(x).shape == (10, problem.output_dim) == problem.exact(x).shape
    torch.testing.assert_close(m1(x), m2(x))


def test_mlp_init_statistics_and_normalisation() -> None:
    model = MLP((2, 400, 300, 1), lower=(0.0, -1.0), upper=(2.0, 1.0), generator=gen(0), dtype=F64)
    w = model.linears[1].weight
    assert abs(w.std().item() - math.sqrt(2 / 700)) < 0.02 * math.sqrt(2 / 700)
    assert abs(w.mean().item()) < 1e-3
    assert all((lin.bias == 0).all() for lin in model.linears)
    assert all(not b.requires_grad for b in model.buffers())
    # the built-in affine map sends uniform domain samples to mean 0 / std 1
    x = torch.rand(50000, 2, generator=gen(1), dtype=F64) * torch.tensor([2.0, 2.0], dtype=F64)
    x = x + torch.tensor([0.0, -1.0], dtype=F64)
    z = (x - model.input_mean) / model.input_std
    torch.testing.assert_close(z.mean(0), torch.zeros(2, dtype=F64), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(2, dtype=F64), atol=0.02, rtol=0)
    assert len(list(model.parameters())) == 6
    identity = MLP((3, 4, 1))
    torch.testing.assert_close(identity.input_mean, torch.zeros(3))
    torch.testing.assert_close(identity.input_std, torch.ones(3))
    with pytest.raises(ValueError):
        MLP((2, 4, 1), lower=(0.0, 0.0))
    with pytest.raises(ValueError):
        MLP((1,))


def test_make_model_dtype_and_hidden() -> None:
    problem = Burgers1D(dtype=F64)
    model = problem.make_model((7, 5), generator=gen(0))
    assert model.layers == (2, 7, 5, 1)
    assert all(p.dtype == F64 for p in model.parameters())
    torch.testing.assert_close(model.input_mean, torch.tensor([0.5, 0.0], dtype=F64))
    torch.testing.assert_close(model.input_std, torch.tensor([1.0, 2.0], dtype=F64) / math.sqrt(12))


# ------------------------------------------------------------------- Burgers reference
def _slow_cole_hopf(t: float, x: float, nu: float = 0.01 / math.pi) -> float:
    """Plain trapezoid rule in the original variable eta, float64, shifted exponent."""
    eta = torch.linspace(-2.0, 2.0, 40001, dtype=F64)  # step 1e-4 << sqrt(2 nu t)
    expo = -eta**2 / (4 * nu * t) - torch.cos(math.pi * (x - eta)) / (2 * math.pi * nu)
    weight = torch.exp(expo - expo.max())
    num = torch.trapezoid(torch.sin(math.pi * (x - eta)) * weight, eta)
    den = torch.trapezoid(weight, eta)
    return -(num / den).item()


def test_burgers_reference_matches_slow_quadrature() -> None:
    problem = Burgers1D(dtype=F64)
    ts = [0.05, 0.3, 0.6, 0.95]
    xs = [-0.8, -0.3, -0.02, 0.005, 0.4, 0.9]
    pts = torch.tensor([[t, x] for t in ts for x in xs], dtype=F64)
    got = problem.exact(pts).reshape(-1)
    want = torch.tensor([_slow_cole_hopf(t, x) for t in ts for x in xs], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_burgers_reference_basic_properties() -> None:
    problem = Burgers1D(dtype=F64)
    x = torch.linspace(-1, 1, 101, dtype=F64)
    # initial condition
    u0 = problem.exact(torch.stack((torch.zeros_like(x), x), -1)).reshape(-1)
    torch.testing.assert_close(u0, -torch.sin(math.pi * x), rtol=0, atol=1e-14)
    t, xg, U = problem.reference_solution()
    assert U.shape == (100, 256) and t.shape == (100,) and xg.shape == (256,)
    assert problem.reference_solution() is problem.reference_solution()  # cached
    torch.testing.assert_close(U, -U.flip(1), rtol=0, atol=1e-12)  # odd in x
    assert U[:, [0, -1]].abs().max() < 1e-12  # u(t, +-1) = 0
    peak = U.abs().amax(1)
    assert peak.max() <= 1.0 + 1e-12
    assert (peak[1:] <= peak[:-1] + 1e-12).all()  # max |u| does not grow
    assert peak[-1] > 0.5  # ... and decays slowly (shock, small viscosity)
    torch.testing.assert_close(U, problem.exact(problem.evaluation_points()).reshape(100, 256))


def test_burgers_reference_matches_basdevant_benchmark() -> None:
    # Basdevant et al. (1986): max_t |u_x(t, 0)| = 152.00516, reached at t = 1.6037 / pi
    problem = Burgers1D(dtype=F64)
    pt = torch.tensor([[1.6037 / math.pi, 0.0]], dtype=F64, requires_grad=True)
    (du,) = torch.autograd.grad(problem.exact(pt).sum(), pt)
    assert abs(du[0, 1].item() + 152.00516) < 1e-3
    # u_t = 0 at x = 0 (u(t, 0) = 0 for all t)
    assert abs(du[0, 0].item()) < 1e-9


def test_burgers_reference_float32_and_empty() -> None:
    problem = Burgers1D()
    pts = problem.sample(16, gen(0))["pde"]
    u = problem.exact(pts)
    assert u.dtype == torch.float32 and u.shape == (16, 1)
    torch.testing.assert_close(u.double(), Burgers1D(dtype=F64).exact(pts.double()), atol=1e-6, rtol=1e-6)
    assert problem.exact(pts[:0]).shape == (0, 1)


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("amp_hi", [0.1, 0.0])
def test_short_training_lowers_poisson_loss(amp_hi: float) -> None:
    problem = Poisson1D(amp_hi=amp_hi)  # default two-scale solution, and plain sin(2 pi x)
    model = problem.make_model((32, 32), generator=gen(0))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = gen(1)
    fixed = problem.sample(256, gen(123))

    def total() -> float:
        return sum(problem.losses(model, fixed).values()).item()

    before = total()
    for _ in range(200):
        optimiser.zero_grad()
        loss = sum(problem.losses(model, problem.sample(64, g)).values())
        loss.backward()
        optimiser.step()
    after = total()
    assert math.isfinite(after) and after < before, (before, after)
    if amp_hi == 0.0:  # the single smooth mode is learnt quickly
        assert after < 0.5 * before, (before, after)


def test_wave_and_klein_gordon_exact_data() -> None:
    wave = Wave1D(dtype=F64)
    x = torch.linspace(0, 1, 7, dtype=F64)
    at0 = torch.stack((torch.zeros_like(x), x), -1)
    torch.testing.assert_close(wave.exact(at0).reshape(-1),
                               torch.sin(math.pi * x) + 0.5 * torch.sin(4 * math.pi * x))
    kg = KleinGordon1D(dtype=F64)
    torch.testing.assert_close(kg.exact(at0).reshape(-1), x)
    # a wrong solution (the initial profile frozen in time) leaves a clear residual
    frozen = lambda pts: kg.exact(torch.stack((torch.zeros_like(pts[:, 0]), pts[:, 1]), -1))  # noqa: E731
    assert float(kg.losses(frozen, kg.sample(64, gen(0)))["pde"].detach()) > 1.0


def test_problems_from_module_paths(tmp_path) -> None:
    from lossbalance.problems import ProblemError

    assert isinstance(make_problem("lossbalance.problems.wave:Wave1D", c=1.0), Wave1D)
    path = tmp_path / "mine.py"
    path.write_text("from lossbalance.problems import Poisson1D\n"
                    "def make(kappa=1.0):\n    return Poisson1D(kappa=kappa)\n")
    assert make_problem(f"{path}:make", kappa=3.0, device=None).kappa == 3.0
    with pytest.raises(ProblemError, match="Did you mean 'burgers'"):
        make_problem("burger")
    with pytest.raises(ProblemError, match="importing 'no_such_module_xyz' failed"):
        make_problem("no_such_module_xyz:P")
    with pytest.raises(ProblemError, match="has no attribute 'mak'.*Did you mean 'make'"):
        make_problem(f"{path}:mak")


# ------------------------------------------------------------------------------ Kovasznay
@settings(max_examples=10, deadline=None)
@given(re=st.floats(1.0, 200.0), seed=st.integers(0, 2**31 - 1))
def test_kovasznay_exact_solution_satisfies_navier_stokes_to_round_off(re: float, seed: int) -> None:
    problem = Kovasznay2D(re=re, dtype=F64)
    x = problem.sample(64, gen(seed))["pde"]
    residual = problem.residual(problem.exact, x)        # the problem's own autograd residual
    assert residual.shape == (64, 3)
    assert residual.abs().max().item() < 1e-11
    # the terms the residual balances are O(1): this is a cancellation, not small terms
    assert problem.exact(x).abs().max().item() > 0.5


def test_kovasznay_solution_and_residual_components() -> None:
    problem = Kovasznay2D(dtype=F64)
    assert problem.lam == pytest.approx(-0.9637405, abs=1e-7) and problem.output_dim == 3
    pts = torch.tensor([[0.0, 0.0], [0.5, 0.25], [1.0, 1.5]], dtype=F64)
    lam = problem.lam
    expected = [[0.0, 0.0, 0.0],
                [1 - math.exp(lam / 2) * math.cos(math.pi / 2), lam / (2 * math.pi) * math.exp(lam / 2),
                 (1 - math.exp(lam)) / 2],
                [1 - math.exp(lam) * math.cos(3 * math.pi), 0.0, (1 - math.exp(2 * lam)) / 2]]
    torch.testing.assert_close(problem.exact(pts), torch.tensor(expected, dtype=F64), atol=1e-14, rtol=0)
    # Re = 20's flow under Re = 40: still divergence-free, but not a solution of the momentum equations
    other = Kovasznay2D(re=20.0, dtype=F64)
    residual = problem.residual(other.exact, problem.sample(64, gen(0))["pde"])
    assert residual[:, 2].abs().max().item() < 1e-12
    assert residual[:, 0].square().mean().item() > 1e-3 and residual[:, 1].square().mean().item() > 1e-4


@settings(max_examples=10, deadline=None)
@given(shift=st.floats(-2.0, 2.0), seed=st.integers(0, 1000))
def test_kovasznay_outlet_pins_the_pressure(shift: float, seed: int) -> None:
    """p + c solves the equations as well: only the outlet's pressure term sees the constant."""
    problem = Kovasznay2D(dtype=F64)

    def shifted(x: torch.Tensor) -> torch.Tensor:
        return problem.exact(x) + torch.tensor([0.0, 0.0, shift], dtype=F64)

    losses = problem.losses(shifted, problem.sample(32, gen(seed)))
    assert max(losses[k].item() for k in ("momentum_x", "momentum_y", "continuity")) < 1e-20
    # (p + c) - p rounds at about 2e-16 |p| (|p| <= 1 on the outlet): the error of bc = c^2 is 2 |c| times that
    assert losses["bc"].item() == pytest.approx(shift**2, rel=1e-12, abs=1e-15 * abs(shift) + 1e-30)


def test_kovasznay_rejects_a_bad_reynolds_number() -> None:
    for re in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="re must be positive"):
            Kovasznay2D(re=re)
