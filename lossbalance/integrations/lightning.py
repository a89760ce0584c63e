"""Lightning (``lightning`` 2.x): ``LossBalancerCallback`` for automatic optimisation.

::

    class PINN(L.LightningModule):
        def configure_optimizers(self):
            self.balancer = LossBalancer(self.parameters(), "lra")   # parameters on their device now
            return torch.optim.Adam(self.parameters(), lr=1e-3)

        def training_step(self, batch, batch_idx):
            return self.balancer.loss({"pde": ..., "bc": ...})       # Lightning does the backward

    trainer = L.Trainer(callbacks=[LossBalancerCallback()], gradient_clip_val=1.0, ...)

``balancer.loss(losses)`` is a scalar whose value is the weighted total and whose ``.backward()``
accumulates exactly the balanced gradient, so everything Lightning does around the backward and
the optimizer step applies unchanged: gradient clipping, ``accumulate_grad_batches`` (Lightning
divides the loss, hence the gradient; each micro-batch is one balancer step), LR schedulers,
``precision="bf16-mixed"``. The callback adds what Lightning cannot know about:

* checkpoints: ``on_save_checkpoint`` stores ``balancer.state_dict()`` under ``"lossbalance"``;
  ``on_load_checkpoint`` loads it back, at once when the balancer exists, else (built later, in
  ``configure_optimizers`` or ``on_fit_start``) when training starts;
* logging: ``weight/<term>`` and ``loss/<term>`` (the unweighted term) through ``pl_module.log``
  after every training batch (``on_step=True``), so any Lightning logger receives them.

Build the balancer from the module's parameters (no optimizer: Lightning steps its own) once
they are on their device, e.g. in ``configure_optimizers`` (called after the Trainer moved the
module) or in ``__init__`` when training on one CPU process: the balancer keeps the device and
dtype of the parameters it was built with.

DDP (``strategy="ddp"``): the balancer averages the per-term gradients over the ranks itself,
so every rank computes the same weights; the surrogate's backward accumulates that averaged
direction and DDP's reducer all-reduces ``.grad`` once more, a mean of equal tensors (unchanged,
and no extra collective that could hang). Steps without a weight update are one backward of the
weighted sum, averaged by DDP alone. The balancer must be built after the Trainer has started
the processes (``configure_optimizers`` or ``setup``): one built in ``__init__`` (before
``torch.distributed`` is initialised) would balance each rank alone, and the callback refuses it
when training starts. As with plain DDP, a parameter that no term reaches needs
``DDPStrategy(find_unused_parameters=True)``.

Resume: the whole balancer state (weights, step counter, strategy state, generator) is restored
from any checkpoint, at an epoch boundary or mid-epoch (``ModelCheckpoint(every_n_train_steps=)``).
What data the rest of a resumed epoch sees is Lightning's: with a plain ``DataLoader`` (not
resumable) Lightning 2.x continues the batch counter but restarts the loader, so a resume after
batch 3 trains on batch 0 (with a warning); a resumable loader (``state_dict``/
``load_state_dict``, e.g. ``torchdata``'s ``StatefulDataLoader``) continues where it stopped.

``precision="16-mixed"`` scales the returned loss, hence the gradient, and unscales it before
the step; the balancer's own per-term gradients are taken unscaled (in float16 they may
underflow): prefer ``bf16-mixed``. Manual optimisation works too
(``self.manual_backward(self.balancer.loss(losses))``); the callback then still logs and
checkpoints.
"""
from __future__ import annotations

from typing import Any

from ..balancer import LossBalancer
from ._imports import require

