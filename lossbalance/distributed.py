"""Distribution: the mean over processes, and the agreement of the ranks on the terms.

A balancer in a multi-process run (``torch.distributed``, e.g. DistributedDataParallel) averages
the per-term gradients and the loss values over the processes, so that every process computes
the same weights and takes the same step. Two rules live here and nowhere else:

- **One collective per step** for the gradients and the loss values (packed into one flat
  tensor), plus one small collective that checks the ranks agree on the terms (below).
- **Check after averaging.** Non-finite values are looked for in the *averaged* tensors, so
  that every process sees the same verdict and all of them raise, or all skip the step, together
  (:meth:`Reduction.checks`).

Agreement on the terms. Every step, each rank sends a 24-bit hash of its declared term names
(in order) and which of them it holds this step; the sum over the ranks tells every rank, before
any gradient is exchanged, whether they all declared the same terms in the same order (if not,
every rank raises a ``RuntimeError`` naming its own terms: never a hang, never an abort; a rank
whose terms fail its local checks sends a refusal flag instead, :meth:`Reduction.refuse`) and how
many ranks hold each term. An ``optional`` term that some ranks hold and others do not is
*present* on every rank that step: a rank without it contributes a zero loss and a zero
gradient; its loss value is averaged over the ranks that hold it (the count), its gradient, like
every gradient, over all ranks (as DistributedDataParallel averages a loss that is zero on some
ranks). The terms of the first step, when not declared, are registered in one order on all
ranks, so that ranks whose
first dicts list the same names in different orders still agree: they take rank 0's order.

Uneven points per rank: the average is the mean of the per-rank means (as DDP's), not the mean
over the union of the points.

Per-point tables (RBA, SA-PINN, BRDR): on an update the ranks exchange the ids and detached
per-point values of their batches (:meth:`Reduction.gather_points`: the sizes, then the padded
ids and values; a no-op in one process), so that every rank updates the same table on the union.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["Reduction", "ProcessGroupMean", "make_reduction", "refused_error"]


class Reduction:
    """The no-op reduction of a single process; the base of :class:`ProcessGroupMean`."""

    active = False
    world = 1

    def mean_(self, flat: Tensor) -> None:
        """Average ``flat`` over the processes, in place (nothing to do in one process)."""

    def checks(self, stage: str) -> bool:
        """Whether values are checked for NaN/Inf at ``stage``: ``"local"`` (before any
        averaging) in one process, ``"averaged"`` (after it) when distributed."""
        return stage == ("averaged" if self.active else "local")

    def presence(
        self, declared: Sequence[str], present: Sequence[str], optional: bool, device: torch.device
    ) -> Tensor | None:
        """How many ranks hold each declared term this step (``None``: all of them hold all)."""
        return None

    def canonical(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The order of a first step's undeclared terms (in one process: as given)."""
        return names

    def value_label(self) -> str:
        return "loss value (averaged over processes)" if self.active else "loss value"

    def gather_points(self, ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The points of every rank, one occurrence per id: ``(ids, values, own)``, ``own`` the
        rows of the calling rank's points (``None``: the rows are the batch itself, as here)."""
        return ids, values, None

    def refuse(self, keys: tuple[str, ...], *, first: bool, device: torch.device) -> None:
        """This rank's terms failed its checks (distributed: the other ranks are told; here nothing)."""

    def holders(self, held: Sequence[bool]) -> list[int]:
        """How many ranks hold each of these terms this step (one process: itself or none)."""
        return [int(h) for h in held]


class ProcessGroupMean(Reduction):
    """The mean over the processes of ``group`` (``None``: the default group)."""

    active = True

    def __init__(self, group: Any = None):
        self.group = group
        self.world = torch.distributed.get_world_size(group)

    def mean_(self, flat: Tensor) -> None:
        torch.distributed.all_reduce(flat, group=self.group)
        flat.div_(self.world)

    def canonical(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Rank 0's order of the first step's terms (one broadcast, on the first step only); a
        rank that holds other names keeps them, and :meth:`presence` then raises on every rank."""
        first = [list(names)]
        torch.distributed.broadcast_object_list(first, src=torch.distributed.get_global_rank(self.group, 0)
                                                if self.group is not None else 0, group=self.group)
        theirs = first[0]
        return tuple(n for n in theirs if n in names) + tuple(n for n in names if n not in theirs)

    def presence(
        self, declared: Sequence[str], present: Sequence[str], optional: bool, device: torch.device
    ) -> Tensor | None:
        """Raise on every rank unless all declared the same terms (one small all-reduce of a
        fixed size); with ``optional`` terms declared, a second one counts the ranks holding each."""
        digest = int.from_bytes(hashlib.blake2b("\x1f".join(declared).encode(), digest_size=3).digest(), "big")
        header = torch.tensor([1, digest, digest * digest, 0], dtype=torch.int64, device=device)  # exact sums
        torch.distributed.all_reduce(header, group=self.group)
        world, total, squares, refused = header.tolist()
        if refused:
            raise refused_error(refused)
        if world * squares != total * total:  # the hashes differ (equality case of Cauchy-Schwarz)
            raise RuntimeError(
                f"the processes disagree on the loss terms: this rank declared {list(declared)}. Every rank "
                "must build the same term names (declare them with LossBalancer(..., terms=[...]), and "
                "the ones that some ranks lack on some steps with optional=[...])"
            )
        if not optional:
            return None
        held = set(present)
        counts = torch.tensor([float(name in held) for name in declared], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts, group=self.group)
        return counts

    def refuse(self, keys: tuple[str, ...], *, first: bool, device: torch.device) -> None:
        """This rank's terms failed its checks: join the collectives the other ranks are in
        before their :meth:`presence` check (``first``: the first step's :meth:`canonical`
        broadcast too) with a refusal flag there, so that they raise instead of waiting."""
        if first:
            self.canonical(keys)
        header = torch.tensor([1, 0, 0, 1], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(header, group=self.group)

    def holders(self, held: Sequence[bool]) -> list[int]:
        """One small all-reduce: on every rank, how many ranks hold each term (on the backend's
        device: the current CUDA device for NCCL, else the CPU)."""
        nccl = torch.distributed.get_backend(self.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        counts = torch.tensor([int(h) for h in held], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(counts, group=self.group)
        return counts.tolist()

    def gather_points(self, ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """All ranks' ``ids`` and detached ``values`` (1-D, any lengths: the sizes are gathered
        first, the batches padded and trimmed), concatenated in rank order and de-duplicated:
        an id held by several ranks keeps its first occurrence (the lowest rank's), the order
        of the kept rows is the gathered order, so that ranks holding the same points in the
        same order get rank 0's batch unchanged. ``own``: the union's row of each local point."""
        local = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
        sizes = [torch.zeros_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, local, group=self.group)
        counts = [int(n) for n in torch.cat(sizes).tolist()]
        all_ids = self._gathered(ids, counts)
        all_values = self._gathered(values.detach(), counts)
        unique, inverse = torch.unique(all_ids, return_inverse=True)
        total = all_ids.numel()
        first = torch.full(unique.shape, total, dtype=torch.long, device=ids.device)
        first.scatter_reduce_(0, inverse, torch.arange(total, device=ids.device), reduce="amin")
        keep = torch.sort(first).values
        row = torch.empty_like(first).scatter_(0, inverse[keep], torch.arange(keep.numel(), device=ids.device))
        start = sum(counts[: self._rank()])
        return all_ids[keep], all_values[keep], row[inverse[start : start + ids.numel()]]

    def _gathered(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """``x`` of every rank (``counts[r]`` entries on rank ``r``), concatenated in rank order."""
        padded = x.new_zeros(max(counts))
        padded[: x.numel()] = x
        parts = [torch.empty_like(padded) for _ in counts]
        torch.distributed.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    def _rank(self) -> int:
        return torch.distributed.get_rank(self.group)


def make_reduction(distributed: bool | None, group: Any) -> Reduction:
    """The reduction for ``distributed=`` (``None``: on when more than one process runs)."""
    dist = torch.distributed
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if distributed is None:
        distributed = active
    if not distributed:
        return Reduction()
    if not active:
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return ProcessGroupMean(group)


def refused_error(count: int) -> RuntimeError:
    """What a rank whose own checks passed raises when ``count`` other ranks refused their terms."""
    return RuntimeError(
        f"{count} other process(es) refused their loss terms this step (their error names the term and "
        "the fix); nothing was changed here. Every rank must pass the same, valid terms"
    )
