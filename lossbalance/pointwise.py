r"""Pointwise terms: per-point residual losses (:class:`Residual`), reduced to a scalar by the
balancer after their pointwise weighting: causal weights (:class:`Causal`) or residual-based
attention (:class:`RBA`).

A term of the loss dict may be a :class:`Residual` instead of a scalar. The balancer reduces it
to a scalar first (phase ``_pointwise`` of :meth:`LossBalancer._take`), so every strategy,
scope, combiner, :meth:`~LossBalancer.loss` and checkpoint sees a plain scalar term. The
pointwise weighting of a term is declared once, on the balancer::

    balancer = LossBalancer(opt, "lra", pointwise={"pde": Causal(chunks=32, eps=[1e-2, 1e-1, 1, 10, 100])})
    balancer.step({"pde": Residual(r**2, t=t), "ic": ic_loss})

and its state (the annealing index of :class:`Causal`, the per-point multipliers of
:class:`RBA`) lives in the balancer's ``state_dict`` (resumed bit for bit). The state advances
once per step (not on the re-evaluations of an L-BFGS closure) and only when the step succeeds:
a failed or skipped step leaves it as it was.

``values`` of a :class:`Residual`: with ``kind="loss"`` (default) the per-point losses
``l_i >= 0`` (e.g. ``r**2``); with ``kind="residual"`` the residuals ``r_i`` themselves, whose
per-point loss is ``r_i**2``. :class:`RBA` needs ``kind="residual"`` (its multipliers scale
``r_i`` before squaring, as in the paper).

Causal weights: the authors' repository states that the method is covered by a University of
Pennsylvania patent; this implementation was written from the paper only. Check the licence
terms that apply to your use.

Distributed runs: the chunks, the causal weights and the RBA multipliers are per process (each
process weights its own points).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["Residual", "Causal", "RBA", "Pointwise"]


class Residual:
    """A vector of per-point losses (or residuals), one loss term of the dict.

    Args:
        values: 1-D tensor, one entry per point: the per-point losses ``l_i`` (``kind="loss"``,
            e.g. ``r**2``) or the residuals ``r_i`` (``kind="residual"``, loss ``r_i**2``).
        t: per-point times (1-D, same length), for :class:`Causal` weights.
        ids: stable integer ids of the points (1-D, same length, unique), for :class:`RBA`'s
            per-point multipliers; the same point keeps its id across shuffles and resamplings.
        reduction: ``"mean"`` or ``"sum"`` of the per-point losses when the term has no
            pointwise weighting (weighted terms use the mean their paper defines).
        kind: ``"loss"`` or ``"residual"`` (what ``values`` holds).
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
        t_range: ``(t_min, t_max)`` for ``split="time"``.

    The authors' repository states that the method is covered by a University of Pennsylvania
    patent; implemented here from the paper only.
    """

    kind = "causal"

    def __init__(
        self, chunks: int = 32, eps: float | Sequence[float] = 1.0, *, split: Literal["count", "time"] = "count",
        cumulative: Literal["exclusive", "inclusive"] = "exclusive", delta: float = 0.99,
        t_range: tuple[float, float] | None = None,
    ):
        schedule = _causal_schedule(chunks, eps)
        _check_causal_variant(split, cumulative, delta, t_range)
        self.chunks, self.eps, self.split, self.cumulative = chunks, [float(e) for e in schedule], split, cumulative
        self.delta, self.t_range = float(delta), t_range

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
        """The chunk of every point (0..M-1)."""
        n, m = t.shape[0], self.chunks
        if self.split == "count":
            order = torch.argsort(t, stable=True)
            q, r = divmod(n, m)
            rank = torch.arange(n, device=t.device)
            big = r * (q + 1)  # the first r chunks hold q + 1 points
            chunk = torch.where(rank < big, rank // (q + 1), r + (rank - big) // max(q, 1))
            return torch.empty_like(chunk).scatter_(0, order, chunk)
        lo, hi = (t.min(), t.max()) if self.t_range is None else (t.new_tensor(self.t_range[0]), t.new_tensor(self.t_range[1]))
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        return ((t - lo) / span * m).floor().clamp(0, m - 1).long()

    def _chunks(self, losses: Tensor, t: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every point's chunk, the chunks' point counts and mean losses ``L_k``, their weights ``w_k``."""
        m = self.chunks
        chunk = self.chunk_index(t.detach())
        counts = torch.zeros(m, dtype=losses.dtype, device=losses.device).index_add_(0, chunk, torch.ones_like(losses))
        sums = torch.zeros(m, dtype=losses.dtype, device=losses.device).index_add(0, chunk, losses)
        chunk_loss = sums / counts.clamp(min=1)
        seen = torch.cumsum(chunk_loss.detach(), 0)
        if self.cumulative == "exclusive":
            seen = seen - chunk_loss.detach()
        return chunk, counts, chunk_loss, torch.exp(-eps * seen)

    def point_weights(self, losses: Tensor, t: Tensor, state: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Per point ``p`` (detached): its chunk's weight ``w_k(p)`` and its share ``1 / (M' n_k(p))``
        of the term's value (``M'`` non-empty chunks, ``n_k`` points in chunk k), so that the value
        is ``sum_p w_k(p) share_p l_p`` (used by the ``ntk`` strategy)."""
        chunk, counts, _, w = self._chunks(losses.detach(), t, self.eps[state["eps_index"]])
        return w[chunk], 1.0 / (counts[chunk] * (counts > 0).sum())

    def reduce(self, losses: Tensor, t: Tensor, state: Mapping[str, Any], update: bool):
        """The term's value, the figures for ``stats`` and the state after this step."""
        index = state["eps_index"]
        eps = self.eps[index]
        _, counts, chunk_loss, w = self._chunks(losses, t, eps)
        present = counts > 0
        value = (w * chunk_loss).sum() / present.sum()
        w_min = torch.where(present, w, torch.full_like(w, math.inf)).min()
        done = index == len(self.eps) - 1
        if update and len(self.eps) > 1 and not done and bool(w_min > self.delta):
            index += 1
        figures = {"causal_min": w_min, "causal_eps": eps, "causal_done": (w_min > self.delta).float() if done else 0.0}
        return value, figures, {"kind": self.kind, "eps_index": index}

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
    state keeps every id seen (it grows with resampling). On calls that do not advance the state
    (the re-evaluations of an L-BFGS closure) the stored multipliers are used unchanged.

    Args:
        gamma: decay (0.999), eta: learning rate (1e-3): the authors' code.
        init: the multiplier of a new point (0).
    """

    kind = "rba"

    def __init__(self, gamma: float = 0.999, eta: float = 1e-3, *, init: float = 0.0):
        if not 0 <= gamma < 1:
            raise ValueError(f"RBA(gamma=...) is in [0, 1), got {gamma!r}")
        if not eta > 0 or not math.isfinite(eta):
            raise ValueError(f"RBA(eta=...) is a positive float, got {eta!r}")
        if not init >= 0 or not math.isfinite(init):
            raise ValueError(f"RBA(init=...) is a float >= 0, got {init!r}")
        self.gamma, self.eta, self.init = float(gamma), float(eta), float(init)

    def __repr__(self) -> str:
        return f"RBA(gamma={self.gamma}, eta={self.eta}, init={self.init})"

    def initial_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "ids": torch.zeros(0, dtype=torch.long), "lambdas": torch.zeros(0)}

    def check(self, name: str, residual: Residual) -> None:
        if residual.kind != "residual":
            raise ValueError(
                f"loss term {name!r} has RBA weights, which scale the residuals r_i before squaring: pass "
                "them as Residual(r, ids=ids, kind='residual') (not the per-point losses r**2)"
            )
        if residual.ids is None:
            raise ValueError(f"loss term {name!r} has RBA weights: pass stable point ids, Residual(r, ids=ids, kind='residual')")
        ids = residual.ids
        if ids.numel() > 1 and bool((torch.sort(ids).values.diff() == 0).any()):
            raise ValueError(f"loss term {name!r}: the point ids of its Residual repeat; each point needs its own id")

    def reduce(self, r: Tensor, ids: Tensor, state: Mapping[str, Any], update: bool):
        known, stored = state["ids"].to(ids.device), state["lambdas"].to(device=r.device, dtype=r.dtype)
        pos = torch.searchsorted(known, ids).clamp(max=max(known.numel() - 1, 0))
        found = known[pos] == ids if known.numel() else torch.zeros_like(ids, dtype=torch.bool)
        old = torch.where(found, stored[pos] if known.numel() else r.new_zeros(r.shape), r.new_full(r.shape, self.init))
        a = r.detach().abs()
        lam = self.gamma * old + self.eta * a / a.max().clamp(min=torch.finfo(a.dtype).tiny) if update else old
        value = (lam * r).pow(2).mean()
        figures = {"rba_mean": lam.mean(), "rba_max": lam.max()}
        if not update:
            return value, figures, state
        new_ids = torch.cat([known, ids[~found]])
        new_lam = torch.cat([stored, lam[~found]])
        order = torch.argsort(new_ids)
        new_ids, new_lam = new_ids[order], new_lam[order]
        new_lam = new_lam.index_put((torch.searchsorted(new_ids, ids),), lam)
        return value, figures, {"kind": self.kind, "ids": new_ids, "lambdas": new_lam}

    def checked_state(self, name: str, state: Any) -> dict[str, Any]:
        ids = state.get("ids") if isinstance(state, Mapping) else None
        lam = state.get("lambdas") if isinstance(state, Mapping) else None
        ok = (isinstance(ids, Tensor) and isinstance(lam, Tensor) and ids.dim() == 1 and lam.dim() == 1
              and ids.dtype == torch.long and lam.is_floating_point() and ids.shape == lam.shape)
        if not ok or (ids.numel() > 1 and not bool((ids.diff() > 0).all())):
            raise ValueError(f"corrupt state: the RBA state of term {name!r} is not sorted unique ids with one multiplier each")
        return {"kind": self.kind, "ids": ids.clone(), "lambdas": lam.clone()}


Weighting = Causal | RBA


class Reduced(NamedTuple):
    """One call's pointwise terms, reduced: the plain loss dict, the figures, the pending state
    and the loss dict as given (its :class:`Residual` terms, for the ``ntk`` strategy)."""

    losses: dict[str, Any]
    figures: dict[str, dict[str, Any]]
    state: dict[str, dict[str, Any]]
    given: Any = None


class Pointwise:
    """The balancer's pointwise weightings ``{term: Causal | RBA}`` and their state."""

    def __init__(self, weightings: Mapping[str, Weighting] | None):
        weightings = dict(weightings or {})
        for name, w in weightings.items():
            if not isinstance(name, str):
                raise TypeError(f"pointwise= maps term names to Causal(...) or RBA(...); got the key {name!r}")
            if not isinstance(w, (Causal, RBA)):
                raise TypeError(f"pointwise[{name!r}] is a Causal(...) or RBA(...), got {type(w).__name__}")
        self.weightings = weightings
        self.state = {name: w.initial_state() for name, w in weightings.items()}

    def reduce(self, losses: Any, update: bool) -> Reduced:
        """``losses`` with every :class:`Residual` reduced to a scalar; nothing is changed here
        (the new state is returned, committed by :meth:`commit` once the step succeeded)."""
        if not isinstance(losses, Mapping):
            return Reduced(losses, {}, {})
        for name in self.weightings:
            if name in losses and isinstance(losses[name], Tensor):
                raise TypeError(
                    f"loss term {name!r} has pointwise weights ({self.weightings[name]!r}) but was passed as a "
                    "scalar: pass its per-point values, lossbalance.Residual(values, t=..., ids=...)"
                )
        if not any(isinstance(v, Residual) for v in losses.values()):
            return Reduced(losses, {}, {}, losses)
        out, figures, state = dict(losses), {}, {}
        for name, term in losses.items():
            if not isinstance(term, Residual):
                continue
            values, t, ids = _checked(name, term)
            weighting = self.weightings.get(name)
            if weighting is None:
                per_point = values.pow(2) if term.kind == "residual" else values
                out[name] = per_point.mean() if term.reduction == "mean" else per_point.sum()
                continue
            if term.reduction != "mean":
                raise ValueError(f"loss term {name!r} has pointwise weights, which define their own mean: use Residual(reduction='mean')")
            weighting.check(name, term)
            if isinstance(weighting, Causal):
                per_point = values.pow(2) if term.kind == "residual" else values
                out[name], figures[name], state[name] = weighting.reduce(per_point, t, self.state[name], update)
            else:
                out[name], figures[name], state[name] = weighting.reduce(values, ids, self.state[name], update)
        return Reduced(out, figures, state, losses)

    def commit(self, state: Mapping[str, dict[str, Any]]) -> None:
        self.state = {**self.state, **state}

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
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"loss term {name!r}: Residual values must be 1-D, one entry per point, got shape "
                         f"{tuple(values.shape)} (flatten them, e.g. r.reshape(-1))")
    return values


def _checked_companion(name: str, label: str, x: Any, values: Tensor) -> Tensor | None:
    """``t`` or ``ids``: one per point, on the values' device (ids as integers)."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"loss term {name!r}: Residual {label} must be a tensor, got {type(x).__name__}")
    x = x.as_subclass(Tensor).detach()
    if x.dim() != 1 or x.shape[0] != values.shape[0]:
        raise ValueError(f"loss term {name!r}: Residual {label} has shape {tuple(x.shape)}, the values "
                         f"{tuple(values.shape)}: give one {label} per point")
    if label == "ids" and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"loss term {name!r}: Residual ids must be integers, got {x.dtype}")
    if x.device != values.device:
        raise ValueError(f"loss term {name!r}: Residual {label} is on {x.device}, its values on {values.device}")
    return x.long() if label == "ids" else x
