r"""How the per-term gradients become one update direction.

A *combiner* takes the ``(K, P)`` matrix whose rows are the **weighted** per-term gradients
``lambda_i g_i`` (flattened over the balanced parameters) and returns one ``(P,)`` direction,
which the balancer writes into ``.grad``:

- :class:`WeightedSum` (``"sum"``, the default): ``sum_i lambda_i g_i``, what one backward of
  the weighted total gives;
- :class:`PCGrad` (``"pcgrad"``): projecting conflicting gradients (Yu et al. 2020), summed;
- :class:`ConFIG` (``"config"``): conflict-free inverse gradients (Liu, Chu & Thuerey 2025);
- :class:`UPGrad` (``"upgrad"``): the mean of the rows projected onto their dual cone (Quinton &
  Rey 2024), natively; equals torchjd's ``UPGrad()``;
- :class:`MGDA` (``"mgda"``): the minimum-norm convex combination of the rows (Desideri 2012;
  Sener & Koltun 2018), solved exactly;
- :class:`DCGD` (``"dcgd"``): dual cone gradient descent for a PDE group against a boundary group
  (Hwang & Lim 2024), variants ``center``, ``avg``, ``proj``;
- :class:`MomentumConFIG` (``"mconfig"``): momentum ConFIG (Liu, Chu & Thuerey 2025), one
  term's backward per step, round robin; the balancer handles it specially (below);
- :class:`TorchJD` (``"torchjd:<Aggregator>"``): any ``torchjd.aggregation`` aggregator
  (optional dependency).

One module per combiner (``weighted_sum``, ``pcgrad``, ``conflict_free``, ``upgrad``, ``mgda``,
``dual_cone``, ``torchjd_adapter``); ``base`` holds the protocol, :class:`CallableCombiner` and
the registry behind :func:`make_combiner`, ``numerics`` the unit rows, the trace-normalised
Gramian and the non-negative quadratic program the combiners share.

:func:`make_combiner` turns a short name, a combiner object or a plain callable
``f(grads) -> direction`` into a :class:`Combiner`.

``"mconfig"`` is not applied to the matrix: it changes which terms are differentiated. The
balancer sees its ``one_term_per_step`` flag, differentiates only the term whose turn it is (one
backward of one term per step) and hands that gradient to :meth:`MomentumConFIG.step`; it
refuses strategies that need per-term gradients, ``diagnose_every``, a ``GradScaler`` and L-BFGS,
and warns when wrapped around an optimizer with ``betas`` (pair it with ``torch.optim.SGD``).

L-BFGS with a combiner (``step(closure=...)``): the closure's value, what L-BFGS sees as the
loss, is the weighted total ``sum_i lambda_i L_i`` with the weights fixed for the whole step;
``.grad`` is the combiner's direction at the evaluated point (the per-term gradients are
recomputed at every evaluation: K backward passes each). That direction is in general not the
gradient of that total, nor of any function (a field that is not a gradient). L-BFGS without a
line search (``line_search_fn=None``: steps of ``lr`` along its quasi-Newton direction) only uses
the value for its stopping test (``tolerance_change``) and builds its curvature pairs from
differences of the direction: a secant method on the direction field, consistent, and what runs
here. A strong-Wolfe line search tests the total's decrease and curvature along a direction that
is not its gradient: inconsistent, so the balancer refuses it (``ValueError`` when built or
stepped). Keep ``lr`` small (e.g. 0.1): without a line search, L-BFGS steps are not damped.

Conventions shared by every combiner here:

- The input is not modified and no autograd graph is recorded (combiners run under
  ``torch.no_grad()``); the output has the input's dtype and device.
- PCGrad, ConFIG and DCGD compute in float64 by default (``double=True``; float32 on devices without
  float64 such as MPS) and cast the result back, so gradients from ``1e-30`` to ``1e30`` in
  float32 neither underflow nor overflow in the inner products. Float64 input (and float32 with
  ``double=False``) is divided row by row by its largest entry before the unit vectors are
  formed, which keeps even rows near the ends of the float64 exponent range finite.
- UPGrad and MGDA form the Gramian ``J J^T`` as one matmul in the input dtype (``double=False``
  by default, as torchjd: a float64 copy of a large float32 matrix cost more than the rest),
  solve their K x K problem in float64, and form the Gramian again from scaled unit rows only
  where the input-dtype one overflowed or underflowed: the same range as above.
- A zero gradient (a term that does not reach the parameters, or a zero loss) never produces
  NaN: PCGrad does not project onto it, ConFIG ignores it.
- Non-finite input gives non-finite output (as the plain sum would); nothing raises.
- Randomness comes only from the ``generator`` argument (the balancer passes its own), never
  from the global random state, so runs and resumed runs are reproducible.
"""
from .base import CallableCombiner, Combiner, available_combiners, make_combiner
from .conflict_free import ConFIG
from .dual_cone import DCGD
from .mgda import MGDA
from .momentum import MomentumConFIG
from .pcgrad import PCGrad
from .torchjd_adapter import TorchJD
from .upgrad import UPGrad
from .weighted_sum import WeightedSum

__all__ = [
    "Combiner", "WeightedSum", "PCGrad", "ConFIG", "UPGrad", "MGDA", "DCGD", "MomentumConFIG", "TorchJD", "CallableCombiner",
    "make_combiner", "available_combiners",
]
