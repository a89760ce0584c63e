r"""How the per-term gradients become one update direction.

A *combiner* takes the ``(K, P)`` matrix whose rows are the **weighted** per-term gradients
``lambda_i g_i`` (flattened over the balanced parameters) and returns one ``(P,)`` direction,
which the balancer writes into ``.grad``:

- :class:`WeightedSum` (``"sum"``, the default): ``sum_i lambda_i g_i``, what one backward of
  the weighted total gives;
- :class:`PCGrad` (``"pcgrad"``): projecting conflicting gradients (Yu et al. 2020), summed;
- :class:`ConFIG` (``"config"``): conflict-free inverse gradients (Liu, Chu & Thuerey 2025);
- :class:`TorchJD` (``"torchjd:<Aggregator>"``): any ``torchjd.aggregation`` aggregator
  (optional dependency).

:func:`make_combiner` turns a short name, a combiner object or a plain callable
``f(grads) -> direction`` into a :class:`Combiner`.

Conventions shared by every combiner here:

- The input is not modified and no autograd graph is recorded (combiners run under
  ``torch.no_grad()``); the output has the input's dtype and device.
- PCGrad and ConFIG compute in float64 by default (``double=True``; float32 on devices without
  float64 such as MPS) and cast the result back, so gradients from ``1e-30`` to ``1e30`` in
  float32 neither underflow nor overflow in the inner products. Float64 input (and float32 with
  ``double=False``) is divided row by row by its largest entry before the unit vectors are
  formed, which keeps even rows near the ends of the float64 exponent range finite.
- A zero gradient (a term that does not reach the parameters, or a zero loss) never produces
  NaN: PCGrad does not project onto it, ConFIG ignores it.
- Non-finite input gives non-finite output (as the plain sum would); nothing raises.
- Randomness comes only from the ``generator`` argument (the balancer passes its own), never
  from the global random state, so runs and resumed runs are reproducible.
"""
from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import Tensor

__all__ = [
    "Combiner", "WeightedSum", "PCGrad", "ConFIG", "TorchJD", "CallableCombiner",
    "make_combiner", "available_combiners",
]

_INSTALL_HINT = "pip install lossbalance[bench]  (or: pip install torchjd)"


