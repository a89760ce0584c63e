"""Several runs side by side: :func:`run_many`, long-lived worker processes (or all in this
process), progress through one queue."""
from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import time
import traceback
from typing import Any, Callable, Sequence, TextIO

import torch

from ..problems import ProblemError, resolve_problem
from .progress import Progress
from .runner import RunResult, RunSpec, failed_result, run_spec, strategy_settings

__all__ = ["run_many"]


def _run_one(index: int, spec: RunSpec, messages: Any, parent: int | None = None) -> None:
    """Run one spec in this (worker) process; progress and the result or the traceback go to ``messages``.

    With ``parent`` (its pid), the process exits as soon as it notices that the parent is gone (a
    killed sweep leaves no orphans training on)."""
    tick = time.perf_counter()

    def report(step: int, steps: int, loss: float) -> None:
        if parent is not None and os.getppid() != parent:
            os._exit(3)
        messages.put(("progress", index, (step, steps, loss)))

    try:
        result = run_spec(spec, report)
        messages.put(("done", index, result.portable()))
    except Exception:  # noqa: BLE001 - reported to the parent
        messages.put(("error", index, (traceback.format_exc(), time.perf_counter() - tick)))


def _worker(tasks: Any, messages: Any, parent: int | None = None) -> None:
    """Entry point of one worker process: one thread; runs specs from ``tasks`` until ``None``.

    The process is reused for every run it takes, so a sweep pays the start-up (a fork, or a spawned
    interpreter's ``import torch``) once per worker, not once per run."""
    torch.set_num_threads(1)
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and os.getppid() != parent:
                return
            continue
        if task is None:
            return
        index, spec = task
        messages.put(("start", index, os.getpid()))
        _run_one(index, spec, messages, parent)


def run_many(
    specs: Sequence[RunSpec],
    *,
    workers: int | None = None,
    progress: str = "auto",
    stream: TextIO | None = None,
    on_error: str = "raise",
    on_result: Callable[[int, RunResult], None] | None = None,
    start_method: str | None = None,
) -> list[RunResult]:
    """Run every spec and return the results in the same order.

    ``workers``: processes side by side (default: one per run, at most the number of CPU cores);
    each process uses one thread, and a result crosses back without its model.
    ``workers=1`` runs the specs one after the other in this process, also on one thread
    (results keep ``model`` and ``balancer``). Unknown problem or strategy names raise
    ``ValueError`` before anything starts; a run that fails in its process raises
    ``RuntimeError`` with its traceback and stops the others (``on_error="raise"``, the default);
    with ``on_error="record"`` its result carries the traceback in ``failure`` (error NaN) and the
    others complete. ``on_result(index, result)`` is called in this process as each run finishes
    (e.g. to save it), failed runs included.

    The processes are started once, up to ``workers`` of them, and each takes the next waiting run
    when it finishes one. ``start_method``: ``None`` (default) forks where that is safe (Linux, every
    run on the CPU, CUDA not initialised here: a worker starts in milliseconds, with torch and the
    problem's module already imported, and runs on one thread, so no OpenMP pool is used after the
    fork), else spawns (a fresh interpreter per worker: about 2.5 s of ``import torch``); or one of
    ``"fork"``, ``"spawn"``, ``"forkserver"``.

    ``progress``: ``"auto"`` (tqdm bars if installed and ``stream`` is a terminal, else a line
    every 10 %), ``"tqdm"``, ``"print"`` or ``"none"``; written to ``stream`` (default stderr).
    """
    specs = list(specs)
    workers = _check_options(specs, workers, progress)
    method = _start_method(specs, start_method)
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    bars = Progress(specs, progress, sys.stderr if stream is None else stream)
    try:
        if workers == 1 or len(specs) <= 1:
            results = _run_here(specs, bars, on_error, on_result)
        else:
            results = _Fanout(specs, workers, bars, on_error, on_result, method).run()
    finally:
        bars.close()
    return [r for r in results if r is not None]


