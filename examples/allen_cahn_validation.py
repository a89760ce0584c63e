"""Allen-Cahn validation on a CPU budget: fixed weights, grad-norm, grad-norm + causal, RBA.

``u_t - 1e-4 u_xx + 5 u^3 - 5 u = 0``, ``x in [-1, 1]`` periodic, ``t in [0, 1]``,
``u0 = x^2 cos(pi x)`` (``lossbalance.problems.AllenCahn1D``), the benchmark of Wang, Sankaran &
Perdikaris (2022, causal training) and of Wang et al. (2023, "An expert's guide to training
PINNs", jaxpi). A reduced version of jaxpi's set-up (``examples/allen_cahn_jaxpi.py`` is the full
one): the jaxpi network (periodic embedding, Fourier features, modified MLP:
``lossbalance.problems.allen_cahn.JaxpiMLP``) made smaller, Adam with exponential learning-rate
decay, and per method

* ``fixed``: weights 1 and 1 (``"static"``), fresh uniform points every step;
* ``grad-norm``: ``GradNormRatio.jaxpi()`` (jaxpi's grad-norm weights, EMA 0.9), updated every
  ``--update-every`` steps (jaxpi: 1000 of 2e5 steps; fewer here, to fit the short budget);
* ``grad-norm + causal``: the same and ``Causal(chunks=32, eps=1.0)`` on the PDE term (jaxpi);
* ``RBA``: fixed weights and ``RBA()`` (gamma 0.999, eta 1e-3) on both terms, on a fixed pool of
  ``--pool`` points per term drawn once per seed, ``--batch-size`` of them per step with their
  indices as ids (RBA keeps a multiplier per point, so its points must come back);
* ``RBA + grad-norm`` (with ``--rba-gradnorm``);
* ``fixed (RBA's points)`` (only by name in ``--methods``): fixed weights on RBA's pool and
  batches, a control for the pool itself.

The error is the relative L2 error on the reference grid (201 x 512, ETDRK4). Single-threaded:
``OMP_NUM_THREADS=1 python examples/allen_cahn_validation.py --seeds 0 1 2 --rba-gradnorm``
(the README's table: ``--methods fixed grad-norm "grad-norm + causal" RBA "RBA + grad-norm" "fixed (RBA's points)"``).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from lossbalance import RBA, Causal, GradNormRatio, LossBalancer, Residual
from lossbalance.problems import AllenCahn1D
from lossbalance.problems.allen_cahn import JaxpiMLP


def methods(update_every: int, rba_gradnorm: bool) -> dict[str, dict]:
    table = {
        "fixed": {"strategy": lambda: "static"},
        "grad-norm": {"strategy": GradNormRatio.jaxpi},
        "grad-norm + causal": {"strategy": GradNormRatio.jaxpi, "causal": True},
        "RBA": {"strategy": lambda: "static", "rba": True, "pool": True},
        "fixed (RBA's points)": {"strategy": lambda: "static", "pool": True},  # a control, with --methods
    }
    if rba_gradnorm:
        table["RBA + grad-norm"] = {"strategy": GradNormRatio.jaxpi, "rba": True, "pool": True}
    for options in table.values():
        options["update_every"] = update_every
    return table


def run(method: dict, *, seed: int, steps: int, width: int, depth: int, fourier_scale: float, fourier_dim: int,
        batch_size: int, pool: int, lr: float, decay: float, decay_every: int, chunks: int, eps: float,
        device: str = "cpu") -> dict:
    """Train one network; returns its relative L2 error, final weights and seconds per step."""
    problem = AllenCahn1D(device=device)
    generator = torch.Generator().manual_seed(seed)
    model = JaxpiMLP(width, depth, fourier_scale=fourier_scale, fourier_dim=fourier_dim, generator=generator,
                     device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: decay ** (k / decay_every))
    rba = method.get("rba", False)
    pointwise = {}
    if method.get("causal"):
        pointwise["pde"] = Causal(chunks=chunks, eps=eps)
    if rba:
        pointwise = {"pde": RBA(), "ic": RBA()}
    balancer = LossBalancer(optimizer, method["strategy"](), update_every=method["update_every"],
                            pointwise=pointwise or None)
    points = problem.sample(pool, generator) if method.get("pool") else None
    problem.reference()  # solved before the clock starts
    tick = time.perf_counter()
    for _ in range(steps):
        if points is None:
            batch = problem.sample(batch_size, generator)
        else:  # batch_size of the pool's points per term, their indices as ids
            ids = torch.randperm(pool, generator=generator)[:batch_size].to(device) if pool > batch_size \
                else torch.arange(pool, device=device)
            batch = {name: x[ids] for name, x in points.items()}
        terms = problem.losses(model, batch)
        if rba:
            terms = {name: Residual(term.values, ids=ids, kind="residual") for name, term in terms.items()}
        balancer.step(terms)
        schedule.step()
    seconds = (time.perf_counter() - tick) / max(steps, 1)
    return {"error": float(problem.relative_l2(model)), "weights": balancer.weights, "seconds": seconds}


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--fourier-scale", type=float, default=2.0)
    parser.add_argument("--fourier-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256, help="points per term and step")
    parser.add_argument("--pool", type=int, default=2048,
                        help="RBA: a fixed set of this many points per term, --batch-size of them per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--decay", type=float, default=0.9)
    parser.add_argument("--decay-every", type=int, default=500, help="steps per factor --decay (jaxpi: 5000)")
    parser.add_argument("--update-every", type=int, default=100, help="grad-norm update interval (jaxpi: 1000)")
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--eps", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods, by name")
    parser.add_argument("--rba-gradnorm", action="store_true", help="also RBA + grad-norm")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = methods(args.update_every, args.rba_gradnorm)
    if args.methods:
        table = methods(args.update_every, True)
        table = {name: table[name] for name in args.methods}
    else:
        table.pop("fixed (RBA's points)")
    options = {k: getattr(args, k) for k in ("steps", "width", "depth", "fourier_scale", "fourier_dim", "batch_size", "pool",
                                             "lr", "decay", "decay_every", "chunks", "eps")}
    print(f"Allen-Cahn, JaxpiMLP {args.depth}x{args.width} (modified MLP, periodic embedding, Fourier features "
          f"scale {args.fourier_scale:g} dim {args.fourier_dim}), Adam lr {args.lr:g} x{args.decay:g} every "
          f"{args.decay_every} steps, {args.steps} steps, {args.batch_size} points per term and step, grad-norm "
          f"every {args.update_every} steps, causal eps {args.eps:g} with {args.chunks} chunks, seeds {args.seeds}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    results: dict[str, list[dict]] = {}
    for name, method in table.items():
        results[name] = []
        for seed in args.seeds:
            r = run(method, seed=seed, **options)
            results[name].append(r)
            print(f"  {name:20s} seed {seed}: rel. L2 {r['error']:.3e}  weights "
                  f"{ {k: round(v, 3) for k, v in r['weights'].items()} }  {r['seconds'] * 1e3:.1f} ms/step",
                  flush=True)
    base = statistics.mean(r["seconds"] for r in results["fixed"]) if "fixed" in results else None
    print(f"{'method':20s} | {'rel. L2 (mean +- std)':24s} | {'per seed':30s} | time/step vs fixed")
    for name, runs in results.items():
        errors = [r["error"] for r in runs]
        std = statistics.stdev(errors) if len(errors) > 1 else 0.0
        per_step = statistics.mean(r["seconds"] for r in runs)
        ratio = f"{per_step / base:.2f}x" if base else "-"
        print(f"{name:20s} | {statistics.mean(errors):.3e} +- {std:.2e}    | "
              f"{' '.join(f'{e:.3e}' for e in errors):30s} | {ratio} ({per_step * 1e3:.1f} ms)")
    assert all(math.isfinite(r["error"]) for runs in results.values() for r in runs)
    return results


if __name__ == "__main__":
    main()
