r"""NTK traces of residual terms, for the ``ntk`` strategy (:class:`~lossbalance.strategies.NTKWeighting`).

For a term whose points ``x_p`` have residuals ``r_p = r(x_p; theta)`` (a :class:`~lossbalance.Residual`
with ``kind="residual"``), the diagonal of its neural tangent kernel ``K = J J^T``
(``J = d r / d theta``, Wang, Yu & Perdikaris 2022, eq. (3.6)) is ``K_pp = ||grad_theta r_p||^2``.
The balancer hands the strategy one statistic per term,

``s = sum_p c_p K_pp``,

with per-point coefficients ``c_p >= 0``: ``c_p = 1`` (``points="sum"``: the trace ``tr K``, the
paper) or ``1 / N`` (``points="mean"``: the mean of the diagonal, jaxpi). A term with
:class:`~lossbalance.Causal` weights gets jaxpi's combination (``examples/allen_cahn/models.py``,
``compute_diag_ntk``: the diagonal averaged per chunk, times the chunk's causal weight, averaged
over the chunks): ``c_p = w_k(p) / (M' n_k(p))`` for ``points="mean"`` and ``c_p = w_k(p)``
for ``"sum"`` (``w_k`` the step's causal weights, stop-gradient; ``M'`` chunks, ``n_k`` points each).

Two ways to compute ``s`` (``trace=``):

- ``"exact"``: ``s = sum_p ||grad_theta (sqrt(c_p) r_p)||^2`` from the per-point gradients, ``chunk``
  points at a time (one batched backward per chunk, ``torch.autograd.grad(..., is_grads_batched=True)``
  with one-hot seeds). The balancer holds the batch's graph, not a per-point function, so every
  seed runs back through the whole batch: the cost is about ``N`` backward passes of the term
  (``N`` its points), the memory ``chunk`` times one backward's plus ``chunk x P`` (``P``
  parameters). For large batches use ``"hutchinson"``.
- ``"hutchinson"``: ``s = E_v ||grad_theta (v^T diag(sqrt(c)) r)||^2`` with Rademacher ``v``
  (``E[v v^T] = I``, so the estimate is unbiased: Hutchinson 1990), averaged over ``probes``
  independent ``v`` (about ``probes`` backward passes, ``chunk`` probes at a time; no ``N x P`` Jacobian). Its
  standard error is the sample standard deviation over the probes divided by ``sqrt(probes)``
  (NaN with ``probes=1``: one probe has no spread to estimate it from).
  The probes come from the balancer's generator (saved in its state: a resumed run draws the
  same ones).

The gradients run over the parameters the term may train (its ``scope=``, else all balanced
parameters). Both ways keep the graph (the step's backward uses it afterwards).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .pointwise import Causal, Pointwise, Reduced, Residual, _checked
from .validation import explain_autograd_error

__all__ = ["Trace", "TraceOptions", "exact_trace", "hutchinson_trace", "measure"]


class TraceOptions(NamedTuple):
    """How the ``ntk`` strategy wants its traces: ``points`` (``"sum"`` or ``"mean"``), ``trace``
    (``"exact"`` or ``"hutchinson"``), ``chunk`` (rows per batched backward), ``probes``."""

    points: Literal["sum", "mean"] = "sum"
    trace: Literal["exact", "hutchinson"] = "exact"
    chunk: int = 128
    probes: int = 16


class Trace(NamedTuple):
    """One term's statistic ``s`` and its standard error (0 for ``"exact"``), 0-dim float64."""

    value: Tensor
    stderr: Tensor


def _squared_norms(r: Tensor, params: Sequence[Tensor], seeds: Tensor) -> Tensor:
    """``||grad_theta (seeds[b] . r)||^2`` for every row ``b`` of ``seeds`` (one batched backward)."""
    grads = torch.autograd.grad(r, params, grad_outputs=seeds, is_grads_batched=True, retain_graph=True,
                                allow_unused=True)
    total = seeds.new_zeros(seeds.shape[0], dtype=torch.float64)
    for g in grads:
        if g is not None:
            total = total + g.reshape(g.shape[0], -1).to(torch.float64).square().sum(1)
    return total


def exact_trace(r: Tensor, c: Tensor, params: Sequence[Tensor], chunk: int) -> Trace:
    """``sum_p c_p ||grad_theta r_p||^2``, ``chunk`` points per batched backward."""
    root = c.to(r.dtype).sqrt()
    total = r.new_zeros((), dtype=torch.float64)
    for start in range(0, r.shape[0], chunk):
        rows = torch.arange(start, min(start + chunk, r.shape[0]), device=r.device)
        seeds = torch.zeros(rows.shape[0], r.shape[0], dtype=r.dtype, device=r.device)
        seeds[torch.arange(rows.shape[0], device=r.device), rows] = root[rows]
        total = total + _squared_norms(r, params, seeds).sum()
    return Trace(total, torch.zeros_like(total))


