"""1-D wave equation ``u_tt = 4 u_xx`` of Wang, Yu & Perdikaris (2022).

S. Wang, X. Yu, P. Perdikaris, "When and why PINNs fail to train: A neural tangent kernel
perspective", J. Comput. Phys. 449, 110768 (2022), arXiv:2007.14527, the wave-equation example.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from .base import gradient
from .spacetime import SecondOrderInTime

__all__ = ["Wave1D"]


class Wave1D(SecondOrderInTime):
    r"""``u_tt - c^2 u_xx = 0`` on ``(t, x) in [0, 1] x [0, 1]`` (``c = 2``, ``a = 4``).

    ``u(t, 0) = u(t, 1) = 0``, ``u(0, x) = sin(pi x) + sin(a pi x) / 2``, ``u_t(0, x) = 0``;
    exact solution ``u = sin(pi x) cos(c pi t) + sin(a pi x) cos(a c pi t) / 2``.

    Terms, sampling and evaluation: :class:`~lossbalance.problems.spacetime.SecondOrderInTime`
    (the residual is ``u_tt - c^2 u_xx``; 100 x 100 evaluation grid by default).
    """

    name = "wave"

    def __init__(self, c: float = 2.0, a: float = 4.0, *, residuals: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(residuals=residuals, device=device, dtype=dtype)
        self.c = float(c)
        self.a = float(a)

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
