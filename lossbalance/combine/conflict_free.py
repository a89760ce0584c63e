"""ConFIG: conflict-free inverse gradients (Liu, Chu & Thuerey 2025)."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .base import Combiner, check_grads, register
from .numerics import compute_dtype, peak_scaled, squares_fit, unit_rows

__all__ = ["ConFIG"]


@register
class ConFIG(Combiner):
    r"""Conflict-free inverse gradients.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025 (arXiv 2408.11104), Eq. 2 with equal weights. With unit vectors
    ``u_i = g_i / ||g_i||`` as the rows of ``U`` (K x P)::

        x   = U^+ 1                       (minimum-norm least-squares solution of U x = 1)
        g_u = x / ||x||
        g   = (sum_i g_i . g_u) g_u = (sum_i ||g_i|| cos_i) g_u,   cos_i = u_i . g_u

    When ``U x = 1`` has a solution (the gradients are linearly independent, or dependent only
    through duplicated directions), ``u_i . g_u = 1 / ||x|| > 0`` for every i: the update makes
    the same angle with every term's gradient and conflicts with none, and
    ``g = (sum_i ||g_i||) x / ||x||^2``. When it has none (an exactly opposite pair, or more
    directions than their span holds, e.g. three gradients at 120 degrees in a plane), ``x`` is
    the least-squares compromise and may conflict with some terms: that is the method.
    Positively scaling one term's gradient changes only the length of ``g``, never its
    direction: the balancer's weights act on the length alone.

    Two terms, closed form (``closed_form=True``, the default; no linear algebra). With
    ``c = u_1 . u_2`` and ``x = a u_1 + b u_2``: ``u_1 . x = a + b c = 1`` and
    ``u_2 . x = a c + b = 1`` give ``a = b = 1 / (1 + c)``, so ``g_u`` is the bisector
    ``(u_1 + u_2) / ||u_1 + u_2||`` and, since ``(g_1 + g_2) . (u_1 + u_2) = (||g_1|| + ||g_2||)(1 + c)``
    and ``||u_1 + u_2||^2 = 2 (1 + c)``::

        g = (||g_1|| + ||g_2||) / 2 * (u_1 + u_2)

    the mean norm times the sum of the unit vectors: equal-norm gradients give exactly
    ``g_1 + g_2``. A zero gradient gives ``u = 0`` and is ignored (the result is the other
    gradient, as in the general form; conflictfree's closed form returns NaN there). An exactly
    opposite pair gives ``u_1 + u_2 = 0`` and the zero vector. The closed form agrees with the
    general form, edge cases and thresholds included (tested).

    Numerics of the general form: ``x = U^+ 1`` is computed from a QR factorisation
    ``U^T = Q R`` and an SVD of the small ``K x K`` factor, ``x = Q (R^T)^+ 1``: as accurate as an
    SVD of ``U``, works for rank deficiency and ``K > P``, and costs ``O(P K^2)`` on any device
    (an SVD of the wide ``U`` is an order of magnitude slower). Singular values at or below
    ``rtol * sigma_max`` count as zero (default ``rtol = sqrt(eps)`` of the compute dtype,
    1.5e-8 in float64): the ``u_1 + u_2`` direction of a pair opposite up to rounding. If the
    projection of ``1`` onto the range of ``U`` is at most ``rtol * sqrt(K)`` (``1`` orthogonal to
    every usable direction, e.g. an exactly opposite pair alone) the update is the zero vector:
    otherwise rounding noise would pick an arbitrary direction, and its length
    ``sum_i g_i . g_u`` would then point against one of the terms. Zero rows enter the
    right-hand side as 0 instead of 1 (the same solution in exact arithmetic; an unfittable 1
    leaks into ``x`` through rounding, amplified by the condition number squared). In the
    length, cosines ``|u_i . g_u| <= rtol / (2 sqrt(K))`` count as zero: where a solution
    exists every cosine is ``1/||x|| >= rtol / sqrt(K)``, so only rounding residue of an exact
    zero (a term of an opposite pair) is dropped, and a large gradient orthogonal to ``g_u`` up
    to rounding cannot flip the sign of the update against a small one. Accuracy: about
    ``kappa * 1e-16`` relative in float64 where ``U x = 1`` has a solution (``kappa``: condition
    number of the kept part of ``U``), ``kappa^2 * 1e-16`` where it has none (least squares with
    a residual), e.g. an opposite pair together with gradients parallel to 1e-6: ~1e-4.

    Options:

    ``closed_form``
        Use the two-term closed form when K = 2 (default ``True``).
    ``rtol``
        Relative threshold for singular values (and for the projection of ``1``), see above;
        ``None`` means ``sqrt(eps)`` of the compute dtype.
    ``double``
        Compute in float64 (default) and return the input dtype.
    ``solver``
        ``"qr"`` (default): the QR and SVD above. ``"gram"``: an eigendecomposition of the
        ``K x K`` Gramian ``U U^T = V diag(S^2) V^T``, ``x = U^T V diag(S^-2) V^T b`` (one
        ``(K, P)`` matmul and the SVD of the ``K x K`` symmetric positive semi-definite Gramian,
        which is its eigendecomposition: 5-10x cheaper at K = 4, P = 5 000 on a CPU; an SVD
        rather than ``eigh``, whose LAPACK routine costs twice as much when the caches are cold
        after the model's backward), the same tests on ``S``. Its accuracy is ``kappa^2 * 1e-16`` in float64 instead of
        ``kappa * 1e-16``: below the rounding of float32 gradients themselves (``kappa * 6e-8``)
        for ``kappa < 5e8``. Its eigenvalues carry errors of about ``K eps S_max^2``, so its
        default ``rtol`` is ``sqrt(1000 K eps)`` (9.4e-7 at K = 4 in float64): singular values
        below it count as zero, where the QR solver would still resolve them. Momentum ConFIG
        (``"mconfig"``) uses it: its one backward per step leaves the solve as its largest cost.

    Where public implementations differ (read from their source):

    - conflictfree ``ConFIGOperator``: ``torch.linalg.lstsq(units, weights)`` (or ``pinv``), zero
      gradient -> zero unit row (``nan_to_num``) ignored, exactly opposite pair -> zero vector; its
      two-term closed form returns NaN when one gradient is zero, and its general form fails on
      float64 input unless the default dtype is float64.
    - torchjd ``ConFIG``: ``pinv(units) @ weights``, normalised, length ``sum_i g_i . g_u``; the
      same edge cases. Both optionally weight the right-hand side (a preference vector) instead
      of ``1``; here the balancer's weights scale the rows, which only changes the length.
    - Neither thresholds the projection of ``1``: with a pair opposite up to rounding they can
      return an update along one of the pair, against the other.
    """

    name = "config"

    def __init__(self, *, closed_form: bool = True, rtol: float | None = None, double: bool = True,
                 solver: Literal["qr", "gram"] = "qr"):
        if rtol is not None and not (0.0 <= rtol < 1.0):
            raise ValueError(f"rtol must be in [0, 1), got {rtol}")
        if solver not in ("qr", "gram"):
            raise ValueError(f"solver must be 'qr' (QR and SVD of U) or 'gram' (SVD of U U^T), got {solver!r}")
        self.closed_form, self.solver = bool(closed_form), solver
        self.rtol = rtol
        self.double = bool(double)

    def options(self) -> dict[str, Any]:
        return {"closed_form": self.closed_form, "rtol": self.rtol, "double": self.double, "solver": self.solver}

    def _rtol(self, dtype: torch.dtype, k: int) -> float:
        """``rtol``, else ``sqrt(eps)`` (QR) or ``sqrt(1000 K eps)`` (Gramian: its eigenvalues carry
        errors of ``~K eps S_max^2``, so smaller singular values cannot be told from zero)."""
        if self.rtol is not None:
            return self.rtol
        eps = torch.finfo(dtype).eps
        return math.sqrt(1000.0 * k * eps if self.solver == "gram" else eps)

    def _direction(self, units: Tensor, present: Tensor, rtol: float) -> Tensor:
        """The unit direction ``g_u`` (zero vector where there is none) from the unit rows:
        ``u_0`` (K = 1), the closed form (K = 2), else the QR solution."""
        k, p = units.shape
        if k == 1:
            return units[0]
        if k == 2 and self.closed_form:
            s = units[0] + units[1]
            d = units[0] - units[1]
            s_norm = torch.linalg.vector_norm(s)
            usable = (s_norm > 0) & (s_norm > rtol * torch.linalg.vector_norm(d))
            return torch.where(usable, s / torch.where(s_norm > 0, s_norm, torch.ones_like(s_norm)), torch.zeros_like(s))
        x, x_norm, c_norm = self._qr_solution(units, present, rtol)
        usable = (c_norm > rtol * torch.linalg.vector_norm(present)) & (x_norm > 0)
        return torch.where(usable, x / torch.where(x_norm > 0, x_norm, torch.ones_like(x_norm)), torch.zeros_like(x))

    @staticmethod
    def _qr_solution(units: Tensor, b: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(x = U^+ b, ||x||, ||projection of b||)`` from ``U^T = Q R`` and an SVD of ``R``."""
        # U^T = Q R, R^T = A diag(S) B^H  =>  U = A diag(S) (Q B)^T, x = U^+ b = Q B diag(S)^+ A^T b.
        # The right-hand side b is 1 for the present terms and 0 for zero rows: the same
        # solution in exact arithmetic (a zero row cannot be fitted and does not move x), but an
        # unfittable 1 would leak into x through rounding, amplified by the condition number squared.
        q, r = torch.linalg.qr(units.mT)                       # (P, m), (m, K), m = min(P, K)
        a, sv, bh = torch.linalg.svd(r.mT, full_matrices=False)  # (K, m), (m,), (m, m)
        keep = sv > rtol * sv.amax()
        c = torch.where(keep, a.mT @ b, torch.zeros_like(sv))
        y = bh.mT @ (c / torch.where(keep, sv, torch.ones_like(sv)))
        return q @ y, torch.linalg.vector_norm(y), torch.linalg.vector_norm(c)  # ||Q y|| = ||y||

    @staticmethod
    def _gram_coefficients(gram: Tensor, b: Tensor, rtol: float) -> Tensor:
        """The coefficients ``a`` of the unit direction on the unit rows, ``g_u = U^T a`` (zero where
        there is none), from their Gramian ``U U^T = V diag(S^2) V^T``: ``x = U^T V diag(S^-2) V^T b``,
        ``||x||^2 = y^T diag(S^2) y``, ``a = V y / ||x||``. The SVD of the symmetric PSD Gramian is its
        eigendecomposition (a rounding-negative eigenvalue comes out as its tiny absolute value,
        below the threshold)."""
        v, s2, _ = torch.linalg.svd(gram)
        keep = s2 > rtol * rtol * s2[0]
        c = torch.where(keep, v.mT @ b, 0.0)
        y = c / torch.where(keep, s2, 1.0)
        x_norm = (c * y).sum().sqrt()
        usable = (torch.linalg.vector_norm(c) > rtol * torch.linalg.vector_norm(b)) & (x_norm > 0)
        return torch.where(usable, (v @ y) / torch.where(x_norm > 0, x_norm, 1.0), 0.0)

    def _combine(self, grads: Tensor, *, direction: bool = False) -> Tensor:
        """The update ``g`` (``direction``: the unit direction ``g_u``), in the compute dtype."""
        dtype = compute_dtype(grads, self.double)
        k, p = grads.shape
        if k == 0 or p == 0:
            return grads.new_zeros(p, dtype=dtype)
        rtol = self._rtol(dtype, k)
        if self.solver == "gram" and (k > 2 or not self.closed_form):
            return self._gram_combine(grads, dtype, rtol, direction)
        units, norms, ok = unit_rows(grads, dtype)
        units.masked_fill_(~ok[:, None], 0.0)  # keep QR/SVD finite; the result becomes NaN below
        norms = torch.where(ok, norms, torch.zeros_like(norms))
        unit = self._direction(units, (norms > 0).to(dtype), rtol)
        if direction:
            return torch.where(ok.all(), unit, math.nan)
        return torch.where(ok.all(), _length(norms, units @ unit, rtol, k) * unit, math.nan)

    def _gram_combine(self, grads: Tensor, dtype: torch.dtype, rtol: float, direction: bool) -> Tensor:
        """``solver="gram"``: the solve and the length from the ``K x K`` Gramian of the rows, which
        are read twice (the Gramian, then the combination ``g = sum_i c_i g_i``) and never
        normalised as vectors. Rows whose squares could overflow (float64 in float64) are divided
        by their largest entry first, as :func:`unit_rows` does."""
        if squares_fit(grads.dtype, dtype):
            basis, peak, ok = grads.to(dtype), None, None
        else:
            basis, peak, ok = peak_scaled(grads, dtype)
        gram = basis @ basis.mT
        lengths = gram.diagonal().sqrt()                      # ||basis_i||
        ok = torch.isfinite(lengths) if ok is None else ok & torch.isfinite(lengths)
        norms = torch.where(ok, lengths if peak is None else peak * lengths, 0.0)  # ||g_i||
        inverse = torch.where(norms > 0, 1.0 / lengths, 0.0)  # u_i = inverse_i basis_i
        units_gram = torch.where(ok[:, None] & ok, gram * torch.outer(inverse, inverse), 0.0)
        a = self._gram_coefficients(units_gram, (norms > 0).to(dtype), rtol)
        along = torch.where(ok.all(), a * inverse, math.nan)  # g_u = basis^T along
        if direction:
            return basis.mT @ along
        return basis.mT @ (along * _length(norms, units_gram @ a, rtol, len(norms)))

    def direction(self, grads: Tensor, /) -> Tensor:
        """The unit direction ``g_u`` (the zero vector when there is none), input dtype."""
        check_grads(grads)
        with torch.no_grad():
            return self._combine(grads, direction=True).to(grads.dtype)

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        check_grads(grads)
        with torch.no_grad():
            return self._combine(grads).to(grads.dtype)


def _length(norms: Tensor, cosines: Tensor, rtol: float, k: int) -> Tensor:
    """``sum_i ||g_i|| cos_i``, the length of the update along ``g_u``. Where a solution exists
    every cos_i is ``1/||x|| >= rtol / sqrt(K)``; cosines below ``rtol / (2 sqrt(K))`` are rounding
    residue of a zero (e.g. a term of an opposite pair) and count as zero, so that a large
    gradient orthogonal to ``g_u`` up to rounding cannot flip the sign of a small gradient's share."""
    return (norms * torch.where(cosines.abs() > rtol / (2.0 * math.sqrt(k)), cosines, 0.0)).sum()
