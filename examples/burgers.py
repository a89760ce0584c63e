"""Viscous Burgers' equation (the shock benchmark of Raissi et al. 2019) with adaptive loss weights.

``u_t + u u_x - (0.01 / pi) u_xx = 0`` on ``t in [0, 1]``, ``x in [-1, 1]``,
``u(0, x) = -sin(pi x)``, ``u(t, +-1) = 0``; three terms: ``"pde"``, ``"ic"``, ``"bc"``. The
reference solution comes from the Cole-Hopf formula (:class:`lossbalance.problems.Burgers1D`).

The balanced run uses ReLoBRaLo (Bischof & Kraus 2021, the loss-value method that costs a plain
step) when it is registered in this version of lossbalance, else learning-rate annealing with
the PDE residual as the reference; the script prints which. A run with fixed weights runs
beside it for comparison (``--no-baseline`` to skip it).

    python examples/burgers.py --steps 10000
    python examples/burgers.py --strategy softadapt
"""
from __future__ import annotations

import argparse
from typing import Sequence

from lossbalance.demo import RunResult, RunSpec, format_table, run_many, write_figures
from lossbalance.strategies import available_strategies


def pick_strategy() -> str:
    """ReLoBRaLo if registered, else LRA."""
    return "relobralo" if "relobralo" in available_strategies() else "lra"


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="Adam steps (default 5000)")
    parser.add_argument("--strategy", default=None,
                        help=f"a registered strategy (default: relobralo if registered, else lra; "
                             f"known: {', '.join(available_strategies())})")
    parser.add_argument("--lr-decay-every", type=int, default=1000, help="lr x0.9 every this many steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=128, help="points per term and step (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run with fixed weights")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes side by side (default: one per run up to the CPU count; 1: in this process)")
    parser.add_argument("--eval-n", type=int, default=None,
                        help="evaluation grid n x n (default: Raissi's 100 t x 256 x grid)")
    parser.add_argument("--out", default="burgers", help="folder for the figures")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--progress", choices=("auto", "tqdm", "print", "none"), default="auto")
    args = parser.parse_args(argv)

    strategy = args.strategy or pick_strategy()
    if strategy not in available_strategies():
        parser.error(f"unknown strategy {strategy!r}; known: {', '.join(available_strategies())}")
    why = "chosen with --strategy" if args.strategy else (
        "ReLoBRaLo is registered" if strategy == "relobralo" else "ReLoBRaLo is not registered here")
    print(f"Burgers 1-D, nu = 0.01/pi: balancing with {strategy!r} ({why}); {args.steps} steps, "
          f"lr 1e-3 x 0.9^(step/{args.lr_decay_every}), batch {args.batch_size}", flush=True)

    names = [strategy] if args.no_baseline or strategy == "static" else ["static", strategy]
    specs = [RunSpec(name, problem="burgers", steps=args.steps, lr_decay_every=args.lr_decay_every,
                     batch_size=args.batch_size, seed=args.seed, device=args.device, eval_n=args.eval_n)
             for name in names]
    results = run_many(specs, workers=args.workers, progress=args.progress)
    print()
    print(format_table(results))
    if not args.no_plots:
        for path in write_figures(results, args.out, axis_labels=("t", "x")):
            print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
