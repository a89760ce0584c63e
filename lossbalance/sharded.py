"""FSDP2 (``torch.distributed.fsdp.fully_shard``): per-term gradients of sharded parameters.

Why the plain engine cannot be used. ``fully_shard`` replaces each parameter by a sharded
``DTensor`` (``Shard(0)``: rank r holds rows ``r*c : (r+1)*c`` of dim 0, ``c = ceil(n / world)``,
so a shard may be empty) and the optimizer holds those. The forward does not compute with them:
a pre-forward hook all-gathers each module's shards into a separate leaf, the *unsharded*
parameter (``FSDPParam._unsharded_param``, created at the first forward and kept), and swaps it
into the module; a post-backward hook reduce-scatters ``unsharded.grad`` into the sharded
``.grad`` (the mean over the ranks) and frees the gathered storage. So the graph of a loss never
reaches the optimizer's parameters: ``torch.autograd.grad(loss, sharded_params)`` raises "The
differentiated Tensor at index 0 appears to not have been used in the graph", and the gradients
w.r.t. the unsharded leaves are this rank's full, unreduced ones (no hook reduces them).

What this engine does instead. Each term is differentiated with
``torch.autograd.backward(loss, inputs=<the unsharded leaves>, retain_graph=True)``: FSDP's own
hooks fire (the pre-backward all-gather again when the forward resharded, so ``retain_graph``
works across the K calls with ``reshard_after_forward``), its reduce-scatter leaves the term's
gradient, averaged over the ranks, as this rank's shard in the sharded ``.grad``, which is copied
into row i of a ``(K, P_local)`` buffer and cleared (``inputs=`` keeps every other leaf's
``.grad``, e.g. of inputs that require grad, untouched; the parameters' own ``.grad`` is put
back afterwards). The statistics are taken per shard and reduced over the ranks in two
all-reduces of the ``(K, T)`` tables: the sums of |g| and g^2 with the loss values, and the
maxima of |g|. The totals are those of the full averaged gradients, identical on every rank, so
every rank computes the same weights. The step's gradient ``sum_i w_i g_i`` is combined shard by
shard and written as sharded ``DTensor`` ``.grad`` (views into one buffer): no further backward.
A plain step is one FSDP backward of the weighted sum (seeded with the weights), its finiteness
agreed in one all-reduce with the loss values.

FSDP reduces a module's gradient when the backward reaches the module's inputs; a graph that
reaches the module's weights again after that (input derivatives, several forward passes) adds
the rest to the unsharded ``.grad``, where nothing reduces it. Every backward here checks for
that: one term's raises a ``ValueError`` naming it; a plain step's (the joint graph of all the
terms, retained for this) falls back to one backward per term, for good, with a warning.

Every rank must run every backward (FSDP's collectives): an ``optional`` term that this rank
lacks is differentiated as zero times another term. The unsharded leaves are private to FSDP2
(``FSDPParam``, reached through ``torch.distributed._composable_state``); this module is the only
place that reads them and refuses what it cannot map (:func:`make_engine`).

Supported: every parameter of the optimizer sharded by ``fully_shard`` on a 1-D mesh,
``memory="keep"``, no ``probe``, ``grad_mode="loop"``, ``combine="sum"``, no ``scope=``,
``diagnose_every``, ``scaler`` or L-BFGS; other leaves the terms reach must be balanced too.
"""
from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .distributed import Reduction
from .gradients import Backward, Direction, GradientEngine, GradStats, Measured
from .graph import GraphFacts
from .validation import explain_autograd_error, no_path_error, warn_user

__all__ = ["ShardedEngine", "check_sharded", "graph_ids", "make_engine"]

FIX = "train it wrapped in DistributedDataParallel instead (the supported distributed path)"


