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
    ``beta = argmin_{beta >= 0} beta^T G beta - 2 sum(beta)``, ``alpha = beta / sum(beta)``
    (both have the KKT conditions ``(G alpha)_j >= lambda`` with equality on the support), by the
    active-set method of :func:`~lossbalance.combine.numerics.nonnegative_qp` in float64, on the
    rows' cosines: with ``S = diag(||g_i||)`` and ``beta = S^{-1} x``, on
    ``A = S^{-1} G S^{-1} + reg_eps I`` (unit diagonal, positive definite). In ``alpha`` the
    ridge is ``reg_eps sum_i alpha_i^2 ||g_i||^2``, so ``||d - d*|| <= sqrt(reg_eps)
    (sum_i (alpha*_i ||g_i||)^2)^(1/2) <= sqrt(reg_eps) max_i ||g_i||`` for the exact min-norm
    point ``d* = J^T alpha*`` (the projection inequality): relative to the rows that ``d*``
    combines, not to ``||J||_F``, so a row a million times shorter than another is not swamped
    (typically the error is ``O(reg_eps)``). A zero row, or a zero matrix, gives the zero vector.

    torchjd's ``MGDA`` runs Frank-Wolfe (Sener & Koltun, Algorithm 2) and stops once the step
    ``gamma`` is below ``epsilon = 1e-3`` or after ``max_iters = 100`` steps: an approximation of
    the same point, exact for K = 2 (one exact line search on the segment), elsewhere a convex
    combination whose squared norm exceeds the minimum. This combiner returns the minimum.

    Options:

    ``reg_eps``
        Ridge on the unit-diagonal cosine matrix (default ``1e-12``, must be positive), see above.
    ``double``
        Form the Gramian and the update in float64 and return the input dtype (default
        ``False``: one matmul ``J J^T`` in the input dtype, at least float32, as torchjd; the
        simplex problem is solved in float64 either way). The rounding of a float32 Gramian's
        entries is about ``1e-7 ||g_i|| ||g_j||``, so the cosine matrix of nearly dependent rows
        can be indefinite by about ``1e-7``, more than the ridge: then the ridge is raised until
        ``A`` is positive definite (:func:`~lossbalance.combine.numerics.ridged`), which bounds
        ``||d - d*||`` by about ``sqrt(1e-7)`` times the norms above in the worst case
        (typically ``1e-7``, tested), whatever the rows' norms (rows from ``1e-20`` to ``1e4``
        included, tested).
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
        if k == 2:  # the ridge of the cosine problem in alpha: reg_eps ||g_i||^2 on the diagonal
            return _segment(a + self.reg_eps * torch.diag(a.diagonal())), basis, factors
        return _jacobi_scaled_weights(a, self.reg_eps), basis, factors

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        check_grads(grads)
        with torch.no_grad():
            k, p = grads.shape
            if k == 0 or p == 0:
                return grads.new_zeros(p)
            alpha, basis, factors = self._solve(grads)
            return ((alpha.to(basis.device, basis.dtype) * factors) @ basis).to(grads.dtype)


def _jacobi_scaled_weights(a: Tensor, reg_eps: float) -> Tensor:
    r"""The simplex minimiser of ``alpha^T a alpha`` through the unit-diagonal problem.

    With ``s_i = sqrt(a_ii)`` and ``S = diag(s)``, ``beta = S^{-1} x min(s)`` turns
    ``min_{beta >= 0} beta^T a beta - 2 sum(beta)`` into (up to a positive factor)
    ``min_{x >= 0} x^T (S^{-1} a S^{-1}) x - 2 sum_i (min(s) / s_i) x_i``, solved with the ridge
    ``reg_eps`` on ``S^{-1} a S^{-1}`` (:func:`~lossbalance.combine.numerics.ridged`). Rounding in
    the Gramian's entries is relative to ``||g_i|| ||g_j||``, so on the unit diagonal it is
    uniform whatever the row norms, and a ridge raised to make up for it weighs every row by its
    own norm, not by ``tr(G)``. A zero (or underflowed) diagonal entry is a zero (or negligible)
    row: ``alpha`` is one at the first such row.
    """
    k = a.shape[0]
    s = a.diagonal().clamp_min(0.0).sqrt()
    if not bool((s > 0).all()):
        alpha = torch.zeros(k, dtype=a.dtype)
        alpha[int(torch.argmin(s))] = 1.0
        return alpha
    unit = a / (s[:, None] * s[None, :])
    rel = s.min() / s
    x = nonnegative_qp(ridged(unit, reg_eps), -rel[None, :])[0]
    beta = x * rel
    return beta / beta.sum()


def _segment(a: Tensor) -> Tensor:
    """The minimiser of ``alpha^T A alpha`` on the segment ``alpha = (t, 1 - t)``, ``t in [0, 1]``
    (Sener & Koltun 2018, Algorithm 1): ``t = (A_22 - A_12) / (A_11 + A_22 - 2 A_12)`` clipped,
    the denominator ``(e_1 - e_2)^T A (e_1 - e_2) = ||g_1 - g_2||^2``; where rounding left it
    at or below zero the rows are equal to rounding and the shorter one is taken. On Python
    floats (two terms need no active set)."""
    (a11, a12), (_, a22) = a.tolist()
    den = a11 + a22 - 2.0 * a12
    t = min(max((a22 - a12) / den, 0.0), 1.0) if den > 0 else float(a11 <= a22)
    return torch.tensor([t, 1.0 - t], dtype=torch.float64)
