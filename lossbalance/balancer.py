"""``LossBalancer``: replaces ``optimizer.step()`` for models trained on several named loss terms."""
from __future__ import annotations

import inspect
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .combine import Combiner, WeightedSum, make_combiner
from .config import ConfigError, export_config, parse_config, pointwise_config
from .deferred import DeferredChecks, Finding
from .distributed import make_reduction
from .gradients import Backward, Direction
from .ntk import check_terms as check_ntk_terms
from .ntk import check_weightings as check_ntk_weightings
from .ntk import measure as measure_traces
from .options import PLAIN_NAMES, option_problems
from .pointwise import Pointwise, Reduced
from .precision import make_precision
from .reporting import LastStep, StepLog
from .sharded import check_sharded, graph_ids, make_engine
from .snapshot import reevaluates, restore_snapshot, take_snapshot
from .stats import GradStats
from .strategies.base import StepRecord, Strategy, make_strategy
from .strategies.static import Static
from .terms import Bound, TermTable
from .graph import graph_facts, reaches
from .validation import (
    check_finite, check_key_set, check_losses, check_optimizer_state, check_parameters, no_path_error, reentrant_checkpoint_error, warn_user,
)

__all__ = ["LossBalancer"]

Losses = Mapping[str, Tensor]
STATE_FORMAT = 2  # 1: lossbalance 0.1.0 (no "format" key)
_ATTRIBUTE = {"history": "history_size"}  # where a plain option is read back when it is not its own name


class _Batch(NamedTuple):
    """One call's terms: present names in canonical order, 0-dim tensors, detached values, scopes."""

    names: tuple[str, ...]
    terms: list[Tensor]
    values: Tensor
    scopes: list[frozenset[int] | None]
    stale: "_StaleTerms"
    pointwise: Reduced  # the Residual terms' reduction: figures and the pending pointwise state


class _StaleTerms:
    """The terms of a call that are the very tensors of the previous call (built on an earlier
    step, their graph freed): looked up only when an error is explained (``name in stale``)."""

    __slots__ = ("_previous", "_losses")

    def __init__(self, previous: Mapping[str, weakref.ref], losses: Mapping[str, Tensor]):
        self._previous, self._losses = previous, losses

    def __contains__(self, name: object) -> bool:
        ref = self._previous.get(name)  # type: ignore[call-overload]
        return ref is not None and name in self._losses and ref() is self._losses[name]


class _Plan(NamedTuple):
    """What one call computes."""

    update: bool  # update the weights
    per_term: bool  # differentiate each term separately
    early: bool  # the values are checked before the graph is used (else with the backward)
    defer: bool = False  # check_every > 1: the verdict stays on the device (lossbalance.deferred)


class _Undo(NamedTuple):
    """What a failed call puts back (the strategy's and the generator's state only on update steps)."""

    step: int
    updates: int
    skipped: int
    weights: Tensor
    names: tuple[str, ...]
    strategy: Any  # the strategy's checkpoint (None: not taken)
    generator: Tensor | None
    last: LastStep | None
    rows: int  # StepLog.recorded at this point
    combiner: Any = None  # a stateful combiner's checkpoint ("mconfig")
    pointwise: Any = None  # Pointwise.snapshot(): the states and the held re-evaluation states


class _Skip(Exception):
    """A non-finite value under ``nonfinite="skip"``: the call is undone and counted as skipped."""


class _Rollback(_Skip):
    """A deferred read found a non-finite call: every call since the rollback point is undone."""

    def __init__(self, finding: Finding):
        super().__init__(finding)
        self.finding = finding


class _Point(NamedTuple):
    """The rollback point of the deferred checks: the balancer, the parameters and the optimizer."""

    undo: _Undo
    snapshot: Any
    params: list[Tensor]


