"""Nonlinear 1-D Klein-Gordon equation of Wang, Teng & Perdikaris (2021).

S. Wang, Y. Teng, P. Perdikaris, "Understanding and mitigating gradient flow pathologies in
physics-informed neural networks", SIAM J. Sci. Comput. 43(5), A3055-A3081 (2021),
arXiv:2001.04536, the Klein-Gordon example (a manufactured solution).
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from .base import gradient
from .spacetime import SecondOrderInTime

__all__ = ["KleinGordon1D"]


class KleinGordon1D(SecondOrderInTime):
    r"""``u_tt + alpha u_xx + beta u + gamma u^k = f`` on ``(t, x) in [0, 1] x [0, 1]``.

    ``alpha = -1``, ``beta = 0``, ``gamma = 1``, ``k = 3``; manufactured solution
    ``u = x cos(5 pi t) + (x t)^3``, from which ``f``, the boundary values at ``x = 0, 1`` and the
    initial data ``u(0, x) = x``, ``u_t(0, x) = 0`` follow.

    Terms, sampling and evaluation: :class:`~lossbalance.problems.spacetime.SecondOrderInTime`.
    """

    name = "klein_gordon"

    def __init__(self, alpha: float = -1.0, beta: float = 0.0, gamma: float = 1.0, k: int = 3, *,
                 residuals: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(residuals=residuals, device=device, dtype=dtype)
        self.alpha, self.beta, self.gamma, self.k = float(alpha), float(beta), float(gamma), int(k)

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
