"""The numerics the combiners share: the compute dtype, overflow-safe unit rows, the
trace-normalised Gramian of UPGrad and MGDA, and their small non-negative quadratic program."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["compute_dtype", "unit_rows", "normalized_gramian", "nonnegative_qp"]


def compute_dtype(grads: Tensor, double: bool) -> torch.dtype:
    """float64 when ``double`` (float32 on devices without float64, such as MPS), else the input's
    dtype promoted to at least float32."""
    if double and grads.device.type != "mps":
        return torch.float64
    return torch.promote_types(grads.dtype, torch.float32)


def _squares_fit(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether squares (and sums of up to 2**31 squares) of any finite ``source`` number are
    finite and non-zero in ``target``: e.g. float32 in float64, not float64 in float64."""
    s, t = torch.finfo(source), torch.finfo(target)
    return 2.0 * math.log2(s.max) + 31.0 < math.log2(t.max) and 2.0 * math.log2(s.smallest_normal * s.eps) > math.log2(t.smallest_normal)


def unit_rows(grads: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Unit rows ``g_i / ||g_i||`` in ``dtype`` (zero rows stay zero), the norms, finite flags.

    Where squares of the input dtype can underflow or overflow in ``dtype`` (float64 input, or
    float32 computed in float32), each row is divided by its largest absolute entry first.
    Rows with a non-finite entry get a non-finite norm and unit row, and ``ok = False``.
    """
    k, p = grads.shape
    if p == 0:
        return grads.new_zeros((k, 0), dtype=dtype), grads.new_zeros(k, dtype=dtype), grads.new_ones(k, dtype=torch.bool)
    if _squares_fit(grads.dtype, dtype):
        units = grads.to(dtype, copy=True)
        norms = torch.linalg.vector_norm(units, dim=1)
        units.div_(torch.where(norms > 0, norms, torch.ones_like(norms))[:, None])
        return units, norms, torch.isfinite(norms)
    peak = grads.abs().amax(dim=1).to(dtype)
    ok = torch.isfinite(peak)
    one = torch.ones_like(peak)
    units = grads.to(dtype, copy=True)
    units.div_(torch.where(ok & (peak > 0), peak, one)[:, None])
    scaled_norm = torch.linalg.vector_norm(units, dim=1)
    units.div_(torch.where(scaled_norm > 0, scaled_norm, one)[:, None])
    return units, peak * scaled_norm, ok


def normalized_gramian(grads: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(basis, factors, gram, trace)`` with ``g_i = factors_i * basis_i``, ``gram = G / tr(G)``
    for the Gramian ``G = J J^T`` of the rows (``dtype``), and ``trace = tr(G)`` as a Python float.

    Where squares of the input dtype fit in ``dtype`` (float32 input in float64) the basis is the
    input itself and the factors are 1; otherwise the basis is the unit rows of
    :func:`unit_rows` and the factors their norms, and the Gramian is formed from the unit rows
    with the norms divided by the largest one, so that rows from ``1e-200`` to ``1e200`` in float64
    neither overflow nor lose each other. ``trace`` may then be ``inf`` (it only decides whether
    ``G`` counts as zero). A non-finite input row gives a non-finite ``gram``; a zero matrix gives
    ``gram = 0`` and ``trace = 0.0``.
    """
    if _squares_fit(grads.dtype, dtype):
        basis = grads.to(dtype)
        factors = basis.new_ones(grads.shape[0])
        gram = basis @ basis.mT
        trace = float(gram.diagonal().sum())
        return basis, factors, gram / (trace if trace > 0 else 1.0), trace
    basis, factors, ok = unit_rows(grads, dtype)
    top = float(factors.amax()) if factors.numel() else 0.0
    relative = factors / (top if 0 < top < math.inf else 1.0)
    gram = relative[:, None] * (basis @ basis.mT) * relative[None, :]
    scaled_trace = float(gram.diagonal().sum())
    gram = gram / (scaled_trace if scaled_trace > 0 else 1.0)
    if not bool(ok.all()):
        gram = torch.full_like(gram, math.nan)
    return basis, factors, gram, top * top * scaled_trace


def nonnegative_qp(a: Tensor, b: Tensor) -> Tensor:
    r"""For each row ``b_n`` of ``b`` (N, K): the ``x >= 0`` minimising ``x^T a x + 2 b_n^T x``.

    ``a`` is a symmetric positive definite K x K matrix; all N problems are solved at once by a
    primal active-set method (Lawson & Hanson, "Solving Least Squares Problems", 1974, Ch. 23,
    with block additions). ``x`` stays feasible throughout; F is the set of free entries
    (the others are 0). Starting from ``x = 0``, every step takes the minimiser ``z`` of the
    quadratic on F (``a_FF z_F = -b_F``, 0 elsewhere):

    - if ``z`` is positive on F, ``x = z``, and **every** entry outside F whose negative gradient
      ``w_j = -(a x + b)_j`` exceeds the relative tolerance ``1e-12 (|a| |x| + |b|)_j`` joins F;
    - otherwise ``x`` moves towards ``z`` until the first free entry with ``z_j <= 0`` reaches 0,
      and the free entries that reached 0 with ``z_j <= 0`` leave F.

    Each step lowers the objective or shrinks F, and a problem ends when its ``z`` is feasible and
    no entry can join: the KKT conditions ``x >= 0``, ``w <= tol``, ``w_F = 0`` hold, so ``x`` is
    the exact minimiser (to rounding). Gramians of gradients typically need one to three steps,
    whatever K; every problem stops after ``3 K + 10`` steps at the latest with a feasible ``x``.
    """
    n, k = b.shape
    eye = torch.eye(k, dtype=a.dtype, device=a.device)
    abs_a, abs_b = a.abs(), b.abs()
    x = torch.zeros_like(b)
    free = -b > 1e-12 * abs_b
    rows = torch.arange(n, device=b.device)
    for _ in range(3 * k + 10):
        z = torch.linalg.solve(torch.where(free[:, :, None] & free[:, None, :], a, eye), torch.where(free, -b, 0.0))
        blocked = free & (z <= 0)
        back = blocked.any(1)
        if bool(back.any()):
            gap = torch.where(blocked, x - z, 1.0).clamp_min(torch.finfo(x.dtype).tiny)  # z <= 0 <= x
            step, first = torch.where(blocked, x / gap, math.inf).min(1)
            z = x + torch.where(back, step.clamp(0.0, 1.0), 1.0)[:, None] * (z - x)
            hit = blocked & (z <= 0)
            hit[rows, first] |= back
            z = torch.where(hit, 0.0, z)
            free = free & ~hit
        x = z
        w = -(x @ a + b)
        grow = ~free & ~back[:, None] & (w > 1e-12 * (x.abs() @ abs_a + abs_b))
        free = free | grow
        if not bool((back | grow.any(1)).any()):
            break
    return x
