"""Validation of NTK weighting on the 1-D wave equation u_tt = 4 u_xx of Wang, Yu & Perdikaris (2022).

Fixed weights against ``NTKWeighting.ntk2022()`` (trace, no EMA, every 100 steps; exact traces and
Hutchinson's estimate) on a reduced network and budget, several seeds; then, at the initial
parameters of one model, the exact traces against Hutchinson's with their reported errors.
Single-threaded CPU run: ``python benchmarks/ntk_wave.py --steps 3000 --seeds 0 1 2``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lossbalance import NTKWeighting
from lossbalance.demo.runner import train
from lossbalance.ntk import exact_trace, hutchinson_trace
from lossbalance.problems import Wave1D

STRATEGIES = {
    "fixed": lambda: "static",
    "ntk (exact)": lambda: NTKWeighting.ntk2022(),
    "ntk (hutchinson, 16 probes)": lambda: NTKWeighting.ntk2022(trace="hutchinson", probes=16),
}


def traces_agree(hidden, batch_size, probes, seed=0) -> list[tuple[str, float, float, float]]:
    """(term, exact trace, Hutchinson estimate, its standard error) at initialisation."""
    problem = Wave1D(residuals=True)
    model = problem.make_model(hidden, generator=torch.Generator().manual_seed(seed))
    terms = problem.losses(model, problem.sample(batch_size, torch.Generator().manual_seed(seed + 1)))
    params = list(model.parameters())
    rows, generator = [], torch.Generator().manual_seed(seed + 2)
    for name, term in terms.items():
        ones = torch.ones_like(term.values)
        exact = exact_trace(term.values, ones, params, 128).value
        est = hutchinson_trace(term.values, ones, params, probes, 64, generator)
        rows.append((name, float(exact), float(est.value), float(est.stderr)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--probes", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"wave u_tt = 4 u_xx, tanh MLP {args.hidden}, Adam lr 1e-3 (x0.9 every 1000), {args.steps} steps, "
          f"batch {args.batch_size} per term, seeds {args.seeds}")
    for label, make in STRATEGIES.items():
        errors, times = [], []
        for seed in args.seeds:
            tick = time.perf_counter()
            result = train(Wave1D(residuals=True), make(), steps=args.steps, batch_size=args.batch_size,
                           hidden=tuple(args.hidden), seed=seed, update_every=100, history_every=args.steps)
            errors.append(result.error)
            times.append(time.perf_counter() - tick)
            print(f"  {label:28s} seed {seed}: rel. L2 {result.error:.3e}  weights "
                  f"{ {k: round(v, 2) for k, v in result.weights.items()} }  {times[-1]:.0f}s", flush=True)
        print(f"{label:30s} median rel. L2 {statistics.median(errors):.3e}  (min {min(errors):.3e}, max {max(errors):.3e})")
    print(f"traces at initialisation (seed 0), Hutchinson with {args.probes} probes:")
    for name, exact, est, se in traces_agree(tuple(args.hidden), args.batch_size, args.probes):
        print(f"  {name:5s} exact {exact:.5e}  hutchinson {est:.5e} +- {se:.2e}  (z = {(est - exact) / se:+.2f})")


if __name__ == "__main__":
    main()
