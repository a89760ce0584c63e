"""Second order in time on ``(t, x) in [0, 1] x [0, 1]``: what the wave and Klein-Gordon problems share.

Inputs are ``(t, x)`` columns (time first). Loss terms: ``"pde"`` (MSE of the residual),
``"ic"`` (MSE of ``u(0, x) - u*(0, x)``), ``"ic_t"`` (MSE of ``u_t(0, x)``: both problems start at
rest) and ``"bc"`` (MSE of ``u - u*`` on ``x = 0`` and ``x = 1``). ``sample`` draws ``batch_size``
points per set: uniform interior points, ``(0, x)`` with uniform ``x`` (shared by ``"ic"`` and
``"ic_t"``) and ``(t, 0)`` / ``(t, 1)`` alternating. Evaluation: an ``n x n`` grid (``t``-major).
``residuals=True``: every term as a :class:`~lossbalance.Residual` of kind ``"residual"`` (the
per-point residuals whose mean square is the MSE above; ``"pde"`` with the times ``t=``), for
pointwise weights and the ``ntk`` strategy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..pointwise import Residual
from .base import Problem, gradient

__all__ = ["SecondOrderInTime"]


class SecondOrderInTime(Problem):
    """A problem ``u_tt = F(u, u_xx)`` on the unit square, at rest at ``t = 0`` (subclasses give
    ``exact`` and ``_residual``)."""

    input_dim = 2
    default_eval_n = 100

    def __init__(self, *, residuals: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__((0.0, 0.0), (1.0, 1.0), device=device, dtype=dtype)
        self.residuals = bool(residuals)

    @property
    def term_names(self) -> tuple[str, ...]:
        return ("pde", "ic", "ic_t", "bc")

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
        xb = batch["bc"]
        r = {
            "pde": self.residual(model, batch["pde"]),
            "ic": u_ic - self.exact(x_ic.detach()).reshape(-1),
            "ic_t": u_t,
            "bc": self._outputs(model, xb) - self.exact(xb).reshape(-1),
        }
        if self.residuals:
            t = {"pde": batch["pde"][:, 0].detach()}
            return {name: Residual(v, t=t.get(name), kind="residual") for name, v in r.items()}
        return {name: v.square().mean() for name, v in r.items()}

    def evaluation_points(self, n: int | None = None) -> Tensor:
        """``n x n`` grid on ``[0, 1]^2`` (``t``-major)."""
        n = self.default_eval_n if n is None else int(n)
        axis = torch.linspace(0.0, 1.0, n, dtype=self.dtype, device=self.device)
        gt, gx = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack((gt.reshape(-1), gx.reshape(-1)), dim=-1)
