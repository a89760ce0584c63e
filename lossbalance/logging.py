"""Experiment trackers (W&B, MLflow, TensorBoard, ...): a step hook that hands the balancer's
figures to any ``log_fn(metrics, step)``.

>>> import wandb                                                              # doctest: +SKIP
>>> balancer.register_step_hook(MetricsLogger(lambda m, s: wandb.log({**m, "lb_step": s}), every=10))
>>> import mlflow                                                             # doctest: +SKIP
>>> balancer.register_step_hook(MetricsLogger(mlflow.log_metrics, every=10))  # log_metrics(metrics, step)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    from .balancer import LossBalancer

__all__ = ["MetricsLogger", "balancer_metrics"]

LogFn = Callable[[dict[str, float], int], object]


def balancer_metrics(balancer: "LossBalancer", step: int | None = None) -> dict[str, float]:
    """The last step's figures as one flat dict of Python floats.

    ``weight/<term>``, ``loss/<term>`` (the unweighted term) for every term of the last step, the
    term's other figures in ``stats`` as ``<figure>/<term>`` (the gradient statistics of a step
    that computed them, a pointwise weighting's ``causal_min``, ``rba_min``/``_mean``/``_max``, ...,
    the NTK traces) and, when the last step computed the per-term gradients (``step`` is that
    step's index, ``step_count - 1`` by default), ``grad_norm/<term>`` and ``conflict_fraction``.
    """
    step = balancer.step_count - 1 if step is None else step
    metrics: dict[str, float] = {}
    for term, figures in balancer.stats.items():
        for key, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{key}/{term}"] = float(value)
    diagnostics = balancer.diagnostics
    if diagnostics is not None and diagnostics["step"] == step:
        for term, norm in diagnostics["grad_norm"].items():
            metrics[f"grad_norm/{term}"] = float(norm)
        metrics["conflict_fraction"] = float(diagnostics["conflict_fraction"])
    return metrics


class MetricsLogger:
    """A step hook calling ``log_fn(metrics, step)`` on steps 0, ``every``, 2 ``every``, ...

    ``metrics`` is one flat dict of Python floats (see :func:`balancer_metrics`), keys prefixed
    by ``prefix + "/"`` when ``prefix`` is given; ``step`` is the balancer's step index,
    ``step_count - 1`` (0 for the first step). Register it with
    ``balancer.register_step_hook(MetricsLogger(log_fn, every=10))``.

    * MLflow: ``MetricsLogger(mlflow.log_metrics)`` (``log_metrics(metrics, step=None)``).
    * Weights & Biases: ``wandb.log(data, step=...)`` only accepts a step that never decreases
      across *all* ``wandb.log`` calls of the run, so do not pass the balancer's step as W&B's
      step when something else logs too (a framework logging per batch, micro-batches: several
      balancer steps per optimizer step). Log it as a key of its own and plot against it:
      ``MetricsLogger(lambda m, s: run.log({**m, "lossbalance/step": s}))`` with
      ``run.define_metric("lossbalance/*", step_metric="lossbalance/step")``; or write TensorBoard
      scalars and let ``wandb.init(sync_tensorboard=True)`` mirror them.
    """

    def __init__(self, log_fn: LogFn, *, every: int = 1, prefix: str | None = None):
        if not callable(log_fn):
            raise TypeError(f"log_fn must be callable as log_fn(metrics, step), got {type(log_fn).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.log_fn = log_fn
        self.every = every
        self.prefix = prefix

    def metrics(self, balancer: "LossBalancer", step: int) -> dict[str, float]:
        figures = balancer_metrics(balancer, step)
        if self.prefix:
            return {f"{self.prefix}/{key}": value for key, value in figures.items()}
        return figures

    def __call__(self, balancer: "LossBalancer") -> None:
        step = balancer.step_count - 1
        if step < 0 or step % self.every:
            return
        self.log_fn(self.metrics(balancer, step), step)

    def __repr__(self) -> str:
        name = getattr(self.log_fn, "__qualname__", type(self.log_fn).__name__)
        return f"MetricsLogger({name}, every={self.every}, prefix={self.prefix!r})"


def scalar_writer(writer) -> LogFn:
    """``log_fn`` writing each metric with ``writer.add_scalar(tag, value, step)``."""

    def log(metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)

    return log
