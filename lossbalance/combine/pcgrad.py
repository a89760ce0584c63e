"""PCGrad: projecting conflicting gradients (Yu et al. 2020)."""
from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
from torch import Tensor

from .base import Combiner, check_grads, register
from .numerics import compute_dtype, unit_rows

__all__ = ["PCGrad"]


@register
class PCGrad(Combiner):
    r"""Projecting conflicting gradients ("gradient surgery").

    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (arXiv 2001.06782), Algorithm 1. For every term i, starting from
    ``g_i^PC = g_i`` and visiting the *other* terms j in random order::

        if g_i^PC . g_j < 0:   g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j

    always projecting onto the **original** ``g_j`` (not its projected version), and the update
    is the **sum** ``sum_i g_i^PC`` (:meth:`project` returns the projected rows themselves).
    With two terms the projected pair never conflicts: ``g_1^PC . g_2^PC =
    -(g_1 . g_2) (1 - cos^2) >= 0``; with three or more no such guarantee exists, and the result
    depends on the order. Without any conflict PCGrad is the plain sum. The projection is
    computed as ``g_i^PC - min(g_i^PC . u_j, 0) u_j`` with ``u_j = g_j / ||g_j||`` (the same
    number), so a zero ``g_j`` is skipped instead of producing ``0 / 0``, and tiny or huge
    gradients do not underflow or overflow ``||g_j||^2``. The algorithm runs in coefficient
    space (``g_i^PC = sum_k C[i, k] u_k``, inner products from the K x K cosine matrix
    ``U U^T``, as torchjd does): two passes over the ``(K, P)`` gradients instead of ``K^2``,
    and one host transfer of the K x K matrix per call.

    Options:

    ``order``
        ``"random"`` (default, the paper): a fresh order of the other terms for every i: the
        combiner draws ``torch.randperm(K, generator=generator)`` once per term i, in term order,
        and visits that permutation skipping i. ``"shared"``: one permutation drawn once per call
        and used for every i. ``"fixed"``: j = 0..K-1 (skipping i), no randomness, as in
        conflictfree. The random orders need the ``generator`` argument (the balancer passes its
        own; the global random state is never used, and a missing generator raises ``ValueError``
        even when K < 2, so a wiring mistake shows at once); ``"fixed"`` ignores it. Nothing is
        drawn when K < 2.
    ``double``
        Compute in float64 (default) and return the input dtype.

    Where public implementations differ (read from their source):

    - Authors' TensorFlow code (tianheyu927/PCGrad): calls ``tf.random.shuffle`` without using
      its result, so the order is in effect fixed, and visits j = i as well; a zero ``g_j`` gives
      ``0 / 0``. Sum of the projected gradients.
    - conflictfree ``PCGradOperator``: fixed order j = 0..K-1 skipping i; sum (``order="fixed"``).
    - torchjd ``PCGrad``: a fresh ``torch.randperm`` per i from the *global* generator; sum.
    - LibMTL ``PCGrad``: a fresh ``random.shuffle`` per i from Python's *global* generator, j = i
      included; sum. The denominator depends on the version: the 1.1.5 release on PyPI (files of
      December 2021) divides by ``||g_j||^2`` alone; the repository since commit b1f2a6f
      (2023-05-31, "fix zerodivisionerror"; its version string still says 1.1.5) by
      ``||g_j||^2 + 1e-8``, which shrinks the projection, and leaves conflicts in place, when
      ``||g_j||^2`` is not much larger than 1e-8.

    Runs of the last two cannot be reproduced from the training seed alone; here they can.
    """

    name = "pcgrad"
    needs_generator = True

    def __init__(self, *, order: Literal["random", "shared", "fixed"] = "random", double: bool = True):
        if order not in ("random", "shared", "fixed"):
            raise ValueError(f"order must be 'random', 'shared' or 'fixed', got {order!r}")
        self.order = order
        self.double = bool(double)

    def options(self) -> dict[str, Any]:
        return {"order": self.order, "double": self.double}

    def _orders(self, k: int, generator: torch.Generator | None) -> list[list[int]]:
        """For every term i, the other terms in the order i visits them."""
        if self.order == "fixed":
            return [_others(range(k), i) for i in range(k)]
        self._require(generator)
        if k < 2:
            return [[] for _ in range(k)]
        if self.order == "shared":
            perm = _permutation(k, generator)
            return [_others(perm, i) for i in range(k)]
        return [_others(_permutation(k, generator), i) for i in range(k)]  # one draw per i, in term order

    def _require(self, generator: torch.Generator | None) -> None:
        """Raise ``ValueError`` without a generator (the random orders draw from it)."""
        if generator is None:
            raise ValueError(
                f"PCGrad(order={self.order!r}) draws its order from a torch.Generator: pass "
                "generator= (LossBalancer passes its own), or use order='fixed'"
            )

    def _coefficients(self, grads: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(C, U)`` with ``g_i^PC = sum_k C[i, k] u_k``: the algorithm in coefficient space."""
        k = grads.shape[0]
        orders = self._orders(k, generator)
        units, norms, _ = unit_rows(grads, compute_dtype(grads, self.double))
        # one host transfer of the K x K cosines and the norms; the loop runs on Python floats
        table = torch.cat([units @ units.mT, norms[:, None]], dim=1).tolist()
        coefficients = [_projected_row(table, i, orders[i]) for i in range(k)]
        return torch.tensor(coefficients, dtype=units.dtype).reshape(k, k).to(units.device), units

    def project(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        """The projected gradients ``g_i^PC`` as a ``(K, P)`` matrix (input dtype)."""
        check_grads(grads)
        with torch.no_grad():
            coefficients, units = self._coefficients(grads, generator)
            return (coefficients @ units).to(grads.dtype)

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        check_grads(grads)
        with torch.no_grad():
            coefficients, units = self._coefficients(grads, generator)
            return (coefficients.sum(0) @ units).to(grads.dtype)


def _others(order: Iterable[int], i: int) -> list[int]:
    """``order`` without term ``i``."""
    return [j for j in order if j != i]


def _permutation(k: int, generator: torch.Generator) -> list[int]:
    """``torch.randperm(k)`` drawn from ``generator`` (on its device), as a list."""
    return torch.randperm(k, generator=generator, device=generator.device).tolist()


def _projected_row(table: list[list[float]], i: int, order: list[int]) -> list[float]:
    """The coefficients of ``g_i^PC`` over the unit rows, from ``table`` (the K x K cosines
    ``u_m . u_j`` with the norms as column K), projecting away from each conflicting ``u_j`` of
    ``order`` in turn."""
    k = len(table)
    row = [0.0] * k
    row[i] = table[i][k]  # g_i = ||g_i|| u_i
    for j in order:
        dot = sum(row[m] * table[m][j] for m in range(k) if row[m] != 0.0)  # g_i^PC . u_j
        if dot < 0.0:
            row[j] -= dot  # g_i^PC - (g_i^PC . u_j) u_j
    return row
