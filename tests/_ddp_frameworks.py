"""Two-process DDP runs of the framework integrations, started by their tests as a script.

``python tests/_ddp_frameworks.py CASE OUT_DIR``: CASE is ``lightning`` or ``pina``. Lightning's
``strategy="ddp"`` starts rank 1 by running this same command again (its subprocess launcher;
from inside pytest it would start a second pytest session, hence a script). Each rank saves
what the test compares to ``OUT_DIR/rank<r>.pt``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

DDP = dict(strategy="ddp", accelerator="cpu", devices=2)
LIGHTNING_POINTS, LIGHTNING_BATCH = 128, 32  # per rank: 2 batches of 32, the union of a step: 64
# with gradient accumulation: DDP's no_sync micro-batches
LIGHTNING_OPTIONS = dict(max_epochs=2, gradient_clip_val=1.0, accumulate_grad_batches=2)


def run_two_ranks(case: str, timeout: float = 240) -> list[dict]:
    """This script for ``case`` (2 CPU processes, gloo); what each rank saved. A hang fails the
    calling test at ``timeout`` instead of blocking the suite."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, os.path.abspath(__file__), case, out]
        done = subprocess.run(command, env=env, timeout=timeout, check=False, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]


def lightning_run(out_dir: str) -> None:
    from test_integration_lightning import PINN, loader, trainer
    from torch.utils.data import DataLoader, DistributedSampler

    from lossbalance.integrations.lightning import LossBalancerCallback

    class Halves(PINN):
        def train_dataloader(self):
            """Rank r's points r, r+2, ... in order: a step's union is the next 64 points. (Lightning's
            own DistributedSampler always shuffles training data, even from a shuffle=False loader.)"""
            data = loader(LIGHTNING_POINTS).dataset
            sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
            return DataLoader(data, batch_size=LIGHTNING_BATCH, sampler=sampler)

    module = Halves(build_late=True)  # built in configure_optimizers, once the process group exists
    fit = trainer(callbacks=[LossBalancerCallback()], **LIGHTNING_OPTIONS, **DDP)
    fit.fit(module)
    save(out_dir, fit.global_rank, module.balancer, module, fit.global_step)


def pina_run(out_dir: str) -> None:
    from test_integration_pina import solver_and_trainer

    # a batch size: the whole set as one batch fails under DDP in PINA 0.3 (README, PINA)
    solver, weighting, trainer = solver_and_trainer(3, batch_size=16, **DDP)
    trainer.train()
    save(out_dir, trainer.global_rank, weighting.balancer, solver, trainer.global_step,
         pina_weights=dict(solver.weighting.last_saved_weights()))


def save(out_dir: str, rank: int, balancer, module, global_step: int, **extra) -> None:
    torch.save({"weights": balancer.weights, "step_count": balancer.step_count, "global_step": global_step,
                "state": balancer.state_dict(), "params": [p.detach().clone() for p in module.parameters()],
                "distributed": balancer.distributed, **extra}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    case, out = sys.argv[1], sys.argv[2]
    {"lightning": lightning_run, "pina": pina_run}[case](out)
