"""1-D Poisson equation with a two-scale manufactured solution.

A cheap test case in the spirit of the 1-D Poisson examples of S. Wang, X. Yu,
P. Perdikaris, "When and why PINNs fail to train: A neural tangent kernel perspective",
J. Comput. Phys. 449, 110768 (2022), and S. Wang, H. Wang, P. Perdikaris, "On the
eigenvector bias of Fourier feature networks", CMAME 384, 113938 (2021).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import Problem, gradient

__all__ = ["Poisson1D"]


class Poisson1D(Problem):
    r"""``-kappa u'' = f`` on ``[0, 1]`` with Dirichlet data at ``x = 0`` and ``x = 1``.

    Exact solution ``u(x) = sin(freq pi x) + amp_hi sin(freq_hi pi x)`` (defaults
    ``freq = 2``, ``freq_hi = 25``, ``amp_hi = 0.1``; set ``amp_hi = 0`` for the single
    mode ``sin(2 pi x)``), so
    ``f = kappa ((freq pi)^2 sin(freq pi x) + amp_hi (freq_hi pi)^2 sin(freq_hi pi x))``.
    The boundary values come from the exact solution (zero for integer frequencies).
    The high-frequency term makes ``f`` large (``~ 6e2``), so the ``"pde"`` term
    dominates the ``"bc"`` term at initialisation -- the usual imbalance.

    Loss terms: ``"pde"`` (MSE of ``-kappa u'' - f``) and ``"bc"`` (mean of the two
    squared boundary errors).  ``sample(batch_size)`` draws ``batch_size`` uniform
    interior points (key ``"pde"``); key ``"bc"`` always holds the two points
    ``[[0.], [1.]]``.
    """

    name = "poisson"
    input_dim = 1
    default_eval_n = 1001

    def __init__(
        self,
        kappa: float = 1.0,
        *,
        freq: float = 2.0,
        freq_hi: float = 25.0,
        amp_hi: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__((0.0,), (1.0,), device=device, dtype=dtype)
        self.kappa = float(kappa)
        self.freq = float(freq)
        self.freq_hi = float(freq_hi)
        self.amp_hi = float(amp_hi)

    @property
    def term_names(self) -> tuple[str, ...]:
        return ("pde", "bc")

    def exact(self, x: Tensor) -> Tensor:
        x = x[:, :1]
        return torch.sin(self.freq * math.pi * x) + self.amp_hi * torch.sin(self.freq_hi * math.pi * x)

    def source(self, x: Tensor) -> Tensor:
        """Forcing ``f`` at ``x``, shape ``(N,)``."""
        x = x[:, 0]
        w, w_hi = self.freq * math.pi, self.freq_hi * math.pi
        return self.kappa * (w**2 * torch.sin(w * x) + self.amp_hi * w_hi**2 * torch.sin(w_hi * x))

    def _residual(self, u: Tensor, x: Tensor) -> Tensor:
        """``-kappa u'' - f``."""
        u_x = gradient(u, x)[:, 0]
        u_xx = gradient(u_x, x)[:, 0]
        return -self.kappa * u_xx - self.source(x.detach())

    def sample(
        self, batch_size: int = 128, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        n = self._check_batch_size(batch_size)
        return {
            "pde": self._uniform(n, self.lower, self.upper, generator),
            "bc": torch.stack((self.lower, self.upper)),
        }

    def losses(
        self, model: Callable[[Tensor], Tensor], batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        xb = batch["bc"]
        bc_err = self._outputs(model, xb) - self.exact(xb).reshape(-1)
        return {
            "pde": self.residual(model, batch["pde"]).square().mean(),
            "bc": bc_err.square().mean(),
        }

    def evaluation_points(self, n: int | None = None) -> Tensor:
        """``n`` equispaced points on ``[0, 1]`` (1001 by default), shape ``(n, 1)``."""
        n = self.default_eval_n if n is None else int(n)
        return torch.linspace(0.0, 1.0, n, dtype=self.dtype, device=self.device).unsqueeze(-1)
