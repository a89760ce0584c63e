r"""Pointwise terms: per-point residual losses (:class:`Residual`), reduced to a scalar by the
balancer after their pointwise weighting: causal weights (:class:`Causal`), residual-based
attention (:class:`RBA`), self-adaptive weights (:class:`SAPINN`) or balanced residual decay
rate weights (:class:`BRDR`).

A term of the loss dict may be a :class:`Residual` instead of a scalar. The balancer reduces it
to a scalar first (phase ``_pointwise`` of :meth:`LossBalancer._take`), so every strategy,
scope, combiner, :meth:`~LossBalancer.loss` and checkpoint sees a plain scalar term. The
pointwise weighting of a term is declared once, on the balancer::

    balancer = LossBalancer(opt, "lra", pointwise={"pde": Causal(chunks=32, eps=[1e-2, 1e-1, 1, 10, 100])})
    balancer.step({"pde": Residual(r**2, t=t), "ic": ic_loss})

and its state (the annealing index of :class:`Causal`; the per-point tables of :class:`RBA`,
:class:`SAPINN` and :class:`BRDR`, keyed by point id) lives in the balancer's ``state_dict``
(resumed bit for bit). The state advances once per step (not on the re-evaluations of an L-BFGS
closure) and only when the step succeeds: a failed or skipped step leaves it as it was (a new
state is built, the stored one is never changed in place).

``values`` of a :class:`Residual`: with ``kind="loss"`` (default) the per-point losses
``l_i >= 0`` (e.g. ``r**2``); with ``kind="residual"`` the residuals ``r_i`` themselves, whose
per-point loss is ``r_i**2``. :class:`RBA` needs ``kind="residual"`` (its multipliers scale
``r_i`` before squaring, as in the paper); :class:`SAPINN` and :class:`BRDR` weight the
per-point losses and take either kind.

Causal weights: the authors' repository states that the method is covered by a University of
Pennsylvania patent; this implementation was written from the paper only. Check the licence
terms that apply to your use.

Distributed runs (``LossBalancer(..., distributed=True)``, or torch.distributed initialised with
more than one process): the chunks and the causal weights are per process (each process weights
its own points). The per-point tables of :class:`RBA`, :class:`SAPINN` and :class:`BRDR` are the
same on every process: on a call that advances the state, every process gathers the ids and the
detached per-point values of the batch of every term with such weights
(:meth:`lossbalance.distributed.Reduction.gather_points`: the batch sizes may differ), keeps one
occurrence of an id held by several processes (the lowest rank's; the points keep the gathered
order, rank 0's first), and updates the table on that union exactly as one process would on the
union batch; each process then takes its own points' weights from the new table for its term's
value. Processes holding the same points in the same order get exactly the one-process result, and
a checkpoint of any process holds the whole table. Such a term must be in every process's loss
dict on those calls (the processes exchange its points, in the order of ``pointwise=``). Calls
that do not advance the state (the re-evaluations of an L-BFGS closure) exchange nothing and use
the process's own points and the stored table.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from .distributed import Reduction, refused_error
from .reporting import LazyFigures
from .validation import warn_user

__all__ = ["Residual", "Causal", "RBA", "SAPINN", "BRDR", "Pointwise"]


class Residual:
    """A vector of per-point losses (or residuals), one loss term of the dict.

    Args:
        values: 1-D tensor, one entry per point: the per-point losses ``l_i`` (``kind="loss"``,
            e.g. ``r**2``) or the residuals ``r_i`` (``kind="residual"``, loss ``r_i**2``).
        t: per-point times (1-D, same length), for :class:`Causal` weights.
        ids: stable integer ids of the points (1-D, same length, unique), for :class:`RBA`'s
            per-point multipliers; the same point keeps its id across shuffles and resamplings.
            What was checked of an ids tensor (unique, equal to the stored table) is remembered
            by tensor object and version counter, so a fixed point set costs no host read per
            step: change ids in place only with torch operations (``ids.copy_(new)`` under
            ``torch.no_grad()``), which move the counter, or pass a new tensor; a write through
            a NumPy view or ``.data`` is not seen. (``t`` is read afresh on every call.)
        reduction: ``"mean"`` or ``"sum"`` of the per-point losses when the term has no
            pointwise weighting (weighted terms use the mean their paper defines).
        kind: ``"loss"`` or ``"residual"`` (what ``values`` holds). Per-point losses are
            ``>= 0`` (:class:`SAPINN` and :class:`BRDR` check it; the others take them as given).
    """

    __slots__ = ("values", "t", "ids", "reduction", "kind")

    def __init__(
        self, values: Tensor, *, t: Tensor | None = None, ids: Tensor | None = None,
        reduction: Literal["mean", "sum"] = "mean", kind: Literal["loss", "residual"] = "loss",
    ):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Residual(reduction=...) is 'mean' or 'sum', got {reduction!r}")
        if kind not in ("loss", "residual"):
            raise ValueError(f"Residual(kind=...) is 'loss' (per-point losses) or 'residual' (r_i), got {kind!r}")
        self.values, self.t, self.ids, self.reduction, self.kind = values, t, ids, reduction, kind

    def __repr__(self) -> str:
        shape = tuple(self.values.shape) if isinstance(self.values, Tensor) else type(self.values).__name__
        return f"Residual({shape}, t={self.t is not None}, ids={self.ids is not None}, kind={self.kind!r})"


class _Chunking(NamedTuple):
    """The causal chunks of one time tensor: every point's chunk, the points per chunk ``n_k``,
    the share ``1 / (max(n_k, 1) M')`` of a point of chunk k in the term's value (``M'``
    non-empty chunks), ``0`` / ``inf`` for non-empty / empty chunks, ``M`` zeros (the base of
    the chunk sums) and ``M'`` (a 0-dim tensor; :meth:`Causal._grouping` makes it NaN where a
    time is not finite)."""

    chunk: Tensor
    counts: Tensor
    share: Tensor
    absent: Tensor
    zeros: Tensor
    kept: Tensor


def _chunking(chunk: Tensor, counts: Tensor) -> _Chunking:
    present = counts > 0
    kept = present.sum().to(counts.dtype)
    share = 1.0 / (counts.clamp(min=1) * kept)
    return _Chunking(chunk, counts, share, torch.where(present, 0.0, math.inf).to(counts.dtype), torch.zeros_like(counts), kept)


class Causal:
    r"""Causal weights (Wang, Sankaran & Perdikaris 2022, "Respecting causality is all you need
    for training physics-informed neural networks").

    The points of the term are split into ``M = chunks`` chunks along ``t``; ``L_k`` is the mean
    per-point loss of chunk ``k``, its weight ``w_k = exp(-eps * sum_{j<k} L_j)`` (stop-gradient;
    ``cumulative="inclusive"``: ``sum_{j<=k}``), and the term's value ``mean_k w_k L_k``.

    Args:
        chunks: ``M``.
        eps: the causality parameter, a float, or a list annealed by the paper's rule: move to
            the next ``eps`` after a step whose ``min_k w_k > delta`` (the last one is kept; the
            paper stops training there: ``stats[term]["causal_done"]`` turns 1).
        split: ``"count"`` (jaxpi): equal-count groups of the batch sorted by ``t`` (stable sort;
            sizes differ by at most one, the first groups larger, as ``torch.tensor_split``);
            ``"time"`` (the authors' original code): ``M`` equal intervals of
            ``[t_min, t_max]`` (``t_range``, default the batch's range; points outside go to the
            first/last interval; the last interval is closed; empty intervals are left out of
            the mean and add nothing to the sums).
        cumulative: ``"exclusive"`` (the paper, jaxpi; default) or ``"inclusive"`` (PhysicsNeMo,
            PINA).
        delta: the annealing threshold (0.99, the paper).
        t_range: ``(t_min, t_max)`` for ``split="time"`` (refused with ``split="count"``, which has no grid).

    The grouping of a fixed point set is computed once: on the CPU the times are compared with
    the last call's by value (``torch.equal``), so a buffer refilled in any way is grouped anew;
    on other devices the times are grouped on every call (no host read).

    On a CPU, weights that underflow to subnormal floats (a large ``eps``, late chunks) slow the
    backward down (x86 computes subnormals slowly); ``torch.set_flush_denormal(True)`` avoids it
    (measured in the README's performance section).

    The authors' repository states that the method is covered by a University of Pennsylvania
    patent; implemented here from the paper only.
    """

    kind = "causal"
    value_before_update = True  # a step's value uses the eps it started with (see Pointwise.held)

    def __init__(
        self, chunks: int = 32, eps: float | Sequence[float] = 1.0, *, split: Literal["count", "time"] = "count",
        cumulative: Literal["exclusive", "inclusive"] = "exclusive", delta: float = 0.99,
        t_range: tuple[float, float] | None = None,
    ):
        schedule = _causal_schedule(chunks, eps)
        _check_causal_variant(split, cumulative, delta, t_range)
        self.chunks, self.eps, self.split, self.cumulative = chunks, [float(e) for e in schedule], split, cumulative
        self.delta, self.t_range = float(delta), t_range
        self._sizes: dict[tuple, _Chunking] = {}  # split="count": per number of points (see _by_count)
        self._last: tuple[Tensor, _Chunking, dict[float, Tensor]] | None = None  # see _grouping

    def __repr__(self) -> str:
        return (f"Causal(chunks={self.chunks}, eps={self.eps if len(self.eps) > 1 else self.eps[0]}, "
                f"split={self.split!r}, cumulative={self.cumulative!r})")

    def initial_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "eps_index": 0}

    def check(self, name: str, residual: Residual) -> None:
        if residual.t is None:
            raise ValueError(f"loss term {name!r} has causal weights: pass the per-point times, Residual(values, t=t)")
        if residual.values.shape[0] < self.chunks and self.split == "count":
            raise ValueError(
                f"loss term {name!r} has {residual.values.shape[0]} points for Causal(chunks={self.chunks}): "
                "give at least one point per chunk"
            )

    def chunk_index(self, t: Tensor) -> Tensor:
        """The chunk of every point (0..M-1); a NaN time goes to chunk 0 (its term's value is NaN)."""
        n, m = t.shape[0], self.chunks
        if self.split == "count":
            ranks = self._by_count(n, t).chunk  # the chunk of the point of each rank
            return torch.empty_like(ranks).scatter_(0, torch.argsort(t, stable=True), ranks)
        lo, hi = (t.min(), t.max()) if self.t_range is None else (t.new_tensor(self.t_range[0]), t.new_tensor(self.t_range[1]))
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        return ((t - lo) / span * m).floor().nan_to_num(0.0).clamp(0, m - 1).long()

    def _by_count(self, n: int, like: Tensor) -> _Chunking:
        """``split="count"``: the chunk of each rank and the counts of ``n`` points (``like``'s
        dtype and device), which depend on ``n`` alone: kept per size."""
        key = (n, like.dtype, like.device)
        if key not in self._sizes:
            q, r = divmod(n, self.chunks)
            rank = torch.arange(n, device=like.device)
            big = r * (q + 1)  # the first r chunks hold q + 1 points
            ranks = torch.where(rank < big, rank // (q + 1), r + (rank - big) // max(q, 1))
            if len(self._sizes) >= 8:
                self._sizes.clear()
            self._sizes[key] = _chunking(ranks, like.new_zeros(self.chunks).index_add_(0, ranks, like.new_ones(n)))
        return self._sizes[key]

    def _grouping(self, t: Tensor, like: Tensor) -> tuple[_Chunking, dict[float, Tensor]]:
        """Every point's chunk and what follows from the chunks' point counts (``like``'s dtype),
        with the exponent matrices already built for it (per ``eps``). From the values of ``t``:
        on the CPU the grouping of the last call is kept while ``t`` holds the same values
        (compared with ``torch.equal``, so a time buffer refilled in place, even through NumPy or
        ``.data``, is grouped anew); on other devices it is computed on every call (no host read)."""
        t = t.detach()
        last = self._last
        if last is not None and _equal_on_cpu(last[0], t) and last[1].share.dtype == like.dtype:
            return last[1], last[2]
        if self.split == "count":
            grouping = self._by_count(t.shape[0], like)._replace(chunk=self.chunk_index(t))
        else:
            chunk = self.chunk_index(t)
            grouping = _chunking(chunk, torch.zeros(self.chunks, dtype=like.dtype, device=like.device).index_add_(0, chunk, torch.ones_like(like)))
        grouping = grouping._replace(kept=grouping.kept + t.sum() * 0)  # NaN where a time is NaN or infinite
        exponents: dict[float, Tensor] = {}
        self._last = (t.clone(), grouping, exponents) if t.device.type == "cpu" else None
        return grouping, exponents

    def _exponent(self, grouping: _Chunking, exponents: dict[float, Tensor], eps: float) -> Tensor:
        """``E`` with ``E @ (L_k / M')_k = -eps * sum_{j<k} L_j`` (``j<=k``: inclusive), kept per ``eps``."""
        if eps not in exponents:
            m = self.chunks
            below = torch.ones(m, m, dtype=grouping.share.dtype, device=grouping.share.device)
            below = below.tril(-1 if self.cumulative == "exclusive" else 0)
            exponents[eps] = below * (grouping.kept * -eps)
        return exponents[eps]

    def _chunks(self, losses: Tensor, t: Tensor, eps: float) -> tuple[_Chunking, Tensor, Tensor]:
        """The grouping, the chunks' ``L_k / M'`` and their weights ``w_k`` (NaN where a time is
        NaN or infinite)."""
        grouping, exponents = self._grouping(t, losses)
        scaled = grouping.zeros.index_add(0, grouping.chunk, losses) * grouping.share
        return grouping, scaled, torch.exp(self._exponent(grouping, exponents, eps) @ scaled.detach())

    def point_weights(self, losses: Tensor, t: Tensor, state: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Per point ``p`` (detached): its chunk's weight ``w_k(p)`` and its share ``1 / (M' n_k(p))``
        of the term's value (``M'`` non-empty chunks, ``n_k`` points in chunk k), so that the value
        is ``sum_p w_k(p) share_p l_p`` (used by the ``ntk`` strategy)."""
        grouping, _, w = self._chunks(losses.detach(), t, self.eps[state["eps_index"]])
        return w[grouping.chunk], grouping.share[grouping.chunk]

    def reduce(self, losses: Tensor, t: Tensor, state: Mapping[str, Any], update: bool):
        """The term's value ``sum_k w_k L_k / M'``, the figures for ``stats`` (``causal_min`` and
        ``causal_done`` computed when first read) and the state after this step."""
        index = state["eps_index"]
        eps = self.eps[index]
        grouping, scaled, w = self._chunks(losses, t, eps)
        done = index == len(self.eps) - 1
        annealing = self._lowest(w, grouping) if update and not done else None
        if annealing is not None and bool(annealing > self.delta):  # one host read
            index += 1

        def lowest() -> Tensor:
            w_min = self._lowest(w, grouping) if annealing is None else annealing
            return torch.stack([w_min, (w_min > self.delta).to(w.dtype) if done else torch.zeros_like(w_min)])

        figures = {"causal_weights": LazyFigures(("causal_min", "causal_done"), lowest), "causal_eps": eps}
        return torch.dot(w, scaled), figures, {"kind": self.kind, "eps_index": index}

    @staticmethod
    def _lowest(w: Tensor, grouping: _Chunking) -> Tensor:
        """``min_k w_k`` over the non-empty chunks."""
        return (w + grouping.absent).min()

    def checked_state(self, name: str, state: Any) -> dict[str, Any]:
        index = state.get("eps_index") if isinstance(state, Mapping) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.eps):
            raise ValueError(f"corrupt state: the causal state of term {name!r} has eps_index {index!r}, "
                             f"not an index into eps={self.eps}")
        return {"kind": self.kind, "eps_index": index}


class RBA:
    r"""Residual-based attention (Anagnostopoulos, Toscano, Stergiopulos & Karniadakis 2024,
    "Residual-based attention in physics-informed neural networks"): one multiplier per point,

    ``lambda_i <- gamma * lambda_i + eta * |r_i| / max_j |r_j|`` (stop-gradient), then the term's
    value ``mean_i (lambda_i r_i)^2`` with the updated multipliers.

    Needs a :class:`Residual` with ``kind="residual"`` (the residuals ``r_i``) and ``ids``: the
    multipliers are kept per point id in the balancer's state, so they follow the points through
    shuffles; a point seen for the first time starts at ``init`` (0, as in the authors' code:
    the multipliers grow towards at most ``eta / (1 - gamma)`` = 1 with the defaults). The
    state keeps every id seen unless ``forget_after`` is given. The re-evaluations of a step (an
    L-BFGS closure) use the multipliers its first evaluation updated, unchanged.

    Distributed: the update runs on the union of every process's points (module docstring), with
    ``max_j |r_j|`` the maximum over that union; every process then scales its own residuals by
    their updated multipliers (the same table on every process).

    Args:
        gamma: decay (0.999), eta: learning rate (1e-3): the authors' code.
        init: the multiplier of a new point (0).
        forget_after: ``None`` (default): the table keeps every id seen (it grows with resampling);
            ``n``: an id not seen in the last ``n`` steps is dropped from the state when a step
            succeeds (seen again, it starts afresh as a new point).
    """

    kind, label = "rba", "RBA"
    value_before_update = False  # the value uses the updated multipliers

    def fresh_label(self) -> str:
        return f"the initial multiplier init={self.init}"

    def __init__(self, gamma: float = 0.999, eta: float = 1e-3, *, init: float = 0.0, forget_after: int | None = None):
        if not 0 <= gamma < 1:
            raise ValueError(f"RBA(gamma=...) is in [0, 1), got {gamma!r}")
        if not eta > 0 or not math.isfinite(eta):
            raise ValueError(f"RBA(eta=...) is a positive float, got {eta!r}")
        if not init >= 0 or not math.isfinite(init):
            raise ValueError(f"RBA(init=...) is a float >= 0, got {init!r}")
        _check_forget(self.label, forget_after)
        self.gamma, self.eta, self.init, self.forget_after = float(gamma), float(eta), float(init), forget_after
        self._checked_ids, self._same_ids = _Memo(), _Memo()  # ids verified earlier (no host reads)

    def __repr__(self) -> str:
        return f"RBA(gamma={self.gamma}, eta={self.eta}, init={self.init})"

    def initial_state(self) -> dict[str, Any]:
        return {"kind": self.kind, **_empty_table(floats=("lambdas",))}

    def check(self, name: str, residual: Residual) -> None:
        if residual.kind != "residual":
            raise ValueError(
                f"loss term {name!r} has RBA weights, which scale the residuals r_i before squaring: pass "
                "them as Residual(r, ids=ids, kind='residual') (not the per-point losses r**2)"
            )
        _check_ids(name, residual, self.label, "Residual(r, ids=ids, kind='residual')", self._checked_ids)

    def reduce(self, r: Tensor, ids: Tensor, state: Mapping[str, Any], update: bool, union: _Union | None = None):
        """``union``: the update's points of every rank (:meth:`Reduction.gather_points`; ``None``: this batch)."""
        if not update:
            lam = _IdTable(state, ids, r, self._same_ids).column("lambdas", self.init)
            return (lam.to(r.dtype) * r).pow(2).mean(), _summary("rba", lam), state
        union = union or _Union.local(ids, r)
        table = _IdTable(state, union.ids, union.values, self._same_ids)
        a = union.values.abs().to(table.dtype)
        lam = self.gamma * table.column("lambdas", self.init) + self.eta * a / a.max().clamp(min=torch.finfo(a.dtype).tiny)
        mine = union.mine(lam)
        new_state = {"kind": self.kind, **_advanced(table, {"lambdas": lam}, state, self.forget_after)}
        return (mine.to(r.dtype) * r).pow(2).mean(), _summary("rba", mine), new_state

    def checked_state(self, name: str, state: Any) -> dict[str, Any]:
        return {"kind": self.kind, **_checked_id_state(name, self.label, state, floats=("lambdas",))}


_MASKS = ("square", "identity", "sigmoid")


class SAPINN:
    r"""Self-adaptive weights (McClenny & Braga-Neto 2023, "Self-adaptive physics-informed neural
    networks", J. Comput. Phys. 474, 111722): one trainable weight ``lambda_i`` per point, the
    term's value ``mean_i m(lambda_i) l_i`` (``l_i`` the per-point loss, ``r_i**2`` for
    ``kind="residual"``) with a mask function ``m``, and the weights trained to *maximise* it
    (the paper's min-max problem ``min_w max_lambda L``) by their own Adam.

    The ascent gradient is taken in closed form from the detached losses (no extra backward):
    ``g_i = d value / d lambda_i = m'(lambda_i) l_i / N`` (``N`` points in the batch), and one
    step of Adam (torch's update, ``maximize=True``: ``m_i <- b1 m_i + (1-b1) g_i``,
    ``v_i <- b2 v_i + (1-b2) g_i^2``, ``lambda_i <- lambda_i + lr/(1-b1^k_i) * m_i / (sqrt(v_i)/sqrt(1-b2^k_i) + eps)``,
    ``k_i`` the point's own step count) gives the weights of the next step. As in the authors'
    code (one gradient tape for the network and the weights), a step's value and the network's
    gradient use the weights as they were before that step's ascent; the ascent is committed
    with the rest of the pointwise state once the step succeeds. Since ``m' > 0`` and ``l_i >= 0``,
    ``g_i >= 0``: Adam only moves a weight up, so weights started at ``>= 0`` stay ``>= 0``.

    Args:
        mask: ``"square"`` (``m = lambda^2``, the authors' code: ``mean((lambda r)^2)``, and Chen
            et al.'s re-implementation), ``"identity"`` (``m = lambda``, the paper's polynomial
            mask with ``c = q = 1``) or ``"sigmoid"`` (``m = 1/(1+exp(-lambda))``, bounded; PINA's default).
        init: a new point's weight: ``"uniform"`` (``scale * U(0,1)``, the paper's initialisation:
            ``U(0,1)`` on the residual points and ``100 * U(0,1)`` on the initial condition of
            Allen-Cahn, i.e. ``SAPINN(scale=100)`` on the ``ic`` term) or a float ``>= 0`` (constant:
            ``100`` on the residual points of the authors' Burgers code).
        scale: the factor of ``"uniform"``.
        lr, betas, eps: the weights' Adam; ``lr = 5e-3`` (the authors' code, for the network and
            the weights alike), ``betas = (0.9, 0.999)`` (their Burgers code; their Allen-Cahn code
            uses ``beta1 = 0.99``), ``eps = 1e-8`` (torch's; Keras' is 1e-7, added without bias correction).
        seed: seed of the weighting's own generator for the ``"uniform"`` draws. Its state is part
            of the pointwise state (``state_dict``), so a resumed run draws the same initial weights.
            Distributed: give every process the same seed (the default): the new points of an
            update are drawn from the union of the processes' points, on every process alike.
        forget_after: ``None`` (default): the table keeps every id seen (it grows with resampling);
            ``n``: an id not seen in the last ``n`` steps is dropped from the state when a step
            succeeds (seen again, it starts afresh as a new point).

    Needs ``ids`` (the weights, Adam's moments and step counts are kept per point id in the
    balancer's state: they follow the points through shuffles and mini-batches; a point seen for
    the first time gets ``init``, drawn in ascending id order, so the same points in another order
    get the same weights). The state keeps every id seen unless ``forget_after`` is given.
    ``kind="loss"`` values must be ``>= 0``.
    The re-evaluations of a step (an L-BFGS closure) use the weights its first evaluation used,
    from before the ascent, so that every evaluation of the step has one objective.

    Distributed: the ascent runs on the union of every process's points (module docstring), as
    one process would on the union batch: ``N`` is the number of points of the union, i.e.
    ``g_i`` is the gradient of the mean over the union (with equal batches on the processes,
    the gradient of the mean over processes of their terms' values, which DDP averages); the new
    points' initial weights are drawn for the union too. Each process's value uses its own points'
    weights from before the ascent.
    """

    kind, label = "sa_pinn", "SA-PINN"
    value_before_update = True  # the value uses the weights before the step's ascent

    def fresh_label(self) -> str:
        return f"initial weights drawn from {self.scale} * U(0,1)" if self.init == "uniform" else f"the initial weight {self.init}"

    def __init__(self, mask: Literal["square", "identity", "sigmoid"] = "square", *, init: float | str = "uniform",
                 scale: float = 1.0, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 seed: int = 0, forget_after: int | None = None):
        if mask not in _MASKS:
            raise ValueError(f"SAPINN(mask=...) is one of {_MASKS}, got {mask!r}")
        _check_sa_init(init, scale)
        _check_adam(lr, betas, eps)
        _check_forget(self.label, forget_after)
        self.forget_after = forget_after
        self.mask, self.init, self.scale = mask, init if init == "uniform" else float(init), float(scale)
        self.lr, self.betas, self.eps, self.seed = float(lr), (float(betas[0]), float(betas[1])), float(eps), int(seed)
        self._checked_ids, self._same_ids = _Memo(), _Memo()  # ids verified earlier (no host reads)

    def __repr__(self) -> str:
        return f"SAPINN(mask={self.mask!r}, init={self.init!r}, scale={self.scale}, lr={self.lr}, betas={self.betas})"

    def initial_state(self) -> dict[str, Any]:
        return {"kind": self.kind, **_empty_table(floats=("lambdas", "m", "v"), ints=("steps",)),
                "generator": torch.Generator().manual_seed(self.seed).get_state()}

    def check(self, name: str, residual: Residual) -> None:
        _check_ids(name, residual, self.label, "Residual(values, ids=ids)", self._checked_ids)
        _check_nonnegative(name, residual, self.label)

    def masked(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """``m(lambda)`` and ``m'(lambda)``."""
        if self.mask == "square":
            return lam * lam, 2 * lam
        if self.mask == "identity":
            return lam, torch.ones_like(lam)
        s = torch.sigmoid(lam)
        return s, s * (1 - s)

    def reduce(self, losses: Tensor, ids: Tensor, state: Mapping[str, Any], update: bool, union: _Union | None = None):
        """``union``: the update's points of every rank (:meth:`Reduction.gather_points`; ``None``: this batch)."""
        union = union or _Union.local(ids, losses)
        table = _IdTable(state, union.ids, union.values, self._same_ids)
        fresh, generator = self._fresh(table, state["generator"])
        lam = table.column("lambdas", fresh)
        weight, slope = self.masked(lam)
        value = (union.mine(weight).to(losses.dtype) * losses).mean()  # the weights before the ascent
        figures = _summary("sa_pinn", union.mine(lam))
        if not update:
            return value, figures, state
        g = slope * union.values / union.values.shape[0]  # N: the union's points
        rows = self._ascent(lam, g, table.column("m", 0.0), table.column("v", 0.0), table.column("steps", 0))
        return value, figures, {"kind": self.kind, **_advanced(table, rows, state, self.forget_after), "generator": generator}

    def _fresh(self, table: _IdTable, generator_state: Tensor) -> tuple[Tensor | float, Tensor]:
        """The initial weights of the batch's new ids (``scale * U(0,1)`` in ascending id order) and
        the generator's state after the draws."""
        if self.init != "uniform":
            return self.init, generator_state
        count = table.new_count
        if count == 0:
            return 0.0, generator_state
        new = ~table.found
        generator = torch.Generator()
        generator.set_state(generator_state)
        draws = self.scale * torch.rand(count, generator=generator, dtype=torch.float64)
        ranked = torch.empty_like(draws).scatter_(0, torch.argsort(table.ids[new].cpu()), draws)
        fresh = torch.zeros(table.ids.shape, dtype=table.dtype, device=table.like.device)
        fresh[new] = ranked.to(fresh)
        return fresh, generator.get_state()

    def _ascent(self, lam: Tensor, g: Tensor, m: Tensor, v: Tensor, steps: Tensor) -> dict[str, Tensor]:
        """One Adam step up the gradient ``g``, per point (torch.optim.Adam's arithmetic, ``maximize=True``)."""
        b1, b2 = self.betas
        steps = steps + 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bias1 = 1 - torch.pow(lam.new_tensor(b1), steps)
        bias2 = 1 - torch.pow(lam.new_tensor(b2), steps)
        lam = lam + self.lr / bias1 * m / (v.sqrt() / bias2.sqrt() + self.eps)
        return {"lambdas": lam, "m": m, "v": v, "steps": steps}

    def checked_state(self, name: str, state: Any) -> dict[str, Any]:
        checked = _checked_id_state(name, self.label, state, floats=("lambdas", "m", "v"), ints=("steps",))
        generator = state.get("generator")
        try:
            torch.Generator().set_state(generator)
        except (TypeError, RuntimeError) as error:
            raise ValueError(f"corrupt state: the SA-PINN generator state of term {name!r} cannot be loaded ({error})") from error
        return {"kind": self.kind, **checked, "generator": generator.clone()}


class _Union(NamedTuple):
    """An update's points: their ids and detached per-point values (``r_i`` for :class:`RBA`,
    ``l_i`` otherwise) over every rank, one occurrence per id, and ``own``, the rows of the
    calling rank's points (``None``: the rows are the rank's own batch, as in one process)."""

    ids: Tensor
    values: Tensor
    own: Tensor | None = None

    @classmethod
    def local(cls, ids: Tensor, values: Tensor) -> "_Union":
        return cls(ids, values.detach(), None)

    def mine(self, x: Tensor) -> Tensor:
        """``x`` (one row per point of the union) at the calling rank's points."""
        return x if self.own is None else x[self.own]


class _Decay(NamedTuple):
    """A BRDR update's per-point quantities before the weights: the id table, ``d_i``, ``e_i``, ``irdr_i``."""

    table: "_IdTable"
    gap: Tensor
    r4: Tensor
    irdr: Tensor


class BRDR:
    r"""Balanced residual decay rate weights (Chen, Howard & Stinis 2024/2025, "Self-adaptive
    weights based on balanced residual decay rate for physics-informed neural networks and deep
    operator networks", arXiv:2407.01613), as in the authors' code (``SAweight.BRDR``): per point,
    with ``l_i`` the per-point loss (``r_i^2``) and ``k`` the term's update count,

    ``e_i <- e_i + (1 - beta_c^d_i) (l_i^2 - e_i)`` (a moving average of ``r_i^4``),
    ``irdr_i = l_i / (sqrt(e_i / (1 - beta_c^k)) + 1e-14)`` (the inverse residual decay rate),
    ``w_i <- w_i + (1 - beta_w^d_i) (irdr_i / mean_j irdr_j - w_i)`` (stop-gradient), then the
    term's value ``mean_i w_i l_i`` with the updated weights.

    ``d_i = min(k - last_seen_i, max_gap)``: the steps since the point was last seen (1 for a
    point of every batch), so a point that comes back after a while decays as if it had been
    updated every step in between (the authors' ``last_seen``, capped at ``intervalMax`` = 10
    epochs of mini-batches); a new point has ``last_seen = 0``, ``e = 0``, ``w = 1``.

    ``mean_j irdr_j`` pools the points of every term with ``BRDR(pool="all")`` weights (the
    authors' ``BRDRMaster.updateK``: the sum of all terms' ``irdr`` over their total point count),
    so the weights also balance those terms against each other; ``pool="term"``: over the term's
    own points (the weights then balance points within a term only, and the terms are left to
    the strategy). Their global scale factor (``lamda``, updated from the total loss and the
    squared gradient norm, rescaling the gradients: a step-size adaptation, not a pointwise
    weight) is left out.

    Args:
        beta_c, beta_w: 0.999, 0.999 (the authors' defaults).
        pool: ``"all"`` (the authors') or ``"term"``, see above.
        max_gap: the cap of ``d_i`` (the authors: 10 times the batches per epoch; 10 for full batches).
        forget_after: ``None`` (default): the table keeps every id seen (it grows with resampling);
            ``n``: an id not seen in the last ``n`` steps is dropped from the state when a step
            succeeds (seen again, it starts afresh as a new point).

    Needs ``ids``; the state keeps the ids seen (weights, ``e``, ``last_seen``; see ``forget_after``)
    and the update count.

    Distributed: the update runs on the union of every process's points (module docstring):
    ``mean_j irdr_j`` is the mean over the union (of every pooled term), ``last_seen`` and the
    gaps count the steps since any process last held the point; every process then weights its
    own points with their updated weights.
    """

    kind, label = "brdr", "BRDR"
    value_before_update = False  # the value uses the updated weights

    def fresh_label(self) -> str:
        return "the initial weight 1"

    def __init__(self, beta_c: float = 0.999, beta_w: float = 0.999, *, max_gap: int = 10, forget_after: int | None = None,
                 pool: Literal["all", "term"] = "all"):
        for label, beta in (("beta_c", beta_c), ("beta_w", beta_w)):
            if not 0 <= beta < 1:
                raise ValueError(f"BRDR({label}=...) is in [0, 1), got {beta!r}")
        if pool not in ("all", "term"):
            raise ValueError(f"BRDR(pool=...) is 'all' (the authors': every BRDR term's points) or 'term', got {pool!r}")
        if isinstance(max_gap, bool) or not isinstance(max_gap, int) or max_gap < 1:
            raise ValueError(f"BRDR(max_gap=...) is a positive integer, got {max_gap!r}")
        _check_forget(self.label, forget_after)
        self.beta_c, self.beta_w, self.max_gap, self.forget_after = float(beta_c), float(beta_w), max_gap, forget_after
        self.pool = pool
        self._checked_ids, self._same_ids = _Memo(), _Memo()  # ids verified earlier (no host reads)

    def __repr__(self) -> str:
        return f"BRDR(beta_c={self.beta_c}, beta_w={self.beta_w}, max_gap={self.max_gap}, pool={self.pool!r})"

    def initial_state(self) -> dict[str, Any]:
        return {"kind": self.kind, **_empty_table(floats=("weights", "r4"))}

    def check(self, name: str, residual: Residual) -> None:
        _check_ids(name, residual, self.label, "Residual(values, ids=ids)", self._checked_ids)
        _check_nonnegative(name, residual, self.label)

    def decay(self, union: _Union, state: Mapping[str, Any]) -> _Decay:
        """The first half of an update: the moving average ``e`` and ``irdr`` of the update's
        points (``union``: every rank's, :meth:`Reduction.gather_points`)."""
        table = _IdTable(state, union.ids, union.values, self._same_ids)
        step = state["step"] + 1
        gap = (step - table.column("last_seen", 0)).clamp(max=self.max_gap)
        l = union.values.to(table.dtype)
        r4 = table.column("r4", 0.0)
        r4 = r4 + (1 - torch.pow(l.new_tensor(self.beta_c), gap)) * (l * l - r4)
        irdr = l / ((r4 / (1 - self.beta_c**step)).sqrt() + 1e-14)
        return _Decay(table, gap, r4, irdr)

    def reduce(self, losses: Tensor, ids: Tensor, state: Mapping[str, Any], update: bool,
               pooled: tuple[_Decay, Tensor] | None = None, union: _Union | None = None):
        """``pooled``: this term's :meth:`decay` and the mean ``irdr`` over the pooled terms;
        ``union``: the update's points of every rank (:meth:`Reduction.gather_points`; ``None``: this batch)."""
        if not update:
            w = _IdTable(state, ids, losses, self._same_ids).column("weights", 1.0)
            return (w.to(losses.dtype) * losses).mean(), _summary("brdr", w), state
        union = union or _Union.local(ids, losses)
        decay, mean = pooled if pooled is not None else (self.decay(union, state), None)
        mean = decay.irdr.mean() if mean is None else mean
        w = decay.table.column("weights", 1.0)
        balanced = decay.irdr / mean.clamp(min=torch.finfo(w.dtype).tiny)
        w = w + (1 - torch.pow(w.new_tensor(self.beta_w), decay.gap)) * (balanced - w)
        new_state = {"kind": self.kind, **_advanced(decay.table, {"weights": w, "r4": decay.r4}, state, self.forget_after)}
        mine = union.mine(w)
        return (mine.to(losses.dtype) * losses).mean(), _summary("brdr", mine), new_state

    def checked_state(self, name: str, state: Any) -> dict[str, Any]:
        return {"kind": self.kind, **_checked_id_state(name, self.label, state, floats=("weights", "r4"))}


Weighting = Causal | RBA | SAPINN | BRDR


class Reduced(NamedTuple):
    """One call's pointwise terms, reduced: the plain loss dict, the figures, the pending state,
    the loss dict as given (its :class:`Residual` terms, for the ``ntk`` strategy) and the
    states this step's re-evaluations use (:attr:`Pointwise.held`)."""

    losses: dict[str, Any]
    figures: dict[str, dict[str, Any]]
    state: dict[str, dict[str, Any]]
    given: Any = None
    held: dict[str, dict[str, Any]] | None = None


class Pointwise:
    """The balancer's pointwise weightings ``{term: Causal | RBA | SAPINN | BRDR}`` and their state.

    ``held``: per term, the state the re-evaluations of the step just taken use (an L-BFGS
    closure evaluated again at other parameters, :meth:`reduce` with ``reevaluation``), so that
    every evaluation of one step weights the points as its first evaluation did: the state from
    before the step for the weightings whose value uses it (``Causal``: its ``eps``; ``SAPINN``:
    the weights before the ascent), the committed one for the others (``RBA``, ``BRDR``: their
    value uses the updated weights). Dropped when the next step starts (:meth:`start_step`).
    """

    def __init__(self, weightings: Mapping[str, Weighting] | None, reduction: Reduction | None = None):
        weightings = dict(weightings or {})
        for name, w in weightings.items():
            if not isinstance(name, str):
                raise TypeError(f"pointwise= maps term names to Causal(...), RBA(...), SAPINN(...) or BRDR(...); "
                                f"got the key {name!r}")
            if not isinstance(w, (Causal, RBA, SAPINN, BRDR)):
                raise TypeError(f"pointwise[{name!r}] is a Causal(...), RBA(...), SAPINN(...) or BRDR(...), "
                                f"got {type(w).__name__}")
        self.weightings, self.reduction = weightings, reduction or Reduction()
        self.state = {name: w.initial_state() for name, w in weightings.items()}
        self.held: dict[str, dict[str, Any]] = {}
        self._warned_fresh: set[str] = set()

    def reduce(self, losses: Any, update: bool, *, reevaluation: bool = False, frozen: bool = False) -> Reduced:
        """``losses`` with every :class:`Residual` reduced to a scalar; nothing is changed here
        (the new state is returned, committed by :meth:`commit` once the step succeeded).
        ``update``: the step advances the state; ``reevaluation``: the step just taken evaluated
        again (its :attr:`held` states); neither: the committed state held (``frozen``,
        :meth:`~lossbalance.LossBalancer.evaluate`), where points the tables do not hold take the
        initial value (a warning, once per term; ``frozen``: a frozen step, which warns about an
        empty table too)."""
        if not isinstance(losses, Mapping):
            return Reduced(losses, {}, {})
        prepared, refusal = self._checked_terms(losses)
        if update:
            self._require_everywhere(losses, refused=refusal is not None)
        if refusal is not None:
            raise refusal
        if not prepared:  # no Residual term
            return Reduced(losses, {}, {}, losses)
        out, figures, state = self._reduce_terms(losses, prepared, update, reevaluation, frozen)
        return Reduced(out, figures, state, losses, self._held_after(state) if update else {})

    def _reduce_terms(self, losses: Mapping[str, Any], prepared: Mapping[str, tuple], update: bool,
                      reevaluation: bool, frozen: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The loss dict with the ``prepared`` terms reduced, their figures and new states."""
        unions = self._unions(prepared) if update else {}
        pooled = self._pooled_decays(unions) if update else {}
        out, figures, state = dict(losses), {}, {}
        for name, arrays in prepared.items():
            out[name], weighted = self._reduce_term(name, losses[name].reduction, arrays, self._state_for(name, reevaluation),
                                                    update, pooled.get(name), unions.get(name))
            if not update and not reevaluation:
                self._warn_fresh(name, arrays[2], frozen)
            if weighted is not None:
                figures[name], state[name] = weighted
        return out, figures, state

    def _state_for(self, name: str, reevaluation: bool) -> dict[str, Any] | None:
        """The state a term is reduced under: a re-evaluation's held one, else the committed one."""
        return self.held.get(name, self.state.get(name)) if reevaluation else self.state.get(name)

    def _held_after(self, state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The re-evaluation states of a step that advances to ``state``: the state before it for
        the weightings whose value uses that (see :attr:`held`)."""
        return {n: self.state[n] for n in state if self.weightings[n].value_before_update}

    def _warn_fresh(self, name: str, ids: Tensor, frozen: bool) -> None:
        """After a held reduction: warn once per term when its per-id table lacked some of the
        batch's points (the count the reduction's table lookup left, no host read more): a
        started table, or on a ``frozen`` step an empty one too (an evaluation before the first
        step is not the trap; a balancer frozen from the start never learns its weights)."""
        weighting = self.weightings.get(name)
        if weighting is None or isinstance(weighting, Causal) or name in self._warned_fresh:
            return
        count, empty = weighting._same_ids.unknown, not self.state[name]["ids"].numel()
        if not count or (empty and not frozen):
            return
        self._warned_fresh.add(name)
        if empty:
            warn_user(f"loss term {name!r}: its {weighting.label} table is empty and held (frozen before any step "
                      f"updated it): all {ids.numel()} points take {weighting.fresh_label()}. To keep the weights "
                      "an earlier balancer learned (Adam before L-BFGS), load its state first: "
                      "balancer.load_state_dict({**earlier.state_dict(), 'optimizer': None}), then balancer.freeze()")
        else:
            warn_user(f"loss term {name!r}: {count} of its {ids.numel()} points have ids that its {weighting.label} "
                      f"table does not hold, and the table is held (frozen=True, or evaluate()): they take "
                      f"{weighting.fresh_label()}. Evaluate on points the table holds, or a plain tensor term")

    def _refuse_scalars(self, losses: Mapping[str, Any]) -> None:
        for name in self.weightings:
            if name in losses and isinstance(losses[name], Tensor):
                raise TypeError(
                    f"loss term {name!r} has pointwise weights ({self.weightings[name]!r}) but was passed as a "
                    "scalar: pass its per-point values, lossbalance.Residual(values, t=..., ids=...)"
                )

    def _prepared(self, name: str, term: Residual) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The term's per-point values (``r^2`` of residuals), times and ids, checked for its weighting."""
        values, t, ids = _checked(name, term)
        per_point = values.pow(2) if term.kind == "residual" else values
        weighting = self.weightings.get(name)
        if weighting is not None:
            if term.reduction != "mean":
                raise ValueError(f"loss term {name!r} has pointwise weights, which define their own mean: use Residual(reduction='mean')")
            weighting.check(name, term)
        return (values if isinstance(weighting, RBA) else per_point), t, ids  # RBA scales the residuals

    def _checked_terms(self, losses: Mapping[str, Any]) -> tuple[dict[str, tuple], Exception | None]:
        """This rank's checks: weighted terms passed as Residuals, each Residual's values, times
        and ids (:meth:`_prepared`). Returns the prepared arrays, or the error, which the caller
        raises once the other ranks were told (:meth:`_require_everywhere`)."""
        try:
            self._refuse_scalars(losses)
            return {name: self._prepared(name, term) for name, term in losses.items() if isinstance(term, Residual)}, None
        except (TypeError, ValueError) as error:
            return {}, error

    def relays(self, update: bool) -> bool:
        """Whether a call with ``update`` tells the other ranks when this one's terms fail its
        checks (:meth:`_require_everywhere`'s all-reduce), so the balancer need not."""
        return update and self.reduction.active and any(not isinstance(w, Causal) for w in self.weightings.values())

    def _require_everywhere(self, losses: Mapping[str, Any], *, refused: bool = False) -> None:
        """Distributed, on an update: a term with per-id weights that some ranks pass and others
        do not would leave the gather of :meth:`_unions` waiting; every rank raises instead. The
        same all-reduce carries ``refused`` (this rank's checks failed): the other ranks raise."""
        keyed = [n for n, w in self.weightings.items() if not isinstance(w, Causal)]
        if not keyed or not self.reduction.active:
            return
        *counts, refusing = self.reduction.holders([isinstance(losses.get(n), Residual) for n in keyed] + [refused])
        if refusing:
            _raise_unless_refused(refusing, refused)
            return  # this rank raises its own error
        partial = [n for n, c in zip(keyed, counts) if 0 < c < self.reduction.world]
        if partial:
            raise ValueError(
                f"loss terms {partial} have per-point weights, whose tables every process updates together: "
                "pass them in every process's loss dict on every step (some processes did not), or give them "
                "no pointwise= weighting"
            )

    def _unions(self, prepared: Mapping[str, tuple]) -> dict[str, _Union]:
        """Per term with per-id weights, the update's points of every rank
        (:meth:`Reduction.gather_points`), in the declared order of the weightings (the same
        on every rank, so the collectives match)."""
        unions = {}
        for name, weighting in self.weightings.items():
            if name in prepared and not isinstance(weighting, Causal):
                values, _, ids = prepared[name]
                unions[name] = _Union(*self.reduction.gather_points(ids, values.detach()))
        return unions

    def _pooled_decays(self, unions: Mapping[str, _Union]) -> dict[str, tuple[_Decay, Tensor]]:
        """Per term with ``BRDR(pool="all")`` weights: its decay and the ``irdr`` mean over all of
        them (over the union of every rank's points)."""
        decays = {}
        for name, union in unions.items():
            weighting = self.weightings[name]
            if isinstance(weighting, BRDR) and weighting.pool == "all":
                decays[name] = weighting.decay(union, self.state[name])
        if not decays:
            return {}
        irdr = [d.irdr for d in decays.values()]
        mean = sum(x.sum() for x in irdr) / sum(x.numel() for x in irdr) if len(irdr) > 1 else irdr[0].mean()
        return {name: (decay, mean) for name, decay in decays.items()}

    def _reduce_term(self, name: str, reduction: str, arrays: tuple, state: Any, update: bool,
                     pooled: tuple[_Decay, Tensor] | None = None, union: _Union | None = None):
        """One Residual term (its :meth:`_prepared` arrays) under its weighting's ``state``: its
        value and, when it has a pointwise weighting, (figures, new state)."""
        values, t, ids = arrays
        weighting = self.weightings.get(name)
        if weighting is None:
            return (values.mean() if reduction == "mean" else values.sum()), None
        if isinstance(weighting, Causal):
            value, figures, state = weighting.reduce(values, t, state, update)
        elif isinstance(weighting, BRDR):
            value, figures, state = weighting.reduce(values, ids, state, update, pooled, union=union)
        else:
            value, figures, state = weighting.reduce(values, ids, state, update, union=union)
        return value, (figures, state)

    def commit(self, state: Mapping[str, dict[str, Any]], held: Mapping[str, dict[str, Any]] | None = None) -> None:
        """The state after a successful call; ``held``: the states of its re-evaluations (:attr:`held`)."""
        self.state = {**self.state, **state}
        self.held = dict(held or {})

    def start_step(self) -> None:
        """A new step begins: the last step's re-evaluation states are dropped."""
        self.held = {}

    def snapshot(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """What :meth:`restore` puts back (the states are replaced on commit, never changed in place)."""
        return self.state, self.held

    def restore(self, snapshot: tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]) -> None:
        self.state, self.held = snapshot

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()} for name, s in self.state.items()}

    def checked_state(self, saved: Any) -> dict[str, dict[str, Any]] | None:
        """``saved`` (the ``"pointwise"`` entry of a state) checked against this balancer's weightings."""
        if saved is None:
            return None
        if not isinstance(saved, Mapping):
            raise ValueError(f"corrupt state: 'pointwise' is {type(saved).__name__}, expected a dict per term")
        unknown = sorted(set(saved) - set(self.weightings))
        if unknown:
            raise ValueError(f"this state has pointwise weights for term(s) {unknown}, which this balancer does not "
                             "weight pointwise: build it with the same pointwise= before loading")
        checked = {}
        for name, s in saved.items():
            weighting = self.weightings[name]
            kind = s.get("kind") if isinstance(s, Mapping) else None
            if kind != weighting.kind:
                raise ValueError(f"this state has {kind!r} pointwise weights for term {name!r}; this balancer has "
                                 f"{weighting!r}: build it with the same pointwise= before loading")
            checked[name] = weighting.checked_state(name, s)
        return checked


def _raise_unless_refused(refusing: int, refused: bool) -> None:
    """After the ranks told each other: a rank whose own checks passed raises, the others refused."""
    if not refused:
        raise refused_error(refusing)


def _causal_schedule(chunks: Any, eps: Any) -> list[float]:
    """``eps`` as a list (one value or the annealing schedule), ``chunks`` checked."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"Causal(chunks=...) is a positive integer, got {chunks!r}")
    schedule = [eps] if isinstance(eps, (int, float)) else list(eps)
    if not schedule or not all(isinstance(e, (int, float)) and math.isfinite(e) and e >= 0 for e in schedule):
        raise ValueError(f"Causal(eps=...) is a finite float >= 0 or a non-empty list of them, got {eps!r}")
    return schedule


def _check_causal_variant(split: Any, cumulative: Any, delta: Any, t_range: Any) -> None:
    if split not in ("count", "time"):
        raise ValueError(f"Causal(split=...) is 'count' (equal-count groups sorted by t) or 'time' (a time grid), got {split!r}")
    if cumulative not in ("exclusive", "inclusive"):
        raise ValueError(f"Causal(cumulative=...) is 'exclusive' or 'inclusive', got {cumulative!r}")
    if not 0 < delta < 1:
        raise ValueError(f"Causal(delta=...) is in (0, 1), got {delta!r}")
    if t_range is not None and split != "time":
        raise ValueError(f"Causal(t_range=...) sets the time grid of split='time'; split={split!r} groups the "
                         "batch by rank of t and has no grid: pass split='time' or drop t_range")
    if t_range is not None and (len(t_range) != 2 or not t_range[0] < t_range[1]):
        raise ValueError(f"Causal(t_range=...) is (t_min, t_max) with t_min < t_max, got {t_range!r}")


def _checked(name: str, term: Residual) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The Residual's tensors as plain tensors, their shapes checked (errors name the term)."""
    values = _checked_values(name, term.values)
    return values, _checked_companion(name, "t", term.t, values), _checked_companion(name, "ids", term.ids, values)


def _checked_values(name: str, values: Any) -> Tensor:
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError(f"loss term {name!r}: Residual values must be a floating-point tensor, got "
                        f"{type(values).__name__ if not isinstance(values, Tensor) else values.dtype}")
    values = values.as_subclass(Tensor)
    if values.dim() != 1:
        raise ValueError(f"loss term {name!r}: Residual values must be 1-D, one entry per point, got shape "
                         f"{tuple(values.shape)} (flatten them, e.g. r.reshape(-1))")
    if values.numel() == 0:
        raise ValueError(f"loss term {name!r}: Residual values are empty (no points in this batch): give at least one point")
    return values


def _checked_companion(name: str, label: str, x: Any, values: Tensor) -> Tensor | None:
    """``t`` or ``ids``: one per point, on the values' device (ids as integers)."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"loss term {name!r}: Residual {label} must be a tensor, got {type(x).__name__}")
    x = _plain_detached(x)
    if x.dim() != 1 or x.shape[0] != values.shape[0]:
        raise ValueError(f"loss term {name!r}: Residual {label} has shape {tuple(x.shape)}, the values "
                         f"{tuple(values.shape)}: give one {label} per point")
    if label == "ids" and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"loss term {name!r}: Residual ids must be integers, got {x.dtype}")
    if x.device != values.device:
        raise ValueError(f"loss term {name!r}: Residual {label} is on {x.device}, its values on {values.device}")
    return x.long() if label == "ids" else x


def _equal_on_cpu(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are CPU tensors of one shape and dtype holding the same values."""
    return (b.device.type == "cpu" and a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a, b))


def _plain_detached(x: Tensor) -> Tensor:
    """``x`` as a plain detached tensor; the very tensor where it already is one (the weightings
    remember what they computed from it: :class:`_Memo`)."""
    if type(x) is not Tensor:
        x = x.as_subclass(Tensor)
    return x.detach() if x.requires_grad else x


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


class _Memo:
    """What earlier calls computed or verified from tensors they were given, by object and
    version (``_version`` counts in-place changes): for a fixed point set, once instead of on
    every step (with its host reads). A few entries, never saved or copied (a copy starts empty)."""

    _SIZE = 8

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple[tuple[weakref.ref, int], ...], Any]] = {}
        self.unknown = 0  # an id table's memo: how many ids of its last lookup it did not hold (_IdTable)

    def __reduce__(self) -> tuple:
        return (_Memo, ())

    def find(self, *tensors: Tensor) -> Any:
        """What was noted for these very tensors, unchanged since (``None``: nothing)."""
        entry = self._entries.get(id(tensors[0]))
        if entry is None or not all(ref() is t and _version(t) == v for (ref, v), t in zip(entry[0], tensors)):
            return None
        return entry[1]

    def note(self, *tensors: Tensor, value: Any = True) -> None:
        versions = [_version(t) for t in tensors]
        if None in versions:
            return
        self._entries.pop(id(tensors[0]), None)
        self._entries[id(tensors[0])] = (tuple((weakref.ref(t), v) for t, v in zip(tensors, versions)), value)
        while len(self._entries) > self._SIZE:
            self._entries.pop(next(iter(self._entries)))


class _IdTable:
    """A term's per-point state (``state["ids"]``: sorted unique ids, one row of every column
    each) looked up for a batch's ``ids``: the stored rows of the ids found, new ids marked.
    ``memo``: the weighting's record of tables found equal to the batch's ids (no host read)."""

    def __init__(self, state: Mapping[str, Any], ids: Tensor, like: Tensor, memo: _Memo):
        self.state, self.ids, self.like = state, ids, like
        self.dtype = torch.promote_types(like.dtype, torch.float32)  # a bf16 batch does not round the table
        self.known = state["ids"].to(ids.device)
        n = self.known.numel()
        self.same = memo.find(self.known, ids) is not None
        if not self.same and n == ids.numel() and torch.equal(self.known, ids):
            self.same = True
            memo.note(self.known, ids)
        if self.same:  # the whole table, in its order
            self.pos, self.found, self.new_count = None, None, 0
            memo.unknown = 0
            return
        self.pos = torch.searchsorted(self.known, ids).clamp(max=max(n - 1, 0))
        self.found = self.known[self.pos] == ids if n else torch.zeros_like(ids, dtype=torch.bool)
        self.new_count = int(ids.numel() - self.found.sum()) if n else ids.numel()  # one host read
        memo.unknown = self.new_count

    def column(self, key: str, fresh: Tensor | float) -> Tensor:
        """Column ``key`` for the batch's points: the stored row, ``fresh`` (a number or one value
        per point) for a new id. Float columns in :attr:`dtype` (``like``'s, at least float32:
        the tables keep their precision under bf16/float16 residuals, as optimizer states do)."""
        stored = self.state[key].to(self.like.device)
        if stored.is_floating_point():
            stored = stored.to(self.dtype)
        if self.new_count == 0:
            return stored if self.same else stored[self.pos]
        fresh = torch.as_tensor(fresh, dtype=stored.dtype, device=stored.device).expand(self.ids.shape)
        return torch.where(self.found, stored[self.pos], fresh) if self.known.numel() else fresh.clone()

    def merged(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The table with the batch's rows set to ``rows`` (new ids inserted in sorted order);
        the stored tensors are not changed."""
        if self.same:
            return {"ids": self.known, **rows}
        if self.new_count == 0:
            return {"ids": self.known, **{key: self.state[key].to(row).index_put((self.pos,), row) for key, row in rows.items()}}
        new = ~self.found
        ids = torch.cat([self.known, self.ids[new]])
        order = torch.argsort(ids)
        ids = ids[order]
        at = (torch.searchsorted(ids, self.ids),)
        out = {"ids": ids}
        for key, row in rows.items():
            out[key] = torch.cat([self.state[key].to(row), row[new]])[order].index_put(at, row)
        return out


def _empty_table(*, floats: Sequence[str], ints: Sequence[str] = ()) -> dict[str, Any]:
    """A per-id state with no ids yet: the columns, ``last_seen`` and the update count ``step``."""
    empty = torch.zeros(0, dtype=torch.long)
    return {"ids": empty, **{k: torch.zeros(0) for k in floats}, **{k: empty for k in ints}, "last_seen": empty, "step": 0}


def _advanced(table: _IdTable, rows: Mapping[str, Tensor], state: Mapping[str, Any], forget_after: int | None) -> dict[str, Any]:
    """The table after a successful step: the batch's ``rows``, seen at this step; with
    ``forget_after``, the ids not seen in the last ``forget_after`` steps dropped."""
    step = state["step"] + 1
    seen = torch.full(table.ids.shape, step, dtype=torch.long, device=table.ids.device)
    out = table.merged({**rows, "last_seen": seen})
    if forget_after is not None and not table.same:
        keep = step - out["last_seen"] < forget_after
        if not bool(keep.all()):
            out = {key: column[keep] for key, column in out.items()}
    return {**out, "step": step}


def _checked_id_state(name: str, method: str, state: Any, *, floats: Sequence[str], ints: Sequence[str] = ()) -> dict[str, Any]:
    """A saved per-id state: its table (with ``last_seen``) and its update count."""
    checked = _checked_table(name, method, state, floats=floats, ints=(*ints, "last_seen"))
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"corrupt state: the {method} state of term {name!r} has step {step!r}, not an integer >= 0")
    return {**checked, "step": step}


def _check_forget(method: str, forget_after: Any) -> None:
    if forget_after is not None and (isinstance(forget_after, bool) or not isinstance(forget_after, int) or forget_after < 1):
        raise ValueError(f"{method}(forget_after=...) is None (keep every id) or a positive integer, got {forget_after!r}")


_QUANTILES = (0.1, 0.5, 0.9)
_SUMMARY = ("min", "p10", "p50", "mean", "p90", "max")


def _summary(prefix: str, x: Tensor) -> dict[str, LazyFigures]:
    """The batch's per-point weights for ``stats`` and ``history``: ``<prefix>_min``, ``_p10``,
    ``_p50``, ``_mean``, ``_p90``, ``_max`` (the quantiles by linear interpolation between order
    statistics, as ``torch.quantile``), computed from one sort when first read."""
    return {f"{prefix}_summary": LazyFigures(tuple(f"{prefix}_{k}" for k in _SUMMARY), lambda: _order_figures(x))}


def _order_figures(x: Tensor) -> Tensor:
    """``[min, p10, p50, mean, p90, max]`` of ``x``."""
    ordered = x.detach().reshape(-1).sort().values
    n = ordered.numel()
    positions = [q * (n - 1) for q in _QUANTILES]
    below = [math.floor(p) for p in positions]
    picked = ordered[x.new_tensor([*below, *(min(b + 1, n - 1) for b in below)], dtype=torch.long)]
    lo, hi = picked[: len(below)], picked[len(below) :]
    p10, p50, p90 = torch.lerp(lo, hi, lo.new_tensor([p - b for p, b in zip(positions, below)])).unbind()
    return torch.stack([ordered[0], p10, p50, x.detach().mean(), p90, ordered[-1]])


def _check_ids(name: str, residual: Residual, method: str, usage: str, memo: _Memo) -> None:
    """The term's ids are present and unique (``memo``: ids already found so, unchanged, pass)."""
    if residual.ids is None:
        raise ValueError(f"loss term {name!r} has {method} weights: pass stable point ids, {usage}")
    ids = residual.ids
    if memo.find(ids) is not None:
        return
    sorted_unique = ids.numel() < 2 or bool((ids.diff() > 0).all())  # no sort needed
    if not sorted_unique and bool((torch.sort(ids).values.diff() == 0).any()):
        raise ValueError(f"loss term {name!r}: the point ids of its Residual repeat; each point needs its own id")
    memo.note(ids)


def _check_nonnegative(name: str, residual: Residual, method: str) -> None:
    """Per-point losses (``kind="loss"``) must be >= 0: the weights rise with them."""
    if residual.kind == "loss" and bool((residual.values.detach() < 0).any()):
        raise ValueError(f"loss term {name!r} has {method} weights and negative per-point losses: pass losses "
                         "l_i >= 0 (e.g. r**2), or the residuals themselves with Residual(r, ids=ids, kind='residual')")


def _checked_table(name: str, method: str, state: Any, *, floats: Sequence[str], ints: Sequence[str] = ()) -> dict[str, Tensor]:
    """A saved per-point table: sorted unique long ``ids`` and one row per id in every column (cloned)."""
    state = state if isinstance(state, Mapping) else {}
    ids, columns = state.get("ids"), {key: state.get(key) for key in (*floats, *ints)}
    if not _table_ok(ids, columns, floats, ints):
        raise ValueError(f"corrupt state: the {method} state of term {name!r} is not sorted unique ids with one "
                         f"row of {', '.join(columns)} each")
    return {"ids": ids.clone(), **{key: c.clone() for key, c in columns.items()}}


def _table_ok(ids: Any, columns: Mapping[str, Any], floats: Sequence[str], ints: Sequence[str]) -> bool:
    tensors = [ids, *columns.values()]
    if not all(isinstance(x, Tensor) for x in tensors) or ids.dim() != 1:
        return False
    if any(c.shape != ids.shape for c in columns.values()):
        return False
    dtypes = [ids.dtype == torch.long] + [columns[k].is_floating_point() for k in floats]
    dtypes += [columns[k].dtype == torch.long for k in ints]
    return all(dtypes) and (ids.numel() < 2 or bool((ids.diff() > 0).all()))


def _check_sa_init(init: Any, scale: Any) -> None:
    if init != "uniform" and (isinstance(init, (bool, str)) or not isinstance(init, (int, float))
                              or not math.isfinite(init) or init < 0):
        raise ValueError(f"SAPINN(init=...) is 'uniform' (scale * U(0,1)) or a float >= 0, got {init!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"SAPINN(scale=...) is a positive float, got {scale!r}")


def _check_adam(lr: Any, betas: Any, eps: Any) -> None:
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"SAPINN(lr=...) is a positive float, got {lr!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"SAPINN(betas=...) is two floats in [0, 1), got {betas!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"SAPINN(eps=...) is a positive float, got {eps!r}")
