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

import itertools
from typing import Collection, Iterable, Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from .distributed import Reduction
from .stats import GradStats
from .graph import GraphFacts
from .validation import explain_autograd_error, no_path_error, warn_user

__all__ = ["GradStats", "GradientEngine", "Measured", "Backward", "Direction", "MEMORY_MODES", "all_finite", "nonfinite_flag"]

MEMORY_MODES = ("keep", "lean")


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
        self._columns: dict[frozenset[int], Tensor] = {}
        self._inputs: dict[frozenset[int] | None, list[int]] = {}
        self._tensors: dict[frozenset[int] | None, list[Tensor]] = {}
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

    def columns(self, ids: frozenset[int]) -> Tensor:
        """The positions in the flat vector of the tensors whose ``id`` is in ``ids`` (kept)."""
        if ids not in self._columns:
            starts = itertools.accumulate(self.sizes, initial=0)
            parts = [torch.arange(start, start + size) for start, size, p in zip(starts, self.sizes, self.params)
                     if id(p) in ids]
            self._columns[ids] = (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(self.device)
        return self._columns[ids]

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
            self._tensors[scope] = [self.params[j] for j in self._inputs[scope]]
        return self._inputs[scope]

    def tensors(self, scope: frozenset[int] | None) -> list[Tensor]:
        """The tensors a scope covers, in layout order."""
        self.inputs(scope)
        return self._tensors[scope]

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


class Measured(NamedTuple):
    """What :meth:`GradientEngine.measure` returns: the statistics and the (averaged) values."""

    stats: GradStats
    values: Tensor


class Direction(NamedTuple):
    """Per balanced parameter (layout order) and per unbalanced one, the step's gradient."""

    grads: list[Tensor | None]
    others: list[Tensor | None]


class Backward(NamedTuple):
    """What :meth:`GradientEngine.backward` returns: the (averaged) values, what was found
    non-finite (``None``: nothing; else ``"values"`` or ``"gradients"``), and the gradient
    (:meth:`GradientEngine.write` puts it into ``.grad``)."""

    values: Tensor
    failed: Literal["values", "gradients"] | None
    direction: Direction


class GradientEngine:
    """Per-term gradients of scalar losses that share one graph.

    ``params``: the balanced parameters (one device and dtype). ``memory``: ``"keep"`` or
    ``"lean"`` (see the module docstring). ``probe``: optional subset of ``params`` on which the
    statistics are taken. ``reduction``: the mean over processes (:mod:`lossbalance.distributed`);
    the engine packs the loss values with the gradients so that a step needs one collective call.
    ``grad_mode``: ``"loop"`` or ``"batched"`` (``torch.vmap`` over ``autograd.grad``; when vmap
    raises, this engine falls back to the loop for good, with a warning).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        memory: str = "keep",
        probe: Iterable[Tensor] | None = None,
        reduction: Reduction | None = None,
        grad_mode: Literal["loop", "batched"] = "loop",
    ):
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        if grad_mode not in ("loop", "batched"):
            raise ValueError(f"grad_mode must be 'loop' or 'batched', got {grad_mode!r}")
        _check_one_kind(params)
        self.grad_mode = grad_mode
        self.memory = memory
        self._ids = tuple(map(id, params))
        self.layout = _Layout(params)
        self.params = self.layout.params
        self.probe = None if probe is None else _Layout(_probe_subset(probe, self.layout))
        # whether measure() keeps the K full gradients ("keep", no probe), so that write_kept()
        # writes the step without another backward
        self.keeps_gradients = self.probe is None and memory == "keep"
        self.reduction = Reduction() if reduction is None else reduction
        self._extra = int(self.reduction.active)  # a column for the loss value, reduced with the gradients
        self._vmap_failed = False
        self._buffer: Tensor | None = None
        self._row_views: list[list[Tensor]] = []
        self._combined = torch.empty(self.layout.total, dtype=self.layout.dtype, device=self.layout.device)
        self._grad_views = self.layout.views(self._combined)
        self._reached: list[bool] = []
        self._graph_sizes: dict[str, int] = {}
        self.retain_always = False  # a torch.compile'd graph: never free it (no donated buffers)
        self.others: list[Tensor] = []  # nn.Parameter leaves the terms reach that are not balanced
        self._passes: dict[tuple, list[tuple]] = {}  # _groups(), per pattern of scopes
        self._other_rows: list[tuple[Tensor | None, ...]] = []

    def __repr__(self) -> str:
        probe = "" if self.probe is None else f", probe={len(self.probe.params)} tensors"
        return (
            f"GradientEngine({len(self.params)} tensors, {self.layout.total} parameters, "
            f"{self.layout.dtype}, {self.layout.device}, memory={self.memory!r}, grad_mode={self.grad_mode!r}{probe})"
        )

    # ------------------------------------------------------------------ what it holds
    def holds(self, params: Sequence[Tensor]) -> bool:
        """Whether this engine was built for exactly ``params`` (same tensors, same order, still
        on the device and in the dtype it was built for: ``module.to()`` moves them in place)."""
        first = params[0]
        return tuple(map(id, params)) == self._ids and first.device == self.device and first.dtype == self.dtype


    @property
    def device(self) -> torch.device:
        return self.layout.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    def owns(self, grad: Tensor) -> bool:
        """Whether ``grad`` is a view into this engine's reused gradient buffer."""
        return grad._base is self._combined

    @property
    def stats_layout(self) -> _Layout:
        return self.layout if self.probe is None else self.probe

    def note(self, name: str, facts: GraphFacts) -> None:
        """Learn what the graph of term ``name`` holds (its first appearance)."""
        self._graph_sizes[name] = facts.size
        self.retain_always = self.retain_always or facts.compiled
        known = set(map(id, self.others))
        self.others += [p for p in facts.others if id(p) not in known]

    # ------------------------------------------------------------------ per-term gradients
    def measure(
        self,
        names: Sequence[str],
        losses: Sequence[Tensor],
        scopes: Sequence[frozenset[int] | None],
        values: Tensor,
        *,
        stale: Collection[str] = (),
    ) -> Measured:
        """Differentiate each term w.r.t. its scope; return the gradients' statistics and the
        loss ``values`` (averaged over processes when distributed, in the gradients' collective).

        The term with the largest graph is differentiated last, without ``retain_graph`` when
        the kept gradients make the step (no weighted-sum backward follows). The statistics'
        rows stay in the given order of the terms. Raises ``ValueError`` naming a term that
        reaches none of the parameters it may train (``stale``: terms known to be built on an
        earlier step, for the error message).
        """
        buffer = self._rows(len(losses))
        if self._wants_vmap(scopes) and self._batched(losses, buffer[:, : self.stats_layout.total]):
            return self._kept_statistics(scopes, values)
        lean = self._loop(names, losses, scopes, values, stale)
        return self._kept_statistics(scopes, values) if lean is None else self._lean_statistics(lean, scopes, values)

    def _wants_vmap(self, scopes: Sequence[frozenset[int] | None]) -> bool:
        batched = self.grad_mode == "batched" and not self._vmap_failed and self.keeps_gradients
        return batched and not self.others and all(s is None for s in scopes)

    def _order(self, names: Sequence[str]) -> list[int]:
        """The terms from the smallest graph to the largest (the last one may free the graph)."""
        return sorted(range(len(names)), key=lambda i: self._graph_sizes.get(names[i], 0))

    def _loop(self, names: Sequence[str], losses: Sequence[Tensor], scopes, values: Tensor, stale) -> list | None:
        """One ``autograd.grad`` per term into its row of the buffer; in ``"lean"`` mode into
        row 0, reduced at once: then the per-term tables are returned (in the terms' order)."""
        order = self._order(names)
        self._reached = [self.reduction.active] * len(self.params)
        self._other_rows = [()] * len(names)
        lean: dict[int, tuple[Tensor, ...]] = {}
        for i in order:
            retain = self.retain_always or not (self.keeps_gradients and i == order[-1])
            parts, self._other_rows[i] = self._term_gradient(names[i], losses[i], scopes[i], retain, names[i] in stale)
            torch._foreach_copy_(self._row_views[i if self.memory == "keep" else 0], parts)  # torch >= 2.1
            if self.memory == "lean":
                lean[i] = self._lean_row(values[i : i + 1])
        return [lean[i] for i in range(len(names))] if lean else None

    def _term_gradient(self, name: str, loss: Tensor, scope: frozenset[int] | None, retain: bool, stale: bool):
        """The gradient of one term over the statistics layout (zeros where it does not reach);
        with the kept gradients, also its gradient w.r.t. the unbalanced parameters."""
        layout = self.stats_layout
        positions = layout.inputs(scope)
        parts = list(layout.zeros)
        if not positions or not loss.requires_grad:  # (a term another process holds: zero here)
            return parts, ()
        inputs = layout.tensors(scope) + self.others if self.keeps_gradients and self.others else layout.tensors(scope)
        try:
            grads = torch.autograd.grad(loss, inputs, retain_graph=retain, allow_unused=True)
        except RuntimeError as error:
            raise explain_autograd_error(name, error, stale=stale) from error
        hit, reached = False, self._reached if self.keeps_gradients else None
        for j, g in zip(positions, grads):
            if g is not None:
                parts[j] = g if g.layout == torch.strided else _refuse_sparse(g, layout.params[j])
                hit = True
                if reached is not None:
                    reached[j] = True
        if not hit and self.probe is None:
            raise no_path_error(name, scoped=scope is not None)
        return parts, grads[len(positions) :]

    def _lean_row(self, value: Tensor) -> tuple[Tensor, ...]:
        """Row 0 (one term's gradient) reduced to its statistics, after averaging when distributed."""
        value = self._reduce_rows(self._buffer, value) if self.reduction.active else value
        return (*self.stats_layout.table(self._buffer[:, : self.stats_layout.total]), value)

    def _lean_statistics(self, rows, scopes, values: Tensor) -> Measured:
        sum_abs, max_abs, sum_sq, averaged = (torch.cat(column) for column in zip(*rows))
        layout = self.stats_layout
        stats = GradStats(sum_abs, max_abs, sum_sq, layout.numel, layout.matrix, layout.masks(scopes), None)
        return Measured(stats, averaged if self.reduction.active else values)

    def _kept_statistics(self, scopes, values: Tensor) -> Measured:
        """The statistics of the K kept rows (averaged first, with the values, when distributed)."""
        layout = self.stats_layout
        if self.reduction.active:
            values = self._reduce_rows(self._buffer, values)
        grads = self._buffer[:, : layout.total]
        stats = GradStats(
            *layout.table(grads), layout.numel, layout.matrix, layout.masks(scopes),
            grads if self.keeps_gradients else None,
        )
        return Measured(stats, values)

    def _rows(self, k: int) -> Tensor:
        rows = k if self.memory == "keep" else 1
        if self._buffer is None or self._buffer.shape[0] != rows:
            width = self.stats_layout.total + self._extra
            self._buffer = torch.empty(rows, width, dtype=self.layout.dtype, device=self.layout.device)
            self._row_views = [self.stats_layout.views(row[: self.stats_layout.total]) for row in self._buffer]
        return self._buffer

    def _reduce_rows(self, rows: Tensor, values: Tensor) -> Tensor:
        """Average ``rows`` (R, P + 1) in place, their last column holding ``values`` (R,)."""
        rows[:, -1] = values.to(rows.dtype)
        self.reduction.mean_(rows)
        return rows[:, -1].to(values.dtype)

    def _batched(self, losses: Sequence[Tensor], out: Tensor) -> bool:
        """All K gradients in one ``torch.vmap`` over ``autograd.grad`` (False: vmap failed).

        Reach, as the loop records it, at no extra cost: with ``allow_unused`` autograd returns
        ``None`` for a parameter no term's graph reaches. The K seeds differ only in value, so this
        is the same for every row: the union over the terms that the loop records. vmap cannot
        return ``None``, so its one trace of ``vjp`` notes which are missing and returns the rest;
        their columns are zeros, as in the loop (when distributed, all count as reached, as there).
        """
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        basis = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
        reached: list[bool] = []

        def vjp(direction: Tensor) -> tuple[Tensor, ...]:
            grads = torch.autograd.grad(
                stacked, self.params, grad_outputs=direction, retain_graph=True, allow_unused=True
            )
            reached[:] = [g is not None for g in grads]
            return tuple(g for g in grads if g is not None)

        try:
            grads = iter(torch.vmap(vjp)(basis))
        except RuntimeError as error:
            warn_user(f"grad_mode='batched' fell back to the loop: torch.vmap failed ({error})")
            self._vmap_failed = True
            return False
        k = len(losses)
        parts = [
            next(grads).reshape(k, -1) if hit else zero.reshape(1, -1).expand(k, -1)
            for hit, zero in zip(reached, self.layout.zeros)
        ]
        torch.cat(parts, dim=1, out=out)
        self._reached = [hit or self.reduction.active for hit in reached]
        return True

    # ------------------------------------------------------------------ the step's gradient
    def write_kept(self, weights: Tensor, direction: Tensor | None = None) -> None:
        """``.grad = sum_i w_i g_i`` from the kept gradients (or ``.grad = direction`` when given).

        ``.grad`` tensors are views into one buffer of this engine, rewritten by the next call.
        Parameters that no term reached get ``.grad = None``; the unbalanced parameters
        (:attr:`others`) get their share accumulated, as ``backward()`` would.
        """
        self._combine_kept(weights, direction, self._combined)
        for p, view, hit in zip(self.params, self._grad_views, self._reached):
            p.grad = view if hit else None
        for p, g in zip(self.others, self._kept_others(weights)):
            _accumulate(p, g)

    def kept_direction(self, weights: Tensor, direction: Tensor | None = None) -> Direction:
        """What :meth:`write_kept` would write, as views of one fresh vector, not of the reused
        buffer (``None``: not reached)."""
        views = self.layout.views(self._combine_kept(weights, direction))
        return Direction([v if hit else None for v, hit in zip(views, self._reached)], self._kept_others(weights))

    def _combine_kept(self, weights: Tensor, direction: Tensor | None, out: Tensor | None = None) -> Tensor:
        """``sum_i w_i g_i`` of the kept gradients (or ``direction``), into ``out`` (``None``: a new vector)."""
        assert self.keeps_gradients and self._buffer is not None
        if direction is None:
            grads = self._buffer[:, : self.layout.total]
            return torch.mv(grads.T, weights.to(grads.dtype), out=out)
        if out is None:
            return direction.to(self.layout.dtype, copy=True)
        return out.copy_(direction)

    def _kept_others(self, weights: Tensor) -> list[Tensor | None]:
        """``sum_i w_i g_i`` of each unbalanced parameter, from the rows of the per-term calls."""
        out = []
        for j in range(len(self.others)):
            parts = [w * row[j] for w, row in zip(weights.unbind(), self._other_rows) if row and row[j] is not None]
            out.append(sum(parts) if parts else None)
        return out

    def write(self, direction: Direction) -> None:
        """``.grad`` from a :meth:`backward` result: overwritten for the balanced parameters,
        accumulated for the unbalanced ones (:attr:`others`), as ``backward()`` would."""
        for p, g in zip(self.params, direction.grads):
            p.grad = g
        for p, g in zip(self.others, direction.others):
            _accumulate(p, g)

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
        stale: Collection[str] = (),
    ) -> Backward:
        """The gradient of ``sum_i w_i L_i`` (``.grad`` untouched): one backward per distinct scope.

        The backward is seeded with the weights (``grad_outputs``), so no weighted-sum node enters
        the graph; terms sharing a scope share one backward, so the common case (no scopes) is
        exactly one. ``losses`` are 0-dim. Parameters no term reaches get ``None`` (when
        distributed: zeros, since another process may reach them). The values are averaged over
        processes when distributed (in the same collective as the gradients). What is checked
        (``check_grads``: the gradients, ``check_values``: the values) is checked with one host
        sync; ``failed`` says which part is not finite. ``stale``: terms known to be built on an
        earlier step, named first if the backward fails.
        """
        grads, others = self._weighted_sum(names, losses, weights, scopes, stale)
        if self.reduction.active:
            grads, values = self._averaged(grads, values)
        failed = _nonfinite_part(grads if check_grads else [], values if check_values else None)
        return Backward(values, failed, Direction(grads, others))

    def _weighted_sum(self, names, losses, weights: Tensor, scopes, stale: Collection[str]):
        """Per parameter, the gradient of ``sum_i w_i L_i`` (``None`` where no term reaches), and
        per unbalanced parameter (:attr:`others`) its gradient."""
        groups = self._groups(tuple(scopes), tuple(loss.requires_grad for loss in losses))
        seeds = weights.unbind()
        count = len(self.params)
        total: list[Tensor | None] = [None] * (count + len(self.others))
        for n, (members, positions, inputs) in enumerate(groups):
            try:
                grads = torch.autograd.grad(
                    [losses[i] for i in members], inputs, grad_outputs=[seeds[i] for i in members],
                    retain_graph=self.retain_always or n < len(groups) - 1, allow_unused=True,
                )
            except RuntimeError as error:
                culprit = _culprit([names[i] for i in members], [losses[i] for i in members], inputs, stale)
                raise explain_autograd_error(culprit, error, stale=culprit in stale) from error
            for j, g in zip(positions, grads):
                if g is not None:
                    total[j] = g if total[j] is None else total[j] + g
        return total[:count], total[count:]

    def _groups(self, scopes: tuple[frozenset[int] | None, ...], differentiable: tuple[bool, ...]) -> list[tuple]:
        """The backward passes of :meth:`_weighted_sum`, one per distinct scope: ``(members,
        positions, inputs)``, the terms it seeds (those with a graph: a term another process
        holds is a constant zero here), the positions of its inputs among ``params + others`` and
        the inputs themselves. Kept per pattern (the same on almost every call)."""
        key = (scopes, differentiable, len(self.others))  # (others only grows)
        if key not in self._passes:
            members: dict[frozenset[int] | None, list[int]] = {}
            for i, (scope, live) in enumerate(zip(scopes, differentiable)):
                if live:
                    members.setdefault(scope, []).append(i)
            count, others = len(self.params), list(range(len(self.params), len(self.params) + len(self.others)))
            passes = []
            for scope, group in members.items():
                positions = self.layout.inputs(scope) + others
                passes.append((group, positions, [self.params[j] if j < count else self.others[j - count] for j in positions]))
            if len(self._passes) >= 16:
                self._passes.clear()
            self._passes[key] = passes
        return self._passes[key]

    def _averaged(self, grads: list[Tensor | None], values: Tensor) -> tuple[list[Tensor], Tensor]:
        """The gradients (zeros where none) and the values, averaged in one collective."""
        parts = [(z if g is None else g).reshape(-1) for g, z in zip(grads, self.layout.zeros)]
        flat = torch.cat([*parts, values.to(self.layout.dtype)])
        self.reduction.mean_(flat)
        averaged = flat[self.layout.total :].to(values.dtype)
        return self.layout.views(flat[: self.layout.total]), averaged


