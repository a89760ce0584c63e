"""Allen-Cahn: the ETDRK4 reference solver (convergence, shape) and the PINN problem's pieces."""

from __future__ import annotations

import math

import pytest
import torch

from lossbalance import Causal, LossBalancer, Residual
from lossbalance.problems import AllenCahn1D, make_problem
from lossbalance.problems.allen_cahn import (
    PeriodicMLP,
    _solve,
    allen_cahn_reference,
    etdrk4_coefficients,
)

F64 = torch.float64


def solve(modes: int, dt: float, snapshots: int = 11):
    return _solve(modes, dt, snapshots, 1.0)


def test_time_error_is_fourth_order() -> None:
    """Halving dt divides the change of the solution by about 2^4 = 16."""
    runs = [solve(128, dt).u for dt in (4e-3, 2e-3, 1e-3)]
    big, small = (runs[0] - runs[1]).abs().max(), (runs[1] - runs[2]).abs().max()
    assert small < 1e-8
    assert 12 < float(big / small) < 20


def test_modes_converge() -> None:
    """256 vs 512 modes agree (relative L2 over the whole grid, max at t = 1), and better with 1024."""
    u256, u512, u1024 = (solve(m, 1e-3).u for m in (256, 512, 1024))
    d1, d2 = u256 - u512[:, ::2], u512 - u1024[:, ::2]
    assert torch.linalg.norm(d1) / torch.linalg.norm(u512) < 1e-4
    assert d1[-1].abs().max() < 1e-3 and d2[-1].abs().max() < 1e-5
    assert torch.linalg.norm(d2) < torch.linalg.norm(d1) / 3


def test_shape_at_t1() -> None:
    """-1 near x = +-1, +1 plateaus around x = +-1/4, a dip near 0 at x = 0, interfaces at +-1/2; even in x."""
    ref = solve(256, 1e-3)
    u, x = ref.u[-1], ref.x
    assert ref.u.abs().max() <= 1.0
    mirror = (-torch.arange(x.numel())) % x.numel()  # x_j -> -x_j on the periodic grid
    assert torch.allclose(ref.u, ref.u[:, mirror], atol=1e-13, rtol=0)
    at = {float(v): float(u[(x - v).abs().argmin()]) for v in (-1.0, -0.25, 0.0, 0.25, 0.75)}
    assert at[-1.0] < -0.999 and at[0.75] < -0.999
    assert at[-0.25] > 0.98 and at[0.25] > 0.98
    assert abs(at[0.0]) < 0.1
    crossing = x[(x > 0) & (u.sign() != u.roll(-1).sign())]
    assert crossing.numel() == 1 and abs(float(crossing[0]) - 0.5) < 0.02  # one interface on x > 0 (not x = 0)


def test_initial_snapshot_and_grid() -> None:
    ref = solve(64, 1e-2)
    assert ref.u.shape == (11, 64) and ref.t[-1] == 1.0
    assert torch.allclose(ref.u[0], ref.x**2 * torch.cos(math.pi * ref.x), atol=1e-14, rtol=0)
    assert torch.allclose(ref.x, torch.linspace(-1, 1, 65, dtype=F64)[:-1])


def test_phi_functions_against_their_formulas() -> None:
    """The contour means equal the closed forms where those do not cancel (|z| ~ 1), and the
    Taylor limits at z -> 0 (f1 = f2*4 = f3 = h/6 ... : h/6, h/6, h/6 and Q = h/2)."""
    h = 0.5
    z = torch.tensor([-2.0, -0.7, 0.9], dtype=F64)
    c = etdrk4_coefficients(z, h)
    ez = torch.exp(z)
    assert torch.allclose(c.q, h * (torch.exp(z / 2) - 1) / z, rtol=1e-12)
    assert torch.allclose(c.f1, h * (-4 - z + ez * (4 - 3 * z + z**2)) / z**3, rtol=1e-10)
    assert torch.allclose(c.f2, h * (2 + z + ez * (z - 2)) / z**3, rtol=1e-10)
    assert torch.allclose(c.f3, h * (-4 - 3 * z - z**2 + ez * (4 - z)) / z**3, rtol=1e-10)
    tiny = etdrk4_coefficients(torch.tensor([1e-9], dtype=F64), h)
    assert torch.allclose(torch.cat([tiny.q, tiny.f1, tiny.f2, tiny.f3]),
                          torch.tensor([h / 2, h / 6, h / 6, h / 6], dtype=F64), rtol=1e-8)


