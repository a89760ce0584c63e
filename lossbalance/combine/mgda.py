"""MGDA: the minimum-norm point of the convex hull of the rows (Desideri 2012; Sener & Koltun 2018)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Combiner, check_grads, register
from .numerics import compute_dtype, nonnegative_qp, normalized_gramian, ridged

__all__ = ["MGDA"]


@register
class MGDA(Combiner):
    r"""Multiple-gradient descent: the minimum-norm element of the convex hull of the rows.

    Desideri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
    C. R. Acad. Sci. Paris, Ser. I 350 (2012); Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018, Eq. 3; torchjd's ``MGDA()``. With ``G = J J^T``::

        alpha = argmin_{alpha >= 0, sum(alpha) = 1} alpha^T G alpha
        d     = J^T alpha = sum_i alpha_i g_i

    Scaling convention (torchjd's and the papers'): ``d`` is the min-norm point itself, a convex
    combination of the rows, **not** rescaled to their sum: its length is at most the smallest
    row norm, and it is zero exactly when some convex combination of the rows vanishes (a
    Pareto-stationary point). ``d . g_j >= ||d||^2 >= 0`` for every row (the optimality
    condition), so it never conflicts with any term.

    The simplex problem is solved exactly (two rows: in closed form on the segment) through the
    equivalent non-negative problem
    ``beta = argmin_{beta >= 0} beta^T A beta - 2 sum(beta)``, ``alpha = beta / sum(beta)``
    (both have the KKT conditions ``(A alpha)_j >= lambda`` with equality on the support), with
    ``A = G / tr(G) + reg_eps I`` positive definite, by the active-set method of
    :func:`~lossbalance.combine.numerics.nonnegative_qp` in float64. The ridge changes the
    objective by at most ``reg_eps`` (``||alpha||^2 <= 1``), so ``||d - d*|| <=
    sqrt(reg_eps) ||J||_F`` for the exact min-norm point ``d*`` (the projection inequality), and
    typically ``O(reg_eps)``. A zero matrix gives the zero vector.

    torchjd's ``MGDA`` runs Frank-Wolfe (Sener & Koltun, Algorithm 2) and stops once the step
    ``gamma`` is below ``epsilon = 1e-3`` or after ``max_iters = 100`` steps: an approximation of
    the same point, exact for K = 2 (one exact line search on the segment), elsewhere a convex
    combination whose squared norm exceeds the minimum. This combiner returns the minimum.

    Options:

    ``reg_eps``
        Ridge on the trace-normalised Gramian (default ``1e-12``, must be positive), see above.
    ``double``
        Form the Gramian and the update in float64 and return the input dtype (default
        ``False``: one matmul ``J J^T`` in the input dtype, at least float32, as torchjd; the
        simplex problem is solved in float64 either way). A float32 Gramian of nearly dependent
        rows can be indefinite by rounding (about ``1e-7 tr(G)``), more than the ridge: then the
        ridge is raised until ``A`` is positive definite
        (:func:`~lossbalance.combine.numerics.ridged`), which bounds ``||d - d*||`` by about
        ``sqrt(1e-7) ||J||_F`` in the worst case (typically ``1e-7``, tested).
    """

    name = "mgda"

    def __init__(self, *, reg_eps: float = 1e-12, double: bool = False):
        if not (reg_eps > 0 and math.isfinite(reg_eps)):
            raise ValueError(f"reg_eps must be a positive number (the ridge that makes the QP strictly convex), got {reg_eps}")
        self.reg_eps = float(reg_eps)
        self.double = bool(double)

    def options(self) -> dict[str, Any]:
        return {"reg_eps": self.reg_eps, "double": self.double}

    def weights(self, grads: Tensor, /) -> Tensor:
        """The convex weights ``alpha`` (K,), float64 on the CPU (NaN for non-finite input)."""
        check_grads(grads)
        with torch.no_grad():
            return self._solve(grads)[0]

    def _solve(self, grads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = grads.shape[0]
        basis, factors, gram, _ = normalized_gramian(grads, compute_dtype(grads, self.double))
        a = gram.to("cpu", torch.float64)
        if not bool(torch.isfinite(a).all()):
            return torch.full((k,), math.nan, dtype=torch.float64), basis, factors
        a = ridged(a, self.reg_eps)
        if k == 2:
            return _segment(a), basis, factors
        beta = nonnegative_qp(a, -torch.ones(1, k, dtype=torch.float64))[0]
        return beta / beta.sum(), basis, factors

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        check_grads(grads)
        with torch.no_grad():
            k, p = grads.shape
            if k == 0 or p == 0:
                return grads.new_zeros(p)
            alpha, basis, factors = self._solve(grads)
            return ((alpha.to(basis.device, basis.dtype) * factors) @ basis).to(grads.dtype)


def _segment(a: Tensor) -> Tensor:
    """The minimiser of ``alpha^T A alpha`` on the segment ``alpha = (t, 1 - t)``, ``t in [0, 1]``
    (Sener & Koltun 2018, Algorithm 1): ``t = (A_22 - A_12) / (A_11 + A_22 - 2 A_12)`` clipped,
    the denominator ``(e_1 - e_2)^T A (e_1 - e_2) > 0`` for a positive definite ``A``; on Python
    floats (two terms need no active set)."""
    (a11, a12), (_, a22) = a.tolist()
    t = min(max((a22 - a12) / (a11 + a22 - 2.0 * a12), 0.0), 1.0)
    return torch.tensor([t, 1.0 - t], dtype=torch.float64)
