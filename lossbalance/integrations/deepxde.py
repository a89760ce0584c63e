"""DeepXDE (PyTorch backend): ``balance(model, "lra")`` after ``model.compile(...)``.

::

    model.compile("adam", lr=1e-3)
    balancer = balance(model, "lra", update_every=10)
    model.train(iterations=10000)
    model.compile("L-BFGS")
    balance(model)                   # carries the learned weights over, held fixed under L-BFGS
    model.train()

How it hooks in (DeepXDE 1.x, ``Model._compile_pytorch``): ``compile`` builds DeepXDE's optimizer
closure ``model.train_step`` (``sum(losses).backward()``, ``opt.step(closure)``, the LR scheduler),
whose forward pass gets the list of loss terms from ``model.data.losses_train(..., model, ...)``,
looked up on every call. :func:`balance` keeps DeepXDE's code and wraps two callables on the
instances:

* ``model.train_step`` runs DeepXDE's ``train_step`` with a flag set, so that only the loss
  evaluations of a training iteration are balanced. DeepXDE's evaluation passes
  (``Model._test``, which also calls ``data.losses_train`` for the displayed training loss) get
  the plain, unweighted terms and never step the balancer.
* ``model.data.losses_train`` returns, inside a training iteration of a balanced model, the
  one-element list ``[balancer.loss(terms)]``: DeepXDE's ``sum(...)`` and ``.backward()`` then
  accumulate exactly the balanced gradient (plus DeepXDE's L1 penalty, which it appends after
  the terms, unbalanced). One balancer call per training iteration with a first-order optimizer.
* DeepXDE's own ``loss_weights`` (given to ``compile``) become the initial weights and are then
  cleared on the model, so DeepXDE does not multiply the terms a second time. The losses DeepXDE
  displays and records (``losshistory``) are therefore the *unweighted* terms; the weights are
  in ``balancer.weights`` (or ``balancer.history`` with ``history=``).
* ``model.save`` / ``model.restore`` (also used by ``ModelCheckpoint`` and
  ``train(model_restore_path=...)``) are wrapped on the instance: the checkpoint file gets a
  ``"lossbalance"`` entry with ``balancer.state_dict()``, loaded back on restore. DeepXDE's
  ``save`` offers no hook, so the wrapper reads the file it wrote, adds the entry and writes it
  again (twice the writing; a PINN's checkpoint is small).

L-BFGS: DeepXDE's L-BFGS evaluates the closure several times per ``train_step``; the first
evaluation is one balancer step, the others are ``balancer.loss(..., reevaluation=True)`` (the
weights held, the step counter not advanced). ``balance`` defaults to ``frozen=True`` for
``"L-BFGS"``/``"L-BFGS-B"``: the weights stay as learned, a fixed objective for the line search.
With ``frozen=False`` the weights are updated (when due) on the first evaluation of each
``train_step`` only. NNCG (second order through the loss) is not supported.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..balancer import LossBalancer
from ..strategies.base import Strategy
from ..validation import warn_user
from ._imports import require

__all__ = ["balance", "balancer_of"]

_ATTRIBUTE = "_lossbalance_adapter"
_LBFGS = ("L-BFGS", "L-BFGS-B")
CHECKPOINT_KEY = "lossbalance"


def _deepxde():
    dde = require("deepxde", "deepxde", "lossbalance.integrations.deepxde")
    backend = getattr(getattr(dde, "backend", None), "backend_name", None)
    if backend != "pytorch":
        raise RuntimeError(
            f"lossbalance balances DeepXDE's PyTorch backend only; this DeepXDE runs backend {backend!r}. "
            "Select it before importing deepxde: DDE_BACKEND=pytorch (or python -m deepxde.backend.set_default_backend pytorch)"
        )
    return dde


def balancer_of(model: Any) -> LossBalancer | None:
    """The balancer that :func:`balance` last attached to ``model`` (``None``: none)."""
    adapter = getattr(model, _ATTRIBUTE, None)
    return None if adapter is None else adapter.balancer


def default_names(n_terms: int, bcs: Sequence[Any] | None) -> list[str]:
    """``pde`` (or ``pde0``, ``pde1``, ... for several residuals), then ``bc0``, ``bc1``, ... in
    ``data.bcs`` order; ``loss0``, ``loss1``, ... for data without boundary conditions."""
    if bcs is None or n_terms < len(bcs):
        return [f"loss{i}" for i in range(n_terms)]
    n_pde = n_terms - len(bcs)
    pde = ["pde"] if n_pde == 1 else [f"pde{i}" for i in range(n_pde)]
    return pde + [f"bc{i}" for i in range(len(bcs))]


class _Adapter:
    """What :func:`balance` installs on one compiled model."""

    def __init__(self, model: Any, balancer: LossBalancer, names: list[str] | None):
        self.model = model
        self.balancer = balancer
        self.names = names
        self.lbfgs = model.opt_name in _LBFGS
        self.training = False
        self.evaluations = 0
        self.train_step = model.train_step
        self.warned = False

    def wrapped_train_step(self, inputs, targets, auxiliary_vars):
        self.training, self.evaluations = True, 0
        try:
            return self.train_step(inputs, targets, auxiliary_vars)
        finally:
            self.training = False

    def balanced(self, terms: Sequence[Tensor]) -> Tensor:
        names = self.resolve_names(len(terms))
        if getattr(self.balancer.strategy, "reference", "") is None:  # LRA: DeepXDE lists the PDE residual first
            self.balancer.strategy.reference = names[0]
        again = self.lbfgs and self.evaluations > 0  # L-BFGS re-evaluations: one balancer step per train_step
        self.evaluations += 1
        return self.balancer.loss(dict(zip(names, terms)), reevaluation=again)

    def resolve_names(self, n_terms: int) -> list[str]:
        if self.names is None:
            self.names = default_names(n_terms, getattr(self.model.data, "bcs", None))
        _check_names(self.names, n_terms)
        return self.names

    def warn_if_recompiled(self) -> None:
        """Once: the model was compiled again without a new ``balance`` (its terms are no longer
        balanced: DeepXDE trains the sum weighted by the new compile's ``loss_weights``)."""
        if self.warned or self.model.train_step == self.wrapped_train_step:
            return
        self.warned = True
        warn_user("this DeepXDE model was compiled again after balance(model): its loss terms are no longer balanced "
                  "(DeepXDE trains the sum weighted by the new compile's loss_weights, unweighted without them; the "
                  f"learned weights {self.balancer.weights} stay in the old balancer, which its checkpoints still save). "
                  "Call balance(model) after every compile: it carries the learned weights over")

    def uninstall(self) -> None:
        """Put DeepXDE's ``train_step`` back (before another ``balance`` of the same compile)."""
        if self.model.train_step == self.wrapped_train_step:
            self.model.train_step = self.train_step


def _wrap_losses(data: Any) -> None:
    """``data.losses_train`` that returns ``[balancer.loss(terms)]`` inside a balanced training step."""
    if getattr(data.__dict__.get("losses_train"), "_lossbalance", False):
        return
    losses_train = data.losses_train

    def balanced_losses_train(targets, outputs, loss_fn, inputs, model, aux=None):
        losses = losses_train(targets, outputs, loss_fn, inputs, model, aux=aux)
        adapter: _Adapter | None = getattr(model, _ATTRIBUTE, None)
        if adapter is None:
            return losses
        if not adapter.training:  # DeepXDE's evaluation, or a compile since balance()
            adapter.warn_if_recompiled()
            return losses
        terms = list(losses) if isinstance(losses, (list, tuple)) else [losses]
        return [adapter.balanced([t.reshape(()) if t.dim() else t for t in terms])]

    balanced_losses_train._lossbalance = True  # type: ignore[attr-defined]
    data.losses_train = balanced_losses_train


def balance(
    model: Any,
    strategy: str | Strategy = "lra",
    *,
    names: Sequence[str] | None = None,
    **options: Any,
) -> LossBalancer:
    """Balance the loss terms of a compiled DeepXDE ``model`` from now on; returns the balancer.

    Call it after ``model.compile(...)`` (and again after every ``compile``: compiling replaces
    DeepXDE's closures). ``names``: the terms' names in DeepXDE's order (default: ``pde`` or
    ``pde0``, ``pde1``, ..., then ``bc0``, ``bc1``, ... in ``data.bcs`` order). ``options``: any
    :class:`~lossbalance.LossBalancer` keyword (``update_every=``, ``history=``, ...). ``names`` and
    the ``loss_weights`` of ``compile`` need one entry per loss term (checked on one evaluation of
    DeepXDE's terms, before anything is installed: ``ValueError``).

    Initial weights, first found: ``weights=`` in ``options``; the ``loss_weights`` given to this
    ``compile``; the weights of the balancer a previous ``balance(model)`` attached (the learned
    weights carry over, e.g. from Adam to L-BFGS). For L-BFGS, ``frozen`` defaults to ``True``.
    A strategy with a reference term and none given (``"lra"``) takes DeepXDE's first term, the
    PDE residual (``pde``/``pde0``), without the warning a plain ``LossBalancer`` gives.
    The balancer is built on the parameters DeepXDE's optimizer holds (the network and the
    ``external_trainable_variables``), without an optimizer: DeepXDE steps its own.
    """
    _check_compiled(model, names)
    names = None if names is None else list(names)
    _check_term_count(model, names)
    previous: _Adapter | None = getattr(model, _ATTRIBUTE, None)
    if previous is not None:
        previous.uninstall()  # a second balance() of the same compile: wrap DeepXDE's closures, not ours
    names = _initial_weights(model, names, previous, options)
    if names is not None and "terms" not in options:
        options["terms"] = names
    if model.opt_name in _LBFGS:
        options.setdefault("frozen", True)
    params = [p for group in model.opt.param_groups for p in group["params"]]
    balancer = LossBalancer(params, strategy, **options)

    adapter = _Adapter(model, balancer, names)
    model.loss_weights = None  # the balancer holds them now (DeepXDE would multiply again)
    model.train_step = adapter.wrapped_train_step
    setattr(model, _ATTRIBUTE, adapter)
    _wrap_losses(model.data)
    _wrap_checkpoints(model)
    return balancer


def _check_compiled(model: Any, names: Any) -> None:
    """A compiled DeepXDE model on a supported optimizer, and names that are a list."""
    dde = _deepxde()
    if not isinstance(model, dde.Model):
        raise TypeError(f"balance() takes a deepxde.Model, got {type(model).__name__}")
    if model.opt is None or model.train_step is None:
        raise RuntimeError("this DeepXDE model is not compiled: call model.compile(...) before balance(model, ...)")
    if model.opt_name == "NNCG":
        raise NotImplementedError("NNCG differentiates the loss twice; lossbalance supports DeepXDE's first-order optimizers and L-BFGS")
    if isinstance(names, str):
        raise TypeError(f"names must be a list of term names, got the string {names!r}")


def _check_names(names: list[str], n_terms: int) -> None:
    if len(names) != n_terms:
        raise ValueError(f"DeepXDE computes {n_terms} loss terms, but {len(names)} names were given: {names}")


def _check_term_count(model: Any, names: list[str] | None) -> None:
    """``names`` and ``compile(loss_weights=)``: one entry per loss term DeepXDE computes."""
    loss_weights = model.loss_weights
    if names is None and loss_weights is None:
        return
    n_terms = _term_count(model)
    if names is not None:
        _check_names(names, n_terms)
    if loss_weights is not None and len(loss_weights) != n_terms:
        terms = names or default_names(n_terms, getattr(model.data, "bcs", None))
        raise ValueError(
            f"compile(loss_weights={list(loss_weights)}) has {len(loss_weights)} entries, but DeepXDE computes "
            f"{n_terms} loss terms {terms}: give one weight per term"
        )


def _term_count(model: Any) -> int:
    """The number of loss terms DeepXDE computes: one unweighted evaluation on its test data
    (DeepXDE's own evaluation pass, less the L1 penalty it appends to the terms)."""
    inputs, targets, *auxiliary = model.data.test()
    loss_weights, model.loss_weights = model.loss_weights, None  # DeepXDE multiplies (and fails on a wrong length)
    training = getattr(model.net, "training", None)
    try:
        losses = model.outputs_losses_test(inputs, targets, auxiliary[0] if auxiliary else None)[1]
    finally:
        model.loss_weights = loss_weights
        if training is not None:
            model.net.train(training)  # the evaluation pass puts the net in eval mode
    regularizer = getattr(model.net, "regularizer", None)
    return len(losses) - int(regularizer is not None and regularizer[0] == "l1" and regularizer[1] > 0)


def _initial_weights(model: Any, names: list[str] | None, previous: "_Adapter | None", options: dict) -> list[str] | None:
    """Put the initial weights into ``options`` (``weights=``, else ``compile(loss_weights=)``,
    else a previous balancer's learned weights); returns the term names (``None``: not known yet)."""
    loss_weights = model.loss_weights
    if loss_weights is not None:
        loss_weights = [float(w) for w in loss_weights]
        if names is None:  # one weight per term: checked by balance()
            names = default_names(len(loss_weights), getattr(model.data, "bcs", None))
    if "weights" in options:
        return names
    if loss_weights is not None:
        options["weights"] = dict(zip(names, loss_weights))
    elif previous is not None and previous.balancer.weights:
        carried = previous.balancer.weights
        if names is None or set(names) == set(carried):
            options["weights"] = carried
            names = names or list(carried)
    return names


def _wrap_checkpoints(model: Any) -> None:
    """``model.save``/``model.restore`` that also save and load the current balancer's state."""
    if getattr(model.__dict__.get("save"), "_lossbalance", False):
        return  # wrapped by an earlier balance(); they read the current adapter
    save, restore = model.save, model.restore

    def save_with_balancer(save_path, protocol="backend", verbose=0):
        path = save(save_path, protocol=protocol, verbose=verbose)
        balancer = balancer_of(model)
        if protocol == "backend" and balancer is not None:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            checkpoint[CHECKPOINT_KEY] = balancer.state_dict()
            torch.save(checkpoint, path)
        return path

    def restore_with_balancer(save_path, device=None, verbose=0):
        restore(save_path, device=device, verbose=verbose)
        balancer = balancer_of(model)
        if balancer is None:
            return
        checkpoint = torch.load(save_path, map_location="cpu", weights_only=True)
        state: Mapping[str, Any] | None = checkpoint.get(CHECKPOINT_KEY)
        if state is not None:
            balancer.load_state_dict(state)

    save_with_balancer._lossbalance = True  # type: ignore[attr-defined]
    restore_with_balancer._lossbalance = True  # type: ignore[attr-defined]
    save_with_balancer.__doc__, restore_with_balancer.__doc__ = save.__doc__, restore.__doc__
    model.save, model.restore = save_with_balancer, restore_with_balancer
