"""``LossBalancer``: replaces ``optimizer.step()`` for models trained on several named loss terms."""
from __future__ import annotations

import copy
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from torch import Tensor

from .combine import Combiner, WeightedSum, make_combiner
from .config import export_config, option_problems, parse_config
from torch.utils.hooks import RemovableHandle

from .gradients import GradientEngine, GradStats
from .strategies.base import StepRecord, Strategy, make_strategy
from .validation import check_finite, check_key_set, check_losses, graph_size, reaches

__all__ = ["LossBalancer"]

Losses = Mapping[str, Tensor]
Bound = float | Mapping[str, float] | None


class LossBalancer:
    r"""Balance named loss terms and step the wrapped optimizer.

    Each ``step(losses)`` takes a dict of scalar loss terms built from one forward graph,
    differentiates each term separately (when the strategy needs gradients and an update is
    due), updates the weights ``lambda_i``, writes ``sum_i lambda_i grad L_i`` into ``.grad``
    (overwriting it) and calls ``optimizer.step()``. It returns the weighted total (detached).

    Args:
        optimizer: any ``torch.optim.Optimizer``; its parameters that require grad are balanced.
        strategy: a :class:`~lossbalance.strategies.Strategy` or a registered short name.
        update_every: update the weights on every n-th step (the first step included).
        weights: initial weight per term (default 1).
        min_weight, max_weight: clamp every updated weight (a float, or a dict per term).
        warmup: number of steps that keep the initial weights before the first update.
        frozen: never update the weights (they stay as they are, e.g. after loading).
        terms: the terms and their canonical order (default: the keys of the first step).
        optional: terms that may be absent on some steps (their weight is kept meanwhile).
        scope: ``{term: parameters}``: the parameters a term may train (default: all). The term's
            gradient flows through the whole graph but only its scope receives it.
        probe: take the gradient statistics on this subset of the parameters only.
        combine: how the weighted per-term gradients become one direction: ``"sum"`` (default),
            ``"pcgrad"``, ``"config"``, a :class:`~lossbalance.combine.Combiner` or a callable on
            the ``(K, P)`` matrix. Anything but the sum needs the per-term gradients every step.
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
        check_paths: when to check that each term's graph reaches the parameters it may train:
            ``"first"`` (its first appearance; gradient steps check every time anyway, for free)
            or ``"always"`` (a walk of the autograd graph per term and step, also on plain steps).
        seed: seed of the balancer's own random generator (saved in ``state_dict``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
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
        combine: str | Combiner | Callable[[Tensor], Tensor] = "sum",
        diagnose_every: int = 0,
        memory: Literal["keep", "lean"] = "keep",
        grad_mode: Literal["loop", "batched"] = "loop",
        nonfinite: Literal["raise", "skip"] = "raise",
        history: int = 0,
        check_paths: Literal["first", "always"] = "first",
        seed: int = 0,
        scaler: torch.amp.GradScaler | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"LossBalancer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "create the optimizer first, e.g. torch.optim.Adam(model.parameters())"
            )
        problems = option_problems({
            "update_every": update_every, "warmup": warmup, "frozen": frozen, "memory": memory,
            "grad_mode": grad_mode, "nonfinite": nonfinite, "history": history, "check_paths": check_paths,
            "diagnose_every": diagnose_every, "seed": seed,
        })
        if problems:
            raise ValueError("; ".join(problems))
        self.optimizer = optimizer
        self.strategy = make_strategy(strategy)
        self.update_every = update_every
        self.warmup = warmup
        self.frozen = frozen
        self.nonfinite = nonfinite
        self.check_paths = check_paths
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._memory = memory
        self._grad_mode = grad_mode
        self._probe = None if probe is None else list(probe)
        self._reduce = _mean_over_processes(distributed, process_group)
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._hooks: dict[int, Callable[["LossBalancer"], None]] = OrderedDict()
        self._engine = self._make_engine()
        self.combiner = make_combiner(combine)
        self._combines = not isinstance(self.combiner, WeightedSum)
        self.diagnose_every = diagnose_every
        if (self._combines or diagnose_every) and not self._engine.reuses:
            raise ValueError("combine= and diagnose_every= need the kept per-term gradients: memory='keep' and no probe")
        self._initial = dict(weights or {})
        self._bounds = (min_weight, max_weight)
        self._scope_params = {name: list(params) for name, params in (scope or {}).items()}
        self._scopes = self._resolve_scopes()
        self._names: list[str] = []
        self._optional = set(optional)
        self._weights = self._engine.layout.numel.new_zeros(0, dtype=self._weight_dtype())
        self._lower = self._weights.clone()
        self._upper = self._weights.clone()
        self._bounded = False  # whether any term has a min_weight > 0 or a finite max_weight
        if isinstance(terms, str):
            raise TypeError(f"terms must be a list of term names, got the string {terms!r}; write terms=[{terms!r}]")
        for name in terms or ():
            self.add_term(name)
        stray = [n for n in self._scopes if self._names and n not in self._names and n not in self._optional]
        if stray:
            raise KeyError(f"scope names term(s) {stray} that are neither in terms= nor in optional=")
        self._step = 0
        self._updates = 0
        self._skipped = 0
        self._checked: set[str] = set()
        self._graph_sizes: dict[str, int] = {}  # the largest graph is differentiated last: it is not retained
        self._active: tuple[tuple[str, ...], tuple[str, ...], Tensor] | None = None  # keys, names, index
        self._last: tuple[tuple[str, ...], Tensor, Tensor, GradStats | None] | None = None
        self._diagnostics: tuple[int, tuple[str, ...], GradStats] | None = None
        self._history: deque = deque(maxlen=history)

    # ------------------------------------------------------------------ set-up helpers
    def _balanced_params(self) -> list[Tensor]:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            raise ValueError("the optimizer holds no parameter that requires grad: nothing to balance")
        return params

    def _make_engine(self) -> GradientEngine:
        params = self._balanced_params()
        self._param_ids = tuple(map(id, params))
        return GradientEngine(
            params, memory=self._memory, probe=self._probe, reduce=self._reduce, grad_mode=self._grad_mode
        )

    def _weight_dtype(self) -> torch.dtype:
        return torch.promote_types(self._engine.layout.dtype, torch.float32)

    def _resolve_scopes(self) -> dict[str, frozenset[int]]:
        held = set(self._engine.layout.position)
        scopes = {}
        for name, params in self._scope_params.items():
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

    def _bound(self, which: int, name: str) -> float:
        bound = self._bounds[which]
        default = 0.0 if which == 0 else float("inf")
        if isinstance(bound, Mapping):
            return float(bound.get(name, default))
        return default if bound is None else float(bound)

    # ------------------------------------------------------------------ terms
    def add_term(self, name: str, weight: float | None = None, *, optional: bool = False) -> None:
        """Declare a term (e.g. one that appears in a later phase) with its initial weight."""
        if not isinstance(name, str):
            raise TypeError(f"term names must be strings, got {name!r}")
        if name in self._names:
            raise ValueError(f"term {name!r} is already declared")
        value = float(self._initial.get(name, 1.0) if weight is None else weight)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"the initial weight of term {name!r} must be finite and positive, got {value}")
        lower, upper = self._bound(0, name), self._bound(1, name)
        if lower > upper:
            raise ValueError(f"term {name!r}: min_weight {lower} > max_weight {upper}")
        self._names.append(name)
        extend = lambda t, v: torch.cat([t, t.new_full((1,), v)])  # noqa: E731
        self._weights = extend(self._weights, value)
        self._lower = extend(self._lower, lower)
        self._upper = extend(self._upper, upper)
        self._bounded = self._bounded or lower > 0 or upper < float("inf")
        if optional:
            self._optional.add(name)
        self._active = None

    def remove_term(self, name: str) -> None:
        """Forget a term and its weight (e.g. a phase that ended)."""
        if name not in self._names:
            raise KeyError(f"term {name!r} is not declared; declared: {self._names}")
        keep = [i for i, n in enumerate(self._names) if n != name]
        self._names.pop(self._names.index(name))
        self._weights, self._lower, self._upper = (t[keep] for t in (self._weights, self._lower, self._upper))
        self._optional.discard(name)
        self._checked.discard(name)
        self._active = None

    def _resolve_terms(self, losses: Losses) -> tuple[str, ...]:
        """The present terms in canonical order; validates the key set without changing it."""
        keys = tuple(losses)
        if self._active is not None and self._active[0] == keys:
            return self._active[1]
        if not self._names:
            for name in self._scopes:
                if name not in losses and name not in self._optional:
                    raise KeyError(f"scope names the term {name!r}, which is not among the terms {list(keys)}")
            names = keys
        else:
            check_key_set(keys, self._names, self._optional)
            names = tuple(n for n in self._names if n in losses) + tuple(n for n in keys if n not in self._names)
        self.strategy.validate_terms(names)
        return names

    def _index(self, losses: Losses, names: tuple[str, ...]) -> Tensor:
        """Register the first step's terms and return the indices of ``names`` in the weights."""
        keys = tuple(losses)
        if self._active is not None and self._active[0] == keys:
            return self._active[2]
        for name in names:
            if name not in self._names:
                self.add_term(name)
        index = torch.tensor([self._names.index(n) for n in names], device=self._weights.device)
        self._active = (keys, names, index)
        return index

    def _check_reach(self, names: tuple[str, ...], losses: Losses) -> None:
        """Does each term's graph reach the parameters it may train? (``check_paths``)"""
        for name in names:
            if name in self._checked and self.check_paths == "first":
                continue
            scope = self._scopes.get(name)
            if not reaches(losses[name], scope if scope is not None else self._param_ids):
                where = "any balanced parameter" if scope is None else "any parameter of its scope"
                raise ValueError(
                    f"loss term {name!r} has no path to {where}: it was built from tensors that "
                    "do not depend on them (detached, or only on inputs)"
                )
            if name not in self._graph_sizes:
                self._graph_sizes[name] = graph_size(losses[name])
        self._checked.update(names)

    # ------------------------------------------------------------------ the step
    def _due(self) -> bool:
        if self.frozen or self.strategy.fixed or self._step < self.warmup:
            return False
        return (self._step - self.warmup) % self.update_every == 0

    def _backward(self, losses: Losses, may_update: bool) -> Tensor | None:
        """Validate, update the weights when due, write ``.grad``. ``None``: step skipped."""
        if tuple(map(id, self._balanced_params())) != self._param_ids:
            self._engine = self._make_engine()
            self._scopes = self._resolve_scopes()
        check_losses(losses, self._engine.layout.device)
        names = self._resolve_terms(losses)
        self._check_reach(names, losses)
        terms = [t if t.dim() == 0 else t.reshape(()) for t in (losses[n] for n in names)]
        values = torch.stack(terms).detach().to(self._weights.dtype)
        distributed = self._reduce is not None
        averaged = "loss value (averaged over processes)" if distributed else "loss value"
        update = may_update and self._due()
        diagnose = may_update and self.diagnose_every > 0 and self._step % self.diagnose_every == 0
        needs_grads = (update and self.strategy.needs_gradients) or self._combines or diagnose
        # The values are checked before the graph is used when a strategy, the per-term gradients or
        # the scaler depend on them, after averaging when distributed; on a plain step they are
        # checked with the gradients of its one backward (one host sync per step).
        checked = needs_grads or update or (self.scaler is not None and not distributed)
        if checked and not distributed and not self._finite(names, values, "loss value"):
            return None
        scopes = [self._scopes.get(n) for n in names]
        stats = None
        if self.scaler is not None:
            scale = self.scaler.scale(values.new_ones(()))
            terms = [scale * t for t in terms]
        if needs_grads:
            self._diagnostics = None  # its gradients live in the buffer this call overwrites
            order = sorted(range(len(names)), key=lambda i: self._graph_sizes[names[i]])
            stats, values = self._engine.term_gradients(names, terms, scopes, values, order)
            if self.scaler is not None:
                stats = stats.unscaled(scale)
            if distributed and not self._finite(names, values, averaged):
                return None
            if not bool(torch.isfinite(stats.max_abs).all()):
                if self.scaler is not None:
                    update = False  # overflow: keep the weights; the scaler skips the step
                elif not self._finite(names, stats.max_abs.amax(1), "gradient entry (max |g|)"):
                    return None
        elif update and distributed:  # a loss-value strategy needs the averaged values first
            self._reduce(values)
            if not self._finite(names, values, averaged):
                return None
        new_terms = [n for n in names if n not in self._names]
        index = self._index(losses, names)
        weights = self._weights[index]
        plain = stats is None or not self._engine.reuses  # .grad comes from a weighted-sum backward
        rollback = None
        if update:
            if plain:  # the backward that follows the update may fail: be able to undo it
                rollback = (weights, self.strategy.state_dict(), self.generator.get_state())
            record = StepRecord(names, values, weights, self._step, self._updates, stats, self.generator)
            try:
                proposed = self.strategy.update(record)
            except BaseException:
                for name in new_terms:  # the first step of these terms did not happen
                    self.remove_term(name)
                raise
            weights = self._sanitize(proposed, weights, index)
            self._weights[index] = weights
            self._updates += 1
        if not plain:
            direction = None
            if self._combines:
                assert stats is not None and stats.gradients is not None
                weighted = weights.to(stats.gradients.dtype)[:, None] * stats.gradients
                direction = self.combiner(weighted, generator=self.generator)
            self._engine.write_combined(weights, direction)
        else:
            try:
                values, finite = self._engine.backward(
                    names, terms, weights, scopes, values, check_grads=self.scaler is None, check_values=not checked
                )
            except BaseException:
                self._undo_update(rollback, index)
                raise
            if not finite:
                self._undo_update(rollback, index)
                if self._finite(names, values, averaged):  # then it is the gradient
                    self._nonfinite(f"gradient of the weighted sum of the terms {list(names)}")
                return None
        if may_update:
            self._last = (names, values, weights, stats)
            kept = stats is not None and stats.gradients is not None
            if kept:
                self._diagnostics = (self._step, names, stats)  # figures computed when read
            if self._history.maxlen:
                figures = _figures(stats) if kept else None  # now: the buffer is reused next step
                self._history.append((self._step, names, weights, values, figures))  # fresh tensors
            self._step += 1
        return torch.dot(weights, values)

    def _undo_update(self, rollback: tuple[Tensor, dict[str, Any], Tensor] | None, index: Tensor) -> None:
        """Take back this step's weight update (its backward failed)."""
        if rollback is not None:
            self._weights[index], state, generator = rollback
            self.strategy.load_state_dict(state)
            self.generator.set_state(generator)
            self._updates -= 1

    def _sanitize(self, new: Tensor, old: Tensor, index: Tensor) -> Tensor:
        """Bound the strategy's weights; a non-finite or non-positive weight keeps its old value."""
        limits = torch.finfo(old.dtype)
        new = new.to(torch.float64)
        new = torch.where(torch.isfinite(new) & (new > 0), new, old).clamp(limits.tiny, limits.max).to(old.dtype)
        if not self._bounded:
            return new
        return torch.minimum(torch.maximum(new, self._lower[index]), self._upper[index])

    def _finite(self, names: tuple[str, ...], values: Tensor, what: str) -> bool:
        """Whether ``values`` are finite; if not: raise (naming the terms) or count a skipped step."""
        if self.nonfinite == "raise":
            check_finite(names, values, what)
            return True
        if bool(torch.isfinite(values).all()):
            return True
        self._skipped += 1
        return False

    def _nonfinite(self, what: str) -> None:
        """A non-finite value that no single term explains: raise, or count a skipped step."""
        if self.nonfinite == "raise":
            raise ValueError(f"non-finite {what}; nothing was changed. Pass nonfinite='skip' to skip such steps")
        self._skipped += 1

    def backward(self, losses: Losses) -> Tensor:
        """Everything :meth:`step` does except ``optimizer.step()``; returns the weighted total.

        Use it to clip or inspect gradients before calling ``optimizer.step()`` yourself. A step
        skipped for non-finite values (``nonfinite="skip"``) returns NaN and sets the balanced
        parameters' ``.grad`` to ``None``, so that your ``optimizer.step()`` leaves them alone
        instead of applying the previous step's gradient again.
        """
        total = self._backward(losses, True)
        if total is None:
            for p in self._engine.params:
                p.grad = None
            return self._nan()
        self._run_hooks()
        return total

    def step(self, losses: Losses | None = None, *, closure: Callable[[], Losses] | None = None) -> Tensor:
        """Balance, write ``.grad`` and step the optimizer; returns the weighted total (detached).

        Pass either the dict of loss terms or a ``closure`` that recomputes and returns it (for
        ``torch.optim.LBFGS``). With a closure, the weights are updated at most once per call,
        on its first evaluation, and held fixed while the optimizer re-evaluates it.
        """
        if (losses is None) == (closure is None):
            raise TypeError("step() takes either the dict of loss terms or closure=, exactly one of them")
        if losses is not None:
            total = self._backward(losses, True)
            if total is None:
                return self._nan()
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self._run_hooks()
            return total
        if self.scaler is not None:
            raise TypeError("a GradScaler cannot be used with a closure (torch.amp does not support it)")
        snapshot = self._snapshot()  # the optimizer moves the parameters before the closure's last word
        with torch.enable_grad():
            first = self._backward(self._call(closure), True)
        if first is None:
            return self._nan()
        pending, failed = [first], []

        def evaluate() -> Tensor:
            if pending:
                return pending.pop()
            with torch.enable_grad():
                total = self._backward(self._call(closure), False)
            if total is None:
                failed.append(True)
                return self._nan()
            return total

        try:
            self.optimizer.step(evaluate)
        except BaseException:
            self._restore(snapshot)
            raise
        if failed:  # a re-evaluation was non-finite under nonfinite="skip": undo the whole step
            self._restore(snapshot)
            self._skipped += 1
            return self._nan()
        self._run_hooks()
        return first

    def _snapshot(self) -> tuple[dict[str, Any], list[Tensor], list[Tensor | None]]:
        params = self._engine.params
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        return copy.deepcopy(self.state_dict()), [p.detach().clone() for p in params], grads

    def _restore(self, snapshot: tuple[dict[str, Any], list[Tensor], list[Tensor | None]]) -> None:
        state, values, grads = snapshot
        self.load_state_dict(state)
        with torch.no_grad():
            for p, value, grad in zip(self._engine.params, values, grads):
                p.copy_(value)
                p.grad = grad

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
        return self._weights.new_full((), float("nan"))

    # ------------------------------------------------------------------ pass-through and reporting
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def weights(self) -> dict[str, float]:
        """Current weight of every declared term."""
        return dict(zip(self._names, self._weights.tolist()))

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        """Per-term figures of the last step: loss, weight and, where computed, gradient statistics.

        The gradient figures (``grad_mean``, ``grad_max``, ``grad_norm``, over each term's scope)
        are present when that step computed per-term gradients.
        """
        if self._last is None:
            return {}
        names, values, weights, grads = self._last
        columns = {"loss": values, "weight": weights}
        if grads is not None:
            columns.update(grad_mean=grads.mean_abs(), grad_max=grads.max_abs_over(), grad_norm=grads.norm())
        table = {key: col.tolist() for key, col in columns.items()}
        return {name: {key: table[key][i] for key in table} for i, name in enumerate(names)}

    @property
    def diagnostics(self) -> dict[str, Any] | None:
        """Conflict diagnostics of the last step that computed the per-term gradients.

        ``{"step", "names", "grad_norm": {term: ||g||}, "cosine": K x K list, "conflict_fraction"}``:
        ``cosine[i][j]`` is the cosine similarity of terms i and j, ``conflict_fraction`` the share
        of pairs with a negative one. ``None`` before any such step (see ``diagnose_every``).
        """
        if self._diagnostics is None:
            return None
        step, names, stats = self._diagnostics
        return {"step": step, "names": list(names), **_diagnostic_figures(names, _figures(stats))}

    @property
    def history(self) -> list[dict[str, Any]]:
        """The last ``history`` steps: ``{"step", "weights": {...}, "losses": {...}}``, plus
        ``"grad_norm"``, ``"cosine"`` and ``"conflict_fraction"`` on steps with per-term gradients."""
        out = []
        for step, names, w, v, figures in self._history:
            entry = {"step": step, "weights": dict(zip(names, w.tolist())), "losses": dict(zip(names, v.tolist()))}
            if figures is not None:
                entry.update(_diagnostic_figures(names, figures))
            out.append(entry)
        return out

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
        before anything is built. Scopes and the probe name parameters by prefix of
        ``model.named_parameters()``.
        """
        return cls(optimizer, **parse_config(config, model=model))

    def config(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """The plain dict that :meth:`from_config` turns back into an equivalent balancer."""
        settings: dict[str, Any] = {
            "strategy": self.strategy.name, "strategy_options": self.strategy.options(),
            "update_every": self.update_every, "warmup": self.warmup, "frozen": self.frozen,
            "memory": self._memory, "grad_mode": self._grad_mode, "nonfinite": self.nonfinite,
            "check_paths": self.check_paths, "history": self._history.maxlen,
            "diagnose_every": self.diagnose_every, "seed": self.seed,
            "combine": self.combiner.name, "combine_options": self.combiner.options(),
        }
        if self._initial:
            settings["weights"] = dict(self._initial)
        for key, bound in zip(("min_weight", "max_weight"), self._bounds):
            if bound is not None:
                settings[key] = dict(bound) if isinstance(bound, Mapping) else bound
        if self._names:
            settings["terms"] = list(self._names)
        if self._optional:
            settings["optional"] = sorted(self._optional)
        return export_config(settings, self._scope_params, self._probe, model)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's and the balancer's state; loading it continues a run bit for bit."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "names": list(self._names),
            "optional": sorted(self._optional),
            "weights": self._weights.clone(),
            "lower": self._lower.clone(),
            "upper": self._upper.clone(),
            "step": self._step,
            "updates": self._updates,
            "skipped": self._skipped,
            "strategy_name": self.strategy.name,
            "strategy": self.strategy.state_dict(),
            "generator": self.generator.get_state(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; checked first, so a mismatch changes nothing."""
        missing = {"optimizer", "names", "weights", "step", "updates", "strategy", "generator"} - set(state)
        if missing:
            raise KeyError(f"not a LossBalancer state_dict: missing {sorted(missing)}")
        saved = state.get("strategy_name", self.strategy.name)
        if saved != self.strategy.name:
            raise ValueError(
                f"this state was saved by a balancer running strategy {saved!r}; this one runs "
                f"{self.strategy.name!r}: build the balancer with the same strategy before loading"
            )
        names = list(state["names"])
        if len(names) != state["weights"].numel():
            raise ValueError(f"corrupt state: {len(names)} term names but {state['weights'].numel()} weights")
        strategy_state = self.strategy.state_dict()  # a snapshot (protocol)
        self.strategy.load_state_dict(state["strategy"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except BaseException:
            self.strategy.load_state_dict(strategy_state)
            raise
        device, dtype = self._weights.device, self._weights.dtype
        self._names = names
        self._optional = set(state.get("optional", ()))
        self._weights = state["weights"].to(device=device, dtype=dtype).clone()
        n = len(self._names)
        self._lower = state.get("lower", torch.zeros(n)).to(device=device, dtype=dtype).clone()
        self._upper = state.get("upper", torch.full((n,), float("inf"))).to(device=device, dtype=dtype).clone()
        self._bounded = bool((self._lower > 0).any() | torch.isfinite(self._upper).any())
        self._step = int(state["step"])
        self._updates = int(state["updates"])
        self._skipped = int(state.get("skipped", 0))
        self.generator.set_state(state["generator"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._active = None
        self._checked = set()

    def __repr__(self) -> str:
        return (
            f"LossBalancer({type(self.optimizer).__name__}, {self.strategy!r}, update_every={self.update_every}, "
            f"combine={self.combiner!r}, memory={self._memory!r}, terms={self._names})"
        )


def _mean_over_processes(distributed: bool | None, group: Any) -> Callable[[Tensor], None] | None:
    """An in-place mean over the processes of ``group``, or ``None`` when not distributed."""
    dist = torch.distributed
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if distributed is None:
        distributed = active
    if not distributed:
        return None
    if not active:
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    size = dist.get_world_size(group)

    def reduce(tensor: Tensor) -> None:
        dist.all_reduce(tensor, group=group)
        tensor.div_(size)

    return reduce


def _figures(stats: GradStats) -> tuple[Tensor, Tensor, Tensor]:
    return stats.norm(), stats.cosine(), stats.conflict_fraction()


def _diagnostic_figures(names: tuple[str, ...], figures: tuple[Tensor, Tensor, Tensor]) -> dict[str, Any]:
    norms, cosine, fraction = figures
    return {"grad_norm": dict(zip(names, norms.tolist())), "cosine": cosine.tolist(), "conflict_fraction": fraction.item()}
