"""Checks on what users hand the balancer; every error names the offending term and the fix.

Nothing here changes any state: the balancer runs these checks before it touches the weights,
the optimizer or ``.grad``.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Collection, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "check_losses", "check_finite", "check_key_set", "check_optimizer_state", "explain_autograd_error", "no_path_error",
    "reentrant_checkpoint_error", "warn_user", "FREED_GRAPH_HINT",
]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside lossbalance (whatever the depth)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

FREED_GRAPH_HINT = (
    "build the loss dict anew for every step (a backward pass frees its graph) and do not call "
    "backward() on the terms yourself"
)
COMPILED_HINT = (
    "the backward of a torch.compile'd model was first built with donated buffers (by a backward "
    "without retain_graph, e.g. your own loss.backward()), which forbids the balancer's per-term "
    "gradients: set torch._functorch.config.donated_buffer = False before the compiled model's first call"
)
REENTRANT_HINT = "torch.utils.checkpoint(..., use_reentrant=True) cannot be used with torch.autograd.grad: pass use_reentrant=False"
_HINTS = (  # a substring of torch's message, the hint
    ("backward through the graph a second time", FREED_GRAPH_HINT),  # a freed graph
    ("donated buffer", COMPILED_HINT),
    ("use_reentrant=True", REENTRANT_HINT),
)


def explain_autograd_error(name: str, error: RuntimeError, *, stale: bool = False) -> RuntimeError:
    """``error`` from differentiating term ``name``, with the term named and the hint that fits
    torch's message: the freed-graph hint only when the graph was freed or the term was built on
    an earlier step (``stale``: its graph was used, and its parameters have moved since)."""
    text = str(error)
    hints = [hint for key, hint in _HINTS if key in text] or ([FREED_GRAPH_HINT] if stale else [])
    return RuntimeError(f"while differentiating term {name!r}{': ' + hints[0] if hints else ''}. {error}")


def reentrant_checkpoint_error(name: str) -> ValueError:
    return ValueError(
        f"loss term {name!r} goes through torch.utils.checkpoint(..., use_reentrant=True), whose layers "
        "torch.autograd.grad (the balancer's backward) cannot reach: pass use_reentrant=False to "
        "checkpoint() (or checkpoint_sequential())"
    )


def no_path_error(name: str, *, scoped: bool) -> ValueError:
    """The error for a term whose graph reaches none of the parameters it may train."""
    where = "any parameter of its scope" if scoped else "any balanced parameter"
    return ValueError(
        f"loss term {name!r} has no path to {where}: it was built from tensors that do not depend "
        "on them (detached, or only on inputs)"
    )


def _article(noun: str) -> str:
    """``noun`` with its indefinite article: "an int", "a float"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def check_parameters(params: Sequence[Tensor]) -> None:
    """Refuse parameters the balancer cannot differentiate for: complex ones (the per-term
    gradient statistics and the weights are real) and ones on the ``meta`` device (no data)."""
    for i, p in enumerate(params):
        where = f"parameter {i} of the optimizer (shape {tuple(p.shape)}, {p.dtype})"
        if p.is_complex():
            raise TypeError(f"{where} is complex: the balancer works on real parameters; hold the real and "
                            "imaginary parts as a real parameter and build the complex tensor in the forward "
                            "(torch.view_as_complex)")
        if p.device.type == "meta":
            raise ValueError(f"{where} is on the meta device, which holds no data: materialise the model first "
                             "(model.to_empty(device=...), then initialise or load its weights)")


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"loss term names must be strings; got the key {name!r} ({type(name).__name__})")
    if not name:
        raise ValueError("a loss term is named '' (the empty string): give every term a name, e.g. 'pde'")


def check_losses(losses: Any, device: torch.device, *, need_grad: bool = True) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``losses`` is a non-empty ``{str: scalar loss}``
    (``need_grad``: that requires grad)."""
    if not isinstance(losses, Mapping):
        raise TypeError(
            f"losses must be a dict of named loss terms, e.g. {{'pde': ..., 'bc': ...}}; got {type(losses).__name__}"
        )
    if not losses:
        raise ValueError("losses is empty: pass at least one named loss term")
    for name, loss in losses.items():
        _check_name(name)
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"loss term {name!r} is {_article(type(loss).__name__)}, expected a scalar torch.Tensor computed "
                "from the model (a Python number carries no gradient)"
            )
        if loss.numel() != 1:
            raise ValueError(
                f"loss term {name!r} has shape {tuple(loss.shape)}; expected a scalar: reduce it, "
                "e.g. with .mean() or .sum(), or pass per-point losses as lossbalance.Residual(values, ...)"
            )
        if not loss.is_floating_point():
            raise TypeError(f"loss term {name!r} has dtype {loss.dtype}; expected a floating-point scalar")
        if need_grad and not loss.requires_grad:
            raise ValueError(
                f"loss term {name!r} does not require grad: was it computed under torch.no_grad(), "
                "from detached tensors, or from a model whose parameters do not require grad?"
            )
        if loss.device != device:
            raise ValueError(
                f"loss term {name!r} is on {loss.device}, the balanced parameters on {device}: "
                "compute every term on the parameters' device"
            )


def check_finite(names: tuple[str, ...], values: Tensor, what: str = "loss value") -> None:
    """Raise ``ValueError`` naming the terms whose ``values`` are NaN or Inf (one host sync)."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = [f"{n!r} = {v}" for n, v, ok in zip(names, values.tolist(), finite.tolist()) if not ok]
        raise ValueError(
            f"non-finite {what} for term(s) {', '.join(bad)}; nothing was changed. Pass "
            "nonfinite='skip' to skip such steps, or look for a log/sqrt/division of zero in that term"
        )