def _check_options(specs: Sequence[RunSpec], workers: int | None, progress: str) -> int:
    """The number of workers; raises ``ValueError`` for a bad option or an unknown problem or strategy
    (before any process starts)."""
    if progress not in ("auto", "tqdm", "print", "none"):
        raise ValueError(f"progress must be 'auto', 'tqdm', 'print' or 'none', got {progress!r}")
    if workers is None:
        workers = min(len(specs), os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for spec in specs:
        try:
            resolve_problem(spec.problem)
        except ProblemError as exc:
            raise ValueError(f"run {spec.name!r}: {exc}") from None
        strategy_settings(spec.strategy, spec.strategy_options, spec.update_every)
    return workers


def _start_method(specs: Sequence[RunSpec], asked: str | None) -> str:
    """The worker processes' start method: ``asked``, else fork where it is safe (see :func:`run_many`)."""
    methods = multiprocessing.get_all_start_methods()
    if asked is not None:
        if asked not in methods:
            raise ValueError(f"start_method must be one of {methods} here, got {asked!r}")
        return asked
    on_cpu = all(str(spec.device).split(":")[0] == "cpu" for spec in specs)
    if sys.platform == "linux" and "fork" in methods and on_cpu and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _run_here(specs: Sequence[RunSpec], bars: Progress, on_error: str = "raise",
              on_result: Callable[[int, RunResult], None] | None = None) -> list[RunResult | None]:
    """The runs one after the other in this process, on one thread (results keep their model)."""
    results: list[RunResult | None] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: more threads only add overhead and contention
    try:
        for index, spec in enumerate(specs):
            bars.start(index)
            tick = time.perf_counter()
            try:
                result = run_spec(spec, lambda s, n, loss, i=index: bars.update(i, s, n, loss))
            except Exception:
                if on_error == "raise":
                    raise
                result = failed_result(spec, traceback.format_exc(), time.perf_counter() - tick)
            results.append(result)
            if on_result is not None:
                on_result(index, result)
    finally:
        torch.set_num_threads(threads)
    return results


class _Fanout:
    """The runs in up to ``workers`` long-lived processes; each takes the next run from one task
    queue, and messages come back through one queue."""

    def __init__(self, specs: Sequence[RunSpec], workers: int, bars: Progress, on_error: str = "raise",
                 on_result: Callable[[int, RunResult], None] | None = None, start_method: str = "spawn"):
        self.specs, self.workers, self.bars = specs, min(workers, len(specs)), bars
        self.on_error, self.on_result = on_error, on_result
        self.context = multiprocessing.get_context(start_method)
        self.messages = self.context.Queue()
        self.tasks = self.context.Queue()
        self.processes: list[Any] = []
        self.current: dict[int, int] = {}          # pid -> index of the run it is on
        self.left = len(specs)
        self.results: list[RunResult | None] = [None] * len(specs)

    def run(self) -> list[RunResult | None]:
        """Every run's result, in order; with ``on_error="raise"`` a failed or dead run raises
        ``RuntimeError`` and stops the others."""
        try:
            for _ in range(self.workers):   # first: no queue feeder thread runs here when a worker forks
                self._spawn()
            for index, spec in enumerate(self.specs):
                self.tasks.put((index, spec))
            while self.left:
                self._receive()
        finally:
            self._stop()
        return self.results

    def _spawn(self) -> None:
        process = self.context.Process(target=_worker, args=(self.tasks, self.messages, os.getpid()), daemon=True)
        process.start()
        self.processes.append(process)

    def _finish(self, index: int, result: RunResult) -> None:
        self.results[index] = result
        self.left -= 1
        if self.on_result is not None:
            self.on_result(index, result)

    def _receive(self) -> None:
        """Handle the next message; after half a second without one, check that no process died."""
        try:
            kind, index, payload = self.messages.get(timeout=0.5)
        except queue.Empty:
            self._check_alive()
            return
        if kind == "start":
            self.current[payload] = index
            self.bars.start(index)
        elif kind == "progress":
            self.bars.update(index, *payload)
        elif kind == "done":
            self._forget(index)
            self._finish(index, payload)
        else:
            text, seconds = payload
            if self.on_error == "raise":
                raise RuntimeError(f"run {self.specs[index].name!r} failed:\n{text}")
            self._forget(index)
            self._finish(index, failed_result(self.specs[index], text, seconds))

    def _forget(self, index: int) -> None:
        for pid, running in list(self.current.items()):
            if running == index:
                del self.current[pid]

    def _check_alive(self) -> None:
        """A worker that died: its run raises ``RuntimeError`` (or is recorded as failed, and a
        fresh worker takes over the waiting runs)."""
        for process in list(self.processes):
            if process.is_alive():
                continue
            self.processes.remove(process)
            index = self.current.pop(process.pid, None)
            if process.exitcode == 0 and index is None:
                continue
            name = self.specs[index].name if index is not None else "?"
            message = f"run {name!r} died (exit code {process.exitcode})"
            if self.on_error == "raise" or index is None:
                raise RuntimeError(message)
            self._finish(index, failed_result(self.specs[index], message))
            if self.left > len(self.current):
                self._spawn()

    def _stop(self) -> None:
        """Stop the workers (sentinels, then terminate what still runs) and close the queues."""
        for _ in self.processes:
            self.tasks.put(None)
        # Every result is in: an idle worker's exit (torch's teardown, about a second) is not worth
        # waiting for, so a short grace period, then SIGTERM.
        deadline = time.perf_counter() + 0.2
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.perf_counter()) if not self.left else 0)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join()
        self.messages.close()
        self.tasks.close()
        self.tasks.cancel_join_thread()
