"""Nonlinear 1-D Klein-Gordon equation of Wang, Teng & Perdikaris (2021).

S. Wang, Y. Teng, P. Perdikaris, "Understanding and mitigating gradient flow pathologies in
physics-informed neural networks", SIAM J. Sci. Comput. 43(5), A3055-A3081 (2021),
arXiv:2001.04536, the Klein-Gordon example (a manufactured solution).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import Problem, gradient

__all__ = ["KleinGordon1D"]


class KleinGordon1D(Problem):
    r"""``u_tt + alpha u_xx + beta u + gamma u^k = f`` on ``(t, x) in [0, 1] x [0, 1]``.

    ``alpha = -1``, ``beta = 0``, ``gamma = 1``, ``k = 3``; manufactured solution
    ``u = x cos(5 pi t) + (x t)^3``, from which ``f``, the boundary values at ``x = 0, 1`` and the
    initial data ``u(0, x) = x``, ``u_t(0, x) = 0`` follow.

    Inputs are ``(t, x)`` columns (time first).  Loss terms: ``"pde"`` (MSE of the residual),
    ``"ic"`` (MSE of ``u(0, x) - x``), ``"ic_t"`` (MSE of ``u_t(0, x)``) and ``"bc"`` (MSE of
    ``u - u*`` on ``x = 0`` and ``x = 1``).  Sampling and evaluation as :class:`~lossbalance.problems.Wave1D`.
    """

    name = "klein_gordon"
    input_dim = 2
    default_eval_n = 100

    def __init__(self, alpha: float = -1.0, beta: float = 0.0, gamma: float = 1.0, k: int = 3, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__((0.0, 0.0), (1.0, 1.0), device=device, dtype=dtype)
        self.alpha, self.beta, self.gamma, self.k = float(alpha), float(beta), float(gamma), int(k)

    @property
    def term_names(self) -> tuple[str, ...]:
        return ("pde", "ic", "ic_t", "bc")

    def exact(self, x: Tensor) -> Tensor:
        t, s = x[:, 0], x[:, 1]
        return (s * torch.cos(5 * math.pi * t) + (s * t) ** 3).unsqueeze(-1)

    def source(self, x: Tensor) -> Tensor:
        """Forcing ``f`` at ``x``, shape ``(N,)``."""
        t, s = x[:, 0], x[:, 1]
        u = self.exact(x).reshape(-1)
        u_tt = -25 * math.pi**2 * s * torch.cos(5 * math.pi * t) + 6 * s**3 * t
        u_xx = 6 * s * t**3
        return u_tt + self.alpha * u_xx + self.beta * u + self.gamma * u**self.k

    def _residual(self, u: Tensor, x: Tensor) -> Tensor:
        du = gradient(u, x)
        u_tt = gradient(du[:, 0], x)[:, 0]
        u_xx = gradient(du[:, 1], x)[:, 1]
        return u_tt + self.alpha * u_xx + self.beta * u + self.gamma * u**self.k - self.source(x.detach())

    def sample(self, batch_size: int = 128, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n = self._check_batch_size(batch_size)
        interior = self._uniform(n, self.lower, self.upper, generator, dim=2)
        x0 = self._uniform(n, 0.0, 1.0, generator)
        ic = torch.cat((torch.zeros_like(x0), x0), dim=-1)
        tb = self._uniform(n, 0.0, 1.0, generator)
        xb = (torch.arange(n, device=self.device) % 2).to(self.dtype).unsqueeze(-1)
        return {"pde": interior, "ic": ic, "bc": torch.cat((tb, xb), dim=-1)}

    def losses(self, model: Callable[[Tensor], Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_ic = batch["ic"].detach().requires_grad_(True)
            u_ic = self._outputs(model, x_ic)
            u_t = gradient(u_ic, x_ic)[:, 0]
        if not keep_graph:
            u_ic, u_t = u_ic.detach(), u_t.detach()
        xb = batch["bc"]
        return {
            "pde": self.residual(model, batch["pde"]).square().mean(),
            "ic": (u_ic - x_ic.detach()[:, 1]).square().mean(),
            "ic_t": u_t.square().mean(),
            "bc": (self._outputs(model, xb) - self.exact(xb).reshape(-1)).square().mean(),
        }

    def evaluation_points(self, n: int | None = None) -> Tensor:
        """``n x n`` grid on ``[0, 1]^2`` (``t``-major)."""
        n = self.default_eval_n if n is None else int(n)
        axis = torch.linspace(0.0, 1.0, n, dtype=self.dtype, device=self.device)
        gt, gx = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack((gt.reshape(-1), gx.reshape(-1)), dim=-1)
