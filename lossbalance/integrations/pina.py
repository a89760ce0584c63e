"""PINA (``pina-mathlab`` 0.3): ``BalancedWeighting``, a PINA weighting that runs a LossBalancer.

::

    from lossbalance import LRAnnealing
    from lossbalance.integrations.pina import BalancedWeighting
    from lossbalance.integrations.lightning import LossBalancerCallback

    # name the PDE condition as LRA's reference: by default LRA takes the first condition,
    # which for PINA's problems is often a boundary ("boundary" in Poisson2DSquareProblem)
    weighting = BalancedWeighting(LRAnnealing(reference="D"), update_every=10)
    solver = PINN(problem, model, weighting=weighting)
    trainer = Trainer(solver, max_epochs=1000, callbacks=[LossBalancerCallback(weighting)])
    trainer.train()
    weighting.weights            # {"boundary": ..., "D": ...}, one term per PINA condition

How it hooks in: a PINA solver (a LightningModule, automatic optimisation) computes one scalar
loss per condition and hands the dict to ``solver.weighting.aggregate(losses)``, which is
``@final`` in ``BaseWeighting``: it calls ``update_weights(losses)`` (with
``update_every_n_epochs=1``: on every call), multiplies each loss by its weight and reduces the
stack with the weighting's ``aggregator`` callable. ``BalancedWeighting`` uses those two
extension points: in a training step, ``update_weights`` calls ``balancer.loss(losses)`` (one
balancer step) and returns the balancer's weights, and the aggregator returns that balanced loss
instead of the weighted sum. Lightning's backward of it accumulates exactly the balanced
gradient. In validation and test steps (PINA calls the same ``aggregate``), the balancer is not
stepped: the aggregate is the weighted sum with the current weights.

The balancer is built at the first training step, from the solver's parameters that require
grad and, for an inverse problem, its unknown parameters (``problem.unknown_parameters``, a dict
that PINA keeps outside the modules and adds to the model's optimizer: balanced with the model),
once Lightning has put them on their device; ``LossBalancer`` keywords go to ``BalancedWeighting(strategy, **options)``.
``state_dict()``/``load_state_dict()`` (a state loaded before the first step is applied when the
balancer is built) let :class:`~lossbalance.integrations.lightning.LossBalancerCallback` store
it in Lightning checkpoints and log ``weight/<condition>`` and ``loss/<condition>``.

Solvers: tested with ``PhysicsInformedSingleModelSolver``, ``RBAPhysicsInformedSingleModelSolver``
and ``CausalPhysicsInformedSingleModelSolver``. The RBA and causal solvers weight the points (or
the time steps) inside a condition's loss and hand the weighting one scalar per condition, which
the balancer weights: the two compose, nothing is weighted twice (with a static balancer the run
equals PINA's ``ScalarWeighting`` of the same weights bit for bit). lossbalance's own per-point
weights (``pointwise=``) cannot apply to PINA's scalars and are refused.
``GradientPhysicsInformedSingleModelSolver`` adds each condition's residual-gradient penalty to
that condition's loss before the weighting sees it: the balancer weights the penalised losses
(one aggregate per step, as for the plain solver). ``SelfAdaptivePhysicsInformedSolver`` and
``CompetitivePhysicsInformedSolver`` train a second model (the pointwise weights, the
discriminator) with its own optimizer by ascent, and aggregate the conditions once per optimizer
in each training step. There the balancer holds the model's parameters only, not the second
model's, and steps once per training step, on the aggregate whose backward trains the model
(PINA 0.3: the self-adaptive solver's second, the competitive solver's first); the second model's
aggregate is the weighted sum with the current weights, which its optimizer ascends as PINA
intends. A solver that ordered its passes otherwise is caught (the model still holds
gradients where they were just zeroed) with a ``RuntimeError``.

DDP (``Trainer(solver, strategy="ddp", devices=2, batch_size=...)``): the balancer is built at
the first training step, after the processes started, so it averages over the ranks and every
rank holds the same weights (PINA's own gradient-based weightings compute them per rank). PINA
0.3 itself fails under DDP with the whole set as one batch (``batch_size=None``:
``AttributeError: '_ConditionSubset' object has no attribute 'fetch_from_idx_list'``): give a
``batch_size``.

Resume: ``trainer.train(ckpt_path=...)`` from a checkpoint written by ``ModelCheckpoint`` or
``trainer.save_checkpoint`` continues bit for bit. (PINA's own weightings keep their weights
outside the checkpoint: a resume at an epoch where ``update_every_n_epochs`` does not update them
raises ``KeyError: '<condition>'`` in ``BaseWeighting.aggregate``; ``BalancedWeighting`` updates
on every step.) Two PINA runs are only reproducible with Python's ``random`` seeded as well as
torch: PINA samples union domains (e.g. a square's boundary) with ``random.sample``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..balancer import LossBalancer
from ..strategies.base import Strategy
from ._imports import require

__all__ = ["BalancedWeighting"]

_weighting = require("pina.weighting", "pina", "lossbalance.integrations.pina")
_solvers = require("pina.solver", "pina", "lossbalance.integrations.pina")


def _unknowns(solver: Any) -> list[Tensor]:
    """An inverse problem's unknown parameters that require grad (none for a forward problem)."""
    unknowns = getattr(solver.problem, "unknown_parameters", None) or {}
    return [p for p in unknowns.values() if p.requires_grad]


def _model_pass(solver: Any) -> int | None:
    """For PINA's min-max solvers (a second model with its own optimizer, manual optimisation:
    ``training_step`` aggregates the conditions once per optimizer), the index of the aggregate
    of a training step whose backward trains ``solver.model``; ``None`` for the other solvers
    (one aggregate per training step). PINA 0.3's order: the self-adaptive solver's weights
    ascend first, then the model descends; the competitive solver's model descends first, then
    the discriminator ascends."""
    if isinstance(solver, _solvers.SelfAdaptivePhysicsInformedSolver):
        return 1
    if isinstance(solver, _solvers.CompetitivePhysicsInformedSolver):
        return 0
    return None


