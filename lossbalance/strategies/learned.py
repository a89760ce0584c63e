"""Per-term learned scalars with an optimizer of their own (shared by ``gradnorm`` and
``uncertainty``), and :class:`VectorAdam`, Adam on one vector of them (``famo``)."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["LearnedScalars", "VectorAdam", "optimizer_class", "optimizer_settings", "optimizer_option"]


def optimizer_class(optimizer: str | type[torch.optim.Optimizer], *, what: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim.Optimizer`` subclass ``optimizer`` names (a class, or the name of one in
    ``torch.optim``). Anything else raises ``ValueError``, and so does L-BFGS (it needs a
    closure and takes a single parameter group, while the terms, one parameter group each, may
    come and go). ``what`` names the trained quantities in that message."""
    cls = getattr(torch.optim, optimizer, None) if isinstance(optimizer, str) else optimizer
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            "optimizer must be a torch.optim.Optimizer subclass or the name of one (e.g. 'Adam', 'SGD'), "
            f"got {optimizer!r}"
        )
    if issubclass(cls, torch.optim.LBFGS):
        raise ValueError(
            f"{what} cannot be trained with L-BFGS (it needs a closure and takes a single parameter group, "
            "and the terms may come and go); use e.g. 'Adam' or 'SGD' for them -- the model itself may still "
            "use L-BFGS"
        )
    return cls


