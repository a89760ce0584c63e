"""UPGrad: the mean of the rows projected onto the dual cone of all rows (Quinton & Rey 2024)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Combiner, check_grads, register
from .numerics import compute_dtype, nonnegative_qp, normalized_gramian, ridged

__all__ = ["UPGrad"]


@register
class UPGrad(Combiner):
    r"""Unconflicting projection of gradients, natively (no torchjd, no QP library).

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232
    (2024), Eq. 3 and Proposition 1; torchjd's ``UPGrad()``. With ``J`` the ``(K, P)`` matrix
    of the rows ``g_i`` and its Gramian ``G = J J^T``, every row is projected onto the dual cone
    ``{x : g_j . x >= 0 for all j}`` of the rows, and the update is the **mean** of the
    projections (torchjd's default preference vector ``1/K``)::

        pi(g_i) / K = J^T v_i,   v_i = argmin_{v >= e_i / K} v^T A v      (Proposition 1)
        A           = G / tr(G) + reg_eps I      (A = reg_eps I when tr(G) < norm_eps)
        d           = (1/K) sum_i pi(g_i) = J^T sum_i v_i

    ``v_i`` is computed as ``e_i / K + x`` with ``x >= 0`` minimising
    ``x^T A x + 2 (A e_i / K)^T x``, all K problems at once by the exact active-set method of
    :func:`~lossbalance.combine.numerics.nonnegative_qp` in float64 (quadprog's dual method in
    torchjd; both solve the same strictly convex problem exactly, so the two agree to rounding).
    Cost, as torchjd's: the Gramian as one matmul ``J J^T`` in the input dtype, the K x K problem
    in float64 on the CPU, and ``d = (sum_i v_i)^T J`` as one more matmul.
    Without any conflict (all ``g_i . g_j >= 0``) every ``v_i = e_i / K`` and ``d`` is the mean
    of the rows, for any ``reg_eps``. The direction never conflicts with any row in the limit
    ``reg_eps -> 0``; with the regulariser it is the exact projection for the rows extended by
    ``sqrt(reg_eps tr(G))`` times orthonormal extra coordinates, so ``g_j . d`` can be slightly
    negative (relative to ``tr(G)``, about ``reg_eps``) where rows conflict.

    Options (torchjd's ``QuadprogProjector`` defaults):

    ``reg_eps``
        The ridge added to the trace-normalised Gramian (default ``1e-4``, must be positive: it
        makes ``A`` positive definite, which the exact active set needs). It biases cases whose
        rows differ much in norm: a row with ``||g_i||^2 / tr(G)`` near ``reg_eps`` is projected
        as if it were partly orthogonal to the others.
    ``norm_eps``
        Below this **absolute** ``tr(G) = sum_i ||g_i||^2`` (default ``1e-4``) the Gramian counts
        as zero and the update is the plain mean of the rows, as in torchjd. Small gradients
        (late training, small loss weights) fall under it silently: ``norm_eps=0`` keeps the
        projection at every scale (a zero matrix then gives the zero vector).
    ``double``
        Form the Gramian and the update in float64 and return the input dtype (default
        ``False``: in the input dtype, at least float32, as torchjd; float32 sums of ``P = 2e5``
        products move ``d`` by less than ``1e-5 ||J||_F``, tested against float64 references).

    Where the input-dtype Gramian would overflow or underflow (float32 rows near ``1e+-19``, where
    torchjd's squares underflow or overflow), it is formed again from unit rows scaled by their
    norms (:func:`~lossbalance.combine.numerics.normalized_gramian`), and a ridge that rounding
    left short of positive definiteness is raised
    (:func:`~lossbalance.combine.numerics.ridged`).
    """

    name = "upgrad"

    def __init__(self, *, reg_eps: float = 1e-4, norm_eps: float = 1e-4, double: bool = False):
        if not (reg_eps > 0 and math.isfinite(reg_eps)):
            raise ValueError(f"reg_eps must be a positive number (the ridge that makes the QP strictly convex), got {reg_eps}")
        if not norm_eps >= 0:
            raise ValueError(f"norm_eps must be >= 0 (0: never fall back to the mean), got {norm_eps}")
        self.reg_eps = float(reg_eps)
        self.norm_eps = float(norm_eps)
        self.double = bool(double)

    def options(self) -> dict[str, Any]:
        return {"reg_eps": self.reg_eps, "norm_eps": self.norm_eps, "double": self.double}

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        check_grads(grads)
        with torch.no_grad():
            k, p = grads.shape
            dtype = compute_dtype(grads, self.double)
            if k == 0 or p == 0:
                return grads.new_zeros(p)
            basis, factors, gram, trace = normalized_gramian(grads, dtype)
            a = gram.to("cpu", torch.float64)
            if not bool(torch.isfinite(a).all()):
                return grads.new_full((p,), math.nan)
            if trace < self.norm_eps:
                a = torch.zeros_like(a)
            a = ridged(a, self.reg_eps)
            weights = nonnegative_qp(a, a / k).sum(0) + 1.0 / k  # row i of b: (A e_i / K)^T
            return ((weights.to(basis.device, dtype) * factors) @ basis).to(grads.dtype)
