"""Viscous Burgers' equation, the shock benchmark of Raissi, Perdikaris & Karniadakis (2019).

M. Raissi, P. Perdikaris, G. E. Karniadakis, "Physics-informed neural networks: A deep
learning framework for solving forward and inverse problems involving nonlinear partial
differential equations", J. Comput. Phys. 378, 686-707 (2019), Section 3.1.

The reference solution is computed here (nothing is downloaded) from the Cole-Hopf
transform; it reproduces the classic benchmark value
``max_t |u_x(t, 0)| = 152.00516`` at ``t = 1.6037 / pi`` (Basdevant et al.,
Computers & Fluids 14, 1986).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import MLP, Problem, gradient

__all__ = ["Burgers1D", "BurgersConFIG", "latin_hypercube"]

_CHUNK = 2048  # points per block in the Cole-Hopf quadrature (block x nodes matrices)


class Burgers1D(Problem):
    r"""``u_t + u u_x - nu u_xx = 0`` for ``t in [0, t_final]``, ``x in [-1, 1]``.

    ``nu = 0.01 / pi``, ``u(0, x) = -sin(pi x)``, ``u(t, -1) = u(t, 1) = 0``, ``t_final = 1``.

    Inputs are ``(t, x)`` columns (time first).  Loss terms: ``"pde"`` (MSE of the
    residual ``u_t + u u_x - nu u_xx``), ``"ic"`` (MSE of ``u(0, x) + sin(pi x)``) and
    ``"bc"`` (MSE of ``u(t, +-1)``).  ``sample(batch_size)`` draws ``batch_size`` points
    for each: uniform interior points (key ``"pde"``), ``(0, x)`` with uniform ``x``
    (``"ic"``) and ``(t, +-1)`` with uniform ``t``, alternating ``x = -1, +1`` (``"bc"``).

    Reference solution (``exact``): the Cole-Hopf formula

    .. math::
        u(t, x) = -\frac{\int \sin(\pi(x-\eta)) f(x-\eta) e^{-\eta^2/(4\nu t)} d\eta}
                        {\int f(x-\eta) e^{-\eta^2/(4\nu t)} d\eta},
        \qquad f(y) = \exp\!\big(-\cos(\pi y) / (2\pi\nu)\big),

    evaluated, after substituting ``eta = sqrt(4 nu t) z``, with a trapezoid rule on
    ``z in [-L, L]`` in float64 and a log-sum-exp (softmax) normalisation of the
    exponent ``-z^2 - cos(pi (x - sqrt(4 nu t) z)) / (2 pi nu)``.  ``L`` is chosen so
    the neglected tails are below ``e^-50`` relative and the step resolves the
    integrand's narrowest peak (its width does not depend on ``nu``), so the result is
    accurate to round-off and differentiable in ``(t, x)`` with autograd -- the exact
    "model" has residual ~1e-12.  It equals ``-sin(pi x)`` at ``t = 0``, is odd in
    ``x`` and vanishes at ``x = +-1``.  ``relative_l2`` uses the grid of Raissi's
    ``burgers_shock.mat`` by default (256 ``x`` in ``[-1, 1]`` times 100 ``t`` in
    ``[0, 0.99]``), computed lazily and cached on the instance.
    """

    name = "burgers"
    input_dim = 2
    default_eval_n = 256

    def __init__(
        self,
        nu: float = 0.01 / math.pi,
        *,
        t_final: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if nu <= 0 or t_final <= 0:
            raise ValueError("need nu > 0 and t_final > 0")
        super().__init__((0.0, -1.0), (float(t_final), 1.0), device=device, dtype=dtype)
        self.nu = float(nu)
        self.t_final = float(t_final)
        # Quadrature in z = eta / sqrt(4 nu t).  Exponent h(z) = -z^2 - c cos(pi(x - s z)),
        # c = 1/(2 pi nu): the tails |z| > L are below exp(-L^2 + 2c) <= e^-50 relative to
        # max h >= -c, and |h''| <= 2 + 2 pi t, so the step below gives >= 20 nodes per peak
        # width (the trapezoid rule then converges geometrically for this entire integrand).
        c = 1.0 / (2.0 * math.pi * self.nu)
        half_width = math.sqrt(2.0 * c + 50.0)
        step = 0.1 / math.sqrt(1.0 + math.pi * self.t_final)
        m = math.ceil(half_width / step)
        self._c = c
        self._nodes = torch.linspace(
            -half_width, half_width, 2 * m + 1, dtype=torch.float64, device=self.device
        )
        self._reference: dict[int | None, tuple[Tensor, Tensor, Tensor]] = {}

    @property
    def term_names(self) -> tuple[str, ...]:
        return ("pde", "ic", "bc")

    # ------------------------------------------------------------ reference solution
    def _cole_hopf(self, t: Tensor, x: Tensor) -> Tensor:
        """Cole-Hopf solution for 1-D float64 ``t``, ``x`` of equal length."""
        z = self._nodes.to(t.device)
        s = torch.sqrt(4.0 * self.nu * t.clamp_min(0.0))
        y = x.unsqueeze(-1) - s.unsqueeze(-1) * z  # (N, M)
        weights = torch.softmax(-z.square() - self._c * torch.cos(math.pi * y), dim=-1)
        return -(weights * torch.sin(math.pi * y)).sum(-1)

    def exact(self, x: Tensor) -> Tensor:
        """Cole-Hopf reference at ``(t, x)`` points (computed in float64, differentiable)."""
        tx = x.to(torch.float64)
        parts = [
            self._cole_hopf(block[:, 0], block[:, 1]) for block in torch.split(tx, _CHUNK, dim=0)
        ]
        u = torch.cat(parts) if parts else tx.new_zeros(0)
        return u.to(x.dtype).unsqueeze(-1)

    def _grid_axes(self, n: int | None) -> tuple[Tensor, Tensor]:
        kw = {"dtype": self.dtype, "device": self.device}
        if n is None:  # Raissi et al.'s burgers_shock.mat grid
            return torch.linspace(0.0, 0.99, 100, **kw), torch.linspace(-1.0, 1.0, 256, **kw)
        n = int(n)
        return torch.linspace(0.0, self.t_final, n, **kw), torch.linspace(-1.0, 1.0, n, **kw)

    def evaluation_points(self, n: int | None = None) -> Tensor:
        """``(t, x)`` grid, ``t``-major: Raissi's 100 x 256 grid if ``n is None``, else ``n x n``."""
        t, x = self._grid_axes(n)
        gt, gx = torch.meshgrid(t, x, indexing="ij")
        return torch.stack((gt.reshape(-1), gx.reshape(-1)), dim=-1)

    def reference_solution(self, n: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, x, U)`` with ``U[i, j] = u(t[i], x[j])`` on the evaluation grid (cached)."""
        if n not in self._reference:
            t, x = self._grid_axes(n)
            _, values = self.evaluation_data(n)
            self._reference[n] = (t, x, values.reshape(t.numel(), x.numel()))
        return self._reference[n]

    # ------------------------------------------------------------------ PINN terms
    def _residual(self, u: Tensor, x: Tensor) -> Tensor:
        """``u_t + u u_x - nu u_xx`` at ``(t, x)`` points."""
        du = gradient(u, x)
        u_t, u_x = du[:, 0], du[:, 1]
        u_xx = gradient(u_x, x)[:, 1]
        return u_t + u * u_x - self.nu * u_xx

    def sample(
        self, batch_size: int = 128, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        n = self._check_batch_size(batch_size)
        interior = self._uniform(n, self.lower, self.upper, generator, dim=2)
        x0 = self._uniform(n, -1.0, 1.0, generator)
        ic = torch.cat((torch.zeros_like(x0), x0), dim=-1)
        tb = self._uniform(n, 0.0, self.t_final, generator)
        odd = (torch.arange(n, device=self.device) % 2).to(self.dtype)
        xb = (2.0 * odd - 1.0).unsqueeze(-1)  # -1, +1, -1, ...
        bc = torch.cat((tb, xb), dim=-1)
        return {"pde": interior, "ic": ic, "bc": bc}

    def losses(
        self, model: Callable[[Tensor], Tensor], batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        x_ic = batch["ic"]
        ic_target = -torch.sin(math.pi * x_ic[:, 1])
        return {
            "pde": self.residual(model, batch["pde"]).square().mean(),
            "ic": (self._outputs(model, x_ic) - ic_target).square().mean(),
            "bc": self._outputs(model, batch["bc"]).square().mean(),
        }


def latin_hypercube(n: int, lower: Tensor, upper: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``n`` Latin-hypercube points in the box ``[lower, upper]`` (McKay, Beckman & Conover 1979):
    every coordinate has exactly one point in each of its ``n`` equal strata, at a uniform
    position inside the stratum, the strata of the coordinates paired by independent random
    permutations. Shape ``(n, d)``, in the dtype and on the device of ``lower``."""
    d = lower.numel()
    draw = {"generator": generator, "device": generator.device if generator is not None else lower.device}
    strata = torch.stack([torch.randperm(n, **draw) for _ in range(d)], dim=1).to(lower.device, lower.dtype)
    jitter = torch.rand(n, d, dtype=lower.dtype, **draw).to(lower.device)
    return lower + (upper - lower) * (strata + jitter) / n