def optimizer_settings(
    optimizer: str | type[torch.optim.Optimizer], lr: float, optimizer_options: Mapping[str, Any] | None, *, what: str
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class and the further keyword arguments (``optimizer_options``) with which
    a strategy trains ``what``, checked now rather than at the first update: ``ValueError`` for
    an optimizer that is not a usable ``torch.optim`` class, for ``lr`` among the options, and
    for options the optimizer does not take."""
    options = dict(optimizer_options or {})
    if "lr" in options:
        raise ValueError(f"give the learning rate of {what} as lr=, not in optimizer_options")
    cls = optimizer_class(optimizer, what=what)
    try:
        cls([torch.zeros((), requires_grad=True)], lr=lr, **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"optimizer_options: cannot build {cls.__name__}(lr={lr}, **{options}): {error}") from error
    return cls, options


def optimizer_option(optimizer: str | type[torch.optim.Optimizer]) -> str | type[torch.optim.Optimizer]:
    """``optimizer`` as ``options()`` exports it: a ``torch.optim`` class by its name, so that
    exported configs stay plain data (any other class as it is)."""
    if not isinstance(optimizer, str) and getattr(torch.optim, optimizer.__name__, None) is optimizer:
        return optimizer.__name__
    return optimizer


def _copy(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples of tensors (an optimizer's state_dict)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj


class LearnedScalars:
    """Learnable 0-dim tensors, one per term name, trained by an optimizer of their own.

    A term's scalar is created when the term is first seen (:meth:`ensure`), as a parameter group
    of its own; the optimizer (``optimizer_cls(..., lr=lr, **options)``) is built with the first
    one. The insertion order of :attr:`params` is the optimizer's param-group order, and is saved
    with the optimizer's state. :meth:`state_dict` and :meth:`load_state_dict` copy deeply: a
    saved state never aliases live tensors, and a resumed run continues bit for bit.

    A state loaded without ``"values"`` is kept pending: the scalars (and the optimizer state) are
    re-created at the next :meth:`ensure`, which gives them their dtype and device.
    """

    def __init__(self, optimizer_cls: type[torch.optim.Optimizer], lr: float, options: Mapping[str, Any]):
        self.optimizer_cls = optimizer_cls
        self.lr = lr
        self.options = dict(options)
        self.params: dict[str, Tensor] = {}   # term -> 0-dim leaf tensor, in the optimizer's group order
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: tuple[list[str], Any] | None = None  # loaded (order, optimizer state), no values

    @property
    def names(self) -> list[str]:
        """The known terms, in the optimizer's param-group order (those of a pending state included)."""
        return list(self._pending[0]) if self._pending is not None else list(self.params)

    def _add(self, name: str, value: Tensor) -> None:
        param = value.detach().clone().requires_grad_(True)
        self.params[name] = param
        if self.optimizer is None:
            self.optimizer = self.optimizer_cls([param], lr=self.lr, **self.options)
        else:
            self.optimizer.add_param_group({"params": [param]})

    def ensure(self, names: Iterable[str], initial: Callable[[str], Tensor]) -> None:
        """Create the scalars of a pending state, then those of ``names`` not known yet, with the
        value ``initial(name)`` (a 0-dim tensor: it sets the scalar's dtype and device; known
        scalars follow it there, see :meth:`follow`)."""
        if self.params:
            self.follow(initial(next(iter(self.params))))
        if self._pending is not None:
            (order, optimizer), self._pending = self._pending, None
            for name in order:
                self._add(name, initial(name))
            if self.optimizer is not None and optimizer is not None:
                self.optimizer.load_state_dict(optimizer)
        for name in names:
            if name not in self.params:
                self._add(name, initial(name))

    def follow(self, like: Tensor) -> None:
        """Move the scalars and their optimizer's state to the dtype and device of ``like`` (the
        model moved, ``model.to(...)``); nothing happens when they are there already."""
        first = next(iter(self.params.values()))
        if first.dtype == like.dtype and first.device == like.device:
            return
        with torch.no_grad():
            for param in self.params.values():
                param.data = param.data.to(like)
        if self.optimizer is not None:  # torch.optim casts the loaded state to its parameters' dtype and device
            self.optimizer.load_state_dict(self.optimizer.state_dict())

    def values(self, names: Iterable[str]) -> Tensor:
        """The current values of ``names``, stacked and detached."""
        return torch.stack([self.params[name].detach() for name in names])

    def assign(self, names: Iterable[str], values: Tensor) -> None:
        """Overwrite the scalars of ``names`` with ``values`` (in place: the optimizer keeps them)."""
        with torch.no_grad():
            for i, name in enumerate(names):
                self.params[name].copy_(values[i])

    def step(
        self, names: tuple[str, ...] | list[str], gradient: Callable[[Tensor], tuple[Tensor | None, Tensor]]
    ) -> None:
        """One step of the optimizer. ``gradient(values)`` maps the current values of ``names`` to
        ``(objective or None, its gradient)``; the scalars of the terms not in ``names`` get no
        gradient (the optimizer skips them). The gradients are cleared afterwards."""
        assert self.optimizer is not None, "ensure() the terms before stepping"
        position = {name: i for i, name in enumerate(names)}

        def closure() -> Tensor | None:
            objective, grads = gradient(self.values(names))
            with torch.no_grad():
                for name, param in self.params.items():
                    param.grad = grads[position[name]].clone() if name in position else None
            return objective

        self.optimizer.step(closure)
        for param in self.params.values():
            param.grad = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"order": [names], "values": {name: value}, "optimizer": state or None}``, copied."""
        if self._pending is not None:
            order, optimizer = self._pending
            return {"order": list(order), "values": {}, "optimizer": _copy(optimizer)}
        return {
            "order": list(self.params),
            "values": {name: param.detach().clone() for name, param in self.params.items()},
            "optimizer": None if self.optimizer is None else _copy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace everything by ``state`` (``"order"``, ``"optimizer"`` and, optionally,
        ``"values"``: without them the state is applied at the next :meth:`ensure`)."""
        self.params, self.optimizer, self._pending = {}, None, None
        order = list(state["order"])
        optimizer = state.get("optimizer")
        values = state.get("values")
        if values is None:
            self._pending = (order, _copy(optimizer)) if order else None
            return
        for name in order:
            self._add(name, values[name])
        if self.optimizer is not None and optimizer is not None:
            self.optimizer.load_state_dict(_copy(optimizer))