class BalancedWeighting(_weighting.BaseWeighting):
    """A PINA weighting whose aggregate is ``LossBalancer.loss`` of the conditions' losses.

    Args:
        strategy: the :class:`~lossbalance.LossBalancer` strategy (a name or a Strategy).
        hooks: step hooks (:meth:`LossBalancer.register_step_hook`, e.g. a
            :class:`~lossbalance.tensorboard.TensorBoardLogger`), registered when the balancer is
            built at the first training step, so that they see step 0.
        options: any other ``LossBalancer`` keyword (``update_every=``, ``weights=``, ...).
    """

    def __init__(self, strategy: str | Strategy = "lra", *, hooks: Sequence[Callable[[LossBalancer], None]] = (),
                 **options: Any):
        if options.get("pointwise"):
            raise ValueError(
                "BalancedWeighting does not take pointwise=: PINA reduces each condition's residual to one "
                "scalar before the weighting sees it, so per-point weights cannot apply here. Use PINA's "
                "RBAPhysicsInformedSingleModelSolver or CausalPhysicsInformedSingleModelSolver for the "
                "per-point weights; BalancedWeighting then balances their conditions"
            )
        super().__init__(update_every_n_epochs=1, aggregator=self._aggregate)
        self.strategy = strategy
        self.options = options
        self.hooks = list(hooks)
        self.balancer: LossBalancer | None = None
        self._balanced: Tensor | None = None  # this aggregate's balanced loss (training steps)
        self._pending: Mapping[str, Any] | None = None
        self._batch: int | None = None  # min-max solvers: the training batch of the last aggregate
        self._pass = 0  # and which of its aggregates that was

    def _training(self) -> bool:
        trainer = getattr(self.solver, "trainer", None) if self.solver is not None else None
        return bool(trainer is not None and trainer.training and torch.is_grad_enabled())

    def _balancing(self) -> bool:
        """Whether this training aggregate is the one to balance: every one, except with PINA's
        min-max solvers, where only the pass that trains ``solver.model`` steps the balancer; the
        second model's pass (self-adaptive weights, discriminator) gets the weighted sum with the
        current weights, which that model ascends."""
        wanted = _model_pass(self.solver)
        if wanted is None:
            return True
        batch = self.solver.trainer.fit_loop.total_batch_idx
        self._pass = self._pass + 1 if batch == self._batch else 0
        self._batch = batch
        if self._pass != wanted:
            return False
        leftover = [p.grad for p in self.solver.model.parameters() if p.grad is not None]
        if leftover and bool(torch.stack([g.any() for g in leftover]).any()):
            raise RuntimeError(
                f"BalancedWeighting expected aggregate {wanted} of each {type(self.solver).__name__} training step "
                "to train solver.model (PINA 0.3's order, its optimizer zeroing the model's gradients just before), "
                "but the model still holds gradients: this solver orders its passes otherwise, and the balancer "
                "would step on the wrong one. Use PINA's ScalarWeighting (fixed weights) with this solver"
            )
        return True

    def _balanced_parameters(self) -> list[Tensor]:
        """The solver's parameters that require grad, the second model's (min-max solvers: its own
        optimizer) left out, and an inverse problem's unknowns (not module parameters; trained by
        the model's optimizer)."""
        second = _model_pass(self.solver) is not None
        others = {id(p) for p in self.solver.models[1].parameters()} if second else set()
        params = [p for p in self.solver.parameters() if p.requires_grad and id(p) not in others]
        held = {id(p) for p in params}
        return params + [p for p in _unknowns(self.solver) if id(p) not in held]

    def _build(self) -> LossBalancer:
        self.balancer = LossBalancer(self._balanced_parameters(), self.strategy, **self.options)
        for hook in self.hooks:
            self.balancer.register_step_hook(hook)
        if self._pending is not None:
            self.balancer.load_state_dict(self._pending)
            self._pending = None
        return self.balancer

    def update_weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        if self._training():  # built on the first training aggregate: a restored state's weights apply to it
            balancer = self.balancer or self._build()
            self._balanced = balancer.loss(losses) if self._balancing() else None
        else:
            self._balanced = None
        current, initial = self.weights, self.options.get("weights") or {}  # before its first step: weights=
        return {name: current.get(name, float(initial.get(name, 1.0))) for name in losses}

    def _aggregate(self, weighted: Tensor) -> Tensor:
        balanced, self._balanced = self._balanced, None
        return weighted.sum() if balanced is None else balanced

    # ------------------------------------------------------------------ reporting and state
    @property
    def weights(self) -> dict[str, float]:
        """The balancer's weights; before its first training step, those of a loaded state
        (e.g. ``trainer.test(ckpt_path=...)``), else the initial ``weights=``."""
        if self.balancer is not None:
            return self.balancer.weights
        if self._pending is not None:
            return dict(zip(self._pending["names"], torch.as_tensor(self._pending["weights"]).tolist()))
        return {name: float(w) for name, w in (self.options.get("weights") or {}).items()}

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        return {} if self.balancer is None else self.balancer.stats

    def state_dict(self) -> dict[str, Any] | None:
        return self.balancer.state_dict() if self.balancer is not None else self._pending

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.balancer is None:
            self._pending = state
        else:
            self.balancer.load_state_dict(state)

    def __repr__(self) -> str:
        return f"BalancedWeighting({self.balancer!r})" if self.balancer else f"BalancedWeighting({self.strategy!r})"
