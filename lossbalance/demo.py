"""The training runner and the ``python -m lossbalance demo`` comparison.

:func:`train` trains one PINN of :mod:`lossbalance.problems` with one weighting strategy in
this process and returns a :class:`RunResult`; :func:`run_many` runs several
:class:`RunSpec` side by side, one process each (``spawn``, one thread per process);
:func:`run_demo` is the demo: 2-D Helmholtz (``a1 = 1, a2 = 4``) with fixed weights against
learning-rate annealing (and any other registered strategy), a table of the relative L2
errors, and figures when matplotlib is installed. The examples in ``examples/`` reuse these
functions.

Every run records conflict diagnostics (``LossBalancer(diagnose_every=...)``, every strategy,
fixed weights included): on each step that the history keeps, the per-term gradient norms, their
pairwise cosine similarities and the fraction of conflicting pairs enter ``RunResult.history``
(keys ``"grad_norm"``, ``"cosine"``, ``"conflict_fraction"``) and the ``conflicts.png`` figure.
The cost is the per-term gradients on those steps (one ``autograd.grad`` per term instead of one
backward of the weighted sum): every 15th step at the default budget, about 1 % of the run time.

Setup (Wang, Teng & Perdikaris 2021, the authors' ``Helmholtz2D_model_tf.py``): MLP
``[2, 50, 50, 50, 1]``, tanh, Xavier-normal; Adam, learning rate
``1e-3 * 0.9 ** (step / decay_every)`` (TensorFlow's ``exponential_decay(1e-3, step, 1000, 0.9)``,
not staircase); 128 fresh points per term and step; LRA with the PDE residual as the
reference, updated every 10 steps. The demo shortens the run to 6 000 steps at the authors'
decay (every 1 000 steps), which keeps the gap between fixed and balanced weights at about 3x
with errors small enough to mean something. Measured here (seed 0, one thread per run):

=========================  ==========  ====  ======  ==============
steps, decay 0.9 every      fixed       LRA   ratio   CPU per run
=========================  ==========  ====  ======  ==============
4 000, 100                  3.96        0.91  4.3x    ~22 s
6 000, 1 000 (default)      0.43        0.15  2.9x    ~36 s
8 000, 1 000                0.31        0.078 4.0x    ~45 s
40 000, 1 000 (authors')    0.175       0.026 6.7x    ~6 min
=========================  ==========  ====  ======  ==============

At 4 000 / 100 both networks stay far from the solution (LRA's 0.91 is a near-zero field);
compressing the decay further erases the gap (DESIGN.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import multiprocessing
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import torch

from .balancer import LossBalancer
from .problems import PROBLEMS, Problem, make_problem
from .strategies import Strategy, available_strategies, make_strategy

__all__ = [
    "STRATEGY_DEFAULTS", "RunSpec", "RunResult", "train", "run_spec", "run_many",
    "format_table", "run_demo", "add_demo_arguments", "main",
]

#: Per-strategy settings used when a strategy is given by name: constructor options and the
#: balancer's ``update_every``. Strategies not listed here get their defaults and update every step.
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    # Wang, Teng & Perdikaris (2021): the PDE residual is the reference; update every 10 steps.
    "lra": {"options": {"reference": "pde"}, "update_every": 10},
}

#: The demo's default budget (see the module docstring for why).
DEMO_STEPS = 6000
DEMO_DECAY_EVERY = 1000

ProgressFn = Callable[[int, int, float], None]


# ---------------------------------------------------------------------------------------- results
@dataclass
class RunResult:
    """What one training run produced.

    ``error``: relative L2 error on the problem's evaluation grid; ``weights`` and ``losses``:
    the final weight and (unweighted) value of every term; ``wall_time``: seconds spent in the
    training loop; ``history``: ``{"step", "weights", "losses", "lr"}`` every few steps, plus
    ``"grad_norm"``, ``"cosine"`` and ``"conflict_fraction"`` on diagnosed steps;
    ``points`` / ``abs_error``: the evaluation grid and ``|u - u*|`` on it (plain lists, for the
    error plots). ``model`` and ``balancer`` are set only for runs made in this process.
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

    def portable(self) -> "RunResult":
        """A copy without the live model and balancer (what crosses process boundaries)."""
        return dataclasses.replace(self, model=None, balancer=None)


