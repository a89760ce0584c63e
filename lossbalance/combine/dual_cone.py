"""DCGD: dual cone gradient descent for the PDE group against the boundary group (Hwang & Lim 2024)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ..validation import warn_user
from .base import Combiner, check_grads, register
from .conflict_free import ConFIG
from .numerics import compute_dtype, unit_rows

__all__ = ["DCGD"]

Groups = Sequence[int | str] | Sequence[Sequence[int | str]] | None


@register
class DCGD(Combiner):
    r"""Dual cone gradient descent: an update in the dual cone of the two group gradients.

    Hwang, Lim et al., "Dual Cone Gradient Descent for Training Physics-Informed Neural
    Networks", NeurIPS 2024 (arXiv 2409.18426), Section 4 and the authors' ``dcgd.py``. The rows
    are split into the PDE (residual) group and the boundary group; ``g_r`` and ``g_b`` are the
    sums of their (weighted) rows, ``g = g_r + g_b`` the total gradient, and the dual cone is
    ``K* = {x : x . g_r >= 0 and x . g_b >= 0}``. With ``g_r^perp = g_r - (g_r . g_b / ||g_b||^2) g_b``
    (the projection of ``g`` onto the hyperplane orthogonal to ``g_b``) and
    ``g_b^perp = g_b - (g_r . g_b / ||g_r||^2) g_r``, the three variants of the paper::

        DCGD (Projection), "proj":  g_r^perp  if g . g_b < 0,  g_b^perp  if g . g_r < 0,  else g
        DCGD (Average),    "avg":   (g_r^perp + g_b^perp) / 2   if g is outside K*,   else g
        DCGD (Center),     "center" (default):  (g . c / ||c||^2) c,   c = g_r/||g_r|| + g_b/||g_b||

    "proj" is the Euclidean projection of ``g`` onto ``K*`` (at most one of ``g . g_r``,
    ``g . g_b`` is negative, since they sum to ``||g||^2``); "avg" averages the projections of
    ``g`` onto the two faces of the cone; "center" takes the bisector of the two unit vectors, the
    centre of ``K*`` in the plane of ``g_r, g_b``, with the length of ``g``'s component along it.
    Every variant lies in ``K*`` (tested): "center" is always applied, also without a conflict,
    and equals :class:`ConFIG` of the two group gradients, ``(||g_r|| + ||g_b||) / 2 (u_r + u_b)``
    (it is computed by ConFIG's closed form, so a zero group gradient gives the other one and an
    exactly opposite pair gives zero). Without a conflict "proj" and "avg" give the plain sum.

    Groups (``groups=``): a combiner sees only the ``(K, P)`` matrix, whose rows are the present
    terms in the balancer's canonical order (the declaration order, ``terms=``). ``groups`` is

    - ``None`` (default): row 0 is the PDE group, all other rows the boundary group; in a
      balancer, the first term of the first step (its first key, unless ``terms=`` declares the
      order) becomes the PDE group by name from then on, with a warning, as LRA's default
      reference (a dict in another order gave another result);
    - a list of row indices or term names: the PDE group; the other rows form the boundary group;
    - a pair of such lists: the PDE group and the boundary group; every row must be in one.

    Term names: in a balancer (``combine=DCGD(groups=["pde"])``) the balancer passes the names of
    the rows, so names follow the terms whatever their order, optional terms absent included.
    Called on a bare matrix, names need ``terms=``, the names of its rows in order. Given to a
    balancer too, ``terms=`` must be its rows' names in its order (else ``ValueError`` naming
    both). More than two groups, an empty group, a row in both groups or in neither, an index
    out of range, an unknown or repeated name raise ``ValueError`` naming the groups.

    ``double``: compute in float64 (default) and return the input dtype.
    """

    name = "dcgd"
    takes_names = True

    def __init__(self, *, variant: Literal["center", "avg", "proj"] = "center", groups: Groups = None,
                 terms: Sequence[str] | None = None, double: bool = True):
        if variant not in ("center", "avg", "proj"):
            raise ValueError(f"variant must be 'center', 'avg' or 'proj' (the paper's DCGD (Center), (Average), "
                             f"(Projection)), got {variant!r}")
        self.variant = variant
        self.terms = None if terms is None else [str(t) for t in terms]
        if self.terms is not None and len(set(self.terms)) < len(self.terms):
            raise ValueError(f"DCGD(terms=...) names a term twice: {self.terms}")
        self.groups = _split(groups)
        for group in self.groups:
            for member in group:
                if isinstance(member, str) and self.terms is not None and member not in self.terms:
                    raise ValueError(f"DCGD group member {member!r} is not a known term name (terms: {self.terms}); "
                                     f"groups: {self._describe()}")
        self.double = bool(double)
        self._default = groups is None

    def declare_terms(self, names: Sequence[str]) -> None:
        """The balancer's declared terms (``terms=``), in order: the default PDE group is the first."""
        if self._default and names:
            self._pin_default(names)

    def _pin_default(self, names: Sequence[str]) -> None:
        """No ``groups=``: the first term named becomes the PDE group, by name, with a warning."""
        self.groups, self._default = ([names[0]],), False
        warn_user(f"DCGD: no groups given, using the first term {names[0]!r} as the PDE group and the others "
                  f"({list(names[1:])}) as the boundary group; pass DCGD(groups=[{names[0]!r}]) to make it explicit")

    def options(self) -> dict[str, Any]:
        groups = list(self.groups[0]) if len(self.groups) == 1 else [list(g) for g in self.groups]
        return {"variant": self.variant, "groups": groups, "terms": self.terms, "double": self.double}

    def _describe(self) -> str:
        names = ["PDE", "boundary"]
        parts = [f"{names[i]}={list(g)}" for i, g in enumerate(self.groups)]
        return ", ".join(parts) + ("" if len(self.groups) == 2 else ", boundary=the other rows")

    def rows(self, k: int, names: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
        """The row indices of the PDE group and of the boundary group for a matrix of ``k`` rows
        (``names``: the rows' term names, as the balancer passes them)."""
        names = self._row_names(k, names)
        if self._default and names:
            self._pin_default(names)
        pde = sorted({self._index(member, k, names) for member in self.groups[0]})
        if len(self.groups) == 2:
            boundary = sorted({self._index(member, k, names) for member in self.groups[1]})
        else:
            boundary = [i for i in range(k) if i not in pde]
        self._check_partition(k, pde, boundary)
        return pde, boundary

    def _check_partition(self, k: int, pde: list[int], boundary: list[int]) -> None:
        """Two non-empty groups, every one of the ``k`` rows in exactly one (else ``ValueError``)."""
        both = sorted(set(pde) & set(boundary))
        neither = sorted(set(range(k)) - set(pde) - set(boundary))
        if not pde or not boundary or both or neither:
            problem = ("an empty group" if not pde or not boundary else
                       f"rows {both} in both groups" if both else f"rows {neither} in neither group")
            raise ValueError(f"DCGD needs a non-empty PDE group and a non-empty boundary group, each row in exactly "
                             f"one; got {problem} for {k} rows (PDE rows {pde}, boundary rows {boundary}); "
                             f"groups: {self._describe()}")

    def _row_names(self, k: int, names: Sequence[str] | None) -> list[str] | None:
        """The names of the rows: the balancer's, checked against ``terms=`` when both are given."""
        if names is not None:
            names = list(names)
            if self.terms is not None and self.terms != names:
                raise ValueError(f"DCGD(terms={self.terms}) does not match the balancer's rows {names} (its terms, in "
                                 f"its order): drop terms= (the balancer passes the names) or give them in that order; "
                                 f"groups: {self._describe()}")
            return names
        if self.terms is not None and k != len(self.terms):
            raise ValueError(f"DCGD got {k} rows but terms= names {len(self.terms)} ({self.terms}): the rows must be "
                             f"the terms in this order; groups: {self._describe()}")
        return self.terms

    def _index(self, member: int | str, k: int, names: list[str] | None) -> int:
        if isinstance(member, str) and (names is None or member not in names):
            where = "no terms= given" if names is None else f"the rows are {names}"
            raise ValueError(f"DCGD group member {member!r} is not among the terms ({where}); groups: {self._describe()}")
        i = names.index(member) if isinstance(member, str) else member
        if not 0 <= i < k:
            raise ValueError(f"DCGD group row {member!r} is out of range for {k} rows; groups: {self._describe()}")
        return i

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None,
                 names: Sequence[str] | None = None) -> Tensor:
        check_grads(grads)
        with torch.no_grad():
            pde, boundary = self.rows(grads.shape[0], names)
            dtype = compute_dtype(grads, self.double)
            pair = torch.stack([grads[pde].to(dtype).sum(0), grads[boundary].to(dtype).sum(0)])
            if self.variant == "center":
                return ConFIG(closed_form=True, double=self.double)(pair).to(grads.dtype)
            return _dual_cone_step(pair, self.variant).to(grads.dtype)


