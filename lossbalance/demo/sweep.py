"""Which weighting for my PDE? :func:`compare_strategies` trains every (strategy, seed) pair of one
problem at one budget and tabulates the errors (``python -m lossbalance compare``).

Every run is a :class:`~lossbalance.demo.RunSpec` and runs through :func:`~lossbalance.demo.run_many`
(long-lived worker processes, one thread each) or, with ``engine="submitit"``, as one submitit job
each (SLURM, or submitit's local executor). With ``out``, each finished run is saved at once as
``out/runs/<key>.json``, ``key`` a hash of the run's whole :class:`RunSpec` (and of the source file of
a problem of your own): a rerun loads what is done and runs the rest, so a killed sweep resumes.
``out/sweep.json`` records the configuration the runs share (problem, budget, optimizer, network,
...); a folder holding runs of another configuration is refused before any run starts (strategies
and seeds may be added: those runs are new, the others are reused).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

from ..problems import PROBLEMS, make_problem, resolve_problem
from .parallel import run_many
from .published import published_for
from .runner import DEMO_DECAY_EVERY, RunResult, RunSpec, failed_result, run_spec, strategy_settings

__all__ = ["BEST_STATIC", "SweepError", "SweepConfigError", "SweepTable", "compare_strategies", "best_static_grid"]

#: the pseudo-strategy name of the tuned fixed-weight baseline
BEST_STATIC = "best_static"
CACHE_FORMAT = 1
#: the configuration every run of one output folder shares (the rest: strategy, seed, weights)
SHARED_FIELDS = ("problem", "problem_options", "steps", "lr", "lr_decay", "lr_decay_every", "batch_size",
                 "hidden", "device", "eval_n", "history_every", "diagnose_every", "error_every")


class SweepError(ValueError):
    """A sweep that cannot start (bad problem, strategy, budget or options)."""


class SweepConfigError(SweepError):
    """The output folder holds the runs of another configuration."""


# ----------------------------------------------------------------------------------- the table
@dataclass
class SweepTable:
    """The result of :func:`compare_strategies`.

    ``rows``: one dict per strategy (``"strategy"``, ``"runs"``, ``"failed"``, ``"error_mean"``,
    ``"error_std"`` (sample std over seeds; ``None`` with one), ``"errors"``, ``"weights"`` (final weights, mean over
    seeds), ``"wall_time"`` (mean seconds of a run's training loop), ``"time_per_step"``,
    ``"time_ratio"`` (time per step over static's), ``"failures"``, and for ``best_static`` the
    ``"grid"`` of every weight setting tried). ``results``: every run's :class:`RunResult`;
    ``ran`` / ``cached``: how many runs this call trained / loaded from ``out``; ``timing``: the
    sweep's wall time (``"wall"``, from the first run dispatched to the last result saved) against
    its runs' own times (``"runs"``: their sum; ``"busiest_process"``: the most any one process ran);
    ``"overhead"`` = wall / busiest process - 1 (process start-up, messages, caching: what the sweep
    adds) and ``"utilisation"`` = runs / (wall x processes) (also counts idle cores at the end of an
    uneven split); ``config``: the
    shared configuration; ``published``: published results for the setup; ``files``: what was written.
    """

    problem: str
    metric: str
    rows: list[dict[str, Any]]
    results: list[RunResult] = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    ran: int = 0
    cached: int = 0
    timing: dict[str, Any] = field(default_factory=dict)
    published: list[dict[str, Any]] = field(default_factory=list, repr=False)
    files: list[Path] = field(default_factory=list, repr=False)

    @property
    def metric_label(self) -> str:
        return "MSE" if self.metric == "mse" else "rel. L2"

    def row(self, strategy: str) -> dict[str, Any]:
        """The row of ``strategy``; ``KeyError`` if there is none."""
        for row in self.rows:
            if row["strategy"] == strategy:
                return row
        raise KeyError(strategy)

    def __str__(self) -> str:
        header = ("strategy", f"{self.metric_label} (mean ± std)", "seeds", "final weights", "wall time",
                  "time/step vs static")
        return "\n".join([*_aligned([header, *map(_cells, self.rows)]), *map(_published_line, self.published)])

    def to_csv(self, path: str | os.PathLike) -> Path:
        """The rows as CSV (weights as ``term=value;...``, errors as ``;``-separated)."""
        path = Path(path)
        columns = ["strategy", "runs", "failed", "error_mean", "error_std", "errors", "weights", "wall_time",
                   "time_per_step", "time_ratio", "failures"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["metric", *columns], lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            cells = {key: row.get(key) for key in columns}
            cells["errors"] = ";".join(repr(e) for e in row["errors"])
            cells["weights"] = ";".join(f"{k}={v!r}" for k, v in row["weights"].items())
            cells["failures"] = ";".join(row["failures"])
            writer.writerow({"metric": self.metric, **cells})
        _atomic_write(path, buffer.getvalue())
        return path

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types: config, rows, timing, published entries and every run
        (error and weight histories, no model)."""
        runs = [{"label": r.label, "strategy": r.strategy, "seed": r.seed, "error": r.error, "weights": r.weights,
                 "wall_time": r.wall_time, "run_time": r.run_time, "failure": r.failure,
                 "error_history": r.error_history,
                 "weight_history": [[h["step"], h["weights"]] for h in r.history]}
                for r in self.results]
        return _plain({"problem": self.problem, "metric": self.metric, "config": self.config, "rows": self.rows,
                       "timing": self.timing, "published": self.published, "ran": self.ran, "cached": self.cached,
                       "runs": runs})

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        _atomic_write(path, json.dumps(self.to_dict(), indent=1, allow_nan=True))
        return path


def _cells(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The printed cells of one row: strategy, error, seeds, weights, wall time, time ratio."""
    weights = ", ".join(f"{k}={_number(v)}" for k, v in row["weights"].items())
    ratio = "" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}x"
    wall = "" if row["wall_time"] is None else f"{row['wall_time']:.1f} s"
    return row["strategy"], _error_cell(row), str(row["runs"] - row["failed"]), weights, wall, ratio


def _error_cell(row: Mapping[str, Any]) -> str:
    """``mean ± std``, with the failed runs' count and first failure; ``FAILED: ...`` if all failed."""
    if row["runs"] == row["failed"]:
        return "FAILED: " + row["failures"][0]
    spread = "(one seed)" if row["error_std"] is None else f"± {row['error_std']:.1e}"
    error = f"{row['error_mean']:.3e} {spread}"
    if row["failed"]:
        error += f" ({row['failed']} failed: {row['failures'][0]})"
    return error


def _aligned(lines: Sequence[Sequence[str]]) -> list[str]:
    """The header line (``lines[0]``), a rule and the other lines, in ``|``-separated padded columns."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [fmt(lines[0]), "-+-".join("-" * w for w in widths), *map(fmt, lines[1:])]


def _published_line(entry: Mapping[str, Any]) -> str:
    """``published: value (method; source, figure)``."""
    value = "not confirmed" if entry.get("value") is None else f"{entry['value']:.1e}"
    return f"published: {value} ({entry['method']}; {entry['source']}, {entry['figure']})"


# -------------------------------------------------------------------------------- the sweep
def compare_strategies(
    problem: str = "burgers",
    strategies: Sequence[str] | str = ("static", "lra", "relobralo"),
    seeds: int | Sequence[int] = 3,
    steps: int = 5000,
    *,
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    engine: str = "processes",
    executor: Any = None,
    best_static: bool = False,
    best_static_values: Sequence[float] = (1.0, 10.0, 100.0),
    best_static_max: int = 27,
    problem_options: Mapping[str, Any] | None = None,
    lr: float = 1e-3,
    lr_decay: float = 0.9,
    lr_decay_every: int = DEMO_DECAY_EVERY,
    batch_size: int = 128,
    hidden: Sequence[int] = (50, 50, 50),
    eval_n: int | None = None,
    error_points: int = 20,
    device: str = "cpu",
    progress: str = "auto",
    plots: bool = True,
    stdout: TextIO | None = None,
) -> SweepTable:
    """Train ``problem`` with every strategy for every seed at the same budget and compare.

    Args:
        problem: a registered name (``lossbalance.problems.PROBLEMS``) or ``"package.module:Name"`` /
            ``"path/to/file.py:Name"``: a :class:`~lossbalance.problems.Problem` subclass or a
            function returning one (``problem_options`` are its keyword arguments).
        strategies: registered strategy names (comma-separated or a list); ``static`` (fixed unit
            weights) is always run, first, as the reference of the time ratio; ``"best_static"``
            is the same as ``best_static=True``.
        seeds: a count (seeds ``0 .. n-1``) or the seeds themselves.
        steps: Adam steps per run (the budget), at least 1.
        out: folder for the run cache (``runs/``), ``sweep.json``, ``results.csv``,
            ``results.json`` and the figures; ``None``: nothing written, nothing cached.
        workers: processes side by side (default: one per run up to the CPU count; 1: in this
            process). Each process uses one thread.
        engine: ``"processes"`` (this machine) or ``"submitit"`` (one submitit job per run:
            ``executor``, or a ``submitit.AutoExecutor`` in ``out/submitit``).
        best_static: also run the fixed-weight grid: each non-reference term's weight over
            ``best_static_values`` (all combinations, or the same value for all terms when there
            would be more than ``best_static_max``), and report the best setting (lowest mean error)
            as ``best_static``. It is tuned on the evaluation error: an optimistic baseline.
        error_points: evaluate the error about this many times per run (the error-vs-step figure).
        progress: ``"auto"``, ``"tqdm"``, ``"print"`` or ``"none"`` (see :func:`run_many`).
        plots: write ``error_vs_step.png`` and ``weights_vs_step.png`` to ``out`` (needs matplotlib).

    Bad input (unknown problem or strategy, with the closest known name; a module that fails to
    import; a budget or seed count below 1; an ``out`` of another configuration) raises
    :class:`SweepError` (a ``ValueError``) before any run starts. A run that raises does not stop
    the others: its row shows the error. Returns a :class:`SweepTable`, also printed to ``stdout``.
    """
    stdout = sys.stdout if stdout is None else stdout
    names, best_static = _strategies(strategies, best_static)
    seed_list = _seeds(seeds)
    _check_options(steps, engine, workers, error_points)
    built = _build_problem(problem, problem_options, device)
    base = _shared_settings(problem, problem_options, int(steps), lr=lr, lr_decay=lr_decay,
                            lr_decay_every=lr_decay_every, batch_size=batch_size, hidden=hidden, device=device,
                            eval_n=eval_n, error_points=error_points)
    grid = best_static_grid(built.term_names, best_static_values, best_static_max) if best_static else []
    plan = _Plan(names, grid, seed_list, base)
    _check_engine(engine, executor)
    config = _config(base, problem)
    cache = _Cache(Path(out), config) if out is not None else None   # raises on another configuration

    results = _cached_results(cache, plan.specs)
    pending = [i for i, r in enumerate(results) if r is None]
    print(plan.summary(built.name or problem, len(pending)), file=stdout, flush=True)
    timing = _run_pending(plan.specs, results, pending, cache, engine=engine, executor=executor, out=out,
                          workers=workers, progress=progress, stdout=stdout) if pending else {}
    table = _table(problem, built, plan, results, config=config, timing=timing, ran=len(pending))
    _print_table(table, stdout)
    if out is not None:
        _write_files(table, Path(out), plots, stdout)
    stdout.flush()
    return table


@dataclass
class _Plan:
    """The runs of one sweep: every strategy, then every fixed-weight setting, for every seed."""

    names: list[str]
    grid: list[dict[str, float]]
    seeds: list[int]
    base: dict[str, Any]
    specs: list[RunSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.specs = [RunSpec(name, seed=seed, label=name, **self.base) for name in self.names for seed in self.seeds]
        self.specs += [RunSpec("static", seed=seed, label=_grid_label(weights), balancer_options={"weights": weights},
                               **self.base) for weights in self.grid for seed in self.seeds
                       if not _is_static(weights, self.names)]

    @property
    def steps(self) -> int:
        """Adam steps per run."""
        return self.base["steps"]

    def summary(self, title: str, pending: int) -> str:
        """``title: N runs (...), S steps each; C cached, P to run``."""
        settings = f" + {len(self.grid)} fixed-weight settings" if self.grid else ""
        return (f"{title}: {len(self.specs)} runs ({len(self.names)} strategies{settings} x {len(self.seeds)} seeds), "
                f"{self.steps} steps each; {len(self.specs) - pending} cached, {pending} to run")


def _shared_settings(problem: str, problem_options: Mapping[str, Any] | None, steps: int, *, lr: float,
                     lr_decay: float, lr_decay_every: int, batch_size: int, hidden: Sequence[int], device: str,
                     eval_n: int | None, error_points: int) -> dict[str, Any]:
    """The :class:`RunSpec` fields every run of the sweep shares (:data:`SHARED_FIELDS`)."""
    return dict(problem=problem, problem_options=dict(problem_options or {}), steps=steps, lr=float(lr),
                lr_decay=float(lr_decay), lr_decay_every=int(lr_decay_every), batch_size=int(batch_size),
                hidden=tuple(int(h) for h in hidden), device=device, eval_n=eval_n,
                history_every=max(1, steps // 200), diagnose_every=0, error_every=max(1, steps // int(error_points)))


def _config(base: Mapping[str, Any], problem: str) -> dict[str, Any]:
    """The configuration recorded in ``sweep.json``: the shared settings and the problem's source hash."""
    config = {key: _plain(value) for key, value in base.items()}
    config["problem_source"] = _source_digest(problem)
    return config


def _cached_results(cache: _Cache | None, specs: Sequence[RunSpec]) -> list[RunResult | None]:
    """The cached result of every spec; ``None``: still to run (or no cache)."""
    return [cache.load(spec) if cache else None for spec in specs]


def _run_pending(specs: Sequence[RunSpec], results: list[RunResult | None], pending: Sequence[int],
                 cache: _Cache | None, *, engine: str, executor: Any, out: str | os.PathLike | None,
                 workers: int | None, progress: str, stdout: TextIO) -> dict[str, Any]:
    """Run ``specs[i]`` for every ``i`` in ``pending`` into ``results[i]``, caching each success as it
    comes; returns the timing of :attr:`SweepTable.timing`."""
    todo = [specs[i] for i in pending]

    def finished(j: int, result: RunResult) -> None:
        results[pending[j]] = result
        if cache is not None and result.ok:
            cache.save(todo[j], result)

    tick = time.perf_counter()
    if engine == "submitit":
        _run_submitit(todo, executor, Path(out) if out is not None else None, finished, stdout)
        slots = len(todo)
    else:
        slots = min(len(todo), os.cpu_count() or 1) if workers is None else min(workers, len(todo))
        run_many(todo, workers=slots, progress=progress, on_error="record", on_result=finished)
    wall = time.perf_counter() - tick
    return _timing([results[i] for i in pending], wall, slots, engine)  # type: ignore[arg-type]


def _timing(fresh: Sequence[RunResult], wall: float, slots: int, engine: str) -> dict[str, Any]:
    """The sweep's wall time against its runs' own times (see :class:`SweepTable`)."""
    busy = sum(r.run_time for r in fresh)
    per_process: dict[Any, float] = {}
    for r in fresh:
        per_process[r.pid] = per_process.get(r.pid, 0.0) + r.run_time
    busiest = max(per_process.values(), default=0.0)
    return {"wall": wall, "runs": busy, "processes": slots, "busiest_process": busiest,
            "overhead": (wall / busiest - 1.0) if busiest > 0 and engine == "processes" else None,
            "utilisation": busy / (wall * slots) if wall > 0 else None}


def _table(problem: str, built: Any, plan: _Plan, results: Sequence[RunResult | None], *,
           config: dict[str, Any], timing: dict[str, Any], ran: int) -> SweepTable:
    """The :class:`SweepTable` of the finished runs (``ran`` of them trained here, the rest cached)."""
    done = [r for r in results if r is not None]
    return SweepTable(problem=built.name or problem, metric=getattr(built, "error_metric", "rel_l2"),
                      rows=_rows(plan.names, plan.grid, done, plan.steps), results=done, config=config,
                      ran=ran, cached=len(plan.specs) - ran, timing=timing,
                      published=published_for(problem) if problem in PROBLEMS else [])


def _print_table(table: SweepTable, stdout: TextIO) -> None:
    """The table, then (when runs ran) the sweep's wall time, utilisation and overhead."""
    print(file=stdout)
    print(table, file=stdout)
    timing = table.timing
    if timing:
        over = timing["overhead"]
        print(f"\nsweep wall time {timing['wall']:.1f} s for {timing['runs']:.1f} s of runs on "
              f"{timing['processes']} process(es), {100 * timing['utilisation']:.0f} % busy"
              + (f"; overhead {100 * over:.1f} % over the busiest process's runs" if over is not None else ""),
              file=stdout)


def _write_files(table: SweepTable, out: Path, plots: bool, stdout: TextIO) -> None:
    """``results.csv``, ``results.json`` and (``plots``) the figures into ``out``, listed in ``table.files``."""
    table.files += [table.to_csv(out / "results.csv"), table.to_json(out / "results.json")]
    if plots:
        table.files += _figures(table, out, stdout)
    for path in table.files:
        print(f"wrote {path}", file=stdout)


def best_static_grid(terms: Sequence[str], values: Sequence[float] = (1.0, 10.0, 100.0),
                     max_size: int = 27) -> list[dict[str, float]]:
    """The fixed weights to try: the first term (the PDE residual) at 1, every other term over
    ``values`` (all combinations); more than ``max_size`` combinations: one shared value for all of
    them (``len(values)`` settings)."""
    terms = list(terms)
    values = [float(v) for v in values]
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise SweepError(f"best-static weights must be positive and finite, got {values}")
    if max_size < 1:
        raise SweepError(f"best_static_max must be >= 1, got {max_size}")
    reference, others = terms[0], terms[1:]
    if len(values) ** len(others) <= max_size:
        combos: Iterable[tuple[float, ...]] = itertools.product(values, repeat=len(others))
    else:
        combos = ((v,) * len(others) for v in values)
    return [{reference: 1.0, **dict(zip(others, combo))} for combo in combos]


# ---------------------------------------------------------------------------------- checks
def _strategies(strategies: Sequence[str] | str, best_static: bool) -> tuple[list[str], bool]:
    """``static`` first, then the named strategies, deduplicated; ``best_static`` pulled out."""
    if isinstance(strategies, str):
        strategies = strategies.split(",")
    names = ["static"]
    for name in (str(n).strip() for n in strategies):
        if name == BEST_STATIC:
            best_static = True
        elif name and name not in names:
            names.append(name)
    for name in names:
        try:
            strategy_settings(name)
        except (ValueError, TypeError) as exc:
            raise SweepError(str(exc).replace("Known: ", f"Known: {BEST_STATIC}, ")) from None
    return names, best_static


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise SweepError(f"need at least 1 seed, got seeds={seeds}")
        return list(range(seeds))
    out = list(dict.fromkeys(int(s) for s in seeds))
    if not out:
        raise SweepError("need at least 1 seed, got an empty list")
    return out


def _check_options(steps: int, engine: str, workers: int | None, error_points: int) -> None:
    """Refuse a budget below 1 step, an unknown engine, fewer than 1 worker or error point."""
    if int(steps) < 1:
        raise SweepError(f"the budget must be at least 1 step, got steps={steps}")
    if engine not in ("processes", "submitit"):
        raise SweepError(f"engine must be 'processes' or 'submitit', got {engine!r}")
    if workers is not None and workers < 1:
        raise SweepError(f"workers must be >= 1, got {workers}")
    if int(error_points) < 1:
        raise SweepError(f"error_points must be >= 1, got {error_points}")


def _check_engine(engine: str, executor: Any) -> None:
    """Refuse ``engine="submitit"`` without an executor when submitit is not installed."""
    if engine == "submitit" and executor is None and importlib.util.find_spec("submitit") is None:
        raise SweepError("engine='submitit' needs submitit: pip install 'lossbalance[cluster]'")


def _build_problem(problem: str, options: Mapping[str, Any] | None, device: str) -> Any:
    """The problem, built once here: a bad name, module or option fails before any run."""
    try:
        resolve_problem(problem)
        return make_problem(problem, device=device, **dict(options or {}))
    except SweepError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as the sweep's input error
        raise SweepError(str(exc) if isinstance(exc, ValueError) else
                         f"problem {problem!r} could not be built: {type(exc).__name__}: {exc}") from exc


def _source_digest(problem: str) -> str | None:
    """A hash of the source file of a problem of your own (so an edited problem reruns); ``None``
    for registered problems."""
    if problem in PROBLEMS:
        return None
    try:
        path = inspect.getsourcefile(resolve_problem(problem))
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None  # type: ignore[arg-type]
    except (TypeError, OSError):
        return None


def _is_static(weights: Mapping[str, float], names: Sequence[str]) -> bool:
    """Whether a grid setting is the ``static`` row's (unit weights, and that row is run)."""
    return "static" in names and all(w == 1.0 for w in weights.values())


def _grid_label(weights: Mapping[str, float]) -> str:
    """The grid point's label (and key of its runs): each weight short where that is exact, else in full."""
    return "static[" + ",".join(f"{k}={_exact(v)}" for k, v in list(weights.items())[1:]) + "]"


def _exact(value: float) -> str:
    short = _number(value)
    return short if not math.isfinite(value) or float(short) == value else repr(float(value))


# ----------------------------------------------------------------------------------- cache
class _Cache:
    """``out/sweep.json`` (the shared configuration) and ``out/runs/<key>.json`` (one finished run)."""

    def __init__(self, out: Path, config: dict[str, Any]):
        self.out, self.config = out, config
        self.runs = out / "runs"
        manifest = out / "sweep.json"
        if manifest.exists():
            try:
                stored = json.loads(manifest.read_text())
            except (OSError, ValueError) as exc:
                raise SweepConfigError(f"{manifest} is not a sweep manifest ({exc}); use another --out") from None
            theirs = stored.get("config", {}) if stored.get("format") == CACHE_FORMAT else {}
            diff = [f"{key}: {theirs.get(key)!r} there, {config.get(key)!r} asked"
                    for key in sorted(set(theirs) | set(config)) if theirs.get(key) != config.get(key)]
            if diff:
                raise SweepConfigError(f"{out} holds the results of another configuration ("
                                       + "; ".join(diff) + "). Use another --out, or delete the folder to start over.")
        elif out.exists() and any(out.iterdir()):
            raise SweepConfigError(f"{out} is not empty and holds no sweep.json: use an empty or new --out")
        self.runs.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            _atomic_write(manifest, json.dumps({"format": CACHE_FORMAT, "config": config}, indent=1))

    def key(self, spec: RunSpec) -> str:
        blob = json.dumps({"format": CACHE_FORMAT, "spec": _plain(dataclasses.asdict(spec)),
                           "problem_source": self.config.get("problem_source")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def load(self, spec: RunSpec) -> RunResult | None:
        path = self.runs / f"{self.key(spec)}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # absent or torn: run it again
        if data.get("spec") != _plain(dataclasses.asdict(spec)):
            return None
        return RunResult(**data["result"])

    def save(self, spec: RunSpec, result: RunResult) -> None:
        fields = {f.name for f in dataclasses.fields(RunResult)} - {"model", "balancer", "points", "abs_error"}
        payload = {"spec": _plain(dataclasses.asdict(spec)),
                   "result": _plain({name: getattr(result, name) for name in fields})}
        _atomic_write(self.runs / f"{self.key(spec)}.json", json.dumps(payload, allow_nan=True))


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a torn file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """``value`` as JSON types (tuples and mappings become lists and dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# ------------------------------------------------------------------------------- cluster
def _submitit_job(spec: RunSpec) -> RunResult:
    """One run as a submitit job (one thread; a run that raises comes back as a failed result)."""
    import traceback

    import torch

    torch.set_num_threads(1)
    tick = time.perf_counter()
    try:
        return run_spec(spec).portable()
    except Exception:  # noqa: BLE001 - reported in the table
        return failed_result(spec, traceback.format_exc(), time.perf_counter() - tick)


def _run_submitit(specs: Sequence[RunSpec], executor: Any, out: Path | None, finished: Any, stdout: TextIO,
                  poll: float = 0.25) -> None:
    """Submit one job per spec and hand each result to ``finished(index, result)`` as it comes."""
    if executor is None:
        import submitit

        executor = submitit.AutoExecutor(folder=str((out or Path(".")) / "submitit"))
        executor.update_parameters(timeout_min=60 * 24, cpus_per_task=1)
    jobs = dict(enumerate(executor.submit(_submitit_job, spec) for spec in specs))
    print(f"submitted {len(jobs)} jobs ({type(executor).__name__})", file=stdout, flush=True)
    while jobs:
        for index, job in list(jobs.items()):
            if not job.done():
                continue
            try:
                result = job.result()
            except Exception as exc:  # noqa: BLE001 - the job itself failed (killed, timed out)
                result = failed_result(specs[index], f"{type(exc).__name__}: {exc}")
            del jobs[index]
            finished(index, result)
            print(f"  [{specs[index].name} seed {specs[index].seed}] done ({len(specs) - len(jobs)}/{len(specs)})",
                  file=stdout, flush=True)
        if jobs:
            time.sleep(poll)


# ---------------------------------------------------------------------------------- rows
def _rows(names: Sequence[str], grid: Sequence[Mapping[str, float]], results: Sequence[RunResult],
          steps: int) -> list[dict[str, Any]]:
    """One row per strategy, then (with a grid) the ``best_static`` row; time ratios against static's."""
    by_label: dict[str, list[RunResult]] = {}
    for result in results:
        by_label.setdefault(result.label, []).append(result)
    for weights in grid:  # the all-ones setting is the static row's runs (not trained twice)
        if _is_static(weights, names):
            by_label[_grid_label(weights)] = by_label.get("static", [])
    rows = [_row(name, by_label.get(name, []), steps) for name in names]
    if grid:
        rows.append(_best_static_row(grid, by_label, steps))
    static = rows[0]["time_per_step"]
    for row in rows:
        row["time_ratio"] = (row["time_per_step"] / static) if static and row["time_per_step"] else None
    return rows


def _best_static_row(grid: Sequence[Mapping[str, float]], by_label: Mapping[str, Sequence[RunResult]],
                     steps: int) -> dict[str, Any]:
    """The row of the best setting, as ``best_static``, with its ``"setting"`` and the ``"grid"`` of
    every setting tried: the fewest failed seeds first (a fixed weighting that diverges on some
    seeds is worse than one that finishes on all: its mean covers only the survivors), then the
    lowest finite mean error (no finite mean anywhere: the first setting)."""
    tried = [_row(_grid_label(w), by_label.get(_grid_label(w), []), steps) for w in grid]
    finite = [row for row in tried if row["error_mean"] is not None and math.isfinite(row["error_mean"])]
    best = dict(min(finite, key=lambda row: (row["failed"], row["error_mean"])) if finite else tried[0])
    best["setting"], best["strategy"] = best["strategy"], BEST_STATIC
    best["grid"] = [{"weights": w, "error_mean": row["error_mean"], "error_std": row["error_std"], "failed": row["failed"]}
                    for w, row in zip(grid, tried)]
    return best


def _row(label: str, runs: Sequence[RunResult], steps: int) -> dict[str, Any]:
    """Errors, mean final weights and times over the finished runs of ``label`` (by seed), and failures."""
    ok = sorted((r for r in runs if r.ok), key=lambda r: r.seed)
    errors = [r.error for r in ok]
    return {
        "strategy": label,
        "runs": len(runs),
        "failed": len(runs) - len(ok),
        "seeds": [r.seed for r in ok],
        "errors": errors,
        "error_mean": _mean(errors),
        "error_std": statistics.stdev(errors) if len(errors) > 1 else None,  # undefined for one seed
        "weights": _mean_weights(ok),
        "wall_time": _mean([r.wall_time for r in ok]),
        "time_per_step": _mean([r.wall_time / max(steps, 1) for r in ok]),
        "failures": [_first_line(r.failure) for r in runs if not r.ok],
    }


def _mean(values: Sequence[float]) -> float | None:
    """The mean; ``None`` for no values."""
    return statistics.fmean(values) if values else None


def _mean_weights(runs: Sequence[RunResult]) -> dict[str, float]:
    """Every term's final weight, mean over the runs that have it."""
    terms = dict.fromkeys(k for r in runs for k in r.weights)
    return {t: statistics.fmean(r.weights[t] for r in runs if t in r.weights) for t in terms}


def _first_line(failure: str | None) -> str:
    """The exception line of a traceback (its last non-empty line)."""
    lines = [line.strip() for line in (failure or "").splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


# ------------------------------------------------------------------------------- figures
def _figures(table: SweepTable, out: Path, stdout: TextIO) -> list[Path]:
    """``error_vs_step.png`` (mean over seeds, min-max band, published values as dashed lines) and
    ``weights_vs_step.png`` (one panel per term); nothing without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("no figures: matplotlib is not installed (pip install 'lossbalance[plots]')", file=stdout)
        return []
    groups = _groups(table)
    paths = [_error_figure(table, groups, out / "error_vs_step.png")]
    terms = list(dict.fromkeys(t for runs in groups.values() for r in runs for h in r.history for t in h["weights"]))
    if terms:
        paths.append(_weights_figure(table, groups, terms, out / "weights_vs_step.png"))
    return paths


def _error_figure(table: SweepTable, groups: Mapping[str, Sequence[RunResult]], path: Path) -> Path:
    """Every group's error against the step, and the published values of the table's metric."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, runs in groups.items():
        _plot_band(ax, label, [r.error_history for r in runs if r.error_history], linewidth=1.3)
    for entry in table.published:
        if entry.get("value") is not None and entry.get("metric") == table.metric:
            ax.axhline(entry["value"], color="k", linestyle="--", linewidth=0.9,
                       label=f"published {entry['value']:.1e} ({entry['source'].split(',')[0]}, {entry['figure']})")
    _log_axes(ax)
    ax.set_ylabel(f"{table.metric_label} error")
    ax.legend(fontsize="x-small")
    fig.suptitle(f"{table.problem}: error vs step (mean over seeds, band: min-max)")
    fig.savefig(path, dpi=120)
    return path


def _weights_figure(table: SweepTable, groups: Mapping[str, Sequence[RunResult]], terms: Sequence[str],
                    path: Path) -> Path:
    """One panel per term: every group's weight of it against the step."""
    from matplotlib.figure import Figure

    cols = min(len(terms), 3)
    rows = math.ceil(len(terms) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, term in zip(axes.flat, terms):
        for label, runs in groups.items():
            curves = [[[h["step"], h["weights"][term]] for h in r.history if term in h["weights"]] for r in runs]
            _plot_band(ax, label, [c for c in curves if c], linewidth=1.2)
        _log_axes(ax)
        ax.set_title(term)
    for ax in list(axes.flat)[len(terms):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="x-small")
    fig.suptitle(f"{table.problem}: weights vs step (mean over seeds, band: min-max)")
    fig.savefig(path, dpi=120)
    return path


def _plot_band(ax: Any, label: str, curves: Sequence[Sequence[Sequence[float]]], linewidth: float) -> None:
    """The mean of ``curves`` as a line, their min-max as a band of its colour (nothing without steps)."""
    steps, mean, low, high = _band(curves)
    if steps:
        line, = ax.plot(steps, mean, label=label, linewidth=linewidth)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def _log_axes(ax: Any) -> None:
    """A log y axis over the step, with a light grid."""
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)


def _groups(table: SweepTable) -> dict[str, list[RunResult]]:
    """The finished runs of every row (``best_static``: those of its best setting)."""
    groups: dict[str, list[RunResult]] = {}
    for row in table.rows:
        label = row.get("setting", row["strategy"])
        runs = [r for r in table.results if r.label == label and r.ok]
        if runs:
            groups[row["strategy"] if "setting" not in row else f"best static {label[6:]}"] = runs
    return groups


def _band(curves: Sequence[Sequence[Sequence[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max over curves of ``[step, value]`` pairs, on the steps they all have."""
    if not curves:
        return [], [], [], []
    common = set.intersection(*({p[0] for p in c} for c in curves))
    steps = sorted(common)
    values = [[dict((p[0], p[1]) for p in c)[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]
