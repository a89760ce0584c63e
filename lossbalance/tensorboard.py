"""TensorBoard logging of the weights, the loss terms and the conflict diagnostics."""
from __future__ import annotations

from typing import Any

from .logging import MetricsLogger, scalar_writer

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(MetricsLogger):
    """A step hook that writes ``weight/<term>``, ``loss/<term>`` and, on steps with per-term
    gradients, ``grad_norm/<term>`` and ``conflict_fraction`` as scalars every ``every`` steps.

    ``writer``: any object with ``add_scalar(tag, value, step)`` (a
    ``torch.utils.tensorboard.SummaryWriter``); without one, a ``SummaryWriter(log_dir)`` is made,
    which needs the ``tensorboard`` package (``pip install 'lossbalance[tensorboard]'``).
    It is a :class:`~lossbalance.logging.MetricsLogger` whose ``log_fn`` writes the scalars
    (tags ``<prefix>/weight/<term>``, ...).

    >>> balancer.register_step_hook(TensorBoardLogger(log_dir="runs/pinn", every=10))  # doctest: +SKIP
    """

    def __init__(self, writer: Any = None, *, log_dir: str | None = None, every: int = 1, prefix: str = "lossbalance"):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
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
        super().__init__(scalar_writer(writer), every=every, prefix=prefix)

    def __repr__(self) -> str:
        return f"TensorBoardLogger({type(self.writer).__name__}, every={self.every}, prefix={self.prefix!r})"