def _refuse_sparse(grad: Tensor, param: Tensor) -> Tensor:
    """A sparse gradient is refused with the fix (the kept rows and statistics are dense)."""
    raise ValueError(
            f"a balanced parameter of shape {tuple(param.shape)} gets a {grad.layout} gradient "
            "(nn.Embedding/EmbeddingBag(sparse=True)); per-term gradients need dense ones: build the module "
            "with sparse=False and use e.g. torch.optim.Adam instead of SparseAdam, or a strategy that needs "
            "no gradients (a plain step keeps the sparse gradient)"
        )


def _accumulate(param: Tensor, grad: Tensor | None) -> None:
    """``param.grad += grad``, as ``backward()`` does, for a parameter the balancer does not own."""
    if grad is not None:
        param.grad = grad.detach().clone() if param.grad is None else param.grad + grad


def _check_one_kind(params: Sequence[Tensor]) -> None:
    kinds = {(p.device, p.dtype) for p in params}
    if len(kinds) > 1:
        found = ", ".join(sorted(f"{d}/{t}" for d, t in kinds))
        raise ValueError(
            f"the balanced parameters must share one device and dtype; found {found}. "
            "Cast them (e.g. model.to(dtype)) or balance each group with its own LossBalancer."
        )


def _probe_subset(probe: Iterable[Tensor], layout: _Layout) -> list[Tensor]:
    probe = list(probe)
    if not probe or any(id(p) not in layout.position for p in probe):
        raise ValueError("probe must be a non-empty subset of the optimizer's parameters")
    return probe