def _split(groups: Groups) -> tuple[list[int | str], ...]:
    """``groups`` as a tuple of one (PDE) or two (PDE, boundary) lists of members."""
    if groups is None:
        return ([0],)
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of row indices or term names, or a pair of such lists; got {groups!r}")
    if all(isinstance(m, (int, str)) and not isinstance(m, bool) for m in groups):
        return (list(groups),)
    if all(isinstance(g, Sequence) and not isinstance(g, (str, bytes)) for g in groups):
        if len(groups) != 2:
            raise ValueError(f"DCGD balances two groups (PDE and boundary), got {len(groups)} groups: {list(groups)}")
        return tuple(_split(g)[0] for g in groups)
    raise TypeError(f"groups must be a list of row indices or term names, or a pair of such lists; got {groups!r}")


def _dual_cone_step(pair: Tensor, variant: str) -> Tensor:
    """"proj" or "avg" for the rows ``(g_r, g_b)`` of ``pair``, in the unit-vector form
    ``g_r^perp = ||g_r|| (u_r - c u_b)``, ``g_b^perp = ||g_b|| (u_b - c u_r)`` (``c = u_r . u_b``),
    so that no square of an entry can overflow or underflow."""
    units, norms, _ = unit_rows(pair, pair.dtype)
    (u_r, u_b), (n_r, n_b) = units, norms
    c = u_r @ u_b
    # g . g_b = n_b (n_r c + n_b),  g . g_r = n_r (n_r + n_b c): the signs, without the products
    out_b, out_r = bool(n_r * c + n_b < 0), bool(n_r + n_b * c < 0)
    perp_r, perp_b = n_r * (u_r - c * u_b), n_b * (u_b - c * u_r)
    if not (out_b or out_r):
        return pair.sum(0)
    if variant == "avg":
        return (perp_r + perp_b) / 2
    return perp_r if out_b else perp_b