def test_bad_grid_refused() -> None:
    with pytest.raises(ValueError, match="divide"):
        _solve(64, 3e-3, 11, 1.0)
    with pytest.raises(ValueError, match="even"):
        allen_cahn_reference(modes=63)


def test_cache_in_memory_and_on_disk(tmp_path) -> None:
    options = {"modes": 32, "dt": 1e-2, "snapshots": 11}
    first = allen_cahn_reference(**options, cache_dir=str(tmp_path))
    assert allen_cahn_reference(**options) is first
    assert len(list(tmp_path.iterdir())) == 1
    from lossbalance.problems import allen_cahn as module
    module._CACHE.clear()
    again = allen_cahn_reference(**options, cache_dir=str(tmp_path))
    assert again is not first and torch.equal(again.u, first.u)


# ------------------------------------------------------------------------------ the PINN problem
SMALL = {"modes": 64, "dt": 1e-2, "snapshots": 11}


def test_registered_with_its_terms() -> None:
    problem = make_problem("allen_cahn")
    assert isinstance(problem, AllenCahn1D) and problem.term_names == ("pde", "ic")
    assert AllenCahn1D(periodic="bc").term_names == ("pde", "ic", "bc")
    with pytest.raises(ValueError, match="periodic"):
        AllenCahn1D(periodic="wrap")


def test_embedding_model_is_periodic() -> None:
    problem = AllenCahn1D()
    model = problem.make_model((8,), generator=torch.Generator().manual_seed(0))
    assert isinstance(model, PeriodicMLP)
    t = torch.rand(16, 1, generator=torch.Generator().manual_seed(1))
    x = torch.rand(16, 1, generator=torch.Generator().manual_seed(2)) * 2 - 1
    shifted = torch.where(x > 0, x - 2, x + 2)
    assert torch.allclose(model(torch.cat((t, x), 1)), model(torch.cat((t, shifted), 1)), atol=1e-5)


def test_residual_terms_and_their_values() -> None:
    """pde: Residual(r, t) of kind "residual" (r by hand for a known u), ic: u(0, x) - u0(x)."""
    problem = AllenCahn1D(dtype=F64)
    batch = problem.sample(32, torch.Generator().manual_seed(0))

    def model(tx):  # u = t + x^2: u_t = 1, u_xx = 2
        return (tx[:, :1] + tx[:, 1:] ** 2)

    terms = problem.losses(model, batch)
    assert set(terms) == {"pde", "ic"} and all(isinstance(v, Residual) and v.kind == "residual" for v in terms.values())
    t, x = batch["pde"][:, 0], batch["pde"][:, 1]
    u = t + x**2
    assert torch.allclose(terms["pde"].values, 1 - 2e-4 + 5 * u**3 - 5 * u, atol=1e-12)
    assert torch.equal(terms["pde"].t, t) and terms["ic"].t is None
    s = batch["ic"][:, 1]
    assert torch.equal(batch["ic"][:, 0], torch.zeros_like(s))
    assert torch.allclose(terms["ic"].values, s**2 - s**2 * torch.cos(math.pi * s), atol=1e-14)
    scalars = AllenCahn1D(residuals=False, dtype=F64).losses(model, batch)
    assert torch.allclose(scalars["pde"], terms["pde"].values.square().mean())


def test_bc_term_measures_periodicity() -> None:
    problem = AllenCahn1D(periodic="bc", dtype=F64)
    batch = problem.sample(8, torch.Generator().manual_seed(0))
    periodic = problem.losses(lambda tx: torch.cos(math.pi * tx[:, 1:]) * tx[:, :1], batch)["bc"]
    assert periodic.values.shape == (16,) and periodic.values.abs().max() < 1e-12
    odd = problem.losses(lambda tx: tx[:, 1:] + 0 * tx[:, :1], batch)["bc"].values
    assert torch.allclose(odd, torch.cat((torch.full((8,), -2.0, dtype=F64), torch.zeros(8, dtype=F64))))


