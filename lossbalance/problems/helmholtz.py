"""2-D Helmholtz equation of Wang, Teng & Perdikaris (2021).

S. Wang, Y. Teng, P. Perdikaris, "Understanding and mitigating gradient flow
pathologies in physics-informed neural networks", SIAM J. Sci. Comput. 43(5),
A3055-A3081 (2021), arXiv:2001.04536, Section 2.2 / 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import Problem, gradient

__all__ = ["Helmholtz2D"]

_EDGES = ("bc_bottom", "bc_top", "bc_left", "bc_right")


class Helmholtz2D(Problem):
    r"""``u_xx + u_yy + k^2 u = f`` on ``[-1, 1]^2`` with Dirichlet data on the four edges.

    Exact solution ``u(x, y) = sin(a1 pi x) sin(a2 pi y)`` (defaults ``a1 = 1``,
    ``a2 = 4``, ``k = 1``), hence
    ``f = (k^2 - (a1 pi)^2 - (a2 pi)^2) u``.  Boundary values are taken from the exact
    solution (zero for integer ``a1``, ``a2`` up to round-off).

    Inputs are ``(x, y)`` columns.  Loss terms (``term_names``):

    * ``"pde"`` -- mean of ``(u_xx + u_yy + k^2 u - f)^2`` over the interior points;
    * ``split_boundary=False``: ``"bc"`` -- the *sum* of the four edge MSEs, as
      ``loss_bcs`` in the authors' code;
    * ``split_boundary=True``: ``"bc_bottom"`` (y=-1), ``"bc_top"`` (y=1),
      ``"bc_left"`` (x=-1), ``"bc_right"`` (x=1) -- one MSE per edge.

    ``sample(batch_size)`` follows the authors' training loop: a fresh draw of
    ``batch_size`` (128) uniform interior points and ``batch_size`` uniform points on
    each edge, with keys ``"pde", "bc_bottom", "bc_top", "bc_left", "bc_right"``
    (drawn in that order) whatever ``split_boundary`` is.
    """

    name = "helmholtz"
    input_dim = 2
    default_eval_n = 100  # 100 x 100 grid as in the authors' evaluation

    def __init__(
        self,
        a1: float = 1.0,
        a2: float = 4.0,
        k: float = 1.0,
        *,
        split_boundary: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__((-1.0, -1.0), (1.0, 1.0), device=device, dtype=dtype)
        self.a1 = float(a1)
        self.a2 = float(a2)
        self.k = float(k)
        self.split_boundary = bool(split_boundary)

    @property
    def term_names(self) -> tuple[str, ...]:
        return ("pde", *_EDGES) if self.split_boundary else ("pde", "bc")

    def exact(self, x: Tensor) -> Tensor:
        u = torch.sin(self.a1 * math.pi * x[:, 0]) * torch.sin(self.a2 * math.pi * x[:, 1])
        return u.unsqueeze(-1)

    def source(self, x: Tensor) -> Tensor:
        """Forcing ``f`` at ``x``, shape ``(N,)``."""
        factor = self.k**2 - (self.a1 * math.pi) ** 2 - (self.a2 * math.pi) ** 2
        return factor * self.exact(x).reshape(-1)

    def _residual(self, u: Tensor, x: Tensor) -> Tensor:
        """``u_xx + u_yy + k^2 u - f``."""
        du = gradient(u, x)
        u_xx = gradient(du[:, 0], x)[:, 0]
        u_yy = gradient(du[:, 1], x)[:, 1]
        return u_xx + u_yy + self.k**2 * u - self.source(x.detach())

    def sample(
        self, batch_size: int = 128, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        n = self._check_batch_size(batch_size)
        batch = {"pde": self._uniform(n, self.lower, self.upper, generator, dim=2)}
        fixed = {"bc_bottom": (1, -1.0), "bc_top": (1, 1.0), "bc_left": (0, -1.0), "bc_right": (0, 1.0)}
        for edge in _EDGES:
            axis, value = fixed[edge]
            free = self._uniform(n, -1.0, 1.0, generator).squeeze(-1)
            const = torch.full_like(free, value)
            cols = (free, const) if axis == 1 else (const, free)
            batch[edge] = torch.stack(cols, dim=-1)
        return batch

    def losses(
        self, model: Callable[[Tensor], Tensor], batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        out = {"pde": self.residual(model, batch["pde"]).square().mean()}
        edge_losses = {}
        for edge in _EDGES:
            xb = batch[edge]
            diff = self._outputs(model, xb) - self.exact(xb).reshape(-1)
            edge_losses[edge] = diff.square().mean()
        if self.split_boundary:
            out.update(edge_losses)
        else:
            out["bc"] = torch.stack(list(edge_losses.values())).sum()
        return out

    def evaluation_points(self, n: int | None = None) -> Tensor:
        """``n x n`` uniform grid (``linspace`` on each axis, ``"ij"`` order)."""
        n = self.default_eval_n if n is None else int(n)
        axis = torch.linspace(-1.0, 1.0, n, dtype=self.dtype, device=self.device)
        gx, gy = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack((gx.reshape(-1), gy.reshape(-1)), dim=-1)