def _dtensor_type() -> type | None:
    """``DTensor`` where sharded parameters can exist (an initialised process group, torch >= 2.5)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def make_engine(params: Sequence[Tensor], **options: Any) -> GradientEngine | ShardedEngine:
    """The engine for ``params``: :class:`ShardedEngine` when they are FSDP2-sharded DTensors,
    else the plain :class:`~lossbalance.gradients.GradientEngine` (``options``: its keywords)."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for p in params):
        return GradientEngine(params, **options)
    return ShardedEngine(params, **options)


def graph_ids(engine: GradientEngine | ShardedEngine, params: Sequence[Tensor]) -> frozenset[int]:
    """The ids of the leaves through which the terms' graphs reach ``params``: the parameters
    themselves, and for an FSDP2 model the unsharded parameters its forward computes with."""
    ids = frozenset(map(id, params))
    return ids | engine.unsharded_ids if isinstance(engine, ShardedEngine) else ids


def check_sharded(engine: GradientEngine | ShardedEngine, options: Mapping[str, bool]) -> None:
    """Refuse the options the sharded engine does not support (``options``: name -> given)."""
    given = [name for name, on in options.items() if on]
    if isinstance(engine, ShardedEngine) and given:
        raise ValueError(
            f"{', '.join(given)}: not supported with an FSDP2 (fully_shard) model, whose ranks hold shards of the "
            f"per-term gradients (lossbalance.sharded says what is supported). Drop "
            f"{'them' if len(given) > 1 else 'it'}, or {FIX}"
        )


def _fsdp_params() -> dict[int, Any]:
    """``id(sharded parameter) -> FSDPParam`` over every live ``fully_shard`` state."""
    from torch.distributed._composable_state import _module_state_mapping

    found = {}
    for ref in list(_module_state_mapping.values()):
        for group in getattr(ref(), "_fsdp_param_groups", None) or ():
            for fsdp_param in group.fsdp_params:
                found[id(fsdp_param.sharded_param)] = fsdp_param
    return found


def _describe(param: Tensor) -> str:
    return f"of shape {tuple(param.shape)}"


