"""ConFIG's Burgers notebook with lossbalance: plain Adam, ConFIG and momentum ConFIG.

Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", ICLR 2025 (tum-pbs/ConFIG, the Burgers example): ``u_t + u u_x = (0.01/pi) u_xx`` on
``[0, 1] x [-1, 1]``, ``u(0, x) = -sin(pi x)``, ``u(t, +-1) = 0``; fixed Latin-hypercube points
drawn anew every step (2000 residual, 50 initial, 50 boundary), 2 -> 50 -> 4 x 50 tanh -> 1
(Xavier-normal), 5 000 steps; the problem ``"burgers_config"``
(:class:`lossbalance.problems.BurgersConFIG`).
Methods, with the notebook's optimizers:

- ``adam``: the plain sum of the three terms, Adam (lr 1e-4);
- ``config``: ``combine="config"``, Adam (lr 1e-4);
- ``mconfig``: ``combine="mconfig"`` (one term's backward per step), plain SGD (lr 5e-4), the
  authors' pairing.

The score is the MSE against the Cole-Hopf reference on the notebook's 100 x 256 grid, evaluated
every ``--eval-every`` steps (the notebook: every step): the best value over training (what the
notebook reports) and the last. Each seed draws its own network and its own points.

    python examples/burgers_config.py --threads 1              # 3 seeds x 3 methods x 5000 steps
    python examples/burgers_config.py --steps 1000 --seeds 0 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lossbalance import LossBalancer
from lossbalance.problems import BurgersConFIG

#: method -> (combine, optimizer class, learning rate): the notebook's settings
METHODS = {
    "adam": ("sum", torch.optim.Adam, 1e-4),
    "config": ("config", torch.optim.Adam, 1e-4),
    "mconfig": ("mconfig", torch.optim.SGD, 5e-4),
}
#: the notebook's best test MSE (5 000 steps)
PUBLISHED = {"adam": 3.10e-2, "config": 6.38e-3, "mconfig": 1.86e-3}


def test_mse(problem: BurgersConFIG, model: torch.nn.Module) -> float:
    points, exact = problem.evaluation_data()
    with torch.no_grad():
        return float((model(points).reshape(-1) - exact).square().mean())


def run(method: str, seed: int, steps: int, eval_every: int, lr: float | None = None, **problem_options) -> dict:
    """One training run (``lr``: instead of the notebook's; ``problem_options`` go to
    :class:`BurgersConFIG`); ``{"method", "seed", "best", "final", "history", "seconds"}``."""
    combine, optimizer, default_lr = METHODS[method]
    lr = default_lr if lr is None else lr
    problem = BurgersConFIG(**problem_options)
    generator = torch.Generator().manual_seed(seed)
    model = problem.make_model(generator=generator)
    balancer = LossBalancer(optimizer(model.parameters(), lr=lr), "static", combine=combine)
    history, start = [], time.perf_counter()
    for step in range(steps):
        if step % eval_every == 0:
            history.append([step, test_mse(problem, model)])
        balancer.step(problem.losses(model, problem.sample(generator=generator)))
    history.append([steps, test_mse(problem, model)])
    return {"method": method, "seed": seed, "best": min(e for _, e in history), "final": history[-1][1],
            "history": history, "seconds": time.perf_counter() - start}


def summary(results: list[dict]) -> str:
    """One line per method: best and final test MSE, mean +- std over the seeds, and the published value."""
    lines = [f"{'method':8s}  {'best MSE mean +- std':22s}  {'final MSE mean +- std':22s}  published"]
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        cells = []
        for key in ("best", "final"):
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2e} +- {spread:.1e}")
        lines.append(f"{method:8s}  {cells[0]:22s}  {cells[1]:22s}  {PUBLISHED[method]:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, help="torch threads (the README's runs: 1)")
    parser.add_argument("--json", help="write every run (with its error history) to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            result = run(method, seed, args.steps, args.eval_every)
            results.append(result)
            print(f"{method:8s} seed {seed}: best {result['best']:.3e}  final {result['final']:.3e}  "
                  f"({result['seconds']:.0f} s)", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f)
    print(summary(results))
    return results


if __name__ == "__main__":
    main()