def _nonfinite_part(grads: Sequence[Tensor | None], values: Tensor | None) -> Literal["values", "gradients"] | None:
    """Which of the checked tensors holds a NaN/Inf (one host sync when all are finite)."""
    checked = [g for g in grads if g is not None] + ([] if values is None else [values])
    if not checked or all_finite(checked):
        return None
    if values is not None and not bool(torch.isfinite(values).all()):
        return "values"
    return "gradients"


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, with one host sync."""
    return not bool(_found_nonfinite(tensors))


def nonfinite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A () bool tensor on the tensors' device: whether any entry of ``tensors`` is NaN/Inf (no sync)."""
    return _found_nonfinite(tensors).reshape(()) > 0


_ONE: dict[torch.device, Tensor] = {}  # the unit scale of the fused check, per device (only read)


def _found_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """A one-element tensor, nonzero iff an entry of ``tensors`` is NaN/Inf (no sync).

    One fused call where it can run: the kernel ``GradScaler`` uses (multiplying by 1 in place,
    which leaves the values as they are); else (memory overlap, e.g. an expanded gradient, or no
    kernel for the device) one ``isfinite().all()`` per tensor.
    """
    dense = [t._values() if t.is_sparse else t for t in tensors]  # a sparse gradient: its stored entries
    device = dense[0].device
    found = torch.zeros(1, dtype=torch.float32, device=device)
    if device not in _ONE:
        _ONE[device] = torch.ones(1, dtype=torch.float32, device=device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(dense, found, _ONE[device])
        return found
    except (RuntimeError, NotImplementedError):
        return ~torch.stack([torch.isfinite(t).all() for t in dense]).all()


def _culprit(names: Sequence[str], losses: Sequence[Tensor], inputs: Sequence[Tensor], stale: Collection[str]) -> str:
    """The term to name when a joint backward failed: one built on an earlier step if any, else
    the first whose graph cannot be differentiated on its own."""
    for name in names:
        if name in stale:
            return name
    for name, loss in zip(names, losses):
        try:
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        except RuntimeError:
            return name
    return names[0]
