"""The training runner and the ``python -m lossbalance demo`` comparison.

Modules: ``runner`` (one run: :class:`RunSpec`, :func:`train`, :class:`RunResult`), ``parallel``
(:func:`run_many`, process fan-out) with ``progress`` (its display), ``report``
(:func:`format_table`, :func:`write_figures`), ``compare`` (:func:`run_demo`) and ``cli``
(:func:`main`). The figures themselves are :mod:`lossbalance.plots`.

:func:`train` trains one PINN of :mod:`lossbalance.problems` with one weighting strategy in
this process and returns a :class:`RunResult`; :func:`run_many` runs several
:class:`RunSpec` side by side, one process each (``spawn``, one thread per process);
:func:`run_demo` is the demo: 2-D Helmholtz (``a1 = 1, a2 = 4``) with fixed weights against
learning-rate annealing (and any other registered strategy), a table of the relative L2
errors, and figures when matplotlib is installed. The examples in ``examples/`` reuse these
functions.

Every run records conflict diagnostics (``LossBalancer(diagnose_every=...)``, every strategy,
fixed weights included): on each step that the history keeps, the per-term gradient norms, their
pairwise cosine similarities and the fraction of conflicting pairs enter ``RunResult.history``
(keys ``"grad_norm"``, ``"cosine"``, ``"conflict_fraction"``) and the ``conflicts.png`` figure.
The cost is the per-term gradients on those steps (one ``autograd.grad`` per term instead of one
backward of the weighted sum): every 15th step at the default budget, about 1 % of the run time.

Setup (Wang, Teng & Perdikaris 2021, the authors' ``Helmholtz2D_model_tf.py``): MLP
``[2, 50, 50, 50, 1]``, tanh, Xavier-normal; Adam, learning rate
``1e-3 * 0.9 ** (step / decay_every)`` (TensorFlow's ``exponential_decay(1e-3, step, 1000, 0.9)``,
not staircase); 128 fresh points per term and step; LRA with the PDE residual as the
reference, updated every 10 steps. The demo shortens the run to 6 000 steps at the authors'
decay (every 1 000 steps), which keeps the gap between fixed and balanced weights at about 3x
with errors small enough to mean something. Measured here (seed 0, one thread per run):

=========================  ==========  ====  ======  ==============
steps, decay 0.9 every      fixed       LRA   ratio   CPU per run
=========================  ==========  ====  ======  ==============
4 000, 100                  3.96        0.91  4.3x    ~22 s
6 000, 1 000 (default)      0.43        0.15  2.9x    ~36 s
8 000, 1 000                0.31        0.078 4.0x    ~45 s
40 000, 1 000 (authors')    0.175       0.026 6.7x    ~6 min
=========================  ==========  ====  ======  ==============

At 4 000 / 100 both networks stay far from the solution (LRA's 0.91 is a near-zero field);
compressing the decay further erases the gap (DESIGN.md).
"""
from .cli import add_demo_arguments, compare_main, main
from .compare import resolve_strategies, run_demo
from .parallel import run_many
from .report import format_table, write_figures
from .sweep import BEST_STATIC, SweepConfigError, SweepError, SweepTable, best_static_grid, compare_strategies
from .runner import (
    DEMO_DECAY_EVERY, DEMO_STEPS, STRATEGY_DEFAULTS, ProgressFn, RunResult, RunSpec, run_spec, strategy_settings, train,
)

__all__ = [
    "STRATEGY_DEFAULTS", "RunSpec", "RunResult", "train", "run_spec", "run_many",
    "format_table", "run_demo", "add_demo_arguments", "main",
    "strategy_settings", "resolve_strategies", "write_figures", "DEMO_STEPS", "DEMO_DECAY_EVERY", "ProgressFn",
    "compare_strategies", "compare_main", "SweepTable", "SweepError", "SweepConfigError", "best_static_grid",
    "BEST_STATIC",
]