class BurgersConFIG(Burgers1D):
    r"""Burgers' equation as set up in ConFIG's published Burgers notebook (fresh Latin-hypercube
    points every step, MSE on the notebook's grid).

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025 (arXiv 2408.11104), ``docs/examples/pinn_burgers.ipynb`` of
    tum-pbs/ConFIG (read): the PDE of :class:`Burgers1D` (``u_t + u u_x = (0.01/pi) u_xx``,
    ``u(0, x) = -sin(pi x)``, ``u(t, +-1) = 0``). Every :meth:`sample` draws new Latin-hypercube
    points, as the notebook's samplers do at every step: ``n_residual = 2000`` interior points,
    ``n_initial = 50`` points ``(0, x)`` and ``n_boundary = 50`` points ``(t, +-1)`` (the first
    half at ``x = -1``, the rest at ``x = +1``); ``batch_size`` is ignored. The error is the
    **MSE** (``error_metric = "mse"``) against the Cole-Hopf reference on the notebook's grid,
    100 ``t`` in ``[0, 1]`` times 256 ``x`` in ``[-1 + 1/256, 1 - 1/256]`` (the notebook compares
    with a numerical simulation on that grid). ``make_model()`` builds the notebook's network:
    2 -> 50, then 4 layers 50 -> 50, tanh, -> 1 (five hidden layers of 50), Xavier-normal
    weights, biases 0.001, and no input normalisation.
    """

    name = "burgers_config"
    error_metric = "mse"

    def __init__(self, *, n_residual: int = 2000, n_initial: int = 50, n_boundary: int = 50,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(device=device, dtype=dtype)
        self.counts = {"pde": int(n_residual), "ic": int(n_initial), "bc": int(n_boundary)}
        for key, n in self.counts.items():
            if n < 1:
                raise ValueError(f"BurgersConFIG: need at least one {key!r} point, got {n}")

    def make_model(self, hidden=(50, 50, 50, 50, 50), *, generator=None, activation=torch.tanh):  # type: ignore[override]
        """The notebook's network (see the class docstring)."""
        model = MLP((self.input_dim, *hidden, self.output_dim), activation=activation, generator=generator,
                    device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for linear in model.linears:
                linear.bias.fill_(0.001)
        return model

    def _grid_axes(self, n: int | None) -> tuple[Tensor, Tensor]:
        if n is not None:
            return super()._grid_axes(n)
        kw = {"dtype": self.dtype, "device": self.device}
        return torch.linspace(0.0, 1.0, 100, **kw), torch.linspace(-1.0 + 1 / 256, 1.0 - 1 / 256, 256, **kw)

    def sample(self, batch_size: int = 128, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """New Latin-hypercube points (``batch_size`` is ignored: the notebook's counts)."""
        lo, hi = self.lower.cpu(), self.upper.cpu()
        interior = latin_hypercube(self.counts["pde"], lo, hi, generator)
        x0 = latin_hypercube(self.counts["ic"], lo[1:], hi[1:], generator)
        n = self.counts["bc"]
        tb = latin_hypercube(n, lo[:1], hi[:1], generator)
        xb = torch.where(torch.arange(n) < n // 2, -1.0, 1.0).to(lo.dtype).unsqueeze(-1)
        points = {"pde": interior, "ic": torch.cat((torch.zeros_like(x0), x0), -1), "bc": torch.cat((tb, xb), -1)}
        return {key: value.to(self.device) for key, value in points.items()}