def hutchinson_trace(r: Tensor, c: Tensor, params: Sequence[Tensor], probes: int, chunk: int,
                     generator: torch.Generator) -> Trace:
    """The Hutchinson estimate of ``sum_p c_p ||grad_theta r_p||^2`` and its standard error."""
    draws = torch.randint(0, 2, (probes, r.shape[0]), generator=generator, device=generator.device)
    signs = (2 * draws - 1).to(device=r.device, dtype=r.dtype)
    seeds = signs * c.to(r.dtype).sqrt()
    q = torch.cat([_squared_norms(r, params, block) for block in torch.split(seeds, chunk)])
    stderr = q.std() / math.sqrt(probes) if probes > 1 else q.new_full((), math.nan)
    return Trace(q.mean(), stderr)


def _term_trace(options: TraceOptions, name: str, r: Tensor, t: Tensor | None, pointwise: Pointwise,
                params: Sequence[Tensor], scope: frozenset[int] | None, generator: torch.Generator) -> Trace:
    """One term's statistic over the parameters of its scope."""
    c = _coefficients(r, t, pointwise.weightings.get(name), pointwise.state.get(name), options.points)
    mine = [p for p in params if scope is None or id(p) in scope]
    try:
        if options.trace == "exact":
            return exact_trace(r, c, mine, options.chunk)
        return hutchinson_trace(r, c, mine, options.probes, options.chunk, generator)
    except RuntimeError as error:  # e.g. a Residual whose graph an earlier step freed
        raise explain_autograd_error(name, error) from error


def _coefficients(r: Tensor, t: Tensor | None, weighting: Any, state: Any, points: str) -> Tensor:
    """The per-point coefficients ``c_p`` (see the module docstring)."""
    if isinstance(weighting, Causal):
        w, share = weighting.point_weights(r.detach().square(), t, state)
        return w * share if points == "mean" else w
    n = r.shape[0]
    return r.new_full((n,), 1.0 / n if points == "mean" else 1.0).detach()


def check_weightings(pointwise: Pointwise) -> None:
    """At construction: NTK weights combine with Causal weights only (an error naming the terms)."""
    for name, weighting in pointwise.weightings.items():
        if not isinstance(weighting, Causal):
            raise ValueError(_combined_weighting_error(name, weighting))


def check_terms(names: Sequence[str], given: Any, pointwise: Pointwise) -> None:
    """On every step, not only on updates: each term is a :class:`Residual` of residuals (a
    scalar term would otherwise train until the first update, then raise)."""
    for name in names:
        if isinstance(given, Mapping) and name in given:
            _check_residual(name, given[name], pointwise)


def _combined_weighting_error(name: str, weighting: Any) -> str:
    return (f"strategy 'ntk' on loss term {name!r}, which has {weighting.label} weights: NTK weights combine with "
            "Causal weights only (jaxpi); drop one of them")


def _residual(name: str, given: Any, pointwise: Pointwise) -> tuple[Tensor, Tensor | None]:
    """The residual vector of term ``name`` (and its times), or an error naming the term."""
    _check_residual(name, given, pointwise)
    values, t, _ = _checked(name, given)
    return values, t


def _check_residual(name: str, given: Any, pointwise: Pointwise) -> None:
    if not isinstance(given, Residual):
        raise TypeError(
            f"strategy 'ntk' needs the per-point residuals r_i of loss term {name!r}, got a scalar loss: pass "
            "lossbalance.Residual(r, kind='residual') (the NTK trace sum_i ||grad r_i||^2 is not defined by the "
            "loss value alone)"
        )
    if given.kind != "residual":
        raise ValueError(
            f"strategy 'ntk' needs the residuals r_i of loss term {name!r}, got Residual(kind='loss') (per-point "
            "losses r_i**2): pass Residual(r, kind='residual')"
        )
    weighting = pointwise.weightings.get(name)
    if weighting is not None and not isinstance(weighting, Causal):
        raise ValueError(_combined_weighting_error(name, weighting))


def measure(options: TraceOptions, names: Sequence[str], reduced: Reduced, pointwise: Pointwise,
            params: Sequence[Tensor], scopes: Sequence[frozenset[int] | None], generator: torch.Generator,
            reduction: Any) -> Tensor:
    """The statistic ``s`` of every term in ``names`` (K,) float64, averaged over the processes
    (``reduction.mean_``); every term is checked before anything is computed. The figures
    ``ntk_trace`` (``s``) and ``ntk_trace_se`` (its standard error) go into ``reduced.figures`` (``stats``).
    A term another process holds (absent here) counts 0 here."""
    given: Mapping[str, Any] = reduced.given or {}
    inputs = {n: _residual(n, given[n], pointwise) for n in names if n in given}
    zero = Trace(torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    traces = [zero if name not in inputs else _term_trace(options, name, *inputs[name], pointwise, params, scope, generator)
              for name, scope in zip(names, scopes)]
    values = torch.stack([tr.value.to(params[0].device) for tr in traces])
    reduction.mean_(values)
    for name, value, tr in zip(names, values.unbind(), traces):
        reduced.figures.setdefault(name, {}).update(ntk_trace=value, ntk_trace_se=tr.stderr)
    return values