class Combiner(ABC):
    """Turns the ``(K, P)`` matrix of weighted per-term gradients into one ``(P,)`` direction.

    Subclasses set ``name`` (the short name :func:`make_combiner` knows them by) and
    ``needs_generator`` (``True`` if the combiner draws random numbers: the balancer then passes
    its own ``torch.Generator``). ``options()`` returns the constructor arguments that rebuild the
    object (used by ``__repr__`` and the config export). Combiners here are stateless;
    ``state_dict``/``load_state_dict`` exist so stateful ones (momentum variants) fit the protocol.
    """

    name: ClassVar[str] = ""
    needs_generator: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        """Return the ``(P,)`` direction for the ``(K, P)`` matrix ``grads``."""

    def options(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this combiner."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------------------------
# helpers


def _check(grads: Tensor) -> None:
    if not isinstance(grads, Tensor):
        raise TypeError(f"grads must be a (K, P) tensor, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"grads must be a (K, P) matrix (one row per term), got shape {tuple(grads.shape)}")
    if not grads.is_floating_point():
        raise TypeError(f"grads must have a floating-point dtype, got {grads.dtype}")


def _compute_dtype(grads: Tensor, double: bool) -> torch.dtype:
    if double and grads.device.type != "mps":
        return torch.float64
    return torch.promote_types(grads.dtype, torch.float32)


def _squares_fit(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether squares (and sums of up to 2**31 squares) of any finite ``source`` number are
    finite and non-zero in ``target``: e.g. float32 in float64, not float64 in float64."""
    s, t = torch.finfo(source), torch.finfo(target)
    return 2.0 * math.log2(s.max) + 31.0 < math.log2(t.max) and 2.0 * math.log2(s.smallest_normal * s.eps) > math.log2(t.smallest_normal)


def _unit_rows(grads: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Unit rows ``g_i / ||g_i||`` in ``dtype`` (zero rows stay zero), the norms, finite flags.

    Where squares of the input dtype can underflow or overflow in ``dtype`` (float64 input, or
    float32 computed in float32), each row is divided by its largest absolute entry first.
    Rows with a non-finite entry get a non-finite norm and unit row, and ``ok = False``.
    """
    k, p = grads.shape
    if p == 0:
        return grads.new_zeros((k, 0), dtype=dtype), grads.new_zeros(k, dtype=dtype), grads.new_ones(k, dtype=torch.bool)
    if _squares_fit(grads.dtype, dtype):
        units = grads.to(dtype, copy=True)
        norms = torch.linalg.vector_norm(units, dim=1)
        units.div_(torch.where(norms > 0, norms, torch.ones_like(norms))[:, None])
        return units, norms, torch.isfinite(norms)
    peak = grads.abs().amax(dim=1).to(dtype)
    ok = torch.isfinite(peak)
    one = torch.ones_like(peak)
    units = grads.to(dtype, copy=True)
    units.div_(torch.where(ok & (peak > 0), peak, one)[:, None])
    scaled_norm = torch.linalg.vector_norm(units, dim=1)
    units.div_(torch.where(scaled_norm > 0, scaled_norm, one)[:, None])
    return units, peak * scaled_norm, ok


# ---------------------------------------------------------------------------------------------
# weighted sum


class WeightedSum(Combiner):
    r"""The plain sum of the (already weighted) gradients: ``sum_i lambda_i g_i``.

    This is what ``sum_i lambda_i L_i`` followed by one backward pass gives, and the default of
    :class:`~lossbalance.LossBalancer`. ``grads.sum(0)`` in the input dtype.
    """

    name = "sum"

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        _check(grads)
        with torch.no_grad():
            return grads.sum(0)


# ---------------------------------------------------------------------------------------------
# PCGrad


class PCGrad(Combiner):
    r"""Projecting conflicting gradients ("gradient surgery").

    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (arXiv 2001.06782), Algorithm 1. For every term i, starting from
    ``g_i^PC = g_i`` and visiting the *other* terms j in random order::

        if g_i^PC . g_j < 0:   g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j

    always projecting onto the **original** ``g_j`` (not its projected version), and the update
    is the **sum** ``sum_i g_i^PC`` (:meth:`project` returns the projected rows themselves).
    With two terms the projected pair never conflicts: ``g_1^PC . g_2^PC =
    -(g_1 . g_2) (1 - cos^2) >= 0``; with three or more no such guarantee exists, and the result
    depends on the order. Without any conflict PCGrad is the plain sum. The projection is
    computed as ``g_i^PC - min(g_i^PC . u_j, 0) u_j`` with ``u_j = g_j / ||g_j||`` (the same
    number), so a zero ``g_j`` is skipped instead of producing ``0 / 0``, and tiny or huge
    gradients do not underflow or overflow ``||g_j||^2``. The algorithm runs in coefficient
    space (``g_i^PC = sum_k C[i, k] u_k``, inner products from the K x K cosine matrix
    ``U U^T``, as torchjd does): two passes over the ``(K, P)`` gradients instead of ``K^2``,
    and one host transfer of the K x K matrix per call.

    Options:

    ``order``
        ``"random"`` (default, the paper): a fresh order of the other terms for every i: the
        combiner draws ``torch.randperm(K, generator=generator)`` once per term i, in term order,
        and visits that permutation skipping i. ``"shared"``: one permutation drawn once per call
        and used for every i. ``"fixed"``: j = 0..K-1 (skipping i), no randomness, as in
        conflictfree. The random orders need the ``generator`` argument (the balancer passes its
        own; the global random state is never used, and a missing generator raises ``ValueError``
        even when K < 2, so a wiring mistake shows at once); ``"fixed"`` ignores it. Nothing is
        drawn when K < 2.
    ``double``
        Compute in float64 (default) and return the input dtype.

    Where public implementations differ (read from their source):

    - Authors' TensorFlow code (tianheyu927/PCGrad): calls ``tf.random.shuffle`` without using
      its result, so the order is in effect fixed, and visits j = i as well; a zero ``g_j`` gives
      ``0 / 0``. Sum of the projected gradients.
    - conflictfree ``PCGradOperator``: fixed order j = 0..K-1 skipping i; sum (``order="fixed"``).
    - torchjd ``PCGrad``: a fresh ``torch.randperm`` per i from the *global* generator; sum.
    - LibMTL ``PCGrad``: a fresh ``random.shuffle`` per i from Python's *global* generator, j = i
      included, ``||g_j||^2 + 1e-8`` in the denominator (which shrinks the projection, and leaves
      conflicts in place, when ``||g_j||^2`` is not much larger than 1e-8); sum.

    Runs of the last two cannot be reproduced from the training seed alone; here they can.
    """

    name = "pcgrad"
    needs_generator = True

    def __init__(self, *, order: Literal["random", "shared", "fixed"] = "random", double: bool = True):
        if order not in ("random", "shared", "fixed"):
            raise ValueError(f"order must be 'random', 'shared' or 'fixed', got {order!r}")
        self.order = order
        self.double = bool(double)

    def options(self) -> dict[str, Any]:
        return {"order": self.order, "double": self.double}

    def _orders(self, k: int, generator: torch.Generator | None) -> list[list[int]]:
        if self.order == "fixed":
            return [[j for j in range(k) if j != i] for i in range(k)]
        if generator is None:
            raise ValueError(
                f"PCGrad(order={self.order!r}) draws its order from a torch.Generator: pass "
                "generator= (LossBalancer passes its own), or use order='fixed'"
            )
        if k < 2:
            return [[] for _ in range(k)]
        device = generator.device
        if self.order == "shared":
            perm = torch.randperm(k, generator=generator, device=device).tolist()
            return [[j for j in perm if j != i] for i in range(k)]
        orders = []
        for i in range(k):
            perm = torch.randperm(k, generator=generator, device=device).tolist()
            orders.append([j for j in perm if j != i])
        return orders

    def _coefficients(self, grads: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(C, U)`` with ``g_i^PC = sum_k C[i, k] u_k``: the algorithm in coefficient space."""
        k = grads.shape[0]
        orders = self._orders(k, generator)
        units, norms, _ = _unit_rows(grads, _compute_dtype(grads, self.double))
        # one host transfer of the K x K cosines and the norms; the loop runs on Python floats
        table = torch.cat([units @ units.mT, norms[:, None]], dim=1).tolist()
        coefficients = []
        for i in range(k):
            row = [0.0] * k
            row[i] = table[i][k]  # g_i = ||g_i|| u_i
            for j in orders[i]:
                dot = sum(row[m] * table[m][j] for m in range(k) if row[m] != 0.0)  # g_i^PC . u_j
                if dot < 0.0:
                    row[j] -= dot  # g_i^PC - (g_i^PC . u_j) u_j
            coefficients.append(row)
        return torch.tensor(coefficients, dtype=units.dtype).reshape(k, k).to(units.device), units

    def project(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        """The projected gradients ``g_i^PC`` as a ``(K, P)`` matrix (input dtype)."""
        _check(grads)
        with torch.no_grad():
            coefficients, units = self._coefficients(grads, generator)
            return (coefficients @ units).to(grads.dtype)

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        _check(grads)
        with torch.no_grad():
            coefficients, units = self._coefficients(grads, generator)
            return (coefficients.sum(0) @ units).to(grads.dtype)


# ---------------------------------------------------------------------------------------------
# ConFIG


class ConFIG(Combiner):
    r"""Conflict-free inverse gradients.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025 (arXiv 2408.11104), Eq. 2 with equal weights. With unit vectors
    ``u_i = g_i / ||g_i||`` as the rows of ``U`` (K x P)::

        x   = U^+ 1                       (minimum-norm least-squares solution of U x = 1)
        g_u = x / ||x||
        g   = (sum_i g_i . g_u) g_u = (sum_i ||g_i|| cos_i) g_u,   cos_i = u_i . g_u

    When ``U x = 1`` has a solution (the gradients are linearly independent, or dependent only
    through duplicated directions), ``u_i . g_u = 1 / ||x|| > 0`` for every i: the update makes
    the same angle with every term's gradient and conflicts with none, and
    ``g = (sum_i ||g_i||) x / ||x||^2``. When it has none (an exactly opposite pair, or more
    directions than their span holds, e.g. three gradients at 120 degrees in a plane), ``x`` is
    the least-squares compromise and may conflict with some terms: that is the method.
    Positively scaling one term's gradient changes only the length of ``g``, never its
    direction: the balancer's weights act on the length alone.

    Two terms, closed form (``closed_form=True``, the default; no linear algebra). With
    ``c = u_1 . u_2`` and ``x = a u_1 + b u_2``: ``u_1 . x = a + b c = 1`` and
    ``u_2 . x = a c + b = 1`` give ``a = b = 1 / (1 + c)``, so ``g_u`` is the bisector
    ``(u_1 + u_2) / ||u_1 + u_2||`` and, since ``(g_1 + g_2) . (u_1 + u_2) = (||g_1|| + ||g_2||)(1 + c)``
    and ``||u_1 + u_2||^2 = 2 (1 + c)``::

        g = (||g_1|| + ||g_2||) / 2 * (u_1 + u_2)

    the mean norm times the sum of the unit vectors: equal-norm gradients give exactly
    ``g_1 + g_2``. A zero gradient gives ``u = 0`` and is ignored (the result is the other
    gradient, as in the general form; conflictfree's closed form returns NaN there). An exactly
    opposite pair gives ``u_1 + u_2 = 0`` and the zero vector. The closed form agrees with the
    general form, edge cases and thresholds included (tested).

    Numerics of the general form: ``x = U^+ 1`` is computed from a QR factorisation
    ``U^T = Q R`` and an SVD of the small ``K x K`` factor, ``x = Q (R^T)^+ 1``: as accurate as an
    SVD of ``U``, works for rank deficiency and ``K > P``, and costs ``O(P K^2)`` on any device
    (an SVD of the wide ``U`` is an order of magnitude slower). Singular values at or below
    ``rtol * sigma_max`` count as zero (default ``rtol = sqrt(eps)`` of the compute dtype,
    1.5e-8 in float64): the ``u_1 + u_2`` direction of a pair opposite up to rounding. If the
    projection of ``1`` onto the range of ``U`` is at most ``rtol * sqrt(K)`` (``1`` orthogonal to
    every usable direction, e.g. an exactly opposite pair alone) the update is the zero vector:
    otherwise rounding noise would pick an arbitrary direction, and its length
    ``sum_i g_i . g_u`` would then point against one of the terms. Zero rows enter the
    right-hand side as 0 instead of 1 (the same solution in exact arithmetic; an unfittable 1
    leaks into ``x`` through rounding, amplified by the condition number squared). In the
    length, cosines ``|u_i . g_u| <= rtol / (2 sqrt(K))`` count as zero: where a solution
    exists every cosine is ``1/||x|| >= rtol / sqrt(K)``, so only rounding residue of an exact
    zero (a term of an opposite pair) is dropped, and a large gradient orthogonal to ``g_u`` up
    to rounding cannot flip the sign of the update against a small one. Accuracy: about
    ``kappa * 1e-16`` relative in float64 where ``U x = 1`` has a solution (``kappa``: condition
    number of the kept part of ``U``), ``kappa^2 * 1e-16`` where it has none (least squares with
    a residual), e.g. an opposite pair together with gradients parallel to 1e-6: ~1e-4.

    Options:

    ``closed_form``
        Use the two-term closed form when K = 2 (default ``True``).
    ``rtol``
        Relative threshold for singular values (and for the projection of ``1``), see above;
        ``None`` means ``sqrt(eps)`` of the compute dtype.
    ``double``
        Compute in float64 (default) and return the input dtype.

    Where public implementations differ (read from their source):

    - conflictfree ``ConFIGOperator``: ``torch.linalg.lstsq(units, weights)`` (or ``pinv``), zero
      gradient -> zero unit row (``nan_to_num``) ignored, exactly opposite pair -> zero vector; its
      two-term closed form returns NaN when one gradient is zero, and its general form fails on
      float64 input unless the default dtype is float64.
    - torchjd ``ConFIG``: ``pinv(units) @ weights``, normalised, length ``sum_i g_i . g_u``; the
      same edge cases. Both optionally weight the right-hand side (a preference vector) instead
      of ``1``; here the balancer's weights scale the rows, which only changes the length.
    - Neither thresholds the projection of ``1``: with a pair opposite up to rounding they can
      return an update along one of the pair, against the other.
    """

    name = "config"

    def __init__(self, *, closed_form: bool = True, rtol: float | None = None, double: bool = True):
        if rtol is not None and not (0.0 <= rtol < 1.0):
            raise ValueError(f"rtol must be in [0, 1), got {rtol}")
        self.closed_form = bool(closed_form)
        self.rtol = rtol
        self.double = bool(double)

    def options(self) -> dict[str, Any]:
        return {"closed_form": self.closed_form, "rtol": self.rtol, "double": self.double}

    def _rtol(self, dtype: torch.dtype) -> float:
        return math.sqrt(torch.finfo(dtype).eps) if self.rtol is None else self.rtol

    def _direction(self, units: Tensor, present: Tensor, rtol: float) -> Tensor:
        """The unit direction ``g_u`` (zero vector where there is none) from the unit rows."""
        k, p = units.shape
        if k == 1:
            return units[0]
        if k == 2 and self.closed_form:
            s = units[0] + units[1]
            d = units[0] - units[1]
            s_norm = torch.linalg.vector_norm(s)
            usable = (s_norm > 0) & (s_norm > rtol * torch.linalg.vector_norm(d))
            return torch.where(usable, s / torch.where(s_norm > 0, s_norm, torch.ones_like(s_norm)), torch.zeros_like(s))
        # general form: U^T = Q R, R^T = A diag(S) B^H  =>  U = A diag(S) (Q B)^T,
        # x = U^+ b = Q B diag(S)^+ A^T b. The right-hand side b is 1 for the present terms and
        # 0 for zero rows: the same solution in exact arithmetic (a zero row cannot be fitted
        # and does not move x), but an unfittable 1 would leak into x through rounding,
        # amplified by the condition number squared.
        q, r = torch.linalg.qr(units.mT)                       # (P, m), (m, K), m = min(P, K)
        a, sv, bh = torch.linalg.svd(r.mT, full_matrices=False)  # (K, m), (m,), (m, m)
        keep = sv > rtol * sv.amax()
        c = torch.where(keep, a.mT @ present, torch.zeros_like(sv))
        y = bh.mT @ (c / torch.where(keep, sv, torch.ones_like(sv)))
        x = q @ y
        x_norm = torch.linalg.vector_norm(y)  # ||Q y|| = ||y||, Q has orthonormal columns
        usable = (torch.linalg.vector_norm(c) > rtol * torch.linalg.vector_norm(present)) & (x_norm > 0)
        return torch.where(usable, x / torch.where(x_norm > 0, x_norm, torch.ones_like(x_norm)), torch.zeros_like(x))

    def _combine(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        dtype = _compute_dtype(grads, self.double)
        k, p = grads.shape
        if k == 0 or p == 0:
            zero = grads.new_zeros(p, dtype=dtype)
            return zero, zero
        rtol = self._rtol(dtype)
        units, norms, ok = _unit_rows(grads, dtype)
        units.masked_fill_(~ok[:, None], 0.0)  # keep QR/SVD finite; the result becomes NaN below
        norms = torch.where(ok, norms, torch.zeros_like(norms))
        present = (norms > 0).to(dtype)
        direction = self._direction(units, present, rtol)
        # length = sum_i g_i . g_u = sum_i ||g_i|| cos_i. Where a solution exists every cos_i is
        # 1/||x|| >= rtol / sqrt(K); cosines below rtol / (2 sqrt(K)) are rounding residue of a
        # zero (e.g. a term of an opposite pair) and count as zero, so that a large gradient
        # orthogonal to g_u up to rounding cannot flip the sign of a small gradient's share.
        cosines = units @ direction
        cosines = torch.where(cosines.abs() > rtol / (2.0 * math.sqrt(k)), cosines, torch.zeros_like(cosines))
        update = (norms * cosines).sum() * direction
        finite = ok.all()
        nan = torch.full_like(update, float("nan"))
        return torch.where(finite, update, nan), torch.where(finite, direction, nan)

    def direction(self, grads: Tensor, /) -> Tensor:
        """The unit direction ``g_u`` (the zero vector when there is none), input dtype."""
        _check(grads)
        with torch.no_grad():
            return self._combine(grads)[1].to(grads.dtype)

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        _check(grads)
        with torch.no_grad():
            return self._combine(grads)[0].to(grads.dtype)


# ---------------------------------------------------------------------------------------------
# torchjd interop


def _torchjd_aggregation():
    try:
        from torchjd import aggregation  # noqa: PLC0415 (optional dependency, imported lazily)
    except ImportError as error:
        raise ImportError(f"the 'torchjd' combiner needs the optional dependency torchjd: {_INSTALL_HINT}") from error
    return aggregation


class TorchJD(Combiner):
    r"""Any ``torchjd.aggregation`` aggregator applied to the ``(K, P)`` gradient matrix.

    torchjd (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv
    2406.16232) calls the matrix of per-objective gradients a Jacobian and an *aggregator* maps it
    to one vector: ``TorchJD("UPGrad")``, ``TorchJD("MGDA")``, ``TorchJD("DualProj")``,
    ``TorchJD("ConFIG")``, ... (``make_combiner("torchjd:UPGrad")``) with constructor keyword
    arguments passed through, or ``TorchJD(aggregator_object)``. There is no default aggregator:
    name one. The rows it sees are the balancer's *weighted* gradients. torchjd is an optional
    dependency (``pip install lossbalance[bench]``), imported when the object is created from a
    name; some aggregators need torchjd's own extras (in torchjd 0.18 ``UPGrad`` and ``DualProj``
    need ``torchjd[quadprog_projector]``) and raise torchjd's ImportError saying so.

    Caveats from torchjd's source (none of them ours to fix): some aggregators draw from the
    global random generator (``PCGrad``, ``GradDrop``, ``Random``), so runs are not reproducible
    from the balancer's generator; ``UPGrad`` returns the *mean* of the projections (K times
    smaller than a sum of the same gradients), falls back silently to the plain mean when
    ``sum_i ||g_i||^2 < 1e-4`` and its regulariser biases mixed-scale cases by up to ~12 %.
    """

    name = "torchjd"

    def __init__(self, aggregator: str | Callable[[Tensor], Tensor], **kwargs: Any):
        if isinstance(aggregator, str):
            aggregation = _torchjd_aggregation()
            known = sorted(n for n in dir(aggregation) if n[:1].isupper() and not n.startswith("_"))
            cls = getattr(aggregation, aggregator, None)
            if cls is None or not callable(cls):
                close = difflib.get_close_matches(aggregator, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"torchjd.aggregation has no aggregator {aggregator!r}.{hint} Known: {', '.join(known)}")
            self.aggregator = cls(**kwargs)
        else:
            if kwargs:
                raise TypeError("keyword arguments go to the aggregator's constructor only when it is given by name")
            if not callable(aggregator):
                raise TypeError(f"aggregator must be a torchjd aggregator or its name, got {type(aggregator).__name__}")
            self.aggregator = aggregator
        self._spec = aggregator
        self._kwargs = dict(kwargs)

    def options(self) -> dict[str, Any]:
        return {"aggregator": self._spec, **self._kwargs}

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        _check(grads)
        with torch.no_grad():
            out = self.aggregator(grads.detach())
        if not isinstance(out, Tensor) or tuple(out.shape) != (grads.shape[1],):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self._spec!r} returned {got}, expected a ({grads.shape[1]},) vector")
        return out.to(grads.dtype)


# ---------------------------------------------------------------------------------------------
# plain callables and the factory


class CallableCombiner(Combiner):
    """Wraps a plain function ``f(grads: (K, P) Tensor) -> (P,) Tensor`` as a combiner."""

    name = "callable"

    def __init__(self, fn: Callable[[Tensor], Tensor], /):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def options(self) -> dict[str, Any]:
        return {"fn": self.fn}

    def __repr__(self) -> str:
        return f"CallableCombiner({getattr(self.fn, '__qualname__', self.fn)!s})"

    def __call__(self, grads: Tensor, /, *, generator: torch.Generator | None = None) -> Tensor:
        _check(grads)
        out = self.fn(grads)
        if not isinstance(out, Tensor) or tuple(out.shape) != (grads.shape[1],):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"combiner function {self!r} returned {got}, expected a ({grads.shape[1]},) vector")
        return out


_COMBINERS: dict[str, type[Combiner]] = {c.name: c for c in (WeightedSum, PCGrad, ConFIG, TorchJD)}


def available_combiners() -> list[str]:
    """The short names :func:`make_combiner` knows."""
    return sorted(_COMBINERS)


def make_combiner(spec: str | Combiner | Callable[[Tensor], Tensor] = "sum", /, **options: Any) -> Combiner:
    """A :class:`Combiner` from a short name (with constructor options), an object or a function.

    Short names (case-insensitive): ``"sum"``, ``"pcgrad"``, ``"config"``, ``"torchjd"``, and
    ``"torchjd:<Aggregator>"`` (e.g. ``"torchjd:MGDA"``). A :class:`Combiner` is returned as is; a
    torchjd aggregator object is wrapped in :class:`TorchJD`; any other callable
    ``f(grads) -> direction`` in :class:`CallableCombiner`. An unknown name raises ``ValueError``
    listing the known ones, with the closest match.
    """
    if isinstance(spec, Combiner):
        if options:
            raise TypeError("options go to the combiner's constructor when a combiner object is given")
        return spec
    if isinstance(spec, str):
        key = spec.strip()
        if key.lower().startswith("torchjd:"):
            return TorchJD(key.split(":", 1)[1], **options)
        key = key.lower()
        if key == "torchjd" and "aggregator" not in options:
            raise ValueError("name the torchjd aggregator: make_combiner('torchjd:UPGrad'), or "
                             "make_combiner('torchjd', aggregator='MGDA')")
        if key not in _COMBINERS:
            close = difflib.get_close_matches(key, list(_COMBINERS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown combiner {spec!r}.{hint} Known: {', '.join(available_combiners())}")
        return _COMBINERS[key](**options)
    if callable(spec):
        if options:
            raise TypeError("options cannot be given with a function")
        if type(spec).__module__.split(".")[0] == "torchjd":
            return TorchJD(spec)
        return CallableCombiner(spec)
    raise TypeError(f"combine must be a short name, a Combiner or a callable, got {type(spec).__name__}")