def test_exact_and_error_on_the_reference_grid() -> None:
    problem = AllenCahn1D(reference=SMALL, dtype=F64)
    points, values = problem.evaluation_data()
    ref = problem.reference()
    assert points.shape == (11 * 64, 2) and torch.equal(values, ref.u.reshape(-1))
    assert torch.allclose(problem.exact(points).reshape(-1), values, atol=1e-12)  # the interpolation is exact on the grid
    mid = torch.tensor([[0.05, 0.3]], dtype=F64)  # halfway between two snapshots: the mean of the two
    grid_x = (ref.x - 0.3).abs().argmin()
    shifted = torch.tensor([[0.05, float(ref.x[grid_x])]], dtype=F64)
    assert torch.allclose(problem.exact(shifted).reshape(()), ref.u[:2, grid_x].mean(), atol=1e-12)
    assert problem.exact(mid).shape == (1, 1)
    assert float(problem.relative_l2(problem.exact)) < 1e-12
    assert float(problem.relative_l2(lambda p: torch.zeros(p.shape[0], 1, dtype=F64))) == pytest.approx(1.0)


def test_trains_with_causal_weights() -> None:
    """The problem's Residual terms go straight into a balancer with Causal weights on "pde"."""
    problem = AllenCahn1D()
    model = problem.make_model((8,), generator=torch.Generator().manual_seed(0))
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), 1e-3), "static",
                            pointwise={"pde": Causal(chunks=4, eps=1e-3)})
    for step in range(2):
        balancer.step(problem.losses(model, problem.sample(32, torch.Generator().manual_seed(step))))
    assert 0 < balancer.stats["pde"]["causal_min"] <= 1


@pytest.mark.parametrize("name", ["wave", "klein_gordon"])
def test_second_order_problems_offer_residual_terms(name) -> None:
    """residuals=True: the same terms as Residual(r, kind="residual"), whose mean square is the scalar term."""
    problem, plain = make_problem(name, residuals=True, dtype=F64), make_problem(name, dtype=F64)
    model = problem.make_model((8,), generator=torch.Generator().manual_seed(0))
    batch = problem.sample(16, torch.Generator().manual_seed(1))
    terms, scalars = problem.losses(model, batch), plain.losses(model, batch)
    assert tuple(terms) == tuple(scalars) == problem.term_names
    for key, term in terms.items():
        assert isinstance(term, Residual) and term.kind == "residual" and term.values.shape == (16,)
        assert torch.allclose(term.values.square().mean(), scalars[key], rtol=1e-12)
    assert torch.equal(terms["pde"].t, batch["pde"][:, 0]) and terms["ic"].t is None


def test_jaxpi_mlp_is_periodic_seeded_and_factorised() -> None:
    """JaxpiMLP: u(t, x) = u(t, x + 2) exactly, one output per point, the same network from the same
    seed, and with RWF the kernels exp(s) * v start equal to the Xavier draw of the plain network."""
    from lossbalance.problems.allen_cahn import JaxpiMLP

    def make(**options):
        return JaxpiMLP(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64, **{"fourier_dim": 8, **options})

    tx = torch.rand(10, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shifted = tx + torch.tensor([0.0, 2.0], dtype=F64)
    for options in ({}, {"modified": False}, {"fourier_dim": 0}, {"rwf": (1.0, 0.1)}):
        model = make(**options)
        u = model(tx)
        assert u.shape == (10, 1) and torch.allclose(u, model(shifted), atol=1e-12)
        assert torch.equal(u, make(**options)(tx))
    plain, factorised = make(), make(rwf=(1.0, 0.1))
    assert {n for n, _ in factorised.named_parameters()} >= {"hidden.0.s", "hidden.0.v", "encode_u.s"}
    assert not torch.equal(plain(tx), factorised(tx))  # the RWF draws shift the generator's stream
    from lossbalance.problems.allen_cahn import _Dense

    plain_layer, layer = (_Dense(8, 5, rwf, torch.Generator().manual_seed(1), None, F64) for rwf in (None, (1.0, 0.1)))
    assert torch.allclose(torch.exp(layer.s) * layer.v, plain_layer.weight, atol=1e-14)
    assert layer.s.shape == (5, 1) and 0.5 < float(layer.s.detach().mean()) < 1.5
    assert make().hidden[0].weight.shape == (16, 8) and make(modified=False).hidden[1].weight.shape == (16, 16)
    assert not hasattr(make(modified=False), "encode_u")
    with pytest.raises(ValueError, match="fourier_dim"):
        JaxpiMLP(16, 2, fourier_dim=7)
