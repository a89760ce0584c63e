"""A PyTorch Lightning ``LightningModule`` that balances its loss terms with ``LossBalancer``.

PyTorch Lightning is optional (``pip install lightning``; the older ``pytorch_lightning`` package
works too). Without it this script prints how to install it and returns.

The problem is the 1-D Poisson PINN ``u'' = -pi^2 sin(pi x)`` on ``[0, 1]``, ``u(0) = u(1) = 0``
(solution ``sin(pi x)``), with two terms: ``"pde"`` (the residual on a batch of collocation
points from the training ``DataLoader``, second derivative by ``autograd.grad(...,
create_graph=True)``) and ``"bc"`` (both boundary values), balanced by learning-rate annealing
with the residual as the reference, updated every 10 steps.

How the balancer fits into Lightning (``lossbalance.integrations.lightning``):

* **Automatic optimisation**: ``training_step`` returns ``self.balancer.loss(losses)``, a scalar
  whose value is the weighted total and whose ``.backward()`` (Lightning's) accumulates exactly
  the balanced gradient. Lightning then does everything as usual: ``optimizer.step()``,
  ``global_step``, gradient clipping (``--clip``), gradient accumulation (``--accumulate``: each
  micro-batch is one balancer step), the LR scheduler, ``bf16-mixed`` precision.
* **The balancer is built from the parameters**, without an optimizer (Lightning steps its
  own), in ``configure_optimizers``: the Trainer has moved the module to its device by then.
* **``LossBalancerCallback``** (``pl_module.balancer``) logs ``weight/<term>`` and
  ``loss/<term>`` (unweighted) through ``self.log`` after every batch, so ``--log-dir DIR``
  writes them to ``DIR/lightning_module/version_N/metrics.csv`` (``CSVLogger``, every 10 steps),
  and stores ``balancer.state_dict()`` in Lightning's checkpoints under ``"lossbalance"``:
  ``trainer.fit(..., ckpt_path=...)`` continues with the saved weights, strategy state and
  step counter (the callback loads them into the balancer that ``configure_optimizers`` builds).

Precision: the default (32-bit) and ``--precision bf16-mixed`` (autocast, no scaler) work. Under
``"16-mixed"`` Lightning scales the returned loss (hence the gradient) and unscales it before the
step, but the balancer's per-term gradients are taken unscaled in float16: prefer bf16.

    pip install lightning
    python examples/lightning_module.py --steps 2000 --log-dir runs/
"""
from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from types import ModuleType
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.problems import MLP

INSTALL_HINT = "pip install lightning"


