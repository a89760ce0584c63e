"""TensorBoard logging of the weights, the loss terms and the conflict diagnostics."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .balancer import LossBalancer

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """A step hook that writes ``weight/<term>``, ``loss/<term>`` and, on steps with per-term
    gradients, ``grad_norm/<term>`` and ``conflict_fraction`` as scalars every ``every`` steps.

    ``writer``: any object with ``add_scalar(tag, value, step)`` (a
    ``torch.utils.tensorboard.SummaryWriter``); without one, a ``SummaryWriter(log_dir)`` is made,
    which needs the ``tensorboard`` package (``pip install 'lossbalance[tensorboard]'``).

    >>> balancer.register_step_hook(TensorBoardLogger(log_dir="runs/pinn", every=10))  # doctest: +SKIP
    """

    def __init__(self, writer: Any = None, *, log_dir: str | None = None, every: int = 1, prefix: str = "lossbalance"):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # tensorboard is an optional extra
                raise ImportError(
                    "TensorBoardLogger needs the tensorboard package: pip install 'lossbalance[tensorboard]'"
                ) from error
            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer
        self.every = every
        self.prefix = prefix

    def __call__(self, balancer: "LossBalancer") -> None:
        step = balancer.step_count - 1
        if step % self.every:
            return
        for term, figures in balancer.stats.items():
            self.writer.add_scalar(f"{self.prefix}/weight/{term}", figures["weight"], step)
            self.writer.add_scalar(f"{self.prefix}/loss/{term}", figures["loss"], step)
        diagnostics = balancer.diagnostics
        if diagnostics is not None and diagnostics["step"] == step:
            for term, norm in diagnostics["grad_norm"].items():
                self.writer.add_scalar(f"{self.prefix}/grad_norm/{term}", norm, step)
            self.writer.add_scalar(f"{self.prefix}/conflict_fraction", diagnostics["conflict_fraction"], step)

    def __repr__(self) -> str:
        return f"TensorBoardLogger({type(self.writer).__name__}, every={self.every}, prefix={self.prefix!r})"