@dataclass(frozen=True)
class RunSpec:
    """A picklable description of one run, for :func:`run_many` (see :func:`train` for the fields).

    ``strategy_options=None`` and ``update_every=None`` take :data:`STRATEGY_DEFAULTS`.
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

    @property
    def name(self) -> str:
        return self.label or self.strategy


def strategy_settings(name: str, options: Mapping[str, Any] | None = None,
                      update_every: int | None = None) -> tuple[Strategy, int]:
    """The strategy object and ``update_every`` for a registered name (defaults from
    :data:`STRATEGY_DEFAULTS`). Raises ``ValueError`` for an unknown name, listing the known ones."""
    defaults = STRATEGY_DEFAULTS.get(name, {})
    opts = dict(defaults.get("options", {}) if options is None else options)
    every = defaults.get("update_every", 1) if update_every is None else update_every
    return make_strategy(name, **opts), int(every)


# ---------------------------------------------------------------------------------------- training
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

    Returns the :class:`RunResult` with ``model`` and ``balancer`` set.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if lr_decay_every < 1:
        raise ValueError(f"lr_decay_every must be >= 1, got {lr_decay_every}")
    if isinstance(problem, str):
        problem = make_problem(problem, device=device)
    elif device is not None and torch.device(device) != problem.device:
        raise ValueError(f"the problem lives on {problem.device}, not on {device}; build it there")
    if isinstance(strategy, str):
        strategy_obj, every = strategy_settings(strategy, strategy_options, update_every)
    else:
        if strategy_options:
            raise TypeError("strategy_options go with a strategy name, not a strategy object")
        strategy_obj = strategy
        every = STRATEGY_DEFAULTS.get(strategy.name, {}).get("update_every", 1) if update_every is None else update_every
    history_every = max(1, steps // 400) if history_every is None else int(history_every)

    generator = torch.Generator().manual_seed(seed)
    model = problem.make_model(tuple(hidden), generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    extra = dict(balancer_options or {})
    if diagnose_every is None:
        keeps = extra.get("memory", "keep") == "keep" and extra.get("probe") is None
        diagnose_every = history_every if keeps else 0
    elif diagnose_every < 0:
        raise ValueError(f"diagnose_every must be >= 0, got {diagnose_every}")
    options = {"update_every": every, "seed": seed, "diagnose_every": int(diagnose_every), **extra}
    options["history"] = max(1, int(options.get("history", 1)))  # the runner reads the last step's record
    balancer = LossBalancer(optimizer, strategy_obj, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_decay ** (step / lr_decay_every))
    report_every = max(1, steps // 100)
    history: list[dict[str, Any]] = []

    start = time.perf_counter()
    for step in range(steps):
        batch = problem.sample(batch_size, generator)
        total = balancer.step(problem.losses(model, batch))
        last = step == steps - 1
        if step % history_every == 0 or last:
            record = balancer.history[-1]
            record["lr"] = optimizer.param_groups[0]["lr"]
            history.append(record)
        scheduler.step()
        if progress is not None and ((step + 1) % report_every == 0 or last):
            progress(step + 1, steps, float(total))
    if problem.device.type == "cuda":
        torch.cuda.synchronize(problem.device)
    wall_time = time.perf_counter() - start

    model.eval()
    points, exact = problem.evaluation_data(eval_n)
    with torch.no_grad():
        pred = model(points).reshape(-1).to(exact.dtype)
    error = float(torch.linalg.vector_norm(pred - exact) / torch.linalg.vector_norm(exact))
    final = history[-1] if history else {"weights": balancer.weights, "losses": {}}
    return RunResult(
        label=label or (strategy if isinstance(strategy, str) else strategy_obj.name or type(strategy_obj).__name__),
        strategy=repr(strategy_obj),
        problem=problem.name,
        steps=steps,
        seed=seed,
        error=error,
        weights=dict(balancer.weights),
        losses=dict(final["losses"]),
        wall_time=wall_time,
        history=history,
        points=points.detach().cpu().tolist(),
        abs_error=(pred - exact).abs().cpu().tolist(),
        model=model,
        balancer=balancer,
    )


def run_spec(spec: RunSpec, progress: ProgressFn | None = None) -> RunResult:
    """:func:`train` as a :class:`RunSpec` describes it."""
    problem = make_problem(spec.problem, device=spec.device, **dict(spec.problem_options))
    return train(
        problem, spec.strategy, steps=spec.steps, lr=spec.lr, lr_decay=spec.lr_decay,
        lr_decay_every=spec.lr_decay_every, batch_size=spec.batch_size, update_every=spec.update_every,
        strategy_options=spec.strategy_options, hidden=spec.hidden, seed=spec.seed,
        history_every=spec.history_every, diagnose_every=spec.diagnose_every, eval_n=spec.eval_n,
        label=spec.name, progress=progress,
    )


# ---------------------------------------------------------------------------------------- several runs
class _Progress:
    """Progress of several runs: one tqdm bar each if tqdm is installed, else periodic lines."""

    def __init__(self, specs: Sequence[RunSpec], mode: str, stream: TextIO):
        self.specs, self.stream = specs, stream
        self.started: dict[int, float] = {}
        self.printed: dict[int, int] = {}
        self.bars: dict[int, Any] = {}
        self.tqdm = None
        interactive = bool(getattr(stream, "isatty", lambda: False)())
        if mode == "tqdm" or (mode == "auto" and interactive):
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm
            except ImportError:
                if mode == "tqdm":
                    raise ImportError("progress bars need tqdm: pip install 'lossbalance[progress]'") from None
        self.enabled = mode != "none"
        self.width = max(len(s.name) for s in specs) if specs else 0

    def start(self, index: int) -> None:
        self.started[index] = time.perf_counter()
        if self.enabled and self.tqdm is not None:
            spec = self.specs[index]
            self.bars[index] = self.tqdm(total=spec.steps, desc=spec.name.ljust(self.width), position=index,
                                         leave=True, file=self.stream, dynamic_ncols=True)

    def update(self, index: int, step: int, steps: int, loss: float) -> None:
        if not self.enabled:
            return
        if index in self.bars:
            bar = self.bars[index]
            bar.update(step - bar.n)
            bar.set_postfix_str(f"loss {loss:.3e}", refresh=False)
            return
        tenth = (10 * step) // max(steps, 1)
        if tenth > self.printed.get(index, 0):
            self.printed[index] = tenth
            elapsed = time.perf_counter() - self.started.get(index, time.perf_counter())
            print(f"  [{self.specs[index].name:<{self.width}}] step {step:>{len(str(steps))}}/{steps}  "
                  f"loss {loss:.3e}  {elapsed:6.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _worker(index: int, spec: RunSpec, messages: Any) -> None:
    """Entry point of one run's process: one thread, progress and result through ``messages``."""
    torch.set_num_threads(1)
    try:
        result = run_spec(spec, lambda step, steps, loss: messages.put(("progress", index, (step, steps, loss))))
        messages.put(("done", index, result.portable()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        messages.put(("error", index, traceback.format_exc()))


def run_many(
    specs: Sequence[RunSpec],
    *,
    workers: int | None = None,
    progress: str = "auto",
    stream: TextIO | None = None,
) -> list[RunResult]:
    """Run every spec and return the results in the same order.

    ``workers``: processes side by side (``spawn``; default: one per run, at most the number of
    CPU cores); each process uses one thread, and a result crosses back without its model.
    ``workers=1`` runs the specs one after the other in this process, also on one thread
    (results keep ``model`` and ``balancer``). Unknown problem or strategy names raise
    ``ValueError`` before anything starts; a run that fails in its process raises
    ``RuntimeError`` with its traceback and stops the others.

    ``progress``: ``"auto"`` (tqdm bars if installed and ``stream`` is a terminal, else a line
    every 10 %), ``"tqdm"``, ``"print"`` or ``"none"``; written to ``stream`` (default stderr).
    """
    specs = list(specs)
    if progress not in ("auto", "tqdm", "print", "none"):
        raise ValueError(f"progress must be 'auto', 'tqdm', 'print' or 'none', got {progress!r}")
    if workers is None:
        workers = min(len(specs), os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for spec in specs:  # names and strategy options fail here, before any process starts
        if spec.problem not in PROBLEMS:
            raise ValueError(f"run {spec.name!r}: unknown problem {spec.problem!r}; choose from {sorted(PROBLEMS)}")
        strategy_settings(spec.strategy, spec.strategy_options, spec.update_every)
    stream = sys.stderr if stream is None else stream
    bars = _Progress(specs, progress, stream)
    results: list[RunResult | None] = [None] * len(specs)
    try:
        if workers == 1 or len(specs) <= 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small networks: more threads only add overhead and contention
            try:
                for index, spec in enumerate(specs):
                    bars.start(index)
                    results[index] = run_spec(spec, lambda s, n, loss, i=index: bars.update(i, s, n, loss))
            finally:
                torch.set_num_threads(threads)
        else:
            _run_processes(specs, workers, bars, results)
    finally:
        bars.close()
    return [r for r in results if r is not None]


def _run_processes(specs: list[RunSpec], workers: int, bars: _Progress,
                   results: list[RunResult | None]) -> None:
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    waiting = list(range(len(specs)))
    running: dict[int, Any] = {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                index = waiting.pop(0)
                process = context.Process(target=_worker, args=(index, specs[index], messages), daemon=True)
                process.start()
                running[index] = process
                bars.start(index)
            try:
                kind, index, payload = messages.get(timeout=0.5)
            except queue.Empty:
                for index, process in running.items():
                    if not process.is_alive() and process.exitcode != 0:
                        raise RuntimeError(f"run {specs[index].name!r} died (exit code {process.exitcode})")
                continue
            if kind == "progress":
                bars.update(index, *payload)
            elif kind == "done":
                results[index] = payload
                running.pop(index).join()
            else:
                raise RuntimeError(f"run {specs[index].name!r} failed:\n{payload}")
    finally:
        for process in running.values():
            process.terminate()
        for process in running.values():
            process.join()
        messages.close()


# ---------------------------------------------------------------------------------------- reporting
def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def format_table(results: Sequence[RunResult]) -> str:
    """``strategy | rel. L2 error | final weights | wall time`` as aligned text."""
    header = ("strategy", "rel. L2 error", "final weights", "wall time")
    rows = [
        (r.label, f"{r.error:.3e}", ", ".join(f"{k}={_number(v)}" for k, v in r.weights.items()),
         f"{r.wall_time:.1f} s")
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    line = lambda row: " | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows)])


def resolve_strategies(names: Sequence[str] | str, baseline: str | None = "static") -> list[str]:
    """The baseline first, then the named strategies (deduplicated); unknown names raise ``ValueError``."""
    if isinstance(names, str):
        names = names.split(",")
    out = [baseline] if baseline else []
    for name in (n.strip() for n in names):
        if name and name not in out:
            out.append(name)
    for name in out:
        strategy_settings(name)  # validates the name (and the default options)
    return out


def run_demo(
    strategies: Sequence[str] | str = ("lra",),
    *,
    steps: int = DEMO_STEPS,
    lr_decay_every: int = DEMO_DECAY_EVERY,
    seed: int = 0,
    device: str = "cpu",
    out: str | os.PathLike | None = "lossbalance-demo",
    plots: bool = True,
    workers: int | None = None,
    progress: str = "auto",
    eval_n: int | None = None,
    stdout: TextIO | None = None,
) -> list[RunResult]:
    """Train Helmholtz 2-D (a1 = 1, a2 = 4) with fixed weights and with each named strategy,
    print the comparison table and, when matplotlib is installed and ``plots``, write the figures
    to ``out``. Returns the results (fixed weights first)."""
    stdout = sys.stdout if stdout is None else stdout
    names = resolve_strategies(strategies)
    specs = [RunSpec(name, problem="helmholtz", problem_options={"a1": 1.0, "a2": 4.0}, steps=steps,
                     lr_decay_every=lr_decay_every, seed=seed, device=device, eval_n=eval_n)
             for name in names]
    procs = min(len(specs), os.cpu_count() or 1) if workers is None else workers
    print(f"Helmholtz 2-D (a1=1, a2=4): MLP [2, 50, 50, 50, 1] tanh; Adam 1e-3 x 0.9^(step/{lr_decay_every}); "
          f"batch 128 per term; {steps} steps; seed {seed}; {device}", file=stdout)
    print(f"runs: {', '.join(names)} ({procs} process{'es' if procs > 1 else ''} side by side, 1 thread each)"
          if procs > 1 else f"runs: {', '.join(names)} (one after the other in this process)", file=stdout, flush=True)
    start = time.perf_counter()
    results = run_many(specs, workers=workers, progress=progress)
    total = time.perf_counter() - start
    print(file=stdout)
    print(format_table(results), file=stdout)
    print(f"\ntotal wall time {total:.1f} s", file=stdout)
    if plots and out is not None:
        for path in write_figures(results, out, stdout=stdout):
            print(f"wrote {path}", file=stdout)
    stdout.flush()
    return results


def write_figures(results: Sequence[RunResult], out: str | os.PathLike, *,
                  axis_labels: tuple[str, str] = ("x", "y"), stdout: TextIO | None = None) -> list[Path]:
    """The weights, losses, error-field and (with diagnostics) conflicts PNGs in ``out``; nothing (with a
    note) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("no figures: matplotlib is not installed (pip install 'lossbalance[plots]')",
              file=sys.stdout if stdout is None else stdout)
        return []
    from . import plots

    return plots.save_figures(results, out, axis_labels=axis_labels)


# ---------------------------------------------------------------------------------------- command line
def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"Adam steps per run (default {DEMO_STEPS})")
    parser.add_argument("--strategies", default="lra",
                        help="comma-separated registered strategies to compare with fixed weights "
                             f"(default lra; known: {', '.join(available_strategies())})")
    parser.add_argument("--lr-decay-every", type=int, default=DEMO_DECAY_EVERY,
                        help=f"learning rate x0.9 every this many steps, continuous (default {DEMO_DECAY_EVERY})")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network and the points (default 0)")
    parser.add_argument("--out", default="lossbalance-demo", help="folder for the figures (default ./lossbalance-demo/)")
    parser.add_argument("--no-plots", action="store_true", help="write no figures")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes side by side (default: one per run up to the CPU count; "
                             "1: one after the other in this process)")
    parser.add_argument("--progress", choices=("auto", "tqdm", "print", "none"), default="auto",
                        help="progress display (default: tqdm bars if installed and on a terminal, else a line every 10%%)")
    parser.add_argument("--eval-n", type=int, default=None, help="evaluation grid n x n (default 100)")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m lossbalance demo") -> int:
    """``python -m lossbalance demo [--steps N] [--strategies lra,relobralo] ...``; returns 0."""
    parser = add_demo_arguments(argparse.ArgumentParser(
        prog=prog, description="Train 2-D Helmholtz with fixed weights and with adaptive strategies; compare."))
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.progress == "tqdm" and importlib.util.find_spec("tqdm") is None:
        parser.error("--progress tqdm needs tqdm: pip install 'lossbalance[progress]'")
    try:
        resolve_strategies(args.strategies)
    except (ValueError, TypeError) as exc:
        parser.error(f"--strategies: {exc}")
    run_demo(args.strategies, steps=args.steps, lr_decay_every=args.lr_decay_every, seed=args.seed,
             device=args.device, out=args.out, plots=not args.no_plots, workers=args.workers,
             progress=args.progress, eval_n=args.eval_n)
    return 0
