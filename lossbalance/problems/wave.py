"""1-D wave equation ``u_tt = 4 u_xx`` of Wang, Yu & Perdikaris (2022).

S. Wang, X. Yu, P. Perdikaris, "When and why PINNs fail to train: A neural tangent kernel
perspective", J. Comput. Phys. 449, 110768 (2022), arXiv:2007.14527, the wave-equation example.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import Problem, gradient

__all__ = ["Wave1D"]


class Wave1D(Problem):
    r"""``u_tt - c^2 u_xx = 0`` on ``(t, x) in [0, 1] x [0, 1]`` (``c = 2``, ``a = 4``).

    ``u(t, 0) = u(t, 1) = 0``, ``u(0, x) = sin(pi x) + sin(a pi x) / 2``, ``u_t(0, x) = 0``;
    exact solution ``u = sin(pi x) cos(c pi t) + sin(a pi x) cos(a c pi t) / 2``.

    Inputs are ``(t, x)`` columns (time first).  Loss terms: ``"pde"`` (MSE of the residual
    ``u_tt - c^2 u_xx``), ``"ic"`` (MSE of ``u(0, x) - u0(x)``), ``"ic_t"`` (MSE of
    ``u_t(0, x)``) and ``"bc"`` (MSE of ``u`` on ``x = 0`` and ``x = 1``).  ``sample`` draws
    ``batch_size`` points per set: uniform interior points, ``(0, x)`` with uniform ``x`` (shared
    by ``"ic"`` and ``"ic_t"``) and ``(t, 0)`` / ``(t, 1)`` alternating.  Evaluation: an
    ``n x n`` grid (``t``-major), 100 x 100 by default.
    """

    name = "wave"
    input_dim = 2
    default_eval_n = 100

    def __init__(self, c: float = 2.0, a: float = 4.0, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__((0.0, 0.0), (1.0, 1.0), device=device, dtype=dtype)
        self.c = float(c)
        self.a = float(a)

    @property
    def term_names(self) -> tuple[str, ...]:
        return ("pde", "ic", "ic_t", "bc")

    def exact(self, x: Tensor) -> Tensor:
        t, s = x[:, 0], x[:, 1]
        pi = math.pi
        u = torch.sin(pi * s) * torch.cos(self.c * pi * t) \
            + 0.5 * torch.sin(self.a * pi * s) * torch.cos(self.a * self.c * pi * t)
        return u.unsqueeze(-1)

    def _residual(self, u: Tensor, x: Tensor) -> Tensor:
        du = gradient(u, x)
        u_tt = gradient(du[:, 0], x)[:, 0]
        u_xx = gradient(du[:, 1], x)[:, 1]
        return u_tt - self.c**2 * u_xx

    def sample(self, batch_size: int = 128, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n = self._check_batch_size(batch_size)
        interior = self._uniform(n, self.lower, self.upper, generator, dim=2)
        x0 = self._uniform(n, 0.0, 1.0, generator)
        ic = torch.cat((torch.zeros_like(x0), x0), dim=-1)
        tb = self._uniform(n, 0.0, 1.0, generator)
        xb = (torch.arange(n, device=self.device) % 2).to(self.dtype).unsqueeze(-1)  # 0, 1, 0, ...
        return {"pde": interior, "ic": ic, "bc": torch.cat((tb, xb), dim=-1)}

    def losses(self, model: Callable[[Tensor], Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_ic = batch["ic"].detach().requires_grad_(True)
            u_ic = self._outputs(model, x_ic)
            u_t = gradient(u_ic, x_ic)[:, 0]
        if not keep_graph:
            u_ic, u_t = u_ic.detach(), u_t.detach()
        return {
            "pde": self.residual(model, batch["pde"]).square().mean(),
            "ic": (u_ic - self.exact(x_ic.detach()).reshape(-1)).square().mean(),
            "ic_t": u_t.square().mean(),
            "bc": self._outputs(model, batch["bc"]).square().mean(),
        }

    def evaluation_points(self, n: int | None = None) -> Tensor:
        """``n x n`` grid on ``[0, 1]^2`` (``t``-major)."""
        n = self.default_eval_n if n is None else int(n)
        axis = torch.linspace(0.0, 1.0, n, dtype=self.dtype, device=self.device)
        gt, gx = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack((gt.reshape(-1), gx.reshape(-1)), dim=-1)
