"""Kovasznay flow: steady incompressible Navier-Stokes with an analytic solution.

L. I. G. Kovasznay, "Laminar flow behind a two-dimensional grid", Proc. Cambridge Philos. Soc. 44
(1948) 58-62. The PINN setup (Re = 40 on ``[-0.5, 1] x [-0.5, 1.5]``, velocity on the whole boundary)
is that of X. Jin, S. Cai, H. Li, G. E. Karniadakis, "NSFnets (Navier-Stokes flow nets)",
J. Comput. Phys. 426, 109951 (2021), arXiv:2006.04178; DeepXDE's example
``examples/pinn_forward/Kovasznay_flow.py`` (Re = 20 there) also pins the pressure on the outlet.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import Problem, gradient

__all__ = ["Kovasznay2D"]


class Kovasznay2D(Problem):
    r"""``(u . grad) u + grad p - (1/Re) lap u = 0``, ``div u = 0`` on ``[-0.5, 1] x [-0.5, 1.5]``.

    Exact solution, with ``lambda = Re/2 - sqrt(Re^2/4 + 4 pi^2)`` (``Re = 40`` by default)::

        u = 1 - exp(lambda x) cos(2 pi y)
        v = lambda / (2 pi) exp(lambda x) sin(2 pi y)
        p = (1 - exp(2 lambda x)) / 2

    Inputs are ``(x, y)`` columns; the model has three outputs ``(u, v, p)`` (``output_dim = 3``) and
    ``exact`` returns the three as ``(N, 3)``. Loss terms (``term_names``):

    * ``"momentum_x"``, ``"momentum_y"``: MSE of the two momentum residuals over the interior points;
    * ``"continuity"``: MSE of ``u_x + v_y`` over the interior points;
    * ``"bc"``: MSE of ``(u, v) - (u*, v*)`` over the boundary points (summed over the two components)
      plus the MSE of ``p - p*`` on the outlet ``x = 1``, which fixes the pressure's constant.

    ``sample(batch_size)`` draws ``batch_size`` uniform interior points (``"pde"``), ``batch_size``
    boundary points (``"bc"``: left, right, bottom and top edges in turn, uniform along each) and
    ``batch_size`` points on the outlet (``"outlet"``). The error is the relative L2 error of the
    stacked ``(u, v, p)`` on an ``n x n`` grid (100 by default).
    """

    name = "kovasznay"
    input_dim = 2
    output_dim = 3
    default_eval_n = 100

    def __init__(self, re: float = 40.0, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__((-0.5, -0.5), (1.0, 1.5), device=device, dtype=dtype)
        self.re = float(re)
        if not (self.re > 0 and math.isfinite(self.re)):
            raise ValueError(f"Kovasznay2D: re must be positive and finite, got {re!r}")
        self.lam = self.re / 2 - math.sqrt(self.re**2 / 4 + 4 * math.pi**2)

    @property
    def term_names(self) -> tuple[str, ...]:
        return ("momentum_x", "momentum_y", "continuity", "bc")

    def exact(self, x: Tensor) -> Tensor:
        decay = torch.exp(self.lam * x[:, 0])
        angle = 2 * math.pi * x[:, 1]
        u = 1 - decay * torch.cos(angle)
        v = self.lam / (2 * math.pi) * decay * torch.sin(angle)
        p = (1 - decay.square()) / 2
        return torch.stack((u, v, p), dim=-1)

    @staticmethod
    def _outputs(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """Model values at ``x`` as ``(N, 3)``: the columns ``u``, ``v``, ``p``."""
        return model(x).reshape(x.shape[0], 3)

    def _residual(self, uvp: Tensor, x: Tensor) -> Tensor:
        """The columns ``momentum_x``, ``momentum_y``, ``continuity`` at ``x``, shape ``(N, 3)``."""
        u, v = uvp[:, 0], uvp[:, 1]
        du, dv, dp = (gradient(uvp[:, i], x) for i in range(3))
        lap_u = gradient(du[:, 0], x)[:, 0] + gradient(du[:, 1], x)[:, 1]
        lap_v = gradient(dv[:, 0], x)[:, 0] + gradient(dv[:, 1], x)[:, 1]
        momentum_x = u * du[:, 0] + v * du[:, 1] + dp[:, 0] - lap_u / self.re
        momentum_y = u * dv[:, 0] + v * dv[:, 1] + dp[:, 1] - lap_v / self.re
        return torch.stack((momentum_x, momentum_y, du[:, 0] + dv[:, 1]), dim=-1)

    def sample(self, batch_size: int = 128, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n = self._check_batch_size(batch_size)
        interior = self._uniform(n, self.lower, self.upper, generator, dim=2)
        along = self._uniform(n, 0.0, 1.0, generator).squeeze(-1)
        edge = torch.arange(n, device=self.device) % 4            # left, right, bottom, top
        vertical = edge < 2                                          # x fixed, y free
        lo, hi = self.lower, self.upper
        x = torch.where(vertical, torch.where(edge == 0, lo[0], hi[0]), lo[0] + (hi[0] - lo[0]) * along)
        y = torch.where(vertical, lo[1] + (hi[1] - lo[1]) * along, torch.where(edge == 2, lo[1], hi[1]))
        outlet_y = self._uniform(n, lo[1], hi[1], generator)
        outlet = torch.cat((torch.full_like(outlet_y, float(hi[0])), outlet_y), dim=-1)
        return {"pde": interior, "bc": torch.stack((x, y), dim=-1), "outlet": outlet}

    def losses(self, model: Callable[[Tensor], Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        r = self.residual(model, batch["pde"]).square().mean(dim=0)
        xb, xo = batch["bc"], batch["outlet"]
        velocity = (self._outputs(model, xb)[:, :2] - self.exact(xb)[:, :2]).square().sum(dim=-1).mean()
        pressure = (self._outputs(model, xo)[:, 2] - self.exact(xo)[:, 2]).square().mean()
        return {"momentum_x": r[0], "momentum_y": r[1], "continuity": r[2], "bc": velocity + pressure}

    def evaluation_points(self, n: int | None = None) -> Tensor:
        """``n x n`` grid on the domain (``linspace`` on each axis, ``"ij"`` order)."""
        n = self.default_eval_n if n is None else int(n)
        gx, gy = torch.meshgrid(*(torch.linspace(float(lo), float(hi), n, dtype=self.dtype, device=self.device)
                                  for lo, hi in zip(self.lower, self.upper)), indexing="ij")
        return torch.stack((gx.reshape(-1), gy.reshape(-1)), dim=-1)
