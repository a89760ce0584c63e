"""M-ConFIG: momentum ConFIG, one term's gradient per step (Liu, Chu & Thuerey 2025)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import Tensor

from .base import Combiner, check_grads, register
from .conflict_free import ConFIG

__all__ = ["MomentumConFIG"]


@register
class MomentumConFIG(Combiner):
    r"""Momentum ConFIG (M-ConFIG): one term differentiated per step, ConFIG on per-term momenta.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025 (arXiv 2408.11104), the momentum variant; the default follows the
    authors' ``conflictfree.momentum_operator.PseudoMomentumOperator`` (tum-pbs/ConFIG, read).
    At step ``t`` only term ``k`` is differentiated (round robin: the present term differentiated
    longest ago, never-differentiated terms first, ties in the balancer's order; with a fixed
    set of terms ``k = t mod K``, the authors' ``index = global_step % len(loss_fns)``)::

        m_k   <- beta1 m_k + (1 - beta1) g_k               (only the term differentiated now)
        n_k   <- n_k + 1                                  (its number of gradients so far)
        m^_i  =  m_i / (1 - beta1^n_i)                     (bias-corrected, every term)
        g_c   =  ConFIG(lambda_1 m^_1, ..., lambda_K m^_K)   (see :class:`ConFIG`)
        s     =  s + 1;  mu = g_c (1 - beta1^s)            (s: steps since every term has a momentum)
        r     =  (mu - beta1 mu_prev) / (1 - beta1)        (the gradient that would give momentum mu)
        v     <- beta2 v + (1 - beta2) r^2;  v^ = v / (1 - beta2^s)
        d     =  g_c / (sqrt(v^) + eps)                    (written into .grad)

    ``d`` is Adam-like already, so the documented pairing is plain ``torch.optim.SGD(lr=...)``
    (the authors' advice: "the momentum-based operator, e.g., Adam, is not recommended"); the
    balancer warns once when it wraps an optimizer that divides by a second moment of its own
    (those with ``betas``: Adam, AdamW, NAdam, ...; RMSprop, Adagrad, Adadelta, Adafactor).
    Until every present term has been differentiated once (the first K - 1 steps) the direction
    is zero, as the authors' (an SGD step then moves nothing, weight decay aside). A term that
    joins later is differentiated on the next step and enters ConFIG from then on.

    Cost: one backward of one term per step (``LossBalancer(..., combine="mconfig")``: the
    balancer differentiates only that term, no per-term gradients of the others) plus ConFIG on
    K vectors (``O(K^2 P)``); state ``(K + 2) P``. The step's returned total is still
    ``sum_i lambda_i L_i`` over all terms (their values come from the forward). The weights
    ``lambda_i`` scale the rows, i.e. only the length of ``g_c``, which the second moment then
    mostly normalises away: use it with ``"static"`` or a loss-value strategy; strategies that
    need per-term gradients are refused (they would need every term's gradient each step), and
    so are ``diagnose_every``, a ``GradScaler`` and optimizers that need a closure (L-BFGS).

    Called directly on a ``(K, P)`` matrix (the :class:`Combiner` protocol) it updates every
    row's momentum (rows named ``"0"``, ``"1"``, ...) and returns ``d``: the authors'
    all-gradients use of the operator.

    Options: ``beta1 = 0.9``, ``beta2 = 0.999``, ``eps = 1e-8`` (the authors' defaults);
    ``solver = "gram"``: ConFIG's solve from the ``K x K`` Gramian of the momenta (one matmul and
    a small SVD, accurate to ``kappa^2 * 1e-16``, see :class:`ConFIG`), the largest cost of
    a step after the one backward; ``"qr"``: ConFIG's default QR and SVD (``kappa * 1e-16``).
    Parameters that no present term's gradient reaches (when it was last differentiated) get
    ``.grad = None``, as with every other combiner, not zeros (:meth:`reached`).

    ``state_dict`` holds the momenta, counts, reach, ``mu``, ``v`` and ``s``: saved with the balancer's
    state, a resumed run continues bit for bit.
    """

    name = "mconfig"
    one_term_per_step: ClassVar[bool] = True  # the balancer differentiates one term per step for it

    def __init__(self, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 solver: Literal["qr", "gram"] = "gram"):
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{key} must be in [0, 1), got {value!r}")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be finite and > 0, got {eps!r}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self._config = ConFIG(solver=solver)
        self.solver = solver
        self._clear()

    def _clear(self) -> None:
        self.momenta: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, int] = {}  # the tick at which each term was last differentiated
        self.reach: dict[str, tuple[bool, ...]] = {}  # per term: the parameters its last gradient reached
        self.tick = 0
        self.steps = 0  # s: combined steps since every term had a momentum
        self._mu: Tensor | None = None
        self._v: Tensor | None = None

    def options(self) -> dict[str, Any]:
        return {"beta1": self.beta1, "beta2": self.beta2, "eps": self.eps, "solver": self.solver}

    # ------------------------------------------------------------------ the method
    def pick(self, names: Sequence[str]) -> int:
        """The position in ``names`` of the term to differentiate now."""
        return min(range(len(names)), key=lambda i: (self.last.get(names[i], -1), i))

    def _remember(self, name: str, grad: Tensor) -> None:
        prior = self.momenta.get(name)  # new tensors, never in place: a checkpoint is a shallow copy
        self.momenta[name] = (1 - self.beta1) * grad if prior is None else _like(prior, grad).lerp(grad, 1 - self.beta1)
        self.counts[name] = self.counts.get(name, 0) + 1
        self.last[name] = self.tick
        self.tick += 1

    def _combined(self, names: Sequence[str], weights: Tensor, like: Tensor) -> Tensor:
        held = [i for i, n in enumerate(names) if n in self.momenta]
        if self.steps == 0 and len(held) < len(names):
            return torch.zeros_like(like)
        b1, b2 = self.beta1, self.beta2
        corrections = weights.new_tensor([1 - b1 ** self.counts[names[i]] for i in held])
        scale = (weights if len(held) == len(names) else weights[held]) / corrections
        g = self._config(torch.stack([_like(self.momenta[names[i]], like) for i in held]) * scale[:, None])
        self.steps += 1
        mu = g * (1 - b1**self.steps)
        r = mu if self._mu is None else torch.sub(mu, _like(self._mu, mu), alpha=b1)
        r = r / (1 - b1)
        self._mu = mu
        self._v = (1 - b2) * r.square() if self._v is None else torch.addcmul(b2 * _like(self._v, r), r, r, value=1 - b2)
        return g / ((self._v / (1 - b2**self.steps)).sqrt() + self.eps)

    def step(self, names: Sequence[str], index: int, grad: Tensor, weights: Tensor,
             reached: Sequence[bool] | None = None) -> Tensor:
        """Term ``names[index]`` was differentiated (flat gradient ``grad``); return ``d``.
        ``weights``: the (K,) weights of ``names``; ``reached``: per parameter, whether the term's
        gradient reached it (see :meth:`reached`)."""
        with torch.no_grad():
            self._remember(names[index], grad.detach())
            if reached is not None:
                self.reach[names[index]] = tuple(bool(hit) for hit in reached)
            return self._combined(names, weights.to(grad.dtype), grad)

    def reached(self, names: Sequence[str], count: int) -> list[bool]:
        """Per parameter (``count`` of them), whether the gradient of any term in ``names`` reached
        it when last differentiated: ``d`` is zero elsewhere, and there the balancer leaves
        ``.grad = None``, as for the other combiners (zeros would let weight decay move them). A
        term never differentiated reaches nothing (it has no momentum); one with a momentum but no
        record (a state saved before the record existed) counts as reaching every parameter."""
        hits = [False] * count
        for name in names:
            if name in self.reach:
                hits = [a or b for a, b in zip(hits, self.reach[name])]
            elif name in self.momenta:
                return [True] * count
        return hits

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        check_grads(grads)
        names = [str(i) for i in range(grads.shape[0])]
        with torch.no_grad():
            for name, row in zip(names, grads.unbind()):
                self._remember(name, row)
            return self._combined(names, grads.new_ones(len(names)), grads[0] if len(names) else grads.new_zeros(grads.shape[1]))

    # ------------------------------------------------------------------ state
    def checkpoint(self) -> tuple:
        """A cheap snapshot for undoing a failed step (the tensors are never changed in place)."""
        return (dict(self.momenta), dict(self.counts), dict(self.last), dict(self.reach), self.tick, self.steps, self._mu, self._v)

    def rollback(self, token: tuple) -> None:
        momenta, counts, last, reach, self.tick, self.steps, self._mu, self._v = token
        self.momenta, self.counts, self.last, self.reach = dict(momenta), dict(counts), dict(last), dict(reach)

    def state_dict(self) -> dict[str, Any]:
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return {
            "momenta": {n: m.clone() for n, m in self.momenta.items()}, "counts": dict(self.counts),
            "last": dict(self.last), "reach": {n: list(r) for n, r in self.reach.items()}, "tick": self.tick, "steps": self.steps, "mu": clone(self._mu), "v": clone(self._v),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._clear()
            return
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        self.momenta = {n: m.clone() for n, m in state["momenta"].items()}
        self.counts, self.last = dict(state["counts"]), dict(state["last"])
        self.reach = {n: tuple(r) for n, r in state.get("reach", {}).items()}
        self.tick, self.steps = int(state["tick"]), int(state["steps"])
        self._mu, self._v = clone(state["mu"]), clone(state["v"])


def _like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in the dtype and on the device of ``like`` (the parameters moved: ``model.to(...)``)."""
    return t if t.dtype == like.dtype and t.device == like.device else t.to(like)
