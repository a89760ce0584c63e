"""The gradient engine: per-term gradients from one graph, their statistics, the write-back.

The engine differentiates each loss term separately with ``torch.autograd.grad`` on the one
forward graph (``retain_graph`` for all but the last), never touching ``.grad`` while doing so.
Each term is differentiated with respect to its own *scope* (the parameters it may train), so
gradient flows through the whole graph but only the scope receives it.

Memory modes
    ``"keep"`` (default)
        The K per-term gradients are kept in one flat ``(K, P)`` buffer; the statistics are
        taken from it and the combined gradient ``sum_i w_i g_i`` is written into ``.grad``
        from it: no further backward pass. Extra memory: K x P.
    ``"lean"``
        Each term's gradient is reduced to its statistics at once and dropped; the step then
        runs one backward of the weighted sum. Extra memory: about P, one more backward.

With a ``probe`` (a subset of the parameters, e.g. the last layer), the statistics are taken
on the probe only (in ``"keep"`` mode from the K probe rows, reduced together), and the step is
one backward of the weighted sum.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor

from .validation import FREED_GRAPH_HINT

__all__ = ["GradStats", "GradientEngine", "MEMORY_MODES", "all_finite"]

MEMORY_MODES = ("keep", "lean")
Selection = Literal["all", "matrices"]
Over = Literal["scope", "shared"]


class _Layout:
    """A fixed ordering of parameter tensors in one flat vector: matrices first, then the rest.

    Putting every tensor with ``ndim >= 2`` first makes "weight matrices only" a prefix.
    """

    def __init__(self, params: Sequence[Tensor]):
        order = sorted(range(len(params)), key=lambda j: params[j].dim() < 2)
        self.params: list[Tensor] = [params[j] for j in order]
        self.sizes: list[int] = [p.numel() for p in self.params]
        self.total = sum(self.sizes)
        first = self.params[0]
        self.device, self.dtype = first.device, first.dtype
        self.stat_dtype = torch.promote_types(self.dtype, torch.float64)
        self.numel = torch.tensor(self.sizes, dtype=self.stat_dtype, device=self.device)
        self.matrix = torch.tensor([p.dim() >= 2 for p in self.params], device=self.device)
        self.position = {id(p): j for j, p in enumerate(self.params)}
        self.zeros = self.views(torch.zeros(self.total, dtype=self.dtype, device=self.device))
        self._masks: dict[tuple[frozenset[int] | None, ...], Tensor] = {}
        self._inputs: dict[frozenset[int] | None, list[int]] = {}
        # consecutive tensors of one size (the hidden layers of an MLP, their biases) are reduced
        # together, as a (rows, count, size) block: a few reductions instead of one per tensor
        runs: list[list[int]] = []
        for size in self.sizes:
            if runs and runs[-1][1] == size:
                runs[-1][0] += 1
            else:
                runs.append([1, size])
        self._runs = [(count, size) for count, size in runs]
        self._run_lengths = [count * size for count, size in runs]

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat vector of this layout, shaped like the parameters."""
        return [v.view_as(p) for v, p in zip(flat.split(self.sizes), self.params)]

    def masks(self, scopes: Sequence[frozenset[int] | None]) -> Tensor:
        """(K, T) bool: which tensors of this layout each scope (set of ``id(param)``) covers."""
        key = tuple(scopes)
        if key not in self._masks:
            rows = [[scope is None or id(p) in scope for p in self.params] for scope in scopes]
            self._masks[key] = torch.tensor(rows, dtype=torch.bool, device=self.device)
        return self._masks[key]

    def inputs(self, scope: frozenset[int] | None) -> list[int]:
        """Positions of the tensors a scope covers (all of them without a scope)."""
        if scope not in self._inputs:
            self._inputs[scope] = [j for j, p in enumerate(self.params) if scope is None or id(p) in scope]
        return self._inputs[scope]

    def table(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-tensor sum |g|, max |g| and sum g^2 of the rows of ``flat`` (R, P) -> 3 x (R, T).

        Sums and norms accumulate in float64, so squares and sums of float32 gradients cannot
        overflow; no float64 copy of the gradients is made.
        """
        wide, rows = self.stat_dtype, flat.shape[0]
        blocks = [
            part.view(rows, count, size)
            for part, (count, size) in zip(flat.abs().split(self._run_lengths, dim=1), self._runs)
        ]
        sum_abs = torch.cat([block.sum(2, dtype=wide) for block in blocks], 1)
        max_abs = torch.cat([block.amax(2) for block in blocks], 1).to(wide)
        sum_sq = torch.cat([torch.linalg.vector_norm(block, dim=2, dtype=wide) for block in blocks], 1).square()
        return sum_abs, max_abs, sum_sq


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


class GradientEngine:
    """Per-term gradients of scalar losses that share one graph.

    ``params``: the balanced parameters (one device and dtype). ``memory``: ``"keep"`` or
    ``"lean"`` (see the module docstring). ``probe``: optional subset of ``params`` on which the
    statistics are taken. ``reduce``: an in-place cross-process mean (distributed training); the
    engine packs the loss values with the gradients so that a step needs one collective call.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        memory: str = "keep",
        probe: Iterable[Tensor] | None = None,
        reduce: Callable[[Tensor], None] | None = None,
        grad_mode: Literal["loop", "batched"] = "loop",
    ):
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        if grad_mode not in ("loop", "batched"):
            raise ValueError(f"grad_mode must be 'loop' or 'batched', got {grad_mode!r}")
        self.grad_mode = grad_mode
        kinds = {(p.device, p.dtype) for p in params}
        if len(kinds) > 1:
            found = ", ".join(sorted(f"{d}/{t}" for d, t in kinds))
            raise ValueError(
                f"the balanced parameters must share one device and dtype; found {found}. "
                "Cast them (e.g. model.to(dtype)) or balance each group with its own LossBalancer."
            )
        self.memory = memory
        self.layout = _Layout(params)
        self.params = self.layout.params
        if probe is None:
            self.probe = None
        else:
            probe = list(probe)
            unknown = [p for p in probe if id(p) not in self.layout.position]
            if unknown or not probe:
                raise ValueError("probe must be a non-empty subset of the optimizer's parameters")
            self.probe = _Layout(probe)
        self.reuses = self.probe is None and memory == "keep"
        self.reduce = reduce
        self._extra = 0 if reduce is None else 1  # a column for the loss value, reduced with the gradients
        self._buffer: Tensor | None = None
        self._row_views: list[list[Tensor]] = []
        self._combined = torch.empty(self.layout.total, dtype=self.layout.dtype, device=self.layout.device)
        self._grad_views = self.layout.views(self._combined)
        self._reached: list[bool] = []

    def __repr__(self) -> str:
        probe = "" if self.probe is None else f", probe={len(self.probe.params)} tensors"
        return (
            f"GradientEngine({len(self.params)} tensors, {self.layout.total} parameters, "
            f"{self.layout.dtype}, {self.layout.device}, memory={self.memory!r}, grad_mode={self.grad_mode!r}{probe})"
        )

    @property
    def stats_layout(self) -> _Layout:
        return self.layout if self.probe is None else self.probe

    def _rows(self, k: int) -> Tensor:
        rows = k if self.memory == "keep" else 1
        if self._buffer is None or self._buffer.shape[0] != rows:
            width = self.stats_layout.total + self._extra
            self._buffer = torch.empty(rows, width, dtype=self.layout.dtype, device=self.layout.device)
            self._row_views = [self.stats_layout.views(row[: self.stats_layout.total]) for row in self._buffer]
        return self._buffer

    def _reduce_rows(self, rows: Tensor, values: Tensor) -> Tensor:
        """Reduce ``rows`` (R, P + 1) in place, their last column holding ``values`` (R,)."""
        assert self.reduce is not None
        rows[:, -1] = values.to(rows.dtype)
        self.reduce(rows)
        return rows[:, -1].to(values.dtype)

    def term_gradients(
        self,
        names: Sequence[str],
        losses: Sequence[Tensor],
        scopes: Sequence[frozenset[int] | None],
        values: Tensor,
        order: Sequence[int] | None = None,
    ) -> tuple[GradStats, Tensor]:
        """Differentiate each term w.r.t. its scope; return the gradients' statistics and the
        loss ``values`` (averaged over processes when distributed).

        ``order``: the order in which the terms are differentiated (default: as given). In
        ``"keep"`` mode without probe the last one frees the graph, so the term with the largest
        graph should come last; otherwise the graph is retained for the weighted-sum backward of
        :meth:`backward`. The statistics' rows stay in the given order of the terms.

        Raises ``ValueError`` naming a term that reaches none of the parameters it may train.
        """
        layout = self.stats_layout
        keep_rows = self.memory == "keep"  # K rows: the gradients, or their probe part
        buffer = self._rows(len(losses))
        grads_view = buffer[:, : layout.total]
        tables: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        reduced: dict[int, Tensor] = {}
        reached = [self.reduce is not None] * len(self.layout.params)
        batched = self.grad_mode == "batched" and self.reuses and all(s is None for s in scopes)
        order = list(range(len(losses))) if order is None else list(order)
        if batched and self._batched(losses, grads_view):
            reached = [True] * len(self.layout.params)
            order = []  # done: skip the loop below
        for i in order:
            name, loss, scope = names[i], losses[i], scopes[i]
            positions = layout.inputs(scope)
            parts = list(layout.zeros)
            if positions:
                retain = not (self.reuses and i == order[-1])
                try:
                    grads = torch.autograd.grad(
                        loss, [layout.params[j] for j in positions], retain_graph=retain, allow_unused=True
                    )
                except RuntimeError as error:
                    raise RuntimeError(f"while differentiating term {name!r}: {FREED_GRAPH_HINT}. {error}") from error
                hit = False
                for j, g in zip(positions, grads):
                    if g is not None:
                        parts[j] = g
                        hit = True
                        if self.reuses:
                            reached[j] = True
                if not hit and self.probe is None:
                    where = "any balanced parameter" if scope is None else "any parameter of its scope"
                    raise ValueError(
                        f"loss term {name!r} has no path to {where}: it was built from tensors that do "
                        "not depend on them (detached, or only on inputs)"
                    )
            torch._foreach_copy_(self._row_views[i if keep_rows else 0], parts)  # torch >= 2.1
            if not keep_rows:
                if self.reduce is not None:
                    reduced[i] = self._reduce_rows(buffer, values[i : i + 1])
                tables[i] = layout.table(grads_view)
        if keep_rows:
            if self.reuses:
                self._reached = reached
            if self.reduce is not None:
                values = self._reduce_rows(buffer, values)
            sum_abs, max_abs, sum_sq = layout.table(grads_view)
        else:
            sum_abs, max_abs, sum_sq = (torch.cat(t) for t in zip(*(tables[i] for i in sorted(tables))))
            if reduced:
                values = torch.cat([reduced[i] for i in sorted(reduced)])
        stats = GradStats(
            sum_abs, max_abs, sum_sq, layout.numel, layout.matrix, layout.masks(scopes),
            grads_view if self.reuses else None,
        )
        return stats, values

    def _batched(self, losses: Sequence[Tensor], out: Tensor) -> bool:
        """All K gradients in one ``torch.vmap`` over ``autograd.grad`` (False: vmap failed)."""
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        basis = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)

        def vjp(direction: Tensor) -> tuple[Tensor, ...]:
            return torch.autograd.grad(
                stacked, self.params, grad_outputs=direction, retain_graph=True, materialize_grads=True
            )

        try:
            grads = torch.vmap(vjp)(basis)
        except RuntimeError as error:
            warnings.warn(f"grad_mode='batched' fell back to the loop: torch.vmap failed ({error})", stacklevel=4)
            self.grad_mode = "loop"
            return False
        torch.cat([g.reshape(len(losses), -1) for g in grads], dim=1, out=out)
        return True

    def write_combined(self, weights: Tensor, combined: Tensor | None = None) -> None:
        """``.grad = sum_i w_i g_i`` from the kept gradients (or ``.grad = combined`` when given).

        Parameters that no term reached get ``.grad = None``.
        """
        assert self.reuses and self._buffer is not None
        if combined is None:
            grads = self._buffer[:, : self.layout.total]
            torch.mv(grads.T, weights.to(grads.dtype), out=self._combined)
        else:
            self._combined.copy_(combined)
        for p, view, hit in zip(self.params, self._grad_views, self._reached):
            p.grad = view if hit else None

    def backward(
        self,
        names: Sequence[str],
        losses: Sequence[Tensor],
        weights: Tensor,
        scopes: Sequence[frozenset[int] | None],
        values: Tensor,
        *,
        check_grads: bool = False,
        check_values: bool = False,
    ) -> tuple[Tensor, bool]:
        """One backward per distinct scope of ``sum_i w_i L_i``; ``.grad`` is overwritten.

        The backward is seeded with the weights (``grad_outputs``), so no weighted-sum node enters
        the graph; terms sharing a scope share one backward, so the common case (no scopes) is
        exactly one. ``losses`` are 0-dim. Parameters no term reaches get ``None`` (when
        distributed: zeros, since another process may reach them). Returns ``values``, averaged
        over processes when distributed (in the same collective as the gradients), and whether
        what was checked is finite (``check_grads``: the gradients, ``check_values``: the values;
        one host sync for both). When it is not, ``.grad`` is left as it was.
        """
        groups: dict[frozenset[int] | None, list[int]] = {}
        for i, scope in enumerate(scopes):
            groups.setdefault(scope, []).append(i)
        seeds = weights.unbind()
        total: list[Tensor | None] = [None] * len(self.params)
        for n, (scope, members) in enumerate(groups.items()):
            positions = self.layout.inputs(scope)
            inputs = [self.params[j] for j in positions]
            try:
                grads = torch.autograd.grad(
                    [losses[i] for i in members], inputs, grad_outputs=[seeds[i] for i in members],
                    retain_graph=n < len(groups) - 1, allow_unused=True,
                )
            except RuntimeError as error:
                culprit = _first_failing([names[i] for i in members], [losses[i] for i in members], inputs)
                raise RuntimeError(f"while differentiating term {culprit!r}: {FREED_GRAPH_HINT}. {error}") from error
            for j, g in zip(positions, grads):
                if g is not None:
                    total[j] = g if total[j] is None else total[j] + g
        if self.reduce is None:
            grads = total
        else:
            parts = [(z if g is None else g).reshape(-1) for g, z in zip(total, self.layout.zeros)]
            flat = torch.cat([*parts, values.to(self.layout.dtype)])  # one collective for both
            self.reduce(flat)
            values = flat[self.layout.total :].to(values.dtype)
            grads = [v.view_as(p) for p, v in zip(self.params, flat[: self.layout.total].split(self.layout.sizes))]
        checked = [g for g in grads if g is not None] if check_grads else []
        if check_values:
            checked.append(values)
        if checked and not all_finite(checked):
            return values, False
        for p, g in zip(self.params, grads):
            p.grad = g
        return values, True


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, with one host sync.

    One fused call: the kernel ``GradScaler`` uses (multiplying by 1 in place, which leaves the
    values as they are). Where it cannot run (memory overlap, e.g. an expanded gradient, or no
    kernel for the device) the per-tensor sums are checked instead: NaN and Inf survive a sum;
    a sum that overflows on finite entries is re-checked entry by entry.
    """
    found = torch.zeros(1, dtype=torch.float32, device=tensors[0].device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(list(tensors), found, torch.ones_like(found))
        return not bool(found)
    except (RuntimeError, NotImplementedError):
        pass
    if bool(torch.stack([t.sum() for t in tensors]).sum().isfinite()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _first_failing(names: Sequence[str], losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> str:
    """The first term whose graph cannot be differentiated (to name it in an error message)."""
    for name, loss in zip(names, losses):
        try:
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        except RuntimeError:
            return name
    return "(unknown)"