def import_lightning() -> ModuleType | None:
    """``lightning.pytorch`` (or the older ``pytorch_lightning``), or ``None`` when neither is installed."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            return None
    return pl


def poisson_losses(net: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``"pde"``: mean (u'' + pi^2 sin(pi x))^2 on ``x``; ``"bc"``: u(0)^2 + u(1)^2."""
    x = x.detach().requires_grad_(True)
    u = net(x)
    (u_x,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (u_xx,) = torch.autograd.grad(u_x.sum(), x, create_graph=True)
    ends = torch.tensor([[0.0], [1.0]], dtype=x.dtype, device=x.device)
    return {
        "pde": (u_xx + math.pi**2 * torch.sin(math.pi * x)).pow(2).mean(),
        "bc": net(ends).pow(2).sum(),
    }


def make_module_class(pl: ModuleType) -> type:
    """The ``LightningModule`` subclass (built on demand: Lightning is imported only when present)."""

    class PoissonPINN(pl.LightningModule):
        def __init__(self, hidden: Sequence[int] = (32, 32), lr: float = 1e-3, update_every: int = 10, seed: int = 0):
            super().__init__()
            self.net = MLP([1, *hidden, 1], generator=torch.Generator().manual_seed(seed))
            self.lr = lr
            self.update_every = update_every
            self.balancer: LossBalancer | None = None
            self.start_weights: dict[str, float] = {}

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # the parameters are on their device now; no optimizer in the balancer: Lightning steps its own
            self.balancer = LossBalancer(self.parameters(), LRAnnealing(reference="pde"),
                                         update_every=self.update_every, terms=["pde", "bc"])
            return torch.optim.Adam(self.parameters(), lr=self.lr)

        def on_train_start(self) -> None:
            assert self.balancer is not None  # the callback's on_train_start, first, restored a checkpoint's state
            self.start_weights = self.balancer.weights  # what this fit starts from

        def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
            assert self.balancer is not None
            (x,) = batch
            return self.balancer.loss(poisson_losses(self.net, x))  # Lightning calls .backward() on it

    return PoissonPINN


def evaluate(net: nn.Module, x_eval: Tensor) -> dict[str, float]:
    """Unweighted terms on ``x_eval`` and the relative L2 error against ``sin(pi x)``."""
    terms = {k: v.item() for k, v in poisson_losses(net, x_eval).items()}
    with torch.no_grad():
        grid = torch.linspace(0.0, 1.0, 201, dtype=x_eval.dtype, device=x_eval.device)[:, None]
        exact = torch.sin(math.pi * grid)
        terms["error"] = float(torch.linalg.vector_norm(net(grid) - exact) / torch.linalg.vector_norm(exact))
    return terms


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (Trainer max_steps, default 2000)")
    parser.add_argument("--points", type=int, default=1024, help="collocation points in the dataset (default 1024)")
    parser.add_argument("--batch-size", type=int, default=64, help="collocation points per step (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--update-every", type=int, default=10, help="LRA update interval (default 10)")
    parser.add_argument("--clip", type=float, default=None, help="Trainer gradient_clip_val (default: none)")
    parser.add_argument("--accumulate", type=int, default=1, help="Trainer accumulate_grad_batches (default 1)")
    parser.add_argument("--precision", default=None, help="Trainer precision, e.g. bf16-mixed (default: Lightning's, 32)")
    parser.add_argument("--log-dir", default=None, help="write the logged weights and terms with a CSVLogger here")
    parser.add_argument("--ckpt-path", default=None, help="resume from this Lightning checkpoint")
    parser.add_argument("--save", default=None, help="save a checkpoint here after training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a network this small more threads only add overhead)")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.points, args.update_every, args.accumulate) < 1:
        parser.error("need --steps, --points, --batch-size, --update-every and --accumulate >= 1")

    pl = import_lightning()
    if pl is None:
        message = f"PyTorch Lightning is not installed; this example needs it: {INSTALL_HINT}"
        print(message)
        return {"skipped": True, "reason": message}

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    quiet = logging.getLogger(pl.__name__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available: ..." banner
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's own, with newer torch
            warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
            return run(pl, args)
    finally:
        quiet.setLevel(level)
        torch.set_num_threads(threads)


def run(pl: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed + 1)
    points = torch.rand(args.points, 1, generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(points), batch_size=args.batch_size,
                                         shuffle=True, generator=generator)
    x_eval = torch.linspace(0.0, 1.0, 257)[1:-1, None]

    module = make_module_class(pl)(lr=args.lr, update_every=args.update_every, seed=args.seed)
    if args.ckpt_path is not None:  # only for the "start" row: fit restores everything itself
        module.load_state_dict(torch.load(args.ckpt_path, map_location="cpu", weights_only=False)["state_dict"])
    before = evaluate(module.net, x_eval)
    logger: Any = False
    if args.log_dir is not None:
        logger = pl.loggers.CSVLogger(args.log_dir, name="lightning_module")
    from lossbalance.integrations.lightning import LossBalancerCallback

    options = {} if args.precision is None else {"precision": args.precision}
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=10,
                         callbacks=[LossBalancerCallback()], gradient_clip_val=args.clip,
                         accumulate_grad_batches=args.accumulate,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **options)
    start = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=args.ckpt_path)
    wall_time = time.perf_counter() - start
    if args.save is not None:
        trainer.save_checkpoint(args.save)
    after = evaluate(module.net, x_eval)
    assert module.balancer is not None
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}

    version = getattr(pl, "__version__", "?")
    print(f"Lightning {version}: 1-D Poisson PINN, {trainer.global_step} steps (automatic optimisation), "
          f"LRAnnealing(reference='pde') every {args.update_every}")
    print(f"{'':6} | {'pde':>9} | {'bc':>9} | {'rel. L2 error':>13} | weights")
    start_weights = ", ".join(f"{k}={v:.4g}" for k, v in module.start_weights.items())
    print(f"{'start':6} | {before['pde']:>9.3g} | {before['bc']:>9.3g} | {before['error']:>13.3g} | {start_weights}")
    weights = ", ".join(f"{k}={v:.4g}" for k, v in module.balancer.weights.items())
    print(f"{'end':6} | {after['pde']:>9.3g} | {after['bc']:>9.3g} | {after['error']:>13.3g} | {weights}"
          f"  ({wall_time:.1f} s)")
    return {
        "skipped": False, "before": before, "after": after, "weights": module.balancer.weights,
        "start_weights": module.start_weights, "logged": logged,
        "global_step": trainer.global_step, "balancer_steps": module.balancer.step_count, "wall_time": wall_time,
        "module": module, "trainer": trainer, "lightning_version": version,
    }


if __name__ == "__main__":
    main()
