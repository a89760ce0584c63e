"""``python -m lossbalance demo``: the demo's options and :func:`main`."""
from __future__ import annotations

import argparse
import importlib.util
from typing import Sequence

from ..strategies import available_strategies
from .compare import resolve_strategies, run_demo
from .runner import DEMO_DECAY_EVERY, DEMO_STEPS

__all__ = ["add_demo_arguments", "compare_main", "main"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options (``--steps``, ``--strategies``, ...) to ``parser``; returns it."""
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
    _check_progress(args.progress, parser)
    try:
        resolve_strategies(args.strategies)
    except (ValueError, TypeError) as exc:
        parser.error(f"--strategies: {exc}")
    run_demo(args.strategies, steps=args.steps, lr_decay_every=args.lr_decay_every, seed=args.seed,
             device=args.device, out=args.out, plots=not args.no_plots, workers=args.workers,
             progress=args.progress, eval_n=args.eval_n)
    return 0


def _check_progress(progress: str, parser: argparse.ArgumentParser) -> None:
    """``--progress tqdm`` needs tqdm installed."""
    if progress == "tqdm" and importlib.util.find_spec("tqdm") is None:
        parser.error("--progress tqdm needs tqdm: pip install 'lossbalance[progress]'")


def _key_values(items: Sequence[str], what: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """``key=value`` options; values are read as JSON when they parse (numbers, true, lists), else strings."""
    import json

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"{what} takes key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def compare_main(argv: Sequence[str] | None = None, *, prog: str = "python -m lossbalance compare") -> int:
    """``python -m lossbalance compare --problem burgers --strategies static,lra,relobralo --seeds 3
    --steps 5000 [--out DIR] [--workers N]``: :func:`~lossbalance.demo.compare_strategies`; returns 0."""
    from .sweep import SweepError, compare_strategies

    parser = _compare_parser(prog)
    args = parser.parse_args(argv)
    hidden, values = _widths_and_weights(args, parser)
    _check_progress(args.progress, parser)
    executor = _submitit_executor(args, parser) if args.engine == "submitit" else None
    try:
        compare_strategies(
            args.problem, args.strategies, seeds=args.seeds, steps=args.steps, out=args.out, workers=args.workers,
            engine=args.engine, executor=executor, best_static=args.best_static, best_static_values=values,
            best_static_max=args.best_static_max,
            problem_options=_key_values(args.problem_option, "--problem-option", parser), lr=args.lr,
            lr_decay_every=args.lr_decay_every, batch_size=args.batch_size, hidden=hidden, eval_n=args.eval_n,
            device=args.device, progress=args.progress, plots=not args.no_plots)
    except SweepError as exc:
        parser.error(str(exc))
    return 0


def _compare_parser(prog: str) -> argparse.ArgumentParser:
    """The options of ``python -m lossbalance compare``."""
    from ..problems import PROBLEMS

    parser = argparse.ArgumentParser(
        prog=prog, description="Which weighting for my PDE? Train every (strategy, seed) pair of one problem "
                               "at one budget; table, CSV/JSON and figures in --out (cached: a rerun skips "
                               "finished runs).")
    parser.add_argument("--problem", default="burgers",
                        help=f"{', '.join(sorted(PROBLEMS))}, or package.module:Class / path/file.py:Class "
                             "(default burgers)")
    parser.add_argument("--problem-option", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument of the problem (repeatable; JSON values)")
    parser.add_argument("--strategies", default="static,lra,relobralo",
                        help="comma-separated strategies (static always runs; best_static = --best-static; "
                             f"known: {', '.join(available_strategies())}; default static,lra,relobralo)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per strategy (default 3)")
    parser.add_argument("--steps", type=int, default=5000, help="Adam steps per run (default 5000)")
    parser.add_argument("--out", default="lossbalance-compare",
                        help="folder for the cache, results.csv/json and figures (default ./lossbalance-compare/)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes side by side, one thread each (default: one per run up to the CPU count)")
    parser.add_argument("--best-static", action="store_true",
                        help="also tune fixed weights on a log grid (each non-PDE term over --best-static-values)")
    parser.add_argument("--best-static-values", default="1,10,100", help="grid of the tuned weights (default 1,10,100)")
    parser.add_argument("--best-static-max", type=int, default=27,
                        help="largest grid; beyond it all non-PDE terms share one value (default 27)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--lr-decay-every", type=int, default=DEMO_DECAY_EVERY,
                        help=f"learning rate x0.9 every this many steps, continuous (default {DEMO_DECAY_EVERY})")
    parser.add_argument("--batch-size", type=int, default=128, help="points per term and step (default 128)")
    parser.add_argument("--hidden", default="50,50,50", help="hidden widths of the MLP (default 50,50,50)")
    parser.add_argument("--eval-n", type=int, default=None, help="evaluation grid resolution (default: the problem's)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-plots", action="store_true", help="write no figures")
    parser.add_argument("--progress", choices=("auto", "tqdm", "print", "none"), default="auto",
                        help="progress display (default: tqdm bars if installed and on a terminal, else lines)")
    parser.add_argument("--engine", choices=("processes", "submitit"), default="processes",
                        help="processes on this machine (default) or one submitit job per run (SLURM)")
    parser.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                        help="submitit executor (default auto: SLURM when available, else local processes)")
    parser.add_argument("--cluster-option", action="append", default=[], metavar="KEY=VALUE",
                        help="submitit parameter, e.g. slurm_partition=gpu, timeout_min=120 (repeatable)")
    return parser


def _widths_and_weights(args: argparse.Namespace,
                        parser: argparse.ArgumentParser) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``--hidden`` as ints and ``--best-static-values`` as floats."""
    try:
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
        values = tuple(float(v) for v in args.best_static_values.split(",") if v.strip())
    except ValueError as exc:
        parser.error(f"--hidden / --best-static-values: {exc}")
    return hidden, values


def _submitit_executor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> object:
    """A ``submitit.AutoExecutor`` in ``--out/submitit`` for ``--cluster``, with ``--cluster-option``."""
    if importlib.util.find_spec("submitit") is None:
        parser.error("--engine submitit needs submitit: pip install 'lossbalance[cluster]'")
    import os

    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(args.out, "submitit"),
                                     cluster=None if args.cluster == "auto" else args.cluster)
    executor.update_parameters(**{"timeout_min": 60 * 24, "cpus_per_task": 1,
                                  **_key_values(args.cluster_option, "--cluster-option", parser)})
    return executor
