"""One training run: :class:`RunSpec` (what to run), :func:`train` / :func:`run_spec` (run it in
this process) and :class:`RunResult` (what it produced)."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..balancer import LossBalancer
from ..problems import Problem, make_problem
from ..strategies import Strategy, make_strategy

__all__ = [
    "FIRST_TERM", "STRATEGY_DEFAULTS", "DEMO_STEPS", "DEMO_DECAY_EVERY", "ProgressFn", "RunResult", "RunSpec",
    "strategy_settings", "train", "run_spec", "failed_result",
]

#: In :data:`STRATEGY_DEFAULTS`, stands for the problem's first term (the PDE residual by the
#: :class:`~lossbalance.problems.Problem` convention: ``"pde"``, or Kovasznay's ``"momentum_x"``).
FIRST_TERM = "<the problem's first term>"

#: Per-strategy settings used when a strategy is given by name: constructor options and the
#: balancer's ``update_every``. Strategies not listed here get their defaults and update every step.
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    # Wang, Teng & Perdikaris (2021): the PDE residual is the reference; update every 10 steps.
    "lra": {"options": {"reference": FIRST_TERM}, "update_every": 10},
}

#: The demo's default budget (see :mod:`lossbalance.demo` for why).
DEMO_STEPS = 6000
DEMO_DECAY_EVERY = 1000

ProgressFn = Callable[[int, int, float], None]


@dataclass
class RunResult:
    """What one training run produced.

    ``error``: relative L2 error on the problem's evaluation grid; ``weights`` and ``losses``:
    the final weight and (unweighted) value of every term; ``wall_time``: seconds spent in the
    training loop; ``history``: ``{"step", "weights", "losses", "lr"}`` every few steps, plus
    ``"grad_norm"``, ``"cosine"`` and ``"conflict_fraction"`` on diagnosed steps;
    ``points`` / ``abs_error``: the evaluation grid and ``|u - u*|`` on it (plain lists, for the
    error plots). ``model`` and ``balancer`` are set only for runs made in this process.

    ``metric``: what ``error`` is (``"rel_l2"`` or ``"mse"``, the problem's ``error_metric``);
    ``error_history``: ``[step, error]`` pairs every ``error_every`` steps (empty by default; the time
    they take is not in ``wall_time``). ``failure``: the traceback of a run that raised (then ``error``
    is NaN); ``run_time``: seconds the whole run took in its process (building the problem and the
    model, training, evaluation); ``pid``, ``started``, ``finished``: the process and the epoch times
    of the run (:func:`run_spec`).
    """

    label: str
    strategy: str
    problem: str
    steps: int
    seed: int
    error: float
    weights: dict[str, float]
    losses: dict[str, float]
    wall_time: float
    history: list[dict[str, Any]] = field(default_factory=list)
    points: list[list[float]] | None = field(default=None, repr=False)
    abs_error: list[float] | None = field(default=None, repr=False)
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    balancer: LossBalancer | None = field(default=None, repr=False, compare=False)
    metric: str = "rel_l2"
    error_history: list[list[float]] = field(default_factory=list, repr=False)
    failure: str | None = field(default=None, repr=False)
    run_time: float = 0.0
    pid: int | None = field(default=None, repr=False, compare=False)
    started: float | None = field(default=None, repr=False, compare=False)
    finished: float | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Whether the run finished (no ``failure``)."""
        return self.failure is None

    def portable(self) -> "RunResult":
        """A copy without the live model and balancer (what crosses process boundaries)."""
        return dataclasses.replace(self, model=None, balancer=None)


@dataclass(frozen=True)
class RunSpec:
    """A picklable description of one run, for :func:`run_many` (see :func:`train` for the fields).

    ``strategy_options=None`` and ``update_every=None`` take :data:`STRATEGY_DEFAULTS`.
    ``problem`` is a registered name or ``"package.module:Name"`` / ``"file.py:Name"``;
    ``balancer_options`` go to :class:`LossBalancer` (e.g. ``weights`` for fixed weights).
    """

    strategy: str
    problem: str = "helmholtz"
    problem_options: Mapping[str, Any] = field(default_factory=dict)
    strategy_options: Mapping[str, Any] | None = None
    update_every: int | None = None
    steps: int = DEMO_STEPS
    lr: float = 1e-3
    lr_decay: float = 0.9
    lr_decay_every: int = DEMO_DECAY_EVERY
    batch_size: int = 128
    hidden: tuple[int, ...] = (50, 50, 50)
    seed: int = 0
    device: str = "cpu"
    history_every: int | None = None
    diagnose_every: int | None = None
    eval_n: int | None = None
    label: str | None = None
    balancer_options: Mapping[str, Any] = field(default_factory=dict)
    error_every: int | None = None

    @property
    def name(self) -> str:
        return self.label or self.strategy


def strategy_settings(name: str, options: Mapping[str, Any] | None = None,
                      update_every: int | None = None, terms: Sequence[str] | None = None) -> tuple[Strategy, int]:
    """The strategy object and ``update_every`` for a registered name (defaults from
    :data:`STRATEGY_DEFAULTS`; :data:`FIRST_TERM` becomes ``terms[0]``, or ``None`` without ``terms``).
    Raises ``ValueError`` for an unknown name, listing the known ones."""
    defaults = STRATEGY_DEFAULTS.get(name, {})
    opts = dict(defaults.get("options", {}) if options is None else options)
    opts.update({key: (terms[0] if terms else None) for key, value in opts.items() if value == FIRST_TERM})
    every = defaults.get("update_every", 1) if update_every is None else update_every
    return make_strategy(name, **opts), int(every)


def train(
    problem: Problem | str,
    strategy: str | Strategy = "lra",
    *,
    steps: int = DEMO_STEPS,
    lr: float = 1e-3,
    lr_decay: float = 0.9,
    lr_decay_every: int = DEMO_DECAY_EVERY,
    batch_size: int = 128,
    update_every: int | None = None,
    strategy_options: Mapping[str, Any] | None = None,
    hidden: Sequence[int] = (50, 50, 50),
    seed: int = 0,
    device: str | torch.device | None = None,
    history_every: int | None = None,
    diagnose_every: int | None = None,
    eval_n: int | None = None,
    label: str | None = None,
    progress: ProgressFn | None = None,
    balancer_options: Mapping[str, Any] | None = None,
    error_every: int | None = None,
) -> RunResult:
    """Train a fresh ``problem.make_model(hidden)`` with Adam and a :class:`LossBalancer`.

    Args:
        problem: a :class:`~lossbalance.problems.Problem` or a name for ``make_problem``.
        strategy: a registered name (options and ``update_every`` from :data:`STRATEGY_DEFAULTS`
            unless given) or a strategy object.
        steps: Adam steps; every step draws ``batch_size`` fresh points per point set.
        lr, lr_decay, lr_decay_every: ``lr * lr_decay ** (step / lr_decay_every)``, continuous
            (TensorFlow's ``exponential_decay`` with ``staircase=False``, as the authors).
        seed: seeds the model's initialisation and the points (one generator, so runs with the
            same seed start from the same network and see the same points) and the balancer.
        device: where to train (a problem given by name is built there; default: the problem's).
        history_every: record ``balancer.history`` every n steps (default: about 400 records).
        diagnose_every: compute the conflict diagnostics (per-term gradient norms, cosine
            similarities, conflicting fraction) every n steps, whatever the strategy (the
            balancer's ``diagnose_every``); default ``history_every``, so that every recorded
            step carries them; 0: only on steps whose strategy computes per-term gradients anyway.
            Costs the per-term gradients on those steps. Off by default with ``memory="lean"``
            or a ``probe`` in ``balancer_options`` (the diagnostics need the kept gradients).
        eval_n: resolution of the evaluation grid (default: the problem's).
        progress: ``progress(step, steps, total_loss)``, called about 100 times.
        balancer_options: more keyword arguments for :class:`LossBalancer` (e.g. ``min_weight``,
            ``update_every``, which overrides the strategy's default).
        error_every: also evaluate the error every n steps (and after the last) into
            ``error_history``; that time is left out of ``wall_time``. Default: never.

    Returns the :class:`RunResult` with ``model`` and ``balancer`` set.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if lr_decay_every < 1:
        raise ValueError(f"lr_decay_every must be >= 1, got {lr_decay_every}")
    if error_every is not None and error_every < 1:
        raise ValueError(f"error_every must be >= 1, got {error_every}")
    problem = _problem_on(problem, device)
    strategy_obj, every = _strategy_and_schedule(strategy, strategy_options, update_every, problem.term_names)
    history_every = max(1, steps // 400) if history_every is None else int(history_every)

    generator = torch.Generator().manual_seed(seed)
    model = problem.make_model(tuple(hidden), generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    options = _balancer_options(every, seed, history_every, diagnose_every, balancer_options)
    balancer = LossBalancer(optimizer, strategy_obj, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_decay ** (step / lr_decay_every))
    error_history: list[list[float]] = []
    monitor = None
    if error_every is not None:
        def monitor(step: int) -> None:
            error_history.append([step, _error(problem, model, eval_n)])
            model.train()
    history, wall_time = _fit(problem, model, balancer, scheduler, generator, steps=steps,
                              batch_size=batch_size, history_every=history_every, progress=progress,
                              monitor=monitor, monitor_every=error_every or 0)
    error, points, abs_error = _evaluate(problem, model, eval_n)
    return RunResult(
        label=label or _default_label(strategy, strategy_obj),
        strategy=repr(strategy_obj),
        problem=problem.name,
        steps=steps,
        seed=seed,
        error=error,
        weights=dict(balancer.weights),
        losses=dict(history[-1]["losses"]) if history else {},
        wall_time=wall_time,
        history=history,
        points=points,
        abs_error=abs_error,
        model=model,
        balancer=balancer,
        metric=_metric(problem),
        error_history=error_history,
    )


def _problem_on(problem: Problem | str, device: str | torch.device | None) -> Problem:
    """The problem (built on ``device`` when given by name); a built one must live on ``device``."""
    if isinstance(problem, str):
        return make_problem(problem, device=device)
    if device is not None and torch.device(device) != problem.device:
        raise ValueError(f"the problem lives on {problem.device}, not on {device}; build it there")
    return problem


def _strategy_and_schedule(strategy: str | Strategy, options: Mapping[str, Any] | None,
                           update_every: int | None, terms: Sequence[str]) -> tuple[Strategy, int]:
    """The strategy object and its ``update_every`` (defaults from :data:`STRATEGY_DEFAULTS`)."""
    if isinstance(strategy, str):
        return strategy_settings(strategy, options, update_every, terms)
    if options:
        raise TypeError("strategy_options go with a strategy name, not a strategy object")
    if update_every is None:
        update_every = STRATEGY_DEFAULTS.get(strategy.name, {}).get("update_every", 1)
    return strategy, update_every


def _balancer_options(update_every: int, seed: int, history_every: int, diagnose_every: int | None,
                      extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :class:`LossBalancer` keyword arguments of a run; ``extra`` overrides the others.

    ``diagnose_every=None``: every recorded step, unless ``memory="lean"`` or a ``probe`` leaves
    no kept gradients to diagnose (then 0).
    """
    extra = dict(extra or {})
    if diagnose_every is None:
        keeps = extra.get("memory", "keep") == "keep" and extra.get("probe") is None
        diagnose_every = history_every if keeps else 0
    elif diagnose_every < 0:
        raise ValueError(f"diagnose_every must be >= 0, got {diagnose_every}")
    options = {"update_every": update_every, "seed": seed, "diagnose_every": int(diagnose_every), **extra}
    options["history"] = max(1, int(options.get("history", 1)))  # the runner reads the last step's record
    return options


def _fit(problem: Problem, model: torch.nn.Module, balancer: LossBalancer, scheduler: Any,
         generator: torch.Generator, *, steps: int, batch_size: int, history_every: int,
         progress: ProgressFn | None, monitor: Callable[[int], None] | None = None,
         monitor_every: int = 0) -> tuple[list[dict[str, Any]], float]:
    """The training loop: the history records (every ``history_every`` steps and the last, with
    the learning rate) and the seconds it took, less the time of ``monitor(step)`` (called before
    every ``monitor_every``-th step and after the last, as ``monitor(steps)``)."""
    report_every = max(1, steps // 100)
    history: list[dict[str, Any]] = []
    aside = 0.0
    start = time.perf_counter()
    for step in range(steps):
        if monitor is not None and step % monitor_every == 0:
            tick = time.perf_counter()
            monitor(step)
            aside += time.perf_counter() - tick
        batch = problem.sample(batch_size, generator)
        total = balancer.step(problem.losses(model, batch))
        last = step == steps - 1
        if step % history_every == 0 or last:
            record = balancer.history[-1]
            record["lr"] = scheduler.optimizer.param_groups[0]["lr"]
            history.append(record)
        scheduler.step()
        if progress is not None and ((step + 1) % report_every == 0 or last):
            progress(step + 1, steps, float(total))
    if problem.device.type == "cuda":
        torch.cuda.synchronize(problem.device)
    elapsed = time.perf_counter() - start - aside
    if monitor is not None:
        monitor(steps)
    return history, elapsed


def _metric(problem: Problem) -> str:
    metric = getattr(problem, "error_metric", "rel_l2")
    if metric not in ("rel_l2", "mse"):
        raise ValueError(f"{type(problem).__name__}.error_metric must be 'rel_l2' or 'mse', got {metric!r}")
    return metric


def _score(problem: Problem, pred: torch.Tensor, exact: torch.Tensor) -> float:
    """The problem's error metric of ``pred`` against ``exact`` (1-D tensors)."""
    if _metric(problem) == "mse":
        return float((pred - exact).square().mean())
    return float(torch.linalg.vector_norm(pred - exact) / torch.linalg.vector_norm(exact))


def _error(problem: Problem, model: torch.nn.Module, eval_n: int | None) -> float:
    """The error on the evaluation grid (the model is left in eval mode)."""
    model.eval()
    points, exact = problem.evaluation_data(eval_n)
    with torch.no_grad():
        pred = model(points).reshape(-1).to(exact.dtype)
    return _score(problem, pred, exact)


def _evaluate(problem: Problem, model: torch.nn.Module, eval_n: int | None) -> tuple[float, list[list[float]], list[float]]:
    """The error on the evaluation grid, the grid and ``|u - u*|`` on it (plain lists; the Euclidean norm
    over the outputs at each point for a model with several)."""
    model.eval()
    points, exact = problem.evaluation_data(eval_n)
    with torch.no_grad():
        pred = model(points).reshape(-1).to(exact.dtype)
    error = _score(problem, pred, exact)
    per_point = (pred - exact).reshape(points.shape[0], -1).norm(dim=1)  # |u - u*|, a norm over several outputs
    return error, points.detach().cpu().tolist(), per_point.cpu().tolist()


def _default_label(strategy: str | Strategy, strategy_obj: Strategy) -> str:
    """The strategy's name as given, else the object's ``name`` or class name."""
    return strategy if isinstance(strategy, str) else strategy_obj.name or type(strategy_obj).__name__


def run_spec(spec: RunSpec, progress: ProgressFn | None = None) -> RunResult:
    """:func:`train` as a :class:`RunSpec` describes it (with ``run_time``, ``pid``, ``started``,
    ``finished`` set)."""
    started, tick = time.time(), time.perf_counter()
    problem = make_problem(spec.problem, device=spec.device, **dict(spec.problem_options))
    result = train(
        problem, spec.strategy, steps=spec.steps, lr=spec.lr, lr_decay=spec.lr_decay,
        lr_decay_every=spec.lr_decay_every, batch_size=spec.batch_size, update_every=spec.update_every,
        strategy_options=spec.strategy_options, hidden=spec.hidden, seed=spec.seed,
        history_every=spec.history_every, diagnose_every=spec.diagnose_every, eval_n=spec.eval_n,
        label=spec.name, progress=progress, balancer_options=dict(spec.balancer_options) or None,
        error_every=spec.error_every,
    )
    result.run_time = time.perf_counter() - tick
    result.pid, result.started, result.finished = os.getpid(), started, time.time()
    return result


def failed_result(spec: RunSpec, failure: str, run_time: float = 0.0) -> RunResult:
    """The :class:`RunResult` of a run that raised: NaN error, ``failure`` the traceback."""
    return RunResult(label=spec.name, strategy=spec.strategy, problem=spec.problem, steps=spec.steps,
                     seed=spec.seed, error=float("nan"), weights={}, losses={}, wall_time=float("nan"),
                     failure=failure, run_time=run_time, pid=os.getpid())
