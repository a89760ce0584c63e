"""The numerics the combiners share: the compute dtype, overflow-safe unit rows, the
trace-normalised Gramian of UPGrad and MGDA (one matmul in the input dtype, rescaled only where
it overflows or underflows), and their small non-negative quadratic program."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["compute_dtype", "nonnegative_qp", "normalized_gramian", "peak_scaled", "ridged", "squares_fit", "unit_rows"]


def compute_dtype(grads: Tensor, double: bool) -> torch.dtype:
    """float64 when ``double`` (float32 on devices without float64, such as MPS), else the input's
    dtype promoted to at least float32."""
    if double and grads.device.type != "mps":
        return torch.float64
    return torch.promote_types(grads.dtype, torch.float32)


def squares_fit(source: torch.dtype, target: torch.dtype) -> bool:
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
    if squares_fit(grads.dtype, dtype):
        units = grads.to(dtype, copy=True)
        norms = torch.linalg.vector_norm(units, dim=1)
        units.div_(torch.where(norms > 0, norms, torch.ones_like(norms))[:, None])
        return units, norms, torch.isfinite(norms)
    units, peak, ok = peak_scaled(grads, dtype)
    scaled_norm = torch.linalg.vector_norm(units, dim=1)
    units.div_(torch.where(scaled_norm > 0, scaled_norm, 1.0)[:, None])
    return units, peak * scaled_norm, ok


def peak_scaled(grads: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows / peaks, peaks, ok)`` in ``dtype`` (a new tensor): each row divided by its largest
    absolute entry (zero rows as they are), so that its squares neither overflow nor underflow;
    ``ok``: the rows are finite."""
    peak = grads.abs().amax(dim=1).to(dtype)
    ok = torch.isfinite(peak)
    scaled = grads.to(dtype, copy=True)
    scaled.div_(torch.where(ok & (peak > 0), peak, 1.0)[:, None])
    return scaled, peak, ok


def _trace_is_safe(trace: float, dtype: torch.dtype, p: int) -> bool:
    """Whether a Gramian formed in ``dtype`` with this trace neither overflowed (a finite trace
    bounds every partial sum) nor lost more than ``eps * trace`` to products flushed below the
    smallest normal number (at most ``p`` of them per entry)."""
    info = torch.finfo(dtype)
    return math.isfinite(trace) and trace >= info.smallest_normal / info.eps * max(p, 1)


def normalized_gramian(grads: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(basis, factors, gram, trace)`` with ``g_i = factors_i * basis_i``, ``gram = G / tr(G)``
    (float64, on the CPU) for the Gramian ``G = J J^T`` of the rows, and ``trace = tr(G)`` as a
    Python float.

    The Gramian is one matmul ``J J^T`` in ``dtype`` (float32 for float32 input unless
    ``double``: what torchjd does), converted to float64; the basis is the input in ``dtype`` and
    the factors are 1. Only where that product may have overflowed or underflowed (a trace that
    is not finite, or below ``p`` times the smallest normal number over ``eps``; never for
    float32 input in float64) it is formed again from the unit rows of :func:`unit_rows` with the
    norms divided by the largest one, so that rows from ``1e-200`` to ``1e200`` in float64 (or
    ``1e-30`` to ``1e30`` in float32) neither overflow nor lose each other; ``trace`` may then be
    ``inf`` (it only decides whether ``G`` counts as zero). A non-finite input row gives a
    non-finite ``gram``; a zero matrix gives ``gram = 0`` and ``trace = 0.0``.
    """
    basis = grads.to(dtype)
    gram = (basis @ basis.mT).to("cpu", torch.float64)  # K x K: the solvers run on the CPU (MPS has no float64)
    trace = float(gram.diagonal().sum())
    if squares_fit(grads.dtype, dtype) or _trace_is_safe(trace, dtype, grads.shape[1]):
        return basis, basis.new_ones(grads.shape[0]), gram / (trace if trace > 0 else 1.0), trace
    basis, factors, ok = unit_rows(grads, dtype)
    top = float(factors.amax()) if factors.numel() else 0.0
    relative = (factors / (top if 0 < top < math.inf else 1.0)).to("cpu", torch.float64)
    gram = relative[:, None] * (basis @ basis.mT).to("cpu", torch.float64) * relative[None, :]
    scaled_trace = float(gram.diagonal().sum())
    gram = gram / (scaled_trace if scaled_trace > 0 else 1.0)
    if not bool(ok.all()):
        gram = torch.full_like(gram, math.nan)
    return basis, factors, gram, top * top * scaled_trace


def ridged(gram: Tensor, reg_eps: float) -> Tensor:
    """``gram + reg_eps I`` for a normalised float64 ``gram`` (unit trace or unit diagonal),
    positive definite.

    A Gramian formed in float32 can have eigenvalues slightly below zero (rounding of about
    ``eps32`` times ``tr(G)`` per entry, where the rows are nearly dependent), more than a ridge
    such as MGDA's ``1e-12`` makes up for. When a Cholesky factorisation says the sum is not
    positive definite, the ridge is raised to ``reg_eps - lambda_min(gram)``: the smallest
    eigenvalue becomes ``reg_eps``, which the exact active set of :func:`nonnegative_qp` needs.
    """
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    a = gram + reg_eps * eye
    if int(torch.linalg.cholesky_ex(a).info) == 0:
        return a
    return gram + (reg_eps - float(torch.linalg.eigvalsh(gram)[0])) * eye


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
    k = b.shape[1]
    eye = torch.eye(k, dtype=a.dtype, device=a.device)
    tol_a, tol_b, minus_b = 1e-12 * a.abs(), 1e-12 * b.abs(), -b
    x = torch.zeros_like(b)
    free = minus_b > tol_b
    for _ in range(3 * k + 10):
        z = torch.linalg.solve_ex(torch.where(free[:, :, None] & free[:, None, :], a, eye), torch.where(free, minus_b, 0.0))[0]
        blocked = free & (z <= 0)
        back = bool(blocked.any())  # the one host sync of a step without step-back
        if back:
            z, free, moved = _step_back(x, z, free, blocked)
        x = z
        # w_j > tol_j  <=>  (a x + b)_j + (|a| |x| + |b|)_j 1e-12 < 0, for the entries outside F
        grow = ~free & (torch.addmm(b, x, a) + torch.addmm(tol_b, x.abs(), tol_a) < 0)
        if back:
            grow &= ~moved[:, None]
        elif not bool(grow.any()):
            break
        free = free | grow
    return x


def _step_back(x: Tensor, z: Tensor, free: Tensor, blocked: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The step of :func:`nonnegative_qp` where some free ``z_j <= 0`` (``blocked``): ``x`` moves
    towards ``z`` until the first such entry reaches 0; the blocked entries at 0 leave F. Returns
    the new point, the new free set and which problems moved back."""
    moved = blocked.any(1)
    gap = torch.where(blocked, x - z, 1.0).clamp_min(torch.finfo(x.dtype).tiny)  # z <= 0 <= x
    step, first = torch.where(blocked, x / gap, math.inf).min(1)
    z = x + torch.where(moved, step.clamp(0.0, 1.0), 1.0)[:, None] * (z - x)
    hit = blocked & (z <= 0)
    hit[torch.arange(x.shape[0], device=x.device), first] |= moved
    return torch.where(hit, 0.0, z), free & ~hit, moved
