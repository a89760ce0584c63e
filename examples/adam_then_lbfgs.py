"""Adam with adaptive weights, then L-BFGS with ``balancer.step(closure=...)``.

A common PINN recipe: Adam on fresh random points while the weights adapt, then L-BFGS on one
fixed set of points to polish the solution. A balancer wraps one optimizer, so the L-BFGS phase
gets a NEW ``LossBalancer``; it starts from the weights the Adam phase reached
(``weights=adam_balancer.weights``).

By default the weights are held fixed during L-BFGS (``frozen=True``): L-BFGS builds its
curvature model from gradient differences across iterations, which assumes one objective;
changing the weights between its steps changes the objective under it. ``--lbfgs-update-every N``
keeps adapting them every N ``step`` calls instead (each call runs up to ``--max-iter``
L-BFGS iterations; within one call the balancer holds the weights fixed).

    python examples/adam_then_lbfgs.py --steps 4000 --lbfgs-steps 50
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import torch

from lossbalance import LossBalancer
from lossbalance.demo import strategy_settings, train
from lossbalance.problems import PROBLEMS, make_problem
from lossbalance.strategies import available_strategies


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="helmholtz")
    parser.add_argument("--steps", type=int, default=4000, help="Adam steps (default 4000)")
    parser.add_argument("--lr-decay-every", type=int, default=1000, help="Adam lr x0.9 every this many steps")
    parser.add_argument("--strategy", default="lra", help=f"strategy of the Adam phase (known: {', '.join(available_strategies())})")
    parser.add_argument("--lbfgs-steps", type=int, default=50, help="balancer.step calls with L-BFGS (default 50)")
    parser.add_argument("--max-iter", type=int, default=20, help="L-BFGS iterations per step call (default 20)")
    parser.add_argument("--lbfgs-points", type=int, default=1024, help="fixed points per term for L-BFGS (default 1024)")
    parser.add_argument("--lbfgs-update-every", type=int, default=0,
                        help="keep adapting the weights every N L-BFGS step calls (default 0: frozen)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-n", type=int, default=None, help="evaluation grid resolution (default: the problem's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a network this small more threads only add overhead)")
    args = parser.parse_args(argv)
    if args.strategy not in available_strategies():
        parser.error(f"unknown strategy {args.strategy!r}; known: {', '.join(available_strategies())}")

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    problem = make_problem(args.problem, device=args.device)

    # Phase 1: Adam on fresh points every step, weights adapting (the shared runner).
    adam = train(problem, args.strategy, steps=args.steps, lr_decay_every=args.lr_decay_every,
                 seed=args.seed, eval_n=args.eval_n)
    model = adam.model
    assert model is not None and adam.balancer is not None
    model.train()
    print(f"Adam ({args.steps} steps, {args.strategy}): rel. L2 {adam.error:.3e}, weights "
          + ", ".join(f"{k}={v:.3g}" for k, v in adam.weights.items()) + f", {adam.wall_time:.1f} s", flush=True)

    # Phase 2: L-BFGS on one fixed set of points, a new balancer starting from the Adam weights.
    generator = torch.Generator().manual_seed(args.seed + 1)
    batch = problem.sample(args.lbfgs_points, generator)
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=args.max_iter, history_size=50,
                              tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    if args.lbfgs_update_every > 0:
        strategy, _ = strategy_settings(args.strategy)  # e.g. LRAnnealing(reference="pde")
        balancer = LossBalancer(lbfgs, strategy, weights=adam.weights, update_every=args.lbfgs_update_every,
                                seed=args.seed)
    else:
        balancer = LossBalancer(lbfgs, "static", weights=adam.weights, frozen=True)

    start = time.perf_counter()
    for step in range(args.lbfgs_steps):
        total = balancer.step(closure=lambda: problem.losses(model, batch))
        if not torch.isfinite(total):
            print(f"L-BFGS stopped at step {step}: non-finite loss")
            break
    lbfgs_time = time.perf_counter() - start
    error = float(problem.relative_l2(model, args.eval_n))
    mode = "frozen weights" if args.lbfgs_update_every <= 0 else f"{args.strategy} every {args.lbfgs_update_every}"
    print(f"L-BFGS ({args.lbfgs_steps} x {args.max_iter} iterations, {mode}): rel. L2 {error:.3e}, weights "
          + ", ".join(f"{k}={v:.3g}" for k, v in balancer.weights.items()) + f", {lbfgs_time:.1f} s")
    return {"adam": adam, "adam_error": adam.error, "lbfgs_error": error, "weights": balancer.weights,
            "model": model}


if __name__ == "__main__":
    main()