def check_key_set(present: Collection[str], known: Collection[str], optional: Collection[str]) -> None:
    """Raise ``KeyError`` if the terms of a step differ from the declared ones."""
    unknown = [n for n in present if n not in known and n not in optional]
    missing = [n for n in known if n not in present and n not in optional]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown term(s) {unknown} (not declared and not seen on earlier steps)")
        if missing:
            parts.append(f"missing term(s) {missing}")
        raise KeyError(
            "the loss terms changed (between steps, or between evaluations of a closure): " + "; ".join(parts) + ". Declare a term that comes and "
            "goes with LossBalancer(..., optional=[name]), or call balancer.add_term(name) / "
            "balancer.remove_term(name) when the phase changes."
        )


# the per-parameter state of torch.optim's optimizers that has the parameter's shape, and
# L-BFGS's flat vectors over all its parameters (its state sits under the first one)
_PARAMETER_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg",
                               "grad_avg", "acc_delta", "sum", "ax", "prev", "step_size"})
_FLAT = frozenset({"d", "prev_flat_grad", "old_dirs", "old_stps"})


def check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` when a saved optimizer state is for other parameters: a moment
    (Adam's ``exp_avg``, SGD's ``momentum_buffer``, ...) whose shape is not its parameter's, with
    the parameters matched by position as ``Optimizer.load_state_dict`` does (which would load it
    and fail only at the next step), checked for ``torch.optim``'s own optimizers, whose state keys
    are known; or the state of another optimizer type (:func:`_check_hyperparameters`), for any."""
    _check_hyperparameters(saved, optimizer)
    if not type(optimizer).__module__.startswith("torch.optim"):
        return
    flat_keys = _FLAT if isinstance(optimizer, torch.optim.LBFGS) else frozenset()
    total = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    for position, entry, param in _saved_entries(saved, optimizer):
        _check_entry(position, entry, param, flat_keys, total)


def _check_hyperparameters(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` when the saved parameter groups lack a hyper-parameter of this
    optimizer that torch does not fill in for older states (its flags: ``None`` or bool
    defaults): the state of another optimizer type (Adam's ``betas`` and ``eps`` where L-BFGS
    needs ``max_iter``), which ``Optimizer.load_state_dict`` would take."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    needed = {k for k, v in optimizer.defaults.items() if v is not None and not isinstance(v, bool)}
    for i, group in enumerate(groups if isinstance(groups, list) else []):
        missing = sorted(needed - set(group)) if isinstance(group, Mapping) else []
        if missing:
            raise _other_optimizer_error(type(optimizer).__name__, i, missing, group)


def _other_optimizer_error(kind: str, index: int, missing: list[str], group: Mapping[str, Any]) -> ValueError:
    saved = sorted(k for k in group if k not in ("params", "param_names"))
    return ValueError(
        f"the saved optimizer state is not a {kind}'s: its parameter group {index} has no {missing} (saved with "
        f"{saved}); nothing was loaded. To carry the balancer's part over to this optimizer (weights, per-point "
        "tables, strategy state), load {**state, 'optimizer': None}"
    )


def _check_entry(position: int, entry: Mapping[str, Any], param: Tensor, flat_keys: frozenset[str], total: int) -> None:
    """One parameter's saved state against the parameter (and the parameters' ``total`` elements)."""
    for key, value in entry.items():
        if key in _PARAMETER_SHAPED and isinstance(value, Tensor) and value.shape != param.shape:
            raise ValueError(
                f"this state is for another model: the optimizer's {key!r} of parameter {position} has shape "
                f"{tuple(value.shape)}, the parameter {tuple(param.shape)}; nothing was loaded"
            )
        if key in flat_keys and any(v.numel() != total for v in _tensors(value)):
            raise ValueError(
                f"this state is for another model: the optimizer's {key!r} holds vectors of another length than "
                f"the {total} elements of its parameters; nothing was loaded"
            )


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of a state entry: itself, or those of a list (L-BFGS's history)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in items if isinstance(v, Tensor)]


def _saved_entries(saved: Any, optimizer: torch.optim.Optimizer) -> list[tuple[int, Mapping[str, Any], Tensor]]:
    """``(position, saved state, parameter)`` per parameter with a saved state, matched by
    position; none where torch's own ``load_state_dict`` reports the state (malformed, or
    groups of other sizes)."""
    if not _same_layout(saved, optimizer):
        return []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    entries = [(position, saved["state"].get(index), param) for position, (index, param) in enumerate(zip(ids, params))]
    return [(position, entry, param) for position, entry, param in entries if isinstance(entry, Mapping)]


def _same_layout(saved: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``saved`` is an optimizer state whose groups hold as many parameters as ``optimizer``'s."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping):
        return False
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        return False
    return [len(g["params"]) for g in groups] == [len(g["params"]) for g in optimizer.param_groups]
