"""A PyTorch Lightning ``LightningModule`` that balances its loss terms with ``LossBalancer``.

PyTorch Lightning is optional (``pip install lightning``; the older ``pytorch_lightning`` package
works too). Without it this script prints how to install it and returns.

The problem is the 1-D Poisson PINN ``u'' = -pi^2 sin(pi x)`` on ``[0, 1]``, ``u(0) = u(1) = 0``
(solution ``sin(pi x)``), with two terms: ``"pde"`` (the residual on a batch of collocation
points from the training ``DataLoader``, second derivative by ``autograd.grad(...,
create_graph=True)``) and ``"bc"`` (both boundary values), balanced by learning-rate annealing
with the residual as the reference, updated every 10 steps.

How the balancer fits into Lightning:

* **Manual optimisation** (``self.automatic_optimization = False``): the balancer computes the
  per-term gradients and writes ``.grad`` itself, so Lightning must not call ``backward``.
* **The balancer wraps the torch optimizer**, ``self.optimizers().optimizer``: Lightning hands
  out a ``LightningOptimizer`` wrapper, whose ``.optimizer`` is the optimizer that
  ``configure_optimizers`` returned. It is built in ``on_train_start``, once the Trainer has put
  the model on its device and created (and, on resume, restored) the optimizer.
* **The step**: ``self.balancer.backward(losses)`` writes the balanced gradient, then
  ``self.optimizers().step()`` steps through Lightning. Calling ``self.balancer.step(losses)``,
  which steps the torch optimizer directly, also trains, but Lightning does not see the step:
  ``trainer.global_step`` stays 0, so ``max_steps`` never ends the run (measured with Lightning
  2.6.6: with ``max_steps=5``, ``max_epochs=3`` and 8 batches per epoch it ran all 24 steps),
  and step-based logging, checkpointing and callbacks do not fire. Going through
  ``LightningOptimizer.step`` counts the step and runs the ``on_before_optimizer_step`` hooks.
* **Logging**: ``self.log_dict`` with every weight (``weight/pde``, ``weight/bc``) and every
  unweighted term (``loss/pde``, ``loss/bc``), on every step. ``--log-dir DIR`` writes them to
  ``DIR/lightning_module/version_N/metrics.csv`` (``CSVLogger``, every 10 steps).
* **Checkpoints**: ``on_save_checkpoint`` stores ``balancer.state_dict()`` (the weights, the
  strategy's state, the step counter and the random generator; it also holds a copy of the
  optimizer's state) under ``"lossbalance"``. ``on_load_checkpoint`` keeps it until
  ``on_train_start`` builds the balancer and loads it, so ``trainer.fit(..., ckpt_path=...)``
  continues with the saved weights.

Precision: the balancer runs its own backward passes, which Lightning's ``"16-mixed"`` plugin
never scales, yet its ``GradScaler`` unscales (divides) the gradients when the optimizer steps:
do not combine ``"16-mixed"`` with this pattern. The default (32-bit) and ``--precision
bf16-mixed`` (autocast, no scaler) work; both were run on CPU with Lightning 2.6.6.

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
            self.automatic_optimization = False  # the balancer does the backward passes
            self.net = MLP([1, *hidden, 1], generator=torch.Generator().manual_seed(seed))
            self.lr = lr
            self.update_every = update_every
            self.balancer: LossBalancer | None = None
            self._balancer_state: dict[str, Any] | None = None  # from a checkpoint, until on_train_start
            self.start_weights: dict[str, float] = {}

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.lr)

        def on_train_start(self) -> None:
            # self.optimizers() is a LightningOptimizer; .optimizer is the torch optimizer inside it
            self.balancer = LossBalancer(self.optimizers().optimizer, LRAnnealing(reference="pde"),
                                         update_every=self.update_every, terms=["pde", "bc"])
            if self._balancer_state is not None:
                self.balancer.load_state_dict(self._balancer_state)
                self._balancer_state = None
            self.start_weights = self.balancer.weights  # what this fit starts from (restored on resume)

        def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
            assert self.balancer is not None
            (x,) = batch
            losses = poisson_losses(self.net, x)
            total = self.balancer.backward(losses)  # balanced gradient in .grad (no Lightning backward)
            self.optimizers().step()  # through Lightning: counts global_step, runs its hooks
            self.log_dict({f"weight/{name}": weight for name, weight in self.balancer.weights.items()})
            self.log_dict({f"loss/{name}": value.detach() for name, value in losses.items()})
            return total

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            if self.balancer is not None:
                checkpoint["lossbalance"] = self.balancer.state_dict()

        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            self._balancer_state = checkpoint.get("lossbalance")

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
    parser.add_argument("--precision", default=None, help="Trainer precision, e.g. bf16-mixed (default: Lightning's, 32)")
    parser.add_argument("--log-dir", default=None, help="write the logged weights and terms with a CSVLogger here")
    parser.add_argument("--ckpt-path", default=None, help="resume from this Lightning checkpoint")
    parser.add_argument("--save", default=None, help="save a checkpoint here after training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a network this small more threads only add overhead)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.points < 1 or args.update_every < 1:
        parser.error("need --steps, --points, --batch-size and --update-every >= 1")

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
    options = {} if args.precision is None else {"precision": args.precision}
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=10,
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
    print(f"Lightning {version}: 1-D Poisson PINN, {trainer.global_step} steps (manual optimisation), "
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