class VectorAdam:
    r"""Adam (Kingma & Ba 2015) on one scalar per term, kept as vectors and updated out of place.

    The update is ``torch.optim.Adam``'s (``weight_decay`` as its L2 term, no AMSGrad), with the
    same operations in the same order, so the values equal ``Adam`` over one parameter group per
    term bit for bit (tested)::

        g <- g + wd x;   m <- lerp(m, g, 1 - b1);   v <- b2 v + (1 - b2) g^2;   n <- n + 1
        x <- x - lr / (1 - b1^n) * m / (sqrt(v) / sqrt(1 - b2^n) + eps)

    with ``n`` counted per term: a term steps only on the calls that name it, as a parameter
    without ``.grad`` is skipped by ``torch.optim``. Every step replaces the tensors instead of
    changing them, so :meth:`snapshot` is a tuple of references, and the update of K terms is a
    few vector operations, not K optimizer steps.
    """

    def __init__(self, lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), betas, float(eps), float(weight_decay)
        self.names: tuple[str, ...] = ()
        self.value = self.exp_avg = self.exp_avg_sq = None  # (K,) tensors once a term is known
        self.steps: tuple[int, ...] = ()

    def ensure(self, names: Iterable[str], like: Tensor) -> None:
        """Append the terms of ``names`` not known yet, at 0 (``like``: dtype and device)."""
        new = [name for name in names if name not in self.names]
        if not new:
            return
        zeros = like.new_zeros(len(new))
        if self.value is None:
            self.value, self.exp_avg, self.exp_avg_sq = zeros, zeros, zeros
        else:
            self.value, self.exp_avg, self.exp_avg_sq = (torch.cat((t, zeros)) for t in
                                                         (self.value, self.exp_avg, self.exp_avg_sq))
        self.names, self.steps = self.names + tuple(new), self.steps + (0,) * len(new)

    def _rows(self, names: Sequence[str]) -> Tensor | None:
        """The positions of ``names`` (``None``: all terms, in order)."""
        if tuple(names) == self.names:
            return None
        return torch.tensor([self.names.index(n) for n in names], device=self.value.device)

    def values(self, names: Sequence[str]) -> Tensor:
        """The current values of ``names`` (known terms), in that order."""
        rows = self._rows(names)
        return self.value if rows is None else self.value[rows]

    def step(self, names: Sequence[str], grad: Tensor) -> None:
        """One Adam step of the terms ``names`` (known, distinct) along ``grad`` (their gradients)."""
        rows = self._rows(names)
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        x, m, v = pick(self.value), pick(self.exp_avg), pick(self.exp_avg_sq)
        position = {n: i for i, n in enumerate(self.names)}
        steps = list(self.steps)
        for name in names:
            steps[position[name]] += 1
        b1, b2 = self.betas
        if self.weight_decay != 0:
            grad = grad.add(x, alpha=self.weight_decay)
        m = m.lerp(grad, 1 - b1)
        v = (v * b2).addcmul(grad, grad, value=1 - b2)
        x = self._moved(x, m, v, [float(steps[position[n]]) for n in names])
        if rows is None:
            self.value, self.exp_avg, self.exp_avg_sq = x, m, v
        else:
            self.value, self.exp_avg, self.exp_avg_sq = (t.index_copy(0, rows, new) for t, new in
                                                         ((self.value, x), (self.exp_avg, m), (self.exp_avg_sq, v)))
        self.steps = tuple(steps)

    def _moved(self, x: Tensor, m: Tensor, v: Tensor, counts: list[float]) -> Tensor:
        """``x`` after the bias-corrected step: with one count for all, Adam's own scalars (bit for
        bit); else per-term step sizes (equal to rounding)."""
        b1, b2 = self.betas
        if len(set(counts)) == 1:
            size, root = self.lr / (1 - b1 ** counts[0]), (1 - b2 ** counts[0]) ** 0.5
            return x.addcdiv(m, (v.sqrt() / root).add(self.eps), value=-size)
        size = x.new_tensor([self.lr / (1 - b1**c) for c in counts])
        root = x.new_tensor([math.sqrt(1 - b2**c) for c in counts])
        return x - size * m / ((v.sqrt() / root).add(self.eps))

    # ------------------------------------------------------------------ state
    def snapshot(self) -> tuple:
        """References that :meth:`restore` takes back (nothing is changed in place)."""
        return self.names, self.value, self.exp_avg, self.exp_avg_sq, self.steps

    def restore(self, snapshot: tuple) -> None:
        self.names, self.value, self.exp_avg, self.exp_avg_sq, self.steps = snapshot

    def state_dict(self) -> dict[str, Any]:
        """``{"values", "exp_avg", "exp_avg_sq": {term: 0-dim tensor}, "steps": {term: int}}``, copied."""
        tables = {key: {} if t is None else dict(zip(self.names, t.detach().clone().unbind()))
                  for key, t in (("values", self.value), ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq))}
        return {"order": list(self.names), **tables, "steps": dict(zip(self.names, self.steps))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = tuple(state["order"])
        self.names, self.steps = names, tuple(int(state["steps"][n]) for n in names)
        if not names:
            self.value = self.exp_avg = self.exp_avg_sq = None
            return
        self.value, self.exp_avg, self.exp_avg_sq = (torch.stack([state[key][n].detach().clone() for n in names])
                                                     for key in ("values", "exp_avg", "exp_avg_sq"))
