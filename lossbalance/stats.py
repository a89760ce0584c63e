"""``GradStats``: the read-only record of per-term gradient statistics that strategies see.

The engine (:mod:`lossbalance.gradients`) fills it; strategies reduce it (mean |g|, max |g|,
||g|| over a term's scope or the shared tensors, cosines, conflicts) and never see the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

__all__ = ["GradStats", "Selection", "Over"]

Selection = Literal["all", "matrices"]
Over = Literal["scope", "shared"]


@dataclass(frozen=True)
class GradStats:
    """Per-term, per-tensor gradient statistics of one step (K terms, T parameter tensors).

    ``sum_abs``, ``max_abs``, ``sum_sq`` are ``(K, T)`` tables of ``sum |g|``, ``max |g|`` and
    ``sum g^2`` over each parameter tensor (in float64 for float32 parameters); ``numel`` (T,) counts its entries; ``matrix`` (T,)
    marks the weight matrices (``ndim >= 2``); ``scope`` (K, T) marks what each term may train.
    ``gradients`` is the ``(K, P)`` matrix of flat per-term gradients in ``"keep"`` mode without a
    probe (``None`` otherwise; it lives in the engine's buffer, valid until the next gradient
    step), in units of ``scale`` (a ``GradScaler``'s factor, 1 otherwise). The reductions below take a term's statistics over its scope
    (``over="scope"``, default) or over the tensors every term may train (``over="shared"``).
    """

    sum_abs: Tensor
    max_abs: Tensor
    sum_sq: Tensor
    numel: Tensor
    matrix: Tensor
    scope: Tensor
    gradients: Tensor | None = None
    scale: Tensor | float = 1.0

    def selection(self, tensors: Selection = "all", over: Over = "scope") -> Tensor:
        """(K, T) bool mask of the tensors each term's statistics run over."""
        mask = self.scope if over == "scope" else self.scope.all(0, keepdim=True).expand_as(self.scope)
        if tensors == "matrices":
            mask = mask & self.matrix
        elif tensors != "all":
            raise ValueError(f"tensors must be 'all' or 'matrices', got {tensors!r}")
        return mask

    def mean_abs(self, tensors: Selection = "all", *, layerwise: bool = False, over: Over = "scope") -> Tensor:
        """(K,) mean |g|: over all selected entries, or (``layerwise``) the mean of per-tensor means."""
        mask = self.selection(tensors, over)
        zero = self.sum_abs.new_zeros(())
        if layerwise:
            per_tensor = torch.where(mask, self.sum_abs / self.numel, zero)
            return per_tensor.sum(1) / mask.sum(1)
        return torch.where(mask, self.sum_abs, zero).sum(1) / torch.where(mask, self.numel, zero).sum(1)

    def max_abs_over(self, tensors: Selection = "all", *, over: Over = "scope") -> Tensor:
        """(K,) max |g| over the selected tensors."""
        mask = self.selection(tensors, over)
        return torch.where(mask, self.max_abs, self.max_abs.new_zeros(())).amax(1)

    def norm(self, tensors: Selection = "all", *, over: Over = "scope") -> Tensor:
        """(K,) Euclidean norm ||g|| over the selected tensors."""
        mask = self.selection(tensors, over)
        return torch.where(mask, self.sum_sq, self.sum_sq.new_zeros(())).sum(1).sqrt()

    def unscaled(self, scale: Tensor) -> "GradStats":
        """The statistics of gradients that were computed from losses multiplied by ``scale``
        (``GradScaler``); ``gradients`` stays scaled (combiners are scale-equivariant)."""
        square = scale.to(self.sum_sq.dtype).square()
        return replace(
            self, sum_abs=self.sum_abs / scale, max_abs=self.max_abs / scale, sum_sq=self.sum_sq / square, scale=scale
        )

    @cached_property
    def gram(self) -> Tensor:
        """(K, K) Gram matrix ``g_i . g_j`` of the kept gradients, computed on first use (float64)."""
        if self.gradients is None:
            raise RuntimeError("cosine similarities and conflicts need memory='keep' and no probe")
        wide = self.gradients.to(self.sum_sq.dtype)
        return (wide @ wide.T) / torch.as_tensor(self.scale, dtype=wide.dtype, device=wide.device).square()

    def cosine(self) -> Tensor:
        """(K, K) cosine similarity of the per-term gradients (needs the kept gradients).

        A zero gradient has cosine 0 with every other term (and 1 with itself).
        """
        norms = self.gram.diagonal().sqrt()
        cosine = self.gram / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(self.gram.dtype).tiny)
        return cosine.fill_diagonal_(1.0)

    def conflict_fraction(self) -> Tensor:
        """Fraction of the K(K-1)/2 term pairs whose gradients conflict (``g_i . g_j < 0``)."""
        k = self.gram.shape[0]
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=self.gram.device), 1)
        return (self.gram[upper] < 0).sum() / max(k * (k - 1) // 2, 1)
