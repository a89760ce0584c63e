"""``python -m lossbalance demo``: the demo's options and :func:`main`."""
from __future__ import annotations

import argparse
import importlib.util
from typing import Sequence

from ..strategies import available_strategies
from .compare import resolve_strategies, run_demo
from .runner import DEMO_DECAY_EVERY, DEMO_STEPS

__all__ = ["add_demo_arguments", "main"]


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
