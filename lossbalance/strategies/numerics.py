"""Guarded softmax and ratio shared by the loss-value strategies (``relobralo``, ``softadapt``, ``dwa``)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["safe_ratio", "safe_softmax"]


def safe_softmax(logits: Tensor, scale: float) -> Tensor:
    """``scale * softmax(logits)`` over the last dimension, finite and strictly positive for any input.

    Shared by the loss-value strategies (``relobralo``, ``softadapt``, ``dwa``). The logits are
    made finite first (NaN -> 0, +-inf and anything beyond ``+-finfo.max / 4`` clamped to that
    bound, so that differences of logits cannot overflow), the maximum is subtracted before
    ``exp`` (the largest term is ``exp(0) = 1``, the sum lies in ``[1, K]``), and the shifted
    logits are floored at ``log(finfo.tiny)``: a weight the exact formula would round to 0 comes
    out as the smallest normal number of the dtype instead (and the result is floored there
    too). For ordinary inputs none of these guards is active and the result is the plain
    softmax.
    """
    info = torch.finfo(logits.dtype)
    bound = info.max / 4
    z = torch.nan_to_num(logits, nan=0.0, posinf=bound, neginf=-bound).clamp(-bound, bound)
    z = (z - z.amax(-1, keepdim=True)).clamp_min(math.log(info.tiny))
    e = z.exp()
    return (e * (scale / e.sum(-1, keepdim=True))).clamp_min(info.tiny)


def safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` with ``0 / 0 = 1`` ("no change"); ``x / 0`` stays ``+-inf``
    (:func:`safe_softmax` turns that into a finite logit)."""
    return torch.nan_to_num(numerator / denominator, nan=1.0, posinf=math.inf, neginf=-math.inf)
