"""Learning-rate annealing (Wang, Teng & Perdikaris 2021)."""
from __future__ import annotations

from typing import Any, Collection, Literal, Sequence

import torch
from torch import Tensor

from ..validation import warn_user
from .base import StepRecord, Strategy, register

__all__ = ["LRAnnealing"]


@register
class LRAnnealing(Strategy):
    r"""Learning-rate annealing: scale every term's gradient to the reference term's.

    Wang, Teng & Perdikaris, "Understanding and mitigating gradient flow pathologies in
    physics-informed neural networks", SIAM J. Sci. Comput. 43(5), 2021 (arXiv 2001.04536),
    Algorithm 1; defaults follow the authors' code (PredictiveIntelligenceLab/GradientPathologiesPINNs,
    ``Helmholtz2D_model_tf.py``). For every term i other than the reference r::

        lambda_hat_i = max |grad_W L_r| / mean |grad_W (lambda_i L_i)|
        lambda_i    <- (1 - alpha) * lambda_i + alpha * lambda_hat_i          (alpha = 0.1)

    and the reference keeps its weight. Authors' code, the defaults here: the max runs over the
    weight matrices W (``ndim >= 2``; no biases), the mean is the average of the per-matrix mean
    absolute gradients, and the current ``lambda_i`` sits inside the denominator. The paper's
    Algorithm 1 leaves it out (``weighted_denominator=False``). With it inside, the fixed point is
    ``lambda_i = sqrt(max / mean)``: scaling a term by c scales its balanced gradient by sqrt(c).
    Without it the fixed point is ``max / mean`` and the balanced gradient is scale invariant.

    Options: ``reference`` (default: the first term, with a warning), ``alpha`` (weight of the
    new value in the EMA), ``stat`` (``"max"`` or ``"mean"`` for the numerator),
    ``weighted_denominator``, ``layerwise_mean`` (mean of per-tensor means, or one mean over all
    entries), ``include_bias`` (every parameter tensor, not only matrices), ``over``
    (statistics over each term's scope, or over the parameters all terms share), ``eps`` (added
    to the denominator). The authors update every 10 steps: ``LossBalancer(..., update_every=10)``.

    A term whose gradient is zero (or whose ratio is not finite), or a zero reference gradient,
    leaves that term's weight unchanged on that update. A term whose statistics would run over no
    tensor (e.g. a scope holding only a scalar coefficient with ``include_bias=False``) raises.

    ``LRAnnealing.physicsnemo()`` is NVIDIA PhysicsNeMo-Sym's variant: mean/mean over all
    parameters, unweighted denominator, ``alpha = 0.01``, ``eps = 1e-8``, update every step.
    """

    name = "lra"
    needs_gradients = True

    def __init__(
        self,
        reference: str | None = None,
        *,
        alpha: float = 0.1,
        stat: Literal["max", "mean"] = "max",
        weighted_denominator: bool = True,
        layerwise_mean: bool = True,
        include_bias: bool = False,
        over: Literal["scope", "shared"] = "scope",
        eps: float = 0.0,
    ):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if stat not in ("max", "mean"):
            raise ValueError(f"stat must be 'max' or 'mean', got {stat!r}")
        if over not in ("scope", "shared"):
            raise ValueError(f"over must be 'scope' or 'shared', got {over!r}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.reference = reference
        self.alpha = alpha
        self.stat = stat
        self.weighted_denominator = weighted_denominator
        self.layerwise_mean = layerwise_mean
        self.include_bias = include_bias
        self.over = over
        self.eps = eps
        self._checked_scope: Tensor | None = None

    @classmethod
    def physicsnemo(cls, reference: str | None = None) -> "LRAnnealing":
        """PhysicsNeMo-Sym 2.4 ``LRAnnealing``: mean/mean over all parameters, EMA 0.01."""
        return cls(
            reference, alpha=0.01, stat="mean", weighted_denominator=False,
            layerwise_mean=False, include_bias=True, eps=1e-8,
        )

    def options(self) -> dict[str, Any]:
        return {
            "reference": self.reference, "alpha": self.alpha, "stat": self.stat,
            "weighted_denominator": self.weighted_denominator, "layerwise_mean": self.layerwise_mean,
            "include_bias": self.include_bias, "over": self.over, "eps": self.eps,
        }

    def declare_terms(self, terms: Collection[str], optional: Collection[str]) -> None:
        if self.reference is not None and self.reference in optional:
            raise ValueError(f"LRAnnealing reference term {self.reference!r} is declared optional=, but every update "
                             "divides by its gradient: make another term the reference, or keep it required")

    def validate_terms(self, names: Sequence[str]) -> None:
        if self.reference is None:
            self.reference = names[0]
            warn_user(
                f"LRAnnealing: no reference term given, using the first term {names[0]!r}; "
                f"pass reference={names[0]!r} to make it explicit"
            )
        if self.reference not in names:
            raise KeyError(f"LRAnnealing reference term {self.reference!r} is not among the terms {list(names)}")

    def update(self, record: StepRecord) -> Tensor:
        grads = record.grads
        assert grads is not None
        tensors = "all" if self.include_bias else "matrices"
        if grads.scope is not self._checked_scope:  # the engine reuses one mask per set of scopes
            empty = ~grads.selection(tensors, self.over).any(1)
            if bool(empty.any()):
                bare = [n for n, e in zip(record.names, empty.tolist()) if e]
                raise ValueError(
                    f"LRAnnealing: the statistics of term(s) {bare} run over no parameter tensor "
                    f"(tensors={tensors!r}, over={self.over!r}): their scope holds no weight matrix; "
                    "pass include_bias=True, or over='scope' with a scope that includes one"
                )
            self._checked_scope = grads.scope
        ref = record.names.index(self.reference)
        mean = grads.mean_abs(tensors, layerwise=self.layerwise_mean, over=self.over)
        if self.stat == "max":
            numerator = grads.max_abs_over(tensors, over=self.over)[ref]
        else:
            numerator = mean[ref]
        weights = record.weights
        denominator = mean * weights if self.weighted_denominator else mean
        target = numerator / (denominator + self.eps if self.eps else denominator)
        usable = torch.isfinite(target) & (denominator > 0) & (numerator > 0)
        usable[ref] = False
        return torch.where(usable, torch.lerp(weights.to(target.dtype), target, self.alpha), weights)
