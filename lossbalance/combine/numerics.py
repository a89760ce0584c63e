"""The numerics PCGrad and ConFIG share: the compute dtype and overflow-safe unit rows."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["compute_dtype", "unit_rows"]


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