__all__ = ["LossBalancerCallback", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "lossbalance"


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            pl = require("lightning.pytorch", "lightning", "lossbalance.integrations.lightning")
    return pl


pl = _lightning()


class LossBalancerCallback(pl.Callback):
    """Checkpoint and log a :class:`~lossbalance.LossBalancer` under Lightning.

    Args:
        balancer: the balancer; default: ``pl_module.balancer``, looked up when needed (so it
            may be built in ``configure_optimizers`` or ``on_fit_start``). Anything with the
            balancer's ``state_dict``, ``load_state_dict`` and ``stats`` works too (PINA's
            :class:`~lossbalance.integrations.pina.BalancedWeighting`).
        log: log ``weight/<term>`` and ``loss/<term>`` after every training batch.
        prefix: prepended to the logged names (``prefix + "weight/pde"``).
        prog_bar: also show the logged figures in the progress bar.
    """

    def __init__(self, balancer: LossBalancer | None = None, *, log: bool = True, prefix: str = "", prog_bar: bool = False):
        super().__init__()
        if balancer is not None and not _balancer_like(balancer):
            raise TypeError(
                f"LossBalancerCallback takes a LossBalancer (or an object with its state_dict, load_state_dict "
                f"and stats, such as lossbalance.integrations.pina.BalancedWeighting), got {type(balancer).__name__}"
            )
        self._given = balancer
        self.log = log
        self.prefix = prefix
        self.prog_bar = prog_bar
        # a checkpoint's state and the balancer it went into (None: none yet); on_train_start loads
        # it into the balancer of the run when that is another one (built after the restore)
        self._pending: tuple[dict[str, Any], LossBalancer | None] | None = None

    def balancer(self, pl_module: Any, *, required: bool = True) -> LossBalancer | None:
        """The given balancer, else ``pl_module.balancer``."""
        if self._given is not None:
            return self._given
        found = getattr(pl_module, "balancer", None)
        if isinstance(found, LossBalancer):
            return found
        if not required:
            return None
        what = "no attribute 'balancer'" if found is None else f"'balancer' is a {type(found).__name__}"
        raise RuntimeError(
            f"LossBalancerCallback found no balancer: {type(pl_module).__name__} has {what}. Set "
            "self.balancer = LossBalancer(self.parameters(), ...) in the module (e.g. in configure_optimizers), "
            "or pass it: LossBalancerCallback(balancer)"
        )

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        balancer = self.balancer(pl_module)
        _require_distributed(balancer, getattr(trainer, "world_size", 1))
        if self._pending is not None:
            state, loaded = self._pending
            if loaded is not balancer:
                balancer.load_state_dict(state)
            self._pending = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.log:
            return
        balancer = self.balancer(pl_module)
        for term, figures in balancer.stats.items():
            for key in ("weight", "loss"):
                pl_module.log(f"{self.prefix}{key}/{term}", float(figures[key]), on_step=True, on_epoch=False,
                              prog_bar=self.prog_bar, batch_size=1)

    # ------------------------------------------------------------------ evaluation loops
    def _evaluating(self, pl_module: Any, value: bool) -> None:
        """Validation, test and prediction (sanity checks included): ``balancer.loss()`` returns
        the weighted total with the current weights and steps nothing (``LossBalancer.evaluate``)."""
        balancer = self.balancer(pl_module, required=False)
        if isinstance(balancer, LossBalancer):
            balancer.evaluating = value

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._evaluating(pl_module, True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._evaluating(pl_module, False)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._evaluating(pl_module, True)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._evaluating(pl_module, False)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._evaluating(pl_module, True)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._evaluating(pl_module, False)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        balancer = self.balancer(pl_module, required=False)
        state = None if balancer is None else balancer.state_dict()
        if state is not None:
            checkpoint[CHECKPOINT_KEY] = state
        elif self._pending is not None:
            checkpoint[CHECKPOINT_KEY] = self._pending[0]

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        balancer = self.balancer(pl_module, required=False)
        if balancer is not None:
            balancer.load_state_dict(state)
        self._pending = (state, balancer)

    def __repr__(self) -> str:  # noqa: D105
        return f"LossBalancerCallback({'pl_module.balancer' if self._given is None else self._given!r})"


def _require_distributed(balancer: Any, world: int) -> None:
    """Refuse a balancer that would balance each rank alone in a multi-process run: one built
    before the process group existed (in ``__init__``, before ``Trainer.fit`` launched the ranks)."""
    distributed = getattr(balancer, "distributed", None)  # a BalancedWeighting builds its balancer later
    if world > 1 and distributed is False:
        raise RuntimeError(
            f"the LossBalancer was built before torch.distributed was initialised, so each of the {world} "
            "processes would balance its own data and the ranks' weights would differ. Build it once the "
            "Trainer has started the processes: in configure_optimizers (self.balancer = LossBalancer("
            "self.parameters(), ...)) or setup(), not in __init__"
        )


def _balancer_like(obj: Any) -> bool:
    return isinstance(obj, LossBalancer) or all(hasattr(obj, n) for n in ("state_dict", "load_state_dict", "stats"))