class LossBalancer:
    r"""Balance named loss terms and step the wrapped optimizer.

    Each ``step(losses)`` takes a dict of scalar loss terms built from one forward graph,
    differentiates each term separately (when the strategy needs gradients and an update is
    due), updates the weights ``lambda_i``, writes ``sum_i lambda_i grad L_i`` into ``.grad``
    (overwriting it) and calls ``optimizer.step()``. It returns the weighted total (detached).

    Args:
        optimizer: any ``torch.optim.Optimizer``; its parameters that require grad are balanced.
            Or the parameters themselves (``model.parameters()`` or param-group dicts): a balancer
            without an optimizer, for :meth:`loss` and :meth:`backward` (``step()`` then raises).
        strategy: a :class:`~lossbalance.strategies.Strategy` or a registered short name.
        update_every: update the weights on every n-th step (the first step included).
        weights: initial weight per term (default 1).
        min_weight, max_weight: clamp every updated weight (a float, or a dict per term).
        warmup: number of steps that keep the initial weights before the first update.
        frozen: never update the weights (they stay as they are, e.g. after loading), the
            pointwise weights (per-point tables, causal ``eps``) included; see :meth:`freeze`
            (saved in the state).
        terms: the terms and their canonical order (default: the keys of the first step).
        optional: terms that may be absent on some steps (their weight is kept meanwhile).
        scope: ``{term: parameters}``: the parameters a term may train (default: all). The term's
            gradient flows through the whole graph but only its scope receives it.
        probe: take the gradient statistics on this subset of the parameters only.
        shared: with a combiner (``combine=``), the parameters it acts on: a multi-task model's
            shared encoder. Every other balanced parameter (the task heads) gets the weighted
            sum ``sum_i w_i g_i`` of its per-term gradients (a head only its own task reaches:
            ``w_i`` times that task's gradient), as in Sener & Koltun (2018, Algorithm 2) and
            LibMTL. Default: the combiner acts on every balanced parameter, heads included.
        combine: how the weighted per-term gradients become one direction: ``"sum"`` (default),
            ``"pcgrad"``, ``"config"``, a :class:`~lossbalance.combine.Combiner` or a callable on
            the ``(K, P)`` matrix. Anything but the sum needs the per-term gradients every step,
            except ``"mconfig"`` (momentum ConFIG, :class:`~lossbalance.combine.MomentumConFIG`):
            one term's backward per step, round robin; pair it with ``torch.optim.SGD``.
        diagnose_every: also compute the per-term gradients (norms, cosine similarities, fraction
            of conflicting pairs) every n-th step, for strategies that need no gradients (0: only
            on steps that compute them anyway). Costs the per-term gradients on those steps.
        memory: ``"keep"`` (reuse the per-term gradients for the step) or ``"lean"``.
        grad_mode: ``"loop"`` (one ``autograd.grad`` per term, default) or ``"batched"``
            (``torch.vmap``; see :class:`~lossbalance.gradients.GradientEngine`).
        nonfinite: ``"raise"`` on NaN/Inf losses (or gradient statistics), or ``"skip"`` the step.
        scaler: a ``torch.amp.GradScaler`` for float16 mixed precision: the terms are scaled for the
            backward passes, the statistics are unscaled before the strategy sees them, and a step
            whose gradients overflow keeps the weights and is skipped by the scaler.
        distributed: average gradients and loss values over the processes of ``process_group``
            (one collective call per step). Default: on when ``torch.distributed`` is initialised
            with more than one process.
        history: keep the last n steps' weights and losses (0: none).
        check_every: 1 (default): every call checks its values and gradients for NaN/Inf before
            anything changes (one host sync per plain step). ``N > 1``: calls without a weight
            update make no host sync; the verdict is kept on the device and read at every update
            and every N-th call; a non-finite call found then undoes every call since the last
            clean read (parameters and optimizer state included), see :mod:`lossbalance.deferred`.
        check_paths: when to check that each term's graph reaches the parameters it may train:
            ``"first"`` (its first appearance; gradient steps check every time anyway, and a leaf
            term is refused on every call, for free; a term that loses its path otherwise adds no
            gradient to a plain step but its value still counts) or ``"always"`` (a walk of the
            autograd graph per term and step, also on plain steps).
        seed: seed of the balancer's own random generator (saved in ``state_dict``).
        pointwise: ``{term: Causal(...) | RBA(...) | SAPINN(...) | BRDR(...)}``: pointwise weights of terms passed as
            :class:`~lossbalance.Residual` (per-point losses), reduced to a scalar before the
            strategy sees them; their state is saved in ``state_dict``. See
            :mod:`lossbalance.pointwise`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Iterable[Tensor] | Iterable[dict[str, Any]],
        strategy: str | Strategy = "lra",
        *,
        update_every: int = 1,
        weights: Mapping[str, float] | None = None,
        min_weight: Bound = None,
        max_weight: Bound = None,
        warmup: int = 0,
        frozen: bool = False,
        terms: Iterable[str] | None = None,
        optional: Iterable[str] = (),
        scope: Mapping[str, Iterable[Tensor]] | None = None,
        probe: Iterable[Tensor] | None = None,
        shared: Iterable[Tensor] | None = None,
        combine: str | Combiner | Callable[[Tensor], Tensor] = "sum",
        diagnose_every: int = 0,
        memory: Literal["keep", "lean"] = "keep",
        grad_mode: Literal["loop", "batched"] = "loop",
        nonfinite: Literal["raise", "skip"] = "raise",
        history: int = 0,
        check_every: int = 1,
        check_paths: Literal["first", "always"] = "first",
        seed: int = 0,
        scaler: torch.amp.GradScaler | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        pointwise: Mapping[str, Any] | None = None,
    ):
        _check_plain_options(locals(), terms)
        self.optimizer, self._own_groups = _optimizer_and_groups(optimizer)
        self.strategy = make_strategy(strategy)
        self.update_every = update_every
        self.warmup = warmup
        self.frozen = frozen
        self.evaluating = False  # loss() returns evaluate(): validation/test (the Lightning callback sets it)
        self.nonfinite = nonfinite
        self.check_paths = check_paths
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.diagnose_every = diagnose_every
        self.memory = memory
        self.grad_mode = grad_mode
        self._probe = None if probe is None else list(probe)
        self._shared = None if shared is None else list(shared)
        self._reduction = make_reduction(distributed, process_group)
        self._precision = make_precision(scaler)
        self._hooks: dict[int, Callable[["LossBalancer"], None]] = OrderedDict()
        self._scope_params = {name: list(params) for name, params in (scope or {}).items()}
        self._pointwise = Pointwise(pointwise, self._reduction)
        if self.strategy.needs_traces:
            check_ntk_weightings(self._pointwise)
        self._install_engine(self._balanced_params())
        self._install_combiner(combine)
        self._check_shared()
        self._declare_terms(terms, weights, min_weight, max_weight, optional)
        self.strategy.declare_terms(self._terms.names, self._terms.optional)
        if terms:
            self.combiner.declare_terms(list(terms))
        self._needs_closure = self.optimizer is not None and _needs_closure(self.optimizer)
        if self._momentum:
            self._check_one_term_per_step()
        self._check_line_search()
        check_sharded(self._engine, {f"combine={combine!r}": not isinstance(self.combiner, WeightedSum),
                                     "diagnose_every=": bool(diagnose_every), "scope=": bool(scope),
                                     "shared=": shared is not None,
                                     "scaler=": self._precision.scaled, "L-BFGS": self._needs_closure,
                                     "check_every > 1": check_every > 1,
                                     f"strategy {self.strategy.name!r} (NTK traces)": self.strategy.needs_traces})
        self._step = 0
        self._updates = 0
        self._skipped = 0
        self._previous: dict[str, weakref.ref] = {}  # last call's term tensors: to name a stale one
        self._log = StepLog(history)
        self.check_every = check_every
        self._deferred = self._deferred_checks(check_every)

    def _deferred_checks(self, every: int) -> DeferredChecks | None:
        """``check_every > 1``: the deferred checks (they undo optimizer steps: they need it)."""
        if every == 1:
            return None
        if self.optimizer is None:
            raise ValueError(
                f"check_every={every} undoes the optimizer's steps since the last check when it finds a NaN/Inf: "
                "build the balancer from the optimizer, or keep check_every=1"
            )
        if self._precision.scaled:
            raise ValueError(
                f"check_every={every} cannot be used with scaler=: GradScaler.step reads its overflow flag on every "
                "step anyway; keep check_every=1"
            )
        return DeferredChecks(every)

    def _check_shared(self) -> None:
        """``shared=``: a non-empty set of the optimizer's parameters, for a combiner that acts
        on the kept per-term gradients."""
        if self._shared is None:
            return
        if not self._combines:
            which = ("'mconfig' combines one term's momenta per step over every parameter" if self._momentum
                     else "the weighted sum treats every parameter alike")
            raise ValueError(f"shared= names the parameters a combiner acts on, but {which}: use it with "
                             "combine='mgda', 'upgrad', 'pcgrad', 'config', 'dcgd' or a combiner object")
        if not self._shared:
            raise ValueError("shared= is empty: name the shared parameters, e.g. shared=model.encoder.parameters()")
        held = {id(p) for group in self.param_groups for p in group["params"]}
        for i, p in enumerate(self._shared):
            if not isinstance(p, Tensor) or id(p) not in held:
                raise ValueError(f"shared= item {i} is not a parameter the optimizer holds: name parameters of "
                                 "the model the optimizer trains")
        self._shared_ids = frozenset(map(id, self._shared))

    def _install_combiner(self, combine: str | Combiner | Callable[[Tensor], Tensor]) -> None:
        self.combiner = make_combiner(combine)
        self._momentum = bool(getattr(self.combiner, "one_term_per_step", False))  # "mconfig"
        self._combines = not isinstance(self.combiner, WeightedSum) and not self._momentum
        if (self._combines or self.diagnose_every) and not self._engine.keeps_gradients:
            raise ValueError("combine= and diagnose_every= need the kept per-term gradients: memory='keep' and no probe")

    def _declare_terms(self, terms, weights, min_weight, max_weight, optional) -> None:
        """The term table, with ``terms=`` declared and the per-term options' names checked."""
        fixed = getattr(self.strategy, "weights", None) if isinstance(self.strategy, Static) else None
        if fixed is not None:  # Static(weights=...): the initial weights; weights= wins per term
            weights = {**fixed, **(weights or {})}
        self._terms = TermTable(
            weights=weights, min_weight=min_weight, max_weight=max_weight, optional=optional,
            dtype=torch.promote_types(self._engine.dtype, torch.float32), device=self._engine.device,
            named={"pointwise": list(self._pointwise.weightings)},
        )
        for name in terms or ():
            self.add_term(name)
        if self._terms.names:
            self._terms.check_option_names(self._terms.names, self._scopes, declared=True)

    # ------------------------------------------------------------------ set-up helpers
    @property
    def history_size(self) -> int:
        """How many steps ``history`` keeps (the ``history=`` option)."""
        return self._log.keeps_history

    @property
    def distributed(self) -> bool:
        """Whether this balancer averages over processes (decided at construction: ``distributed=``,
        or ``torch.distributed`` initialised with more than one process then)."""
        return self._reduction.active

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The ``GradScaler`` given as ``scaler=`` (``None`` when absent or disabled)."""
        return self._precision.scaler

    def _balanced_params(self) -> list[Tensor]:
        # each tensor once (an optimizer's group may list one twice: torch.optim only warns)
        params = list({id(p): p for group in self.param_groups for p in group["params"] if p.requires_grad}.values())
        if not params:
            holder = "the optimizer holds" if self.optimizer is not None else "the parameters given hold"
            raise ValueError(f"{holder} no parameter that requires grad: nothing to balance")
        return params

    def _install_engine(self, params: list[Tensor]) -> None:
        """Build the engine and the scopes for ``params``; nothing is replaced unless both succeed."""
        check_parameters(params)
        engine = make_engine(
            params, memory=self.memory, probe=self._probe, reduction=self._reduction, grad_mode=self.grad_mode
        )
        scopes = _resolve_scopes(self._scope_params, frozenset(map(id, params)))
        self._engine, self._scopes, self._param_ids = engine, scopes, graph_ids(engine, params)
        self._checked: set[str] = set()  # terms whose graph the new engine has seen
        self._unbalanced = [p for g in self.param_groups for p in g["params"] if not p.requires_grad]

    def _refresh_parameters(self) -> None:
        """Follow ``requires_grad`` changes of the optimizer's parameters (freezing mid-run), and
        a move of the parameters to another device or dtype (``model.to(...)``, as Lightning
        does after the module is built): the weights move with them."""
        params = self._balanced_params()
        if not self._engine.holds(params):
            self._install_engine(params)
            self._terms.to(self._engine.device, torch.promote_types(self._engine.dtype, torch.float32))

    def _check_line_search(self) -> None:
        """L-BFGS with a combiner: no line search (see :mod:`lossbalance.combine`, "L-BFGS")."""
        if not (self._combines and self._needs_closure):
            return
        search = {g.get("line_search_fn") for g in self.optimizer.param_groups} - {None}
        if search:
            raise ValueError(
                f"combine={self.combiner.name!r} with {type(self.optimizer).__name__}(line_search_fn="
                f"{sorted(search)[0]!r}): the direction the combiner writes into .grad is not the gradient of the "
                "weighted total the closure returns (sum_i lambda_i L_i), and a line search tests that total's "
                "decrease and curvature along it: inconsistent. Use line_search_fn=None (fixed steps of lr; "
                "L-BFGS then builds its curvature pairs from the direction field), or combine='sum'"
            )

    def _check_one_term_per_step(self) -> None:
        """``combine="mconfig"``: what it cannot be combined with, and the optimizer it pairs with."""
        name = self.combiner.name
        if self.strategy.needs_gradients:
            raise ValueError(
                f"combine={name!r} differentiates one term per step; strategy {self.strategy.name!r} needs every "
                "term's gradient on its updates: use 'static' or a loss-value strategy (relobralo, softadapt, dwa, "
                "uncertainty, famo)"
            )
        if self.diagnose_every:
            raise ValueError(f"combine={name!r} differentiates one term per step: diagnose_every= cannot be used")
        if self._precision.scaled:
            raise ValueError(f"combine={name!r} cannot be used with scaler= (use bf16 or float32)")
        if self._needs_closure:
            raise ValueError(
                f"combine={name!r} is a first-order, Adam-like method with state per step: it cannot drive "
                f"{type(self.optimizer).__name__}, which re-evaluates the closure; use torch.optim.SGD"
            )
        if self.optimizer is not None and _normalises_steps(self.optimizer):
            warnings.warn(
                f"combine={name!r} is Adam-like itself (per-term first moments, a second moment of the combined "
                f"direction): pair it with plain torch.optim.SGD, as its authors advise; wrapped around "
                f"{type(self.optimizer).__name__} the direction is normalised twice", UserWarning, stacklevel=3,
            )

    # ------------------------------------------------------------------ terms
    def add_term(self, name: str, weight: float | None = None, *, optional: bool = False) -> None:
        """Declare a term (e.g. one that appears in a later phase) with its initial weight."""
        self.strategy.declare_terms((name,), (name,) if optional else ())
        self._terms.add(name, weight, optional=optional)

    def remove_term(self, name: str) -> None:
        """Forget a term and its weight (e.g. a phase that ended)."""
        self._terms.remove(name)
        self._checked.discard(name)

    def _inspect(self, names: tuple[str, ...], terms: Sequence[Tensor]) -> None:
        """Walk each term's graph at its first appearance (and, with ``check_paths="always"``,
        check its path to the parameters on every call): a path to what it may train, no
        reentrant checkpoint; the engine learns its size, compiled parts and unbalanced leaves."""
        if self.check_paths == "first" and self._checked.issuperset(names):
            self._check_leaves(names, terms)
            return
        for name, term in zip(names, terms):
            scope = self._scopes.get(name)
            targets = self._param_ids if scope is None else scope
            if name in self._checked:
                if self.check_paths == "always" and not reaches(term, targets):
                    raise no_path_error(name, scoped=scope is not None)
                continue
            self._first_look(name, term, targets, scoped=scope is not None)
        self._checked.update(names)

    def _check_leaves(self, names: tuple[str, ...], terms: Sequence[Tensor]) -> None:
        """Every call, for free: a term that is a leaf tensor (e.g. a cached value made
        ``requires_grad``) reaches no parameter but itself; its value would enter the total and
        the strategy without a gradient."""
        for name, term in zip(names, terms):
            if term.grad_fn is None and id(term) not in self._scopes.get(name, self._param_ids):
                raise no_path_error(name, scoped=name in self._scopes)

    def _first_look(self, name: str, term: Tensor, targets: frozenset[int], *, scoped: bool) -> None:
        """A term's first appearance: one walk of its graph (path, reentrant checkpoints, facts)."""
        facts = graph_facts(term, self._param_ids)
        if facts.leaves.isdisjoint(targets):
            raise no_path_error(name, scoped=scoped)
        if facts.reentrant:
            raise reentrant_checkpoint_error(name)
        self._engine.note(name, facts)

    # ------------------------------------------------------------------ adapting or not
    def freeze(self) -> None:
        """Stop adapting: the weights learned so far stay as they are from now on, the
        pointwise weights included (per-point tables and the causal ``eps`` are held; causal
        weights are still computed from the losses), so that L-BFGS sees one objective.

        The method form of the ``frozen`` option (``balancer.frozen = True``); saved in
        :meth:`state_dict`, so a resumed run stays frozen. The strategy is no longer called (its
        state is kept); per-term gradients are no longer computed for it, so with
        ``combine="sum"`` a step costs a plain step. :meth:`unfreeze` resumes adapting. For a
        rerun with these weights fixed from the start, see :func:`lossbalance.static_from`.
        """
        self.frozen = True

    def unfreeze(self) -> None:
        """Adapt again after :meth:`freeze` (the strategy continues from its kept state)."""
        self.frozen = False

    # ------------------------------------------------------------------ the step, phase by phase
    def _due(self) -> bool:
        if self.frozen or self.strategy.fixed or self._step < self.warmup:
            return False
        return (self._step - self.warmup) % self.update_every == 0

    def _balance(
        self, losses: Losses, may_update: bool, *, into: str = "grad", deferrable: bool = True
    ) -> tuple[Tensor | None, _Undo]:
        """Validate, update the weights when due, write ``.grad`` (``into="loss"``: return the
        surrogate loss instead). Returns the weighted total or the surrogate (``None``: skipped
        for non-finite values) and what undoes the call. ``deferrable``: may this call's checks
        wait (``check_every > 1``; not for an L-BFGS closure)."""
        self._refresh_parameters()
        batch = self._take(losses, advance=may_update)
        plan = self._plan(may_update, checks_later=into == "grad", deferrable=deferrable)
        undo = self._undo_point(plan)
        if may_update:
            self._pointwise.start_step()  # the last step's re-evaluation states (an error puts them back)
        try:
            if self._deferred is not None and not plan.defer:
                self._read(undo)  # a call that checks at once: what earlier calls left pending, first
            self._check_values(batch.names, batch.values, plan.early, "local")
            scaled = self._precision.scale(batch.terms, batch.values)
            traces = self._traces(batch, plan)
            stats, values, update = self._measure(batch, scaled, plan)
            index = self._terms.index(batch.names)
            weights = self._update_weights(batch, values, index, stats, update, traces)
            if into == "grad":
                values = self._write_grad(batch, scaled, values, weights, stats, plan)
                result = torch.dot(weights, values)
            else:
                result, values = self._surrogate(batch, scaled, values, weights, stats, plan)
            if plan.defer:
                self._settle(batch.names, plan.update, undo)
        except _Skip as skip:
            self._skip(skip, undo, may_update)
            return None, undo
        except BaseException:
            self._undo(undo)
            raise
        if may_update:
            figures = self._commit_pointwise(batch.pointwise)
            self._log.record(self._step, LastStep(batch.names, values, weights, stats, figures))
            self._step += 1
        return result, undo

    def _skip(self, skip: _Skip, undo: _Undo, may_update: bool) -> None:
        """A call skipped for non-finite values (``nonfinite="skip"``; a deferred read rolls back
        the calls since its rollback point too): undone, counted."""
        self._undo(undo)
        if may_update:
            self._pointwise.start_step()  # a skipped step is still a step: re-evaluations see its state
        self._skipped += 1
        if isinstance(skip, _Rollback):
            self._roll_back(skip.finding, undo)

    def _commit_pointwise(self, reduced: Reduced) -> dict[str, dict[str, Any]] | None:
        """After a successful call: the pointwise state advances; returns its figures for ``stats``."""
        if not reduced.figures:
            return None
        self._pointwise.commit(reduced.state, reduced.held)
        return reduced.figures

    def _take(self, losses: Losses, *, advance: bool) -> _Batch:
        """Phase 1: the terms, validated, as plain 0-dim tensors in canonical order; every
        :class:`~lossbalance.Residual` reduced to a scalar after its pointwise weighting (its new
        state, with ``advance`` and not frozen, pending until the call succeeds; without
        ``advance``, a re-evaluation: the states the step's first evaluation used)."""
        update = advance and not self.frozen
        try:
            reduced = self._pointwise.reduce(losses, update, reevaluation=not advance, frozen=advance and self.frozen)
        except (TypeError, ValueError, KeyError):
            self._relay_refusal(losses, told=self._pointwise.relays(update))
            raise
        losses = _plain_tensors(reduced.losses)
        names = self._checked_names(losses)
        if not self._terms.names:
            names = self._reduction.canonical(names)
        self._validate_for_strategy(names, losses)
        terms = {n: losses[n] if losses[n].dim() == 0 else losses[n].reshape(()) for n in names}
        stale = _StaleTerms(self._previous, losses)
        self._previous = {n: weakref.ref(losses[n]) for n in names}
        values = torch.stack(list(terms.values())).detach().to(self._terms.weights.dtype)
        names, terms, values = self._agree(names, terms, values)
        return _Batch(names, list(terms.values()), values, [self._scopes.get(n) for n in names], stale, reduced)

    def _checked_names(self, losses: Losses) -> tuple[str, ...]:
        """The present terms in canonical order, after the local checks (types, shapes, graph,
        device, the key set, each term's path to what it may train: :meth:`_inspect`).
        Distributed, a rank whose checks fail still joins the agreement collectives the others
        are in (:meth:`Reduction.refuse`), so that every rank raises: this one its own error,
        the others one saying that another rank refused its terms."""
        try:
            check_losses(losses, self._engine.device)
            names = self._terms.resolve(tuple(losses), self._scopes)
            self._inspect(names, [losses[n] for n in names])
            return names
        except (TypeError, ValueError, KeyError):
            self._relay_refusal(losses, told=False)
            raise

    def _validate_for_strategy(self, names: tuple[str, ...], losses: Losses) -> None:
        """The strategy's check of the terms (e.g. LRA's reference among them), before the
        ranks' agreement: a rank that fails it still joins the agreement with a refusal flag."""
        try:
            self.strategy.validate_terms(names)
        except (TypeError, ValueError, KeyError):
            self._relay_refusal(losses, told=False, canonical_done=True)
            raise

    def _relay_refusal(self, losses: Any, *, told: bool, canonical_done: bool = False) -> None:
        """Distributed: this rank's terms failed its checks; unless the others were ``told``
        already, join the agreement collectives they are in with a refusal flag (the first
        step's order broadcast too, unless ``canonical_done``)."""
        if self._reduction.active and not told:
            keys = tuple(losses) if isinstance(losses, Mapping) and all(isinstance(k, str) for k in losses) else ()
            first = not self._terms.names and not canonical_done
            self._reduction.refuse(keys, first=first, device=self._engine.device)

    def _agree(self, names: tuple[str, ...], terms: dict[str, Tensor], values: Tensor):
        """Distributed: check the ranks agree on the terms; an optional term that another rank
        holds enters as zero here, and the values are scaled so that averaging over all ranks
        gives the mean over the ranks holding each term (:mod:`lossbalance.distributed`)."""
        if not self._reduction.active:
            return names, terms, values
        declared = self._declared_across_ranks(names)
        counts = self._reduction.presence(declared, names, bool(self._terms.optional), self._engine.device)
        if counts is None:
            return names, terms, values
        held = counts.tolist()
        everywhere = tuple(n for n, c in zip(declared, held) if c > 0)
        zero = values.new_zeros(())
        full = {n: terms.get(n, zero) for n in everywhere}
        local = dict(zip(names, values.unbind()))
        scaled = torch.stack([local.get(n, zero) * (self._reduction.world / c) for n, c in zip(declared, held) if c > 0])
        return everywhere, full, scaled

    def _declared_across_ranks(self, names: tuple[str, ...]) -> list[str]:
        """The terms as every rank declares them: the registered ones, this call's new required
        ones (in the agreed order), then the optional ones not registered yet (sorted)."""
        registered = set(self._terms.names)
        new = [n for n in names if n not in registered and n not in self._terms.optional]
        later = sorted((self._terms.optional | set(names)) - registered - set(new))
        return self._terms.names + new + later

    def _per_term(self, may_update: bool, update: bool) -> bool:
        """Whether this call differentiates each term: the strategy's update needs it, a
        combiner, or the diagnostics are due."""
        diagnose = may_update and self.diagnose_every > 0 and self._step % self.diagnose_every == 0
        return (update and self.strategy.needs_gradients) or self._combines or diagnose

    def _plan(self, may_update: bool, checks_later: bool = True, deferrable: bool = True) -> _Plan:
        """Phase 2: update the weights? differentiate each term? check the values first (or
        defer the checks)?"""
        update = may_update and self._due()
        per_term = self._per_term(may_update, update)
        if self._deferred is not None and deferrable:
            return _Plan(update, per_term, early=False, defer=True)
        # the per-term gradients, the NTK traces and the scaler need finite values before they use
        # the graph; a plain step, and the update of a loss-value strategy (undone if the values
        # fail), check them with the gradients of the one backward (one host sync)
        traces = update and self.strategy.needs_traces
        early = per_term or traces or self._scaled_locally() or not checks_later
        return _Plan(update, per_term, early)

    def _scaled_locally(self) -> bool:
        return self._precision.scaled and not self._reduction.active

    def _measure(self, batch: _Batch, scaled: list[Tensor], plan: _Plan) -> tuple[GradStats | None, Tensor, bool]:
        """Phase 3: the per-term gradients' statistics when planned (values averaged when distributed).

        Returns the statistics, the values and whether the update still goes ahead (an overflow
        under a GradScaler keeps the weights)."""
        if not plan.per_term:
            if plan.update and self._reduction.active:  # a loss-value strategy needs the averaged values
                self._reduction.mean_(batch.values)
                self._verify_values(batch.names, batch.values, plan, "averaged")
            return None, batch.values, plan.update
        self._log.diagnosed = None  # its gradients live in the buffer this call overwrites
        stats, values = self._engine.measure(batch.names, scaled, batch.scopes, batch.values, stale=batch.stale)
        stats = self._precision.unscale(stats)
        if plan.defer:
            self._deferred.note_values(values)
            self._deferred.note_statistics(stats.max_abs)
            return stats, values, plan.update
        self._check_values(batch.names, values, True, "averaged")
        if bool(torch.isfinite(stats.max_abs).all()):
            return stats, values, plan.update
        if self._precision.scaled:
            return stats, values, False  # overflow: keep the weights; the scaler skips the step
        self._require_finite(batch.names, stats.max_abs.amax(1), "gradient entry (max |g|)")
        return stats, values, plan.update

    def _update_weights(self, batch: _Batch, values: Tensor, index: Tensor | None, stats: GradStats | None,
                        update: bool, traces: Tensor | None = None) -> Tensor:
        """Phase 4: the strategy's new weights for the present terms (bounded), when due."""
        weights = self._terms.present(index)
        if not update:
            return weights
        # a copy: a strategy that changes record.weights in place must not change the table (nor the undo point)
        record = StepRecord(batch.names, values, weights.clone(), self._step, self._updates, stats, self.generator, traces)
        try:
            new = self.strategy.update(record)
        except Exception:  # on values not checked yet (see _plan), a NaN/Inf value is the cause to name
            self._require_finite(batch.names, values, self._reduction.value_label())
            raise
        weights = self._terms.sanitize(new, weights, index)
        self._terms.set_present(index, weights)
        self._updates += 1
        return weights

    def _traces(self, batch: _Batch, plan: _Plan) -> Tensor | None:
        """Phase 2b, before the per-term gradients free the graph: on update steps, the terms' NTK
        traces for a strategy that asks for them (:mod:`lossbalance.ntk`; their figures reach
        ``stats`` with the batch's pointwise figures)."""
        if not self.strategy.needs_traces:
            return None
        if not plan.update:
            check_ntk_terms(batch.names, batch.pointwise.given, self._pointwise)
            return None
        return measure_traces(self.strategy.trace_options, batch.names, batch.pointwise, self._pointwise,
                              self._engine.params, batch.scopes, self.generator, self._reduction)

    def _write_grad(
        self, batch: _Batch, scaled: list[Tensor], values: Tensor, weights: Tensor, stats: GradStats | None, plan: _Plan
    ) -> Tensor:
        """Phase 5: ``.grad`` from the kept gradients, or from one backward of the weighted sum."""
        if self._momentum:
            direction, values = self._one_term_direction(batch, scaled, values, weights, plan)
            self._engine.write(direction)
        elif stats is not None and self._engine.keeps_gradients:
            self._engine.write_kept(weights, self._direction(weights, stats, batch.names) if self._combines else None)
        else:
            result = self._weighted_gradient(batch, scaled, values, weights, check_values=not plan.early, defer=plan.defer)
            self._engine.write(result.direction)
            values = result.values
        for p in self._unbalanced:  # what zero_grad() would leave on parameters nobody balances now
            p.grad = None
        return values

    def _surrogate(
        self, batch: _Batch, scaled: list[Tensor], values: Tensor, weights: Tensor, stats: GradStats | None, plan: _Plan
    ) -> tuple[Tensor, Tensor]:
        """Phase 5 of :meth:`loss`: the step's gradient as fresh tensors, and a scalar whose value
        is the weighted total and whose backward accumulates exactly that gradient (O(P)); or,
        where that gradient is the weighted total's own, the weighted total with its graph."""
        if stats is None and self._live_total_serves(batch, plan):
            live = torch.dot(weights.to(batch.values.dtype), torch.stack(scaled))
            if live.requires_grad:
                return live, values
        if self._momentum:
            direction, values = self._one_term_direction(batch, scaled, values, weights, plan._replace(early=True))
        elif stats is not None and self._engine.keeps_gradients:
            direction = self._engine.kept_direction(
                weights, self._direction(weights, stats, batch.names) if self._combines else None
            )
        else:
            result = self._weighted_gradient(batch, scaled, values, weights, check_values=False, defer=plan.defer)
            direction, values = result.direction, result.values
        params = self._engine.params + self._engine.others
        total = torch.dot(weights, values)
        return surrogate_loss(total, params, direction.grads + direction.others), values

    def _live_total_serves(self, batch: _Batch, plan: _Plan) -> bool:
        """Whether the framework's backward of ``sum_i w_i L_i`` gives :meth:`backward`'s gradient
        on a call without per-term gradients: no scopes, no averaging over processes, no
        momentum combiner, no deferred verdict, and no term built on an earlier call (whose
        freed graph :meth:`backward` explains by name)."""
        return not (self._momentum or plan.defer or self._reduction.active or any(batch.scopes)
                    or any(name in batch.stale for name in batch.names)
                    or any(t.dtype != batch.values.dtype for t in batch.terms))

    def _one_term_direction(
        self, batch: _Batch, scaled: list[Tensor], values: Tensor, weights: Tensor, plan: _Plan
    ) -> tuple[Direction, Tensor]:
        """Phase 5 with ``combine="mconfig"``: one backward of the term whose turn it is, then the
        combiner's step from its momenta. Returns the direction and the (averaged) values."""
        i = self.combiner.pick(batch.names)
        result = self._weighted_gradient(
            batch, scaled, values, weights, check_values=not plan.early, defer=plan.defer, only=i
        )
        layout = self._engine.layout
        flat = torch.cat([(z if g is None else g).reshape(-1) for g, z in zip(result.direction.grads, layout.zeros)])
        step = self.combiner.step(batch.names, i, flat, weights, [g is not None for g in result.direction.grads])
        hits = self.combiner.reached(batch.names, len(layout.zeros))
        return Direction([v if hit else None for v, hit in zip(layout.views(step), hits)], result.direction.others), result.values

    def _direction(self, weights: Tensor, stats: GradStats, names: tuple[str, ...]) -> Tensor:
        """The combiner's direction from the weighted per-term gradients; with ``shared=``, on
        the shared parameters' columns only, the weighted sum on the others."""
        assert stats.gradients is not None
        weighted = weights.to(stats.gradients.dtype)[:, None] * stats.gradients
        if self._shared is None:
            return self._combined(weighted, names)
        columns = self._engine.layout.columns(self._shared_ids)
        direction = weighted.sum(0)
        if columns.numel():
            direction[columns] = self._combined(weighted[:, columns], names)
        return direction

    def _combined(self, weighted: Tensor, names: tuple[str, ...]) -> Tensor:
        if getattr(self.combiner, "takes_names", False):
            return self.combiner(weighted, generator=self.generator, names=names)
        return self.combiner(weighted, generator=self.generator)

    def _weighted_gradient(self, batch: _Batch, scaled: list[Tensor], values: Tensor, weights: Tensor, *,
                           check_values: bool, defer: bool = False, only: int | None = None) -> Backward:
        """One backward of the weighted sum (``.grad`` untouched; ``only``: of that term alone,
        unweighted); a non-finite part raises or skips (``defer``: goes into the deferred verdict)."""
        names, terms, seeds, scopes = batch.names, scaled, weights, batch.scopes
        if only is not None:
            names, terms, seeds, scopes = names[only : only + 1], [terms[only]], weights.new_ones(1), [scopes[only]]
        result = self._engine.backward(
            names, terms, seeds, scopes, values,
            check_grads=not (self._precision.scaled or defer), check_values=check_values and not defer, stale=batch.stale,
        )
        if defer:
            self._deferred.note_values(result.values)
            self._deferred.note_gradients(result.direction.grads + result.direction.others)
            return result
        if result.failed == "values":
            self._require_finite(batch.names, result.values, self._reduction.value_label())
        if result.failed == "gradients":
            self._nonfinite(f"gradient of the weighted sum of the terms {list(names)}")
        return result

    # ------------------------------------------------------------------ non-finite values and undoing
    def _check_values(self, names: tuple[str, ...], values: Tensor, wanted: bool, stage: str) -> None:
        """The loss values, checked at ``stage`` when ``wanted`` (the reduction says which stage)."""
        if wanted and self._reduction.checks(stage):
            self._require_finite(names, values, self._reduction.value_label())

    def _verify_values(self, names: tuple[str, ...], values: Tensor, plan: _Plan, stage: str) -> None:
        """The loss values at ``stage``: checked now, or into the deferred verdict."""
        if not plan.defer:
            self._check_values(names, values, True, stage)
        elif self._reduction.checks(stage):
            self._deferred.note_values(values)

    def _settle(self, names: tuple[str, ...], update: bool, undo: _Undo) -> None:
        """The deferred checks at the end of a call: fold its verdict (device ops) and, when due,
        read the pending one (one host sync; :mod:`lossbalance.deferred`). A clean read makes the
        start of this call the rollback point; a non-finite one raises :class:`_Rollback`."""
        deferred = self._deferred
        if deferred.point is None:  # the first call (or the first after a rollback)
            deferred.point = self._point(undo)
        if deferred.other_terms(names):
            self._read(undo)  # what earlier calls with other terms left pending, first
        due = deferred.due(update)
        deferred.fold(names, self._step)
        if due:
            self._read(undo)

    def _read(self, undo: _Undo) -> None:
        pending = self._deferred.pending
        finding = self._deferred.read()
        if finding is not None:
            raise _Rollback(finding)
        if pending and (self._deferred.point is None or self._deferred.point.undo is not undo):
            self._deferred.point = self._point(undo)

    def _point(self, undo: _Undo) -> _Point:
        """A rollback point at the start of this call (the parameters and the optimizer's state
        are as they were then: a call changes neither before the optimizer's step)."""
        params = list(self._engine.params)
        return _Point(undo, take_snapshot(self.optimizer, params, self._engine.owns), params)

    def check(self) -> None:
        """With ``check_every > 1``: read the deferred NaN/Inf verdict now (one host sync), e.g.
        before saving a checkpoint or at the end of training. If a call since the last read was
        not finite, every call since the rollback point is undone and this raises (or, under
        ``nonfinite="skip"``, counts them skipped), as a read inside a step would. Nothing to do
        with ``check_every=1`` (every call checks itself)."""
        if self._deferred is None or not self._deferred.pending:
            return
        now = self._undo_point(None)
        try:
            self._read(now)
        except _Rollback as found:
            self._roll_back(found.finding, now, current=False)

    def _roll_back(self, finding: Finding, undo: _Undo, *, current: bool = True) -> None:
        """A deferred read found a non-finite call: undo every call since the rollback point
        (the balancer, the parameters, the optimizer's state), then raise or count them skipped
        (``current``: the call that read is one of them)."""
        point = self._deferred.point
        self._deferred.point = None  # the next call makes a new one
        undone = undo.step - point.undo.step + undo.skipped - point.undo.skipped + int(current)
        self._undo(point.undo)
        self._pointwise.start_step()  # the undone calls' re-evaluation states go with them
        restore_snapshot(point.snapshot, self.optimizer, point.params)
        for p in point.params:
            p.grad = None
        what = f"loss value for term(s) {list(finding.terms)}" if finding.terms else "gradient of the weighted sum"
        if self.nonfinite == "raise":
            raise ValueError(
                f"non-finite {what} at step {finding.step} (check_every={self.check_every}: found at step "
                f"{undo.step}); the {undone} call(s) since step {point.undo.step} were undone: the parameters, the "
                "optimizer's state and the balancer are as they were then. Pass nonfinite='skip' to skip such "
                "steps, or look for a log/sqrt/division of zero in that term"
            ) from None
        self._skipped = point.undo.skipped + undone

    def _require_finite(self, names: tuple[str, ...], values: Tensor, what: str) -> None:
        """Raise naming the non-finite terms, or (``nonfinite="skip"``) skip the call."""
        if self.nonfinite == "raise":
            check_finite(names, values, what)
        elif not bool(torch.isfinite(values).all()):
            raise _Skip

    def _nonfinite(self, what: str) -> None:
        """A non-finite value that no single term explains: raise, or skip the call."""
        if self.nonfinite == "raise":
            raise ValueError(f"non-finite {what}; nothing was changed. Pass nonfinite='skip' to skip such steps")
        raise _Skip

    def _undo_point(self, plan: _Plan | None) -> _Undo:
        """What :meth:`_undo` needs (``plan=None``: everything, for a closure step)."""
        full = plan is None or plan.update
        return _Undo(
            self._step, self._updates, self._skipped, self._terms.weights, tuple(self._terms.names),
            self.strategy.checkpoint() if full else None, self.generator.get_state() if full else None,
            self._log.last, self._log.recorded, combiner=self.combiner.checkpoint() if self._momentum else None,
            pointwise=self._pointwise.snapshot(),
        )

    def _undo(self, undo: _Undo) -> None:
        """Put the balancer back as it was at ``undo`` (terms first seen since then are forgotten)."""
        if self._deferred is not None:
            self._deferred.forget_call()
        for name in [n for n in self._terms.names if n not in undo.names]:
            self.remove_term(name)
        if undo.strategy is not None:
            self.strategy.rollback(undo.strategy)
            self.generator.set_state(undo.generator)
        self._terms.weights = undo.weights  # never changed in place (TermTable.set_present)
        if undo.combiner is not None:
            self.combiner.rollback(undo.combiner)
        self._step, self._updates, self._skipped = undo.step, undo.updates, undo.skipped
        if undo.pointwise is not None:
            self._pointwise.restore(undo.pointwise)
        self._log.last = undo.last
        self._log.forget_since(undo.rows)

    # ------------------------------------------------------------------ the public step
    def backward(self, losses: Losses) -> Tensor:
        """Everything :meth:`step` does except ``optimizer.step()``; returns the weighted total.

        Use it to clip or inspect gradients before calling ``optimizer.step()`` yourself. A step
        skipped for non-finite values (``nonfinite="skip"``) returns NaN and sets the balanced
        parameters' ``.grad`` to ``None``, so that your ``optimizer.step()`` leaves them alone
        instead of applying the previous step's gradient again. ``.grad`` is overwritten, not
        accumulated: two calls leave the second call's gradient. On update steps with the kept
        gradients, the ``.grad`` tensors are views into one buffer that the next such call
        rewrites: clone a ``.grad`` you want to keep.
        """
        total, _ = self._balance(losses, True)
        if total is None:
            for p in self._engine.params:
                p.grad = None
            return self._nan()
        self._run_hooks()
        return total

    def loss(self, losses: Losses, *, reevaluation: bool = False) -> Tensor:
        """Everything :meth:`backward` does except writing ``.grad``: a scalar to call
        ``.backward()`` on, for frameworks that own the backward and the optimizer step
        (Lightning's automatic optimisation, DeepXDE, PINA, PhysicsNeMo-style aggregators).

        Its value is the weighted total; its ``.backward()`` *accumulates* into ``.grad`` exactly
        what :meth:`backward` would write (the weighted sum or the ``combine=`` direction, scopes
        respected; parameters no term reaches keep ``.grad = None``), at the cost of one product
        per parameter: the gradient is computed here, the returned scalar has the value
        ``total`` and one autograd node whose backward adds ``upstream * d_p`` to each ``p.grad``,
        ``d_p`` a copy that later calls do not touch. So micro-batches accumulate, and a scaled ``.backward()`` (a
        framework's loss scaling) scales the gradient. A step skipped for non-finite values
        (``nonfinite="skip"``) returns NaN, whose backward adds nothing. Under a ``scaler=`` it
        raises: the framework scales the returned loss itself. Runs the step hooks.

        On a call that needs no per-term gradient (no weight update, no ``combine=``, no
        ``diagnose_every=`` step) and where the weighted sum's own gradient is the step's (no
        ``scope=``, a single process, no ``check_every``, ``"mconfig"`` aside), the returned
        scalar is ``sum_i w_i L_i`` itself, with its graph: the framework's backward is then the
        only backward, the cost of a plain step (the gradient is the same, bit for bit). The
        balancer does not see that gradient, so ``backward()``'s check for a non-finite gradient
        does not run on such calls (the loss values are still checked first; a NaN that reaches
        the parameters shows in the next call's values), and leaf tensors with
        ``requires_grad`` that are not parameters (a PINN's input points) get their ``.grad`` as
        with any ``loss.backward()``.

        ``reevaluation=True``: the same step evaluated again (the closure of a framework's L-BFGS,
        called several times per step): the weights are held, and neither the step counter, the
        pointwise state, the history nor the hooks advance, as for the re-evaluations of
        :meth:`step` with ``closure=``; its values and gradients are checked at once. Refused
        (``ValueError``) with ``combine="mconfig"``, whose every evaluation is a step of its own.

        While :attr:`evaluating` is true (the Lightning callback sets it during validation, test
        and prediction, sanity checks included) it returns :meth:`evaluate` instead: nothing advances.
        Otherwise, under ``torch.no_grad()`` it raises ``RuntimeError`` before anything changes
        (the step would be taken and its result could not be backpropagated).
        """
        if self.evaluating:
            return self.evaluate(losses)
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "loss() was called under torch.no_grad() (or inference mode): its result could not be "
                "backpropagated, so no step was taken; nothing was changed. For a validation loss call "
                "balancer.evaluate(losses) (nothing advances); to train, call loss() with gradients enabled"
            )
        if self._precision.scaled:
            raise TypeError(
                "loss() cannot be used with scaler=: the framework that calls .backward() on the returned "
                "loss scales it; build the balancer without scaler= (for float16, use bf16 or the framework's scaler)"
            )
        if reevaluation and self._momentum:
            raise ValueError(
                f"loss(..., reevaluation=True) cannot be used with combine={self.combiner.name!r}: each call "
                "differentiates the next term in turn and moves its momenta, so a second evaluation of one step "
                "is a new step; nothing was changed. Use a first-order optimizer that evaluates once per step (SGD)"
            )
        total, _ = self._balance(losses, not reevaluation, into="loss", deferrable=not reevaluation)
        if total is None:
            return self._nan().requires_grad_()
        if not reevaluation:
            self._run_hooks()
        return total

    def evaluate(self, losses: Losses) -> Tensor:
        """The weighted total ``sum_i w_i L_i`` of ``losses`` with the current weights, for
        validation and test: nothing advances (no weight update, step counter, statistics,
        pointwise state or hooks) and nothing is checked for NaN; the terms need no gradient
        (with one, the total has its graph). :class:`~lossbalance.Residual` terms are reduced
        with their current pointwise weights (points whose ids a per-point table does not hold
        take the initial value, RBA's 0 included: a warning, once per term). Before the first step, the initial weights
        (``weights=``, else 1). The key set is checked as for a step (``KeyError``)."""
        terms = _plain_tensors(self._pointwise.reduce(losses, False).losses)
        check_losses(terms, self._engine.device, need_grad=False)
        if self._terms.names:
            check_key_set(tuple(terms), self._terms.names, self._terms.optional)
        current = self.weights
        weights = [current[n] if n in current else self._terms.initial_weight(n) for n in terms]
        values = torch.stack([t.reshape(()) for t in terms.values()])
        return torch.dot(values.new_tensor(weights), values)

    def step(
        self,
        losses: Losses | None = None,
        *,
        closure: Callable[[], Losses] | None = None,
        after: Callable[[], Losses] | None = None,
    ) -> Tensor:
        """Balance, write ``.grad`` and step the optimizer; returns the weighted total (detached).

        Pass either the dict of loss terms or a ``closure`` that recomputes and returns it (for
        ``torch.optim.LBFGS``). With a closure, the weights are updated at most once per call,
        on its first evaluation, and held fixed while the optimizer re-evaluates it. If the
        optimizer's step raises, the balancer's step is undone (weights, counters, strategy
        state) and the error propagates.

        ``after``: a function that rebuilds the loss dict on the same points at the parameters
        *after* the step, for strategies that judge a step by its result (``"famo"``): called once
        (gradients enabled) after each step that updated the weights, its values go to
        :meth:`observe`. Costs one forward. If it raises, or its losses are refused (see
        :meth:`observe`), the step stands and the error propagates, saying so.
        """
        if self.optimizer is None:
            raise TypeError(
                "this balancer was built from parameters, without an optimizer: step() needs one. Use "
                "loss(losses) (a loss to call .backward() on) or backward(losses), and step your optimizer yourself"
            )
        if (losses is None) == (closure is None):
            raise TypeError("step() takes either the dict of loss terms or closure=, exactly one of them")
        if after is None:
            return self._step_closure(closure) if closure is not None else self._step_losses(losses)
        self._observer()  # refuse before stepping
        updates, skipped = self._updates, self._skipped
        total = self._step_closure(closure) if closure is not None else self._step_losses(losses)
        if self._updates != updates and self._skipped == skipped:
            self._observe_after(after)
        return total

    def _observe_after(self, after: Callable[[], Losses]) -> None:
        """``step(after=...)``'s closure, once the optimizer has stepped: its errors say that the step stands."""
        try:
            with torch.enable_grad():
                self.observe(self._call(after))
        except (TypeError, ValueError, KeyError) as error:
            reason = error.args[0] if error.args else repr(error)
            reason = str(reason).replace("; nothing was changed", "")
            raise type(error)(
                f"step(after=...): the optimizer step was taken and stands (so does the weights' update); "
                f"the losses after it were refused, the strategy did not learn from them: {reason}"
            ) from error

    def _observer(self) -> Callable[[tuple[str, ...], Tensor], None]:
        observe = getattr(self.strategy, "observe", None)
        if observe is None:
            raise TypeError(
                f"strategy {self.strategy.name!r} does not use the losses after the step: observe() and "
                "step(after=) are for strategies that judge a step by its result, such as 'famo'"
            )
        return observe

    def observe(self, losses: Losses) -> None:
        """Pass the loss values *after* the optimizer's step (same points, new parameters) to a
        strategy that learns from them (:class:`~lossbalance.strategies.FAMO`): call it after
        your own ``optimizer.step()`` (with :meth:`backward` or :meth:`loss`), or let
        ``step(losses, after=closure)`` do it. Only the values are used (detached; the graph is
        not touched). Non-finite values raise, or
        under ``nonfinite="skip"`` are ignored (the strategy then learns at its next update).
        Distributed: the values are averaged over the processes (every process must call it with
        the same terms). ``TypeError`` for a strategy that does not use them; ``KeyError`` naming
        the terms when the key set is not the steps' (a misspelt or missing term, as for a step).
        """
        observe = self._observer()
        if not isinstance(losses, Mapping):
            raise TypeError(f"observe() takes the dict of loss terms, got {type(losses).__name__}")
        if self._terms.names:  # (before the first step there is nothing to learn from: a no-op below)
            check_key_set(tuple(losses), self._terms.names, self._terms.optional)
        losses = _plain_tensors(self._pointwise.reduce(losses, False).losses)
        names = tuple(n for n in self._terms.names if n in losses)
        if not names:
            return
        check_losses({n: losses[n] for n in names}, self._engine.device, need_grad=False)
        weights = self._terms.weights
        values = torch.stack([losses[n].detach().reshape(()) for n in names])
        values = values.to(dtype=weights.dtype, device=weights.device)
        self._reduction.mean_(values)
        try:
            self._require_finite(names, values, "loss value after the step")
        except _Skip:
            return
        with torch.no_grad():
            observe(names, values)

    def _step_losses(self, losses: Losses) -> Tensor:
        if self._needs_closure:
            raise TypeError(
                f"{type(self.optimizer).__name__}.step needs a closure: call "
                "balancer.step(closure=lambda: {'pde': ..., 'bc': ...}) with a function that rebuilds the loss dict"
            )
        total, undo = self._balance(losses, True)
        if total is None:
            return self._nan()
        try:
            self._precision.step(self.optimizer)
        except BaseException:
            self._undo(undo)
            raise
        self._run_hooks()
        return total

    def _step_closure(self, closure: Callable[[], Losses]) -> Tensor:
        if self._precision.scaled:
            raise TypeError("a GradScaler cannot be used with a closure (torch.amp does not support it)")
        self._check_line_search()  # the optimizer's settings may have changed since __init__
        self._refresh_parameters()
        params = self._engine.params
        snapshot = take_snapshot(self.optimizer, params, self._engine.owns) if reevaluates(self.optimizer) else None
        undo = self._undo_point(None)
        with torch.enable_grad():
            first, _ = self._balance(self._call(closure), True, deferrable=False)
        if first is None:
            return self._nan()
        pending, failed = [first], []

        def evaluate() -> Tensor:
            if pending:
                return pending.pop()
            with torch.enable_grad():
                total, _ = self._balance(self._call(closure), False, deferrable=False)
            if total is None:
                failed.append(True)
                return self._nan()
            return total

        try:
            self.optimizer.step(evaluate)
        except BaseException:
            self._undo(undo)
            restore_snapshot(snapshot, self.optimizer, params)
            raise
        if failed:  # a re-evaluation was non-finite under nonfinite="skip": undo the whole step
            self._undo(undo)
            restore_snapshot(snapshot, self.optimizer, params)
            self._skipped += 1
            return self._nan()
        self._run_hooks()
        return first

    def register_step_hook(self, hook: Callable[["LossBalancer"], None]) -> RemovableHandle:
        """Call ``hook(balancer)`` after every step (e.g. a :class:`~lossbalance.tensorboard.TensorBoardLogger`).

        Returns a handle whose ``remove()`` unregisters it.
        """
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def _run_hooks(self) -> None:
        for hook in list(self._hooks.values()):
            hook(self)

    @staticmethod
    def _call(closure: Callable[[], Losses]) -> Losses:
        terms = closure()
        if not isinstance(terms, Mapping):
            raise TypeError(
                f"the closure must return the dict of loss terms, got {type(terms).__name__}; "
                "the balancer does the backward pass itself"
            )
        return terms

    def _nan(self) -> Tensor:
        return self._terms.weights.new_full((), float("nan"))

    # ------------------------------------------------------------------ pass-through and reporting
    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
            return
        for p in (p for group in self.param_groups for p in group["params"]):
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (live: ``load_state_dict`` replaces them), or the
        groups of the parameters given instead of an optimizer."""
        return self._own_groups if self.optimizer is None else self.optimizer.param_groups

    @property
    def weights(self) -> dict[str, float]:
        """Current weight of every registered term: those of ``terms=``, then each term from the
        first step it appears in (empty before the first step without ``terms=``; the
        ``weights=`` given apply from then)."""
        return self._terms.as_dict()

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        """Per-term figures of the last step: loss, weight and, where computed, gradient statistics.

        The gradient figures (``grad_mean``, ``grad_max``, ``grad_norm``, over each term's scope)
        are present when that step computed per-term gradients.
        """
        return self._log.stats()

    @property
    def diagnostics(self) -> dict[str, Any] | None:
        """Conflict diagnostics of the last step that computed the per-term gradients.

        ``{"step", "names", "grad_norm": {term: ||g||}, "cosine": K x K list, "conflict_fraction"}``:
        ``cosine[i][j]`` is the cosine similarity of terms i and j, ``conflict_fraction`` the share
        of pairs with a negative one. ``None`` before any such step (see ``diagnose_every``).
        """
        return self._log.diagnostics()

    @property
    def history(self) -> list[dict[str, Any]]:
        """The last ``history`` steps: ``{"step", "weights": {...}, "losses": {...}}``, plus
        ``"grad_norm"``, ``"cosine"`` and ``"conflict_fraction"`` on steps with per-term gradients,
        and ``"pointwise"``: ``{term: {figure: value}}`` on steps with pointwise figures (``pointwise=``
        weightings: ``causal_min``, ``rba_min`` ... ``rba_p10``/``p50``/``p90`` ... ``rba_max``;
        NTK traces: ``ntk_trace``), as in :attr:`stats` (:func:`lossbalance.plots.plot_pointwise`).

        Each entry is built once, when first read (a read costs the steps added since the last
        one); the entries are shared between reads: treat them as read-only.
        """
        return self._log.history()

    @property
    def step_count(self) -> int:
        """Steps taken (a ``step`` call with a closure counts once)."""
        return self._step

    @property
    def skipped(self) -> int:
        """Steps skipped for non-finite values under ``nonfinite="skip"``."""
        return self._skipped

    # ------------------------------------------------------------------ configuration
    @classmethod
    def from_config(
        cls, optimizer: torch.optim.Optimizer, config: Mapping[str, Any], *, model: torch.nn.Module | None = None
    ) -> "LossBalancer":
        """Build a balancer from a plain dict (YAML/TOML/Hydra); see :mod:`lossbalance.config`.

        Every problem of the config is reported at once (:class:`~lossbalance.config.ConfigError`),
        before anything is built; a combination the balancer itself refuses (e.g. ``min_weight``
        above ``max_weight``) is a ``ConfigError`` too. Scopes and the probe name parameters by
        prefix of ``model.named_parameters()``.
        """
        options = parse_config(config, model=model)
        try:
            return cls(optimizer, **options)
        except ConfigError:
            raise
        except (ValueError, KeyError) as error:  # e.g. weights= naming a term outside terms=
            raise ConfigError([str(error.args[0]) if error.args else str(error)]) from error

    def config(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """The plain dict that :meth:`from_config` turns back into an equivalent balancer: the
        construction options (``weights`` are the initial weights, ``frozen`` the current flag;
        the learned weights are in :meth:`state_dict`, or use :func:`~lossbalance.static_from`)."""
        settings: dict[str, Any] = {
            "strategy": self.strategy.name, "strategy_options": self.strategy.options(),
            **{name: getattr(self, _ATTRIBUTE.get(name, name)) for name in PLAIN_NAMES},
            "combine": self.combiner.name, "combine_options": self.combiner.options(),
        }
        if self._terms.initial:
            settings["weights"] = dict(self._terms.initial)
        for key, bound in zip(("min_weight", "max_weight"), self._terms.bounds):
            if bound is not None:
                settings[key] = dict(bound) if isinstance(bound, Mapping) else bound
        if self._terms.names:
            settings["terms"] = list(self._terms.names)
        if self._terms.optional:
            settings["optional"] = sorted(self._terms.optional)
        if self._pointwise.weightings:
            settings["pointwise"] = pointwise_config(self._pointwise.weightings)
        return export_config(settings, self._scope_params, {"probe": self._probe, "shared": self._shared}, model)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's and the balancer's state; loading it continues a run bit for bit.

        Keys (format 2): ``format``; ``optimizer`` (the optimizer's ``state_dict``, ``None``
        for a balancer built from parameters) and ``optimizer_type`` (its class, e.g.
        ``"torch.optim.adam.Adam"``, ``None`` without one); ``names``,
        ``optional``, ``weights``, ``lower``, ``upper`` (the terms, their weights and bounds);
        ``step``, ``updates``, ``skipped`` (counters); ``strategy_name``, ``strategy`` (the
        strategy's state); ``generator`` (the random generator's state); ``scaler`` (the
        GradScaler's state or ``None``); ``frozen`` (:meth:`freeze`); ``combiner`` (the
        combiner's state: ``{}`` except for stateful ones such as ``"mconfig"``); ``pointwise``
        (per term of ``pointwise=``: the causal ``eps_index``; the per-point tables of RBA, SA-PINN and BRDR keyed by point id);
        ``deferred`` (the unread verdict of ``check_every > 1``, else ``None``). States of
        lossbalance 0.1.0 (no ``format``) load too, and states without ``frozen``/``combiner``
        keep the balancer's own (so do terms missing from ``pointwise``).

        With ``check_every > 1`` the verdict not read yet goes with it (``deferred``, device
        tensors: no host read, nothing rolled back, no collective), and :meth:`load_state_dict`
        refuses a state saved after a non-finite call that no read had caught: its parameters
        (saved next to it) are those after the NaN. Call :meth:`check` before saving to roll
        back first (on every process, in a distributed run).
        """
        return _plain_strings({
            "format": STATE_FORMAT,
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "optimizer_type": None if self.optimizer is None else _optimizer_type(self.optimizer),
            **self._terms.state_dict(),
            "step": self._step,
            "updates": self._updates,
            "skipped": self._skipped,
            "strategy_name": self.strategy.name,
            "strategy": self.strategy.state_dict(),
            "generator": self.generator.get_state(),
            "scaler": self._precision.state_dict(),
            "frozen": self.frozen,
            "combiner": self.combiner.state_dict(),
            "pointwise": self._pointwise.state_dict(),
            "deferred": None if self._deferred is None else self._deferred.unread(),
        })

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Everything is checked first and committed at once: any
        error (a wrong key set, strategy, term table, generator or optimizer state) leaves the
        balancer, its strategy and the optimizer exactly as they were. A state saved without an
        optimizer (``LossBalancer(model.parameters(), ...)``) loads into a balancer with one: its
        balancer's part, with a warning (the optimizer keeps its state); a balancer without an
        optimizer loads the balancer's part of any state. An optimizer state whose parameter groups
        lack this optimizer's hyper-parameters (Adam's into an L-BFGS balancer: torch.optim would
        take it and fail at the next step) is refused; ``{**state, "optimizer": None}`` loads the
        balancer's part alone (weights, per-point tables, strategy state, the ``frozen`` flag;
        no warning unless the state predates ``optimizer_type``): how an Adam phase hands over
        to an L-BFGS balancer with the same strategy."""
        checked = self._checked_state(state)
        self._load_stateful_parts(state)
        if self.optimizer is not None and state["optimizer"] is None and state.get("optimizer_type") is None:
            warn_user("this state was saved by a balancer without an optimizer: the balancer's part is loaded, the "
                      "optimizer keeps its own state (load it from where it was saved, e.g. the framework's checkpoint)")
        self._commit_state(state, checked)

    def _load_stateful_parts(self, state: Mapping[str, Any]) -> None:
        """The strategy, the optimizer, the scaler and the combiner load their parts; if one
        refuses, all are put back as they were and the error propagates."""
        strategy_state, scaler_state = self.strategy.state_dict(), self._precision.state_dict()
        combiner_state = self.combiner.state_dict()
        optimizer_state = None if self.optimizer is None else self.optimizer.state_dict()
        try:
            self.strategy.load_state_dict(state["strategy"])
            if optimizer_state is not None and state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            self._precision.load_state_dict(state.get("scaler"))
            if "combiner" in state:
                self.combiner.load_state_dict(state["combiner"])
        except BaseException:
            self.strategy.load_state_dict(strategy_state)
            if optimizer_state is not None:
                self.optimizer.load_state_dict(optimizer_state)
            self._precision.load_state_dict(scaler_state)
            self.combiner.load_state_dict(combiner_state)
            raise

    def _commit_state(self, state: Mapping[str, Any], checked: Mapping[str, Any]) -> None:
        """The checked parts of a state (cannot fail)."""
        if "frozen" in state:
            self.frozen = state["frozen"]
        self._terms.commit(checked["terms"])
        if checked["pointwise"] is not None:
            self._pointwise.commit(checked["pointwise"])
        self._step, self._updates, self._skipped = checked["counters"]
        self.generator.set_state(checked["generator"])
        self._log = StepLog(self._log.keeps_history)  # the abandoned run's stats, diagnostics and history
        self._checked = set()
        self._deferred = self._deferred_checks(self.check_every)  # what was pending belongs to the old run

    def _checked_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The parts of ``state`` that can be checked without touching anything."""
        missing = {"optimizer", "names", "weights", "step", "updates", "strategy", "generator"} - set(state)
        if missing:
            raise KeyError(f"not a LossBalancer state_dict: missing {sorted(missing)}")
        version = state.get("format", 1)
        if not isinstance(state.get("frozen", False), bool):
            raise ValueError(f"corrupt state: 'frozen' is {state['frozen']!r}, not True or False")
        if version not in (1, STATE_FORMAT):
            raise ValueError(f"this state has format {version!r}; this lossbalance reads formats 1 and {STATE_FORMAT}")
        saved = state.get("strategy_name", self.strategy.name)
        if saved != self.strategy.name:
            raise ValueError(
                f"this state was saved by a balancer running strategy {saved!r}; this one runs "
                f"{self.strategy.name!r}: build the balancer with the same strategy before loading"
            )
        generator = state["generator"]
        try:
            torch.Generator().set_state(generator)  # a scratch generator: a corrupt state raises here
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"corrupt state: the random generator's state cannot be loaded ({error})") from error
        try:
            counters = (int(state["step"]), int(state["updates"]), int(state.get("skipped", 0)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"corrupt state: the step counters are not integers ({error})") from error
        if self.optimizer is not None and state["optimizer"] is not None:
            check_optimizer_state(state["optimizer"], self.optimizer)
        _check_no_unread_nan(state.get("deferred"))
        return {
            "terms": self._terms.checked_state(state), "counters": counters, "generator": generator,
            "pointwise": self._pointwise.checked_state(state.get("pointwise")),
        }

    def __repr__(self) -> str:
        return (
            f"LossBalancer({type(self.optimizer).__name__ if self.optimizer else 'parameters'}, {self.strategy!r}, update_every={self.update_every}, "
            f"combine={self.combiner!r}, memory={self.memory!r}, terms={self._terms.names})"
        )


def _optimizer_type(optimizer: torch.optim.Optimizer) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _check_no_unread_nan(deferred: Any) -> None:
    """Refuse a state saved after a non-finite call that no deferred read had caught."""
    if not isinstance(deferred, Mapping) or not isinstance(deferred.get("first"), Tensor):
        return
    first = int(deferred["first"])
    if first >= 0:
        raise ValueError(
            f"this state was saved with check_every > 1 after a non-finite call (step {first}) that no read had "
            "caught yet: the model and optimizer states saved with it hold the values after the NaN. Resume from "
            "an earlier checkpoint; call balancer.check() before saving to roll back first. Nothing was loaded"
        )


_SECOND_MOMENT_OPTIMIZERS = tuple(getattr(torch.optim, n) for n in ("RMSprop", "Adagrad", "Adadelta", "Adafactor")
                                  if hasattr(torch.optim, n))


def _normalises_steps(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer divides its step by a running second moment (the Adam family, with
    ``betas``; RMSprop, Adagrad, Adadelta, Adafactor)."""
    return "betas" in optimizer.defaults or isinstance(optimizer, _SECOND_MOMENT_OPTIMIZERS)


def surrogate_loss(total: Tensor, params: list[Tensor], grads: list[Tensor | None]) -> Tensor:
    """A scalar with the value of ``total`` whose backward accumulates ``grads`` into ``params``
    (``None``: the parameter is left out, its ``.grad`` untouched), scaled by the gradient that
    reaches it (a framework's loss scaling, ``1 / accumulation steps``): one autograd node,
    whose backward is one product per parameter tensor."""
    pairs = [(p, g.detach() if g.requires_grad else g) for p, g in zip(params, grads) if g is not None]
    if not pairs:
        return total.detach().requires_grad_()
    return _Surrogate.apply(total.detach(), [g for _, g in pairs], *(p for p, _ in pairs))


class _Surrogate(torch.autograd.Function):
    """``forward(total, grads, *params) = total``; ``d/d params = grads`` (times the incoming gradient)."""

    @staticmethod
    def forward(ctx, total: Tensor, grads: list[Tensor], *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return total.clone()

    @staticmethod
    def backward(ctx, upstream: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads = ctx.grads
        if all(g.dtype == grads[0].dtype and g.device == grads[0].device for g in grads):
            return (None, None, *torch._foreach_mul(grads, upstream.to(grads[0].dtype)))  # one op for all
        return (None, None, *(g * upstream.to(g.dtype) for g in grads))


def _plain_tensors(losses: Losses) -> Losses:
    """``losses`` with tensor subclasses (e.g. PINA's ``LabelTensor``) as plain tensor views."""
    if not isinstance(losses, Mapping) or all(type(v) is Tensor for v in losses.values()):
        return losses
    return {k: v.as_subclass(Tensor) if isinstance(v, Tensor) and type(v) is not Tensor else v for k, v in losses.items()}


def _plain_strings(value: Any) -> Any:
    """``value`` with every ``str`` subclass (an ``enum.StrEnum`` or ``numpy.str_`` term name) as a
    plain ``str``, in dict keys and values, lists and tuples: what ``torch.load(weights_only=True)``
    accepts. Such names hash and compare as their plain strings, so the state loads either way."""
    if isinstance(value, str):
        return value if type(value) is str else str.__str__(value)
    if isinstance(value, dict):
        return {_plain_strings(k): _plain_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_plain_strings(v) for v in value)
    return value


def _resolve_scopes(scope_params: Mapping[str, list[Tensor]], held: frozenset[int]) -> dict[str, frozenset[int]]:
    """``{term: ids of its parameters}``; raises unless each scope is a non-empty subset of ``held``."""
    scopes = {}
    for name, params in scope_params.items():
        if not params:
            raise ValueError(f"the scope of term {name!r} is empty: name at least one parameter it may train")
        ids = frozenset(map(id, params))
        if not ids <= held:
            raise ValueError(
                f"the scope of term {name!r} names a parameter the optimizer does not hold "
                "(or that does not require grad): scopes must be subsets of the optimizer's parameters"
            )
        scopes[name] = ids
    return scopes


def _check_plain_options(given: Mapping[str, Any], terms: Any) -> None:
    """The constructor's plain options (one table: :mod:`lossbalance.options`) and ``terms``."""
    problems = option_problems({name: given[name] for name in PLAIN_NAMES})
    if problems:
        raise ValueError("; ".join(problems))
    if isinstance(terms, str):
        raise TypeError(f"terms must be a list of term names, got the string {terms!r}; write terms=[{terms!r}]")


def _optimizer_and_groups(given: Any) -> tuple[torch.optim.Optimizer | None, list[dict[str, Any]]]:
    """The optimizer (or ``None``), and the parameter groups when there is no optimizer, from an
    optimizer or from parameters (tensors or param-group dicts, as ``torch.optim`` takes them)."""
    if isinstance(given, torch.optim.Optimizer):
        return given, []
    wrong = TypeError(
        f"LossBalancer wraps a torch.optim.Optimizer or takes parameters (model.parameters(), or param-group "
        f"dicts), got {type(given).__name__}; e.g. LossBalancer(torch.optim.Adam(model.parameters()), ...)"
    )
    if isinstance(given, (Tensor, str, Mapping, torch.nn.Module)) or not isinstance(given, Iterable):
        raise wrong
    items = list(given)
    if items and all(isinstance(g, Mapping) and "params" in g for g in items):
        return None, _distinct_groups([{**g, "params": list(g["params"])} for g in items])
    if not items or not all(isinstance(p, Tensor) for p in items):
        raise wrong
    return None, _distinct_groups([{"params": items}])


def _distinct_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parameter groups with each tensor once, as ``torch.optim`` takes them: a tensor listed
    twice in a group is kept once (with a warning), one in two groups is refused."""
    seen: set[int] = set()
    for group in groups:
        distinct = list({id(p): p for p in group["params"]}.values())
        if len(distinct) < len(group["params"]):
            warn_user(f"a parameter group lists {len(group['params']) - len(distinct)} parameter(s) more than once: "
                      "each is balanced once (the gradient of a tensor is one, however often it is listed)")
            group["params"] = distinct
        if seen & set(map(id, distinct)):
            raise ValueError("some parameters appear in more than one parameter group: give each tensor to one group")
        seen |= set(map(id, distinct))
    return groups


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (``torch.optim.LBFGS`` does)."""
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty
