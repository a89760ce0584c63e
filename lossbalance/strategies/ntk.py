"""NTK weighting (Wang, Yu & Perdikaris 2022, "When and why PINNs fail to train: a neural tangent kernel perspective")."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..ntk import TraceOptions
from .base import StepRecord, Strategy, register

__all__ = ["NTKWeighting"]


@register
class NTKWeighting(Strategy):
    r"""NTK weighting: weight every term by the inverse of its share of the NTK's trace.

    S. Wang, X. Yu, P. Perdikaris, "When and why PINNs fail to train: a neural tangent kernel
    perspective", J. Comput. Phys. 449, 110768 (2022), arXiv 2007.14527, Algorithm 1 (Section 6);
    with ``K_i = J_i J_i^T`` the NTK block of term i (``J_i = d r_i / d theta`` over its points)::

        s_i         = tr K_i = sum_p ||grad_theta r_i(x_p)||^2           (points="sum", the paper)
                    = tr K_i / N_i                                      (points="mean", jaxpi)
        lambda_hat_i = S / (s_i + eps * mean_j s_j),   S = sum_j s_j (normalize="sum", the paper)
                                                         S = mean_j s_j (normalize="mean", jaxpi)
        lambda_i    <- (1 - alpha) * lambda_i + alpha * lambda_hat_i

    The traces are computed by the balancer (:mod:`lossbalance.ntk`, ``trace="exact"`` per-point
    gradients in chunks of ``chunk`` points, or ``trace="hutchinson"``: an unbiased estimate from
    ``probes`` Rademacher probes, its standard error in ``stats``) on update steps, from the
    residuals of every term: each term must be a :class:`~lossbalance.Residual` with
    ``kind="residual"`` (a scalar term raises, naming it: its loss value does not define the
    trace; a Residual of per-point losses too). A term with :class:`~lossbalance.Causal` weights
    (``pointwise=``) has its diagonal weighted by the step's causal weights, per chunk, as jaxpi
    does (:mod:`lossbalance.ntk`). ``stats[term]`` holds ``ntk_trace`` (``s_i``) and
    ``ntk_trace_se`` on update steps.

    Normalisation: ``points="sum"`` is the paper's trace (its notebook sums the diagonal); with
    ``N_b != N_r`` points the weights then scale with the point counts (the trap of PINNsNTK
    issue #6); ``points="mean"`` (jaxpi) divides each trace by its term's point count.

    Presets: :meth:`ntk2022` (the paper: sum, sum, no EMA; the paper updates every 100 steps:
    ``LossBalancer(..., update_every=100)``, config preset ``ntk2022``) and :meth:`jaxpi` (jaxpi
    ``weighting.scheme = "ntk"``: mean, mean, EMA with ``momentum = 0.9`` (``alpha = 0.1``),
    ``eps = 1e-5`` as in jaxpi's ``pirate`` branch (``jaxpi/models.py``, ``compute_weights``; jaxpi 1.0
    on ``main`` has no ``eps``), ``update_every=1000``, config preset ``jaxpi_ntk``). jaxpi's
    Allen-Cahn pairs it with causal weights: ``pointwise={"pde": Causal(chunks=32, eps=1.0)}``.
    The EMA starts from the balancer's initial weights (1 by default, as jaxpi's ``init_weights``).
    Timing differs from jaxpi as for :class:`~lossbalance.strategies.GradNormRatio`: jaxpi's ``train.py`` takes the step and
    then (``step % update_every_steps == 0``) updates the weights at the new parameters, acting from
    the next step; here the weights come from the current step's residuals and act on that step.

    What peers call NTK weighting and is not this trace: PhysicsNeMo-Sym's "NTK" aggregator
    weights by ``||grad_theta sqrt(|L_i|)||`` (the gradient norm of the root of the term's loss
    value, that is ``||grad L_i|| / (2 sqrt(L_i))``); PINA's ``NeuralTangentKernelWeighting``
    by ``||grad_theta L_i||`` (the loss gradient's norm, which up-weights the term with the larger
    gradient); PINNacle's by ``1^T K_i 1 = ||grad_theta sum_p r_p||^2`` (the kernel's sum, not its
    trace: the cross terms between points count).

    Edge cases: a term whose statistic is zero or not finite keeps its weight on that update
    (e.g. a term no parameter of its scope reaches); ``S`` still counts it. Scaling every residual
    by the same factor leaves the weights unchanged.
    """

    name = "ntk"
    needs_gradients = False
    needs_traces: ClassVar[bool] = True

    def __init__(
        self,
        *,
        points: Literal["sum", "mean"] = "sum",
        normalize: Literal["sum", "mean"] = "sum",
        alpha: float = 1.0,
        eps: float = 0.0,
        trace: Literal["exact", "hutchinson"] = "exact",
        chunk: int = 128,
        probes: int = 16,
    ):
        _check_choice("points", points, ("sum", "mean"))
        _check_choice("normalize", normalize, ("sum", "mean"))
        _check_choice("trace", trace, ("exact", "hutchinson"))
        _check_numbers(alpha, eps, chunk, probes)
        self.normalize, self.alpha, self.eps = normalize, float(alpha), float(eps)
        self.trace_options = TraceOptions(points, trace, chunk, probes)

    @classmethod
    def ntk2022(cls, **options: Any) -> NTKWeighting:
        """The paper: ``lambda_i = sum_j tr K_j / tr K_i``, no EMA (pair with ``update_every=100``)."""
        return cls(**{"points": "sum", "normalize": "sum", "alpha": 1.0, "eps": 0.0, **options})

    @classmethod
    def jaxpi(cls, **options: Any) -> NTKWeighting:
        """jaxpi: ``mean_j m_j / (m_i + 1e-5 mean_j m_j)`` of the diagonals' means ``m``, EMA 0.1
        (pair with ``update_every=1000``)."""
        return cls(**{"points": "mean", "normalize": "mean", "alpha": 0.1, "eps": 1e-5, **options})

    def options(self) -> dict[str, Any]:
        o = self.trace_options
        return {"points": o.points, "normalize": self.normalize, "alpha": self.alpha, "eps": self.eps,
                "trace": o.trace, "chunk": o.chunk, "probes": o.probes}

    def update(self, record: StepRecord) -> Tensor:
        if record.traces is None:
            raise RuntimeError("NTKWeighting needs the NTK traces (record.traces is None)")
        weights = record.weights
        s = record.traces.to(torch.float64)
        mean = s.sum() / s.numel()
        total = mean if self.normalize == "mean" else s.sum()
        target = total / (s + self.eps * mean if self.eps else s)
        moved = ((1 - self.alpha) * weights.to(torch.float64) + self.alpha * target)
        usable = (s > 0) & torch.isfinite(s) & torch.isfinite(moved) & (moved > 0)
        return torch.where(usable, moved.to(weights.dtype), weights)


def _check_numbers(alpha: Any, eps: Any, chunk: Any, probes: Any) -> None:
    def real(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    checks = {
        "alpha": (alpha, real(alpha) and 0.0 < alpha <= 1.0, "(the weight of the new value in the EMA) is in (0, 1]"),
        "eps": (eps, real(eps) and 0.0 <= eps < float("inf"), "is finite and >= 0"),
        "chunk": (chunk, count(chunk), "is a positive integer"),
        "probes": (probes, count(probes), "is a positive integer"),
    }
    for label, (value, ok, what) in checks.items():
        if not ok:
            raise ValueError(f"NTKWeighting({label}=...) {what}, got {value!r}")


def _check_choice(label: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"NTKWeighting({label}=...) is one of {', '.join(map(repr, choices))}, got {value!r}")