class ShardedEngine:
    """Per-term gradients of FSDP2-sharded parameters, reduced over the shards (module docstring).

    The interface of :class:`~lossbalance.gradients.GradientEngine` that the balancer drives;
    ``params``: the optimizer's sharded parameters (``DTensor`` on one 1-D mesh; ``fully_shard``
    shards dim 0 unless given a ``shard_placement_fn``: any placement works, the statistics are sums).
    """

    keeps_gradients = True

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        memory: str = "keep",
        probe: Any = None,
        reduction: Reduction | None = None,
        grad_mode: str = "loop",
    ):
        # (reduction: the balancer's, for its own collectives; this engine reduces over the mesh)
        for name, value, wanted in (("memory", memory, "keep"), ("grad_mode", grad_mode, "loop"), ("probe", probe, None)):
            if value != wanted:
                raise ValueError(f"{name}={value!r} cannot be used with an FSDP2 (fully_shard) model: use "
                                 f"{name}={wanted!r}, or {FIX}")
        self._fsdp = _fsdp_of(params)
        self.params = list(params)
        first = self.params[0]
        self.group, self.world = first.device_mesh.get_group(), first.device_mesh.size()
        local = [p.to_local() for p in self.params]
        self.device, self.dtype = local[0].device, local[0].dtype
        self._sizes = [t.numel() for t in local]
        self._shapes = [t.shape for t in local]
        self._twins = [getattr(f, "_unsharded_param", None) for f in self._fsdp]  # after the first forward
        wide = torch.promote_types(self.dtype, torch.float64)
        self._numel = torch.tensor([p.numel() for p in self.params], dtype=wide, device=self.device)
        self._matrix = torch.tensor([p.dim() >= 2 for p in self.params], device=self.device)
        self._combined = torch.empty(sum(self._sizes), dtype=self.dtype, device=self.device)
        self._buffer: Tensor | None = None
        self._reached = [False] * len(self.params)
        self._split = False  # plain steps: one backward per term (the joint one failed)
        self._unreduced: Tensor | None = None  # the parameter FSDP last left partly unreduced
        self.retain_always = False
        self.others: list[Tensor] = []

    def __repr__(self) -> str:
        return f"ShardedEngine({len(self.params)} sharded tensors over {self.world} ranks, {self.dtype}, {self.device})"

    # ------------------------------------------------------------------ what it holds
    @property
    def unsharded_ids(self) -> frozenset[int]:
        return frozenset(id(t) for t in self._twins if t is not None)

    def holds(self, params: Sequence[Tensor]) -> bool:
        """Built for exactly ``params``, with FSDP's unsharded parameters known and unchanged
        (before the first forward they do not exist: the balancer rebuilds the engine once)."""
        same = len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))
        return same and all(t is not None and t is getattr(f, "_unsharded_param", None) for t, f in zip(self._twins, self._fsdp))

    def owns(self, grad: Tensor) -> bool:
        return False

    def note(self, name: str, facts: GraphFacts) -> None:
        """Learn what the graph of term ``name`` holds; a leaf it reaches that is not balanced
        cannot be given its share (the per-term backward passes are FSDP's)."""
        if facts.others:
            raise ValueError(
                f"loss term {name!r} reaches {len(facts.others)} parameter(s) that the balancer does not balance "
                f"(the first {_describe(facts.others[0])}); with an FSDP2 (fully_shard) model every parameter the "
                "terms train must be in the balancer's optimizer (and sharded)"
            )
        self.retain_always = self.retain_always or facts.compiled

    # ------------------------------------------------------------------ per-term gradients
    def measure(self, names, losses, scopes, values: Tensor, *, stale: Collection[str] = ()) -> Measured:
        """Each term's averaged gradient, shard by shard, into row i; the statistics summed over
        the ranks with the averaged loss values (identical on every rank)."""
        buffer = self._rows(len(losses))
        reached = [False] * len(self.params)
        with _grads_kept(self.params):
            for i, loss in enumerate(losses):
                retain = self.retain_always or i < len(losses) - 1
                self._term_backward(names[i], self._differentiable(loss, losses), None, retain, stale)
                for j, (p, row) in enumerate(zip(self.params, self._views(buffer[i]))):
                    if p.grad is None:
                        row.zero_()
                    else:
                        row.copy_(p.grad.to_local())
                        reached[j] = True
                        p.grad = None
        if not any(reached):
            raise no_path_error(names[0], scoped=False)
        self._reached = reached
        return self._statistics(buffer, values)

    def _differentiable(self, loss: Tensor, losses: Sequence[Tensor]) -> Tensor:
        """``loss``, or (an optional term another rank holds) zero times a term of this rank,
        so that this rank joins FSDP's collectives of that backward too."""
        if loss.requires_grad:
            return loss
        held = [other for other in losses if other.requires_grad] or _no_term_here()
        return held[0] * 0

    def _fsdp_backward(self, name: str, losses: list[Tensor], seeds: list[Tensor] | None, retain: bool, stale) -> bool:
        """One backward through FSDP's hooks into the sharded ``.grad``; False when FSDP left part
        of a gradient unreduced (then cleared): its post-backward hook reduces a module's
        gradient when the backward reaches the module's inputs, and a graph that reaches its
        weights again later (input derivatives, several forward passes) adds the rest after that."""
        for twin in self._twins:
            twin.grad = None
        try:
            torch.autograd.backward(losses, grad_tensors=seeds, inputs=list(self._twins), retain_graph=retain)
        except RuntimeError as error:
            raise explain_autograd_error(name, error, stale=name in stale) from error
        left = [j for j, twin in enumerate(self._twins) if twin.grad is not None]
        for j in left:
            self._twins[j].grad = None
        self._unreduced = self.params[left[0]] if left else None
        return not left

    def _term_backward(self, name: str, loss: Tensor, seed: Tensor | None, retain: bool, stale) -> None:
        """One term's backward; a gradient FSDP cannot reduce in it raises on every rank."""
        if not self._fsdp_backward(name, [loss], None if seed is None else [seed], retain, stale):
            raise ValueError(
                f"FSDP2 reduced the gradient of a parameter {_describe(self._unreduced)} before the backward of "
                f"loss term {name!r} had reached it all, and left the rest unreduced: its post-backward hook runs "
                "when the backward reaches the module's inputs, and this term's graph reaches the module's weights "
                f"again after that (e.g. through a derivative w.r.t. the inputs and a second forward pass). {FIX}"
            )

    def _rows(self, k: int) -> Tensor:
        if self._buffer is None or self._buffer.shape[0] != k:
            self._buffer = torch.empty(k, sum(self._sizes), dtype=self.dtype, device=self.device)
        return self._buffer

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [v.view(shape) for v, shape in zip(flat.split(self._sizes), self._shapes)]

    def _statistics(self, rows: Tensor, values: Tensor) -> Measured:
        """Per tensor, sum |g| and sum g^2 (summed over the ranks, with the values averaged) and
        max |g| (the max over the ranks): two all-reduces of (K, T) tables."""
        wide = self._numel.dtype
        parts = [part.abs() for part in rows.split(self._sizes, dim=1)]
        sum_abs = torch.stack([part.sum(1, dtype=wide) for part in parts], 1)
        sum_sq = torch.stack([torch.linalg.vector_norm(part, dim=1, dtype=wide).square() for part in parts], 1)
        empty = rows.new_zeros(rows.shape[0], dtype=wide)
        max_abs = torch.stack([part.amax(1).to(wide) if part.shape[1] else empty for part in parts], 1)
        k, t = sum_abs.shape
        packed = torch.cat([sum_abs.flatten(), sum_sq.flatten(), values.to(wide) / self.world])
        torch.distributed.all_reduce(packed, group=self.group)
        torch.distributed.all_reduce(max_abs, op=torch.distributed.ReduceOp.MAX, group=self.group)
        sum_abs, sum_sq = packed[: k * t].view(k, t), packed[k * t : 2 * k * t].view(k, t)
        max_abs = torch.where(sum_abs.isfinite(), max_abs, sum_abs)  # a NaN survives the sum, not the max
        scope = torch.ones(k, t, dtype=torch.bool, device=self.device)
        stats = GradStats(sum_abs, max_abs, sum_sq, self._numel, self._matrix, scope, None)
        return Measured(stats, packed[2 * k * t :].to(values.dtype))

    # ------------------------------------------------------------------ the step's gradient
    def write_kept(self, weights: Tensor, direction: Tensor | None = None) -> None:
        """Sharded ``.grad = sum_i w_i g_i`` from the kept shards (``None`` where no term reached);
        views into one buffer, rewritten by the next call."""
        assert direction is None and self._buffer is not None  # check_sharded refuses combiners
        torch.mv(self._buffer.T, weights.to(self.dtype), out=self._combined)
        for p, view, hit in zip(self.params, self._views(self._combined), self._reached):
            p.grad = self._sharded(view, p) if hit else None

    def kept_direction(self, weights: Tensor, direction: Tensor | None = None) -> Direction:
        raise ValueError(f"balancer.loss() cannot be used with an FSDP2 (fully_shard) model: call "
                         f"balancer.step(losses) or balancer.backward(losses), or {FIX}")

    def _sharded(self, local: Tensor, param: Tensor) -> Tensor:
        dtensor = _dtensor_type()
        return dtensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride())

    def write(self, direction: Direction) -> None:
        for p, g in zip(self.params, direction.grads):
            p.grad = g

    def backward(self, names, losses, weights: Tensor, scopes, values: Tensor, *, check_grads: bool = False,
                 check_values: bool = False, stale: Collection[str] = ()) -> Backward:
        """One FSDP backward of ``sum_i w_i L_i`` (``.grad`` untouched: the sharded, averaged
        gradient is returned); the values averaged and the finiteness agreed in one all-reduce."""
        held = [i for i, loss in enumerate(losses) if loss.requires_grad] or _no_term_here()
        with _grads_kept(self.params):
            self._weighted_backward([names[i] for i in held], [losses[i] for i in held], [weights[i] for i in held],
                                    stale)
            grads = [p.grad for p in self.params]
        averaged, bad = self._agreed(values, grads if check_grads else [])
        return Backward(averaged, _failed(averaged if check_values else None, bad), Direction(grads, []))

    def _weighted_backward(self, names: list[str], losses: list[Tensor], seeds: list[Tensor], stale) -> None:
        """``sum_i w_i L_i`` into the sharded ``.grad``: one backward, or (when FSDP cannot reduce
        the joint graph, see :meth:`_fsdp_backward`) one per term, for good, FSDP accumulating."""
        if not self._split:
            if self._fsdp_backward(names[0], losses, seeds, True, stale):
                return
            self._split = True
            warn_user(f"FSDP2 left part of the gradient of a parameter {_describe(self._unreduced)} unreduced in one "
                      "backward of the weighted sum of the terms; the steps without per-term gradients now run one "
                      "backward per term")
            for p in self.params:
                p.grad = None
        for i, (name, loss, seed) in enumerate(zip(names, losses, seeds)):
            self._term_backward(name, loss, seed, self.retain_always or i < len(losses) - 1, stale)

    def _agreed(self, values: Tensor, checked: list[Tensor | None]) -> tuple[Tensor, bool]:
        """The values averaged over the ranks, and whether any rank's ``checked`` shards hold a NaN/Inf."""
        counts = [(~g.to_local().isfinite()).sum() for g in checked if g is not None]
        bad = torch.stack(counts).sum() if counts else values.new_zeros(())
        packed = torch.cat([values.to(torch.float64) / self.world, bad.reshape(1).to(torch.float64)])
        torch.distributed.all_reduce(packed, group=self.group)
        return packed[:-1].to(values.dtype), bool(packed[-1] != 0)


def _failed(values: Tensor | None, bad: bool) -> str | None:
    """What a plain step found non-finite: the (averaged) ``values`` if given, else the gradients."""
    if values is not None and not bool(values.isfinite().all()):
        return "values"
    return "gradients" if bad else None


def _no_term_here() -> list[int]:
    raise ValueError("with an FSDP2 (fully_shard) model every rank must hold at least one term per step "
                     "(FSDP's collectives run in each backward)")


@contextlib.contextmanager
def _grads_kept(params: Sequence[Tensor]) -> Iterator[None]:
    """Clear the parameters' ``.grad`` for FSDP to reduce into, and put it back afterwards."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def _fsdp_of(params: Sequence[Tensor]) -> list[Any]:
    """The ``FSDPParam`` of each parameter; a clear error for anything that is not FSDP2 on one mesh."""
    dtensor, found = _dtensor_type(), _fsdp_params()
    for p in params:
        if not isinstance(p, dtensor) or id(p) not in found:
            what = "a DTensor that fully_shard does not manage (tensor parallel?)" if isinstance(p, dtensor) else "not sharded"
            raise ValueError(
                f"a balanced parameter {_describe(p)} is {what}, next to FSDP2-sharded ones: balance only the "
                f"parameters of one fully_shard model (every module sharded), or {FIX}"
            )
    first = params[0]
    if first.device_mesh.ndim != 1 or any(p.device_mesh != first.device_mesh for p in params):
        raise ValueError(f"the FSDP2 parameters must share one 1-D device mesh (HSDP is not supported): {FIX}")
    return [found[id(p)] for p in params]
