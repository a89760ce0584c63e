"""Helpers and checks shared by the strategy tests (test_dwa, test_softadapt, test_relobralo,
test_uncertainty, test_gradnorm, test_gradnorm_ratio).

Nothing here shares code with the strategies: the references each test compares against stay in
its own file, written in plain Python.
"""
from __future__ import annotations

import copy
import io
import math
import string
from typing import Any, Callable, Sequence

import pytest
import torch
from hypothesis import strategies as st

from _models import mlp
from lossbalance import LossBalancer
from lossbalance.gradients import GradStats
from lossbalance.strategies.base import StepRecord, Strategy

F64 = torch.float64
NAMES = ["pde", "left", "right"]  # the tiny PINN's terms, in the balancer's order


# ----------------------------------------------------------------------------- the tiny PINN
def pinn_losses(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """u'' = -pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0 (exact: sin(pi x)); 32 points."""
    x = torch.linspace(0, 1, 32, dtype=dtype).reshape(-1, 1).requires_grad_(True)
    u = model(x)
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
    return {
        "pde": (d2u + math.pi**2 * torch.sin(math.pi * x)).pow(2).mean(),
        "left": model(torch.zeros(1, 1, dtype=dtype)).pow(2).sum(),
        "right": model(torch.ones(1, 1, dtype=dtype)).pow(2).sum(),
    }


def tiny_pinn(seed: int = 0, dtype: torch.dtype = torch.float32, width: int = 16):
    """The model (MLP 1-width-width-1 tanh, initialised from ``torch.manual_seed(seed)``) and a
    closure returning its three loss terms."""
    model = mlp((1, width, width, 1), seed=seed, dtype=dtype)
    return model, lambda: pinn_losses(model, dtype)


def unweighted(losses: Callable[[], dict[str, torch.Tensor]]) -> float:
    """The plain sum of the terms (weights change during training: compare this one)."""
    return sum(v.item() for v in losses().values())


def term_grads(losses: dict[str, torch.Tensor], params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per-term gradients of the tiny PINN's terms, independent ``autograd.grad`` calls (zeros where
    a term does not reach: the pde term does not reach the output bias)."""
    out = []
    for n in NAMES:
        g = torch.autograd.grad(losses[n], params, retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
    return out


def py_norm(tensors) -> float:
    """The 2-norm over a list of tensors, in plain Python floats."""
    sq = 0.0
    for tensor in tensors:
        for value in tensor.reshape(-1).tolist():
            sq += value * value
    return math.sqrt(sq)


# ----------------------------------------------------------------------------- hand-made records
def make_record(names, losses, weights=None, update: int = 0, *, grads: GradStats | None = None,
                generator: torch.Generator | None = None, dtype: torch.dtype = F64,
                step: int | None = None) -> StepRecord:
    """A StepRecord; lists become ``dtype`` tensors (tensors are used as they are), the weights
    default to ones, ``step`` to ``update``, the generator to a fresh one seeded 0."""
    losses = losses if isinstance(losses, torch.Tensor) else torch.tensor(losses, dtype=dtype)
    if weights is None:
        weights = torch.ones(len(names), dtype=losses.dtype)
    elif not isinstance(weights, torch.Tensor):
        weights = torch.tensor(weights, dtype=dtype)
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    return StepRecord(tuple(names), losses, weights, update if step is None else step, update, grads, generator)


def drive(strategy: Strategy, names, sequence, *, dtype: torch.dtype = F64, seed: int = 0,
          feedback: bool = True) -> list[torch.Tensor]:
    """Direct ``update()`` calls on ``sequence`` (one list of loss values per update), with one
    generator seeded ``seed``; ``feedback``: the weights go back in as the balancer does (else 1)."""
    generator = torch.Generator().manual_seed(seed)
    weights = [1.0] * len(names)
    out = []
    for t, losses in enumerate(sequence):
        new = strategy.update(make_record(names, losses, weights, t, generator=generator, dtype=dtype))
        if feedback:
            weights = new.tolist()
        out.append(new)
    return out


def make_stats(rows: torch.Tensor, sizes: list[int], scope: list[list[bool]] | None = None) -> GradStats:
    """GradStats of the (K, P) per-term gradients ``rows`` split into tensors of ``sizes``."""
    k = rows.shape[0]
    parts = rows.split(sizes, dim=1)
    sum_abs = torch.stack([p.abs().sum(1) for p in parts], 1)
    max_abs = torch.stack([p.abs().amax(1) for p in parts], 1)
    sum_sq = torch.stack([torch.linalg.vector_norm(p, dim=1) for p in parts], 1).square()
    numel = torch.tensor(sizes, dtype=rows.dtype)
    matrix = torch.tensor([True] + [False] * (len(sizes) - 1))
    mask = torch.ones(k, len(sizes), dtype=torch.bool) if scope is None else torch.tensor(scope)
    return GradStats(sum_abs, max_abs, sum_sq, numel, matrix, mask, None)


def norm_record(norms: list[float], weights: list[float] | None = None, *, losses: list[float] | None = None,
                names=None, dtype: torch.dtype = F64, update: int = 0) -> StepRecord:
    """A record whose term i has a one-entry gradient of value norms[i] (so ||g_i|| = norms[i]);
    names default to t0, t1, ..., losses and weights to ones."""
    k = len(norms)
    rows = torch.tensor(norms, dtype=dtype).reshape(k, 1)
    names = [f"t{i}" for i in range(k)] if names is None else names
    losses = [1.0] * k if losses is None else losses
    return make_record(names, losses, weights, update, grads=make_stats(rows, [1]), dtype=dtype)


# ----------------------------------------------------------------------------- hypothesis
loss_values = st.one_of(
    st.just(0.0), st.builds(lambda m, e: m * 10.0**e, st.floats(0.1, 10.0), st.integers(-30, 30))
)


@st.composite
def loss_sequences(draw, min_terms: int = 1, min_len: int = 2, max_len: int = 5) -> list[list[float]]:
    """1-5 terms (at least ``min_terms``) over ``min_len``..``max_len`` updates; values 0 or 1e-31..1e31."""
    k = draw(st.integers(min_terms, 5))
    n = draw(st.integers(min_len, max_len))
    return [draw(st.lists(loss_values, min_size=k, max_size=k)) for _ in range(n)]


def positive_sequences(min_len: int) -> st.SearchStrategy[list[list[float]]]:
    """Three terms in [0.01, 100] over ``min_len``..6 updates."""
    return st.lists(st.lists(st.floats(0.01, 100.0), min_size=3, max_size=3), min_size=min_len, max_size=6)


powers_of_two = st.lists(st.integers(-60, 60), min_size=3, max_size=3)  # one exponent per term


# ----------------------------------------------------------------------------- checks
def assert_finite_positive(weights: torch.Tensor, dtype: torch.dtype | None = None, context: Any = None,
                           shape: tuple[int, ...] | None = None) -> None:
    if dtype is not None:
        assert weights.dtype == dtype
    if shape is not None:
        assert weights.shape == shape
    assert torch.isfinite(weights).all() and (weights > 0).all(), (context, weights)


def check_finite_and_positive(strategy: Strategy, sequence, dtype: torch.dtype,
                              feedback: bool = True) -> list[torch.Tensor]:
    """Drive ``strategy`` through ``sequence``: every weight vector has ``dtype``, is finite and > 0."""
    names = [f"t{i}" for i in range(len(sequence[0]))]
    out = drive(strategy, names, sequence, dtype=dtype, feedback=feedback)
    for w in out:
        assert_finite_positive(w, dtype, sequence)
    return out


PERMUTATION_RTOL = {torch.float32: 1e-5, F64: 1e-12}


def check_permutation_invariance(make: Callable[[], Strategy], sequence, perm: Sequence[int], dtype: torch.dtype,
                                 *, seed: int = 0, exact: bool = False, feedback: bool = True,
                                 rtol: float | None = None) -> None:
    """Reordering the terms permutes the weights (up to ``rtol``, default PERMUTATION_RTOL, or bit
    for bit if ``exact``)."""
    k = len(sequence[0])
    names = [f"t{i}" for i in range(k)]
    a = drive(make(), names, sequence, dtype=dtype, seed=seed, feedback=feedback)
    permuted = [[L[p] for p in perm] for L in sequence]
    b = drive(make(), [names[p] for p in perm], permuted, dtype=dtype, seed=seed, feedback=feedback)
    for wa, wb in zip(a, b):
        if exact:
            assert torch.equal(wa[list(perm)], wb)
        else:
            torch.testing.assert_close(wa[list(perm)], wb, rtol=rtol or PERMUTATION_RTOL[dtype], atol=0)


def check_rescaling_invariance(make: Callable[[], Strategy], sequence, factors: Sequence[float], *,
                               seed: int = 0, rtol: float = 1e-13) -> None:
    """Multiplying term i's losses by ``factors[i]`` leaves the weights unchanged (float64)."""
    names = list(string.ascii_lowercase[: len(factors)])
    scaled = [[L[i] * factors[i] for i in range(len(factors))] for L in sequence]
    a = drive(make(), names, sequence, seed=seed)
    b = drive(make(), names, scaled, seed=seed)
    for wa, wb in zip(a, b):
        torch.testing.assert_close(wa, wb, rtol=rtol, atol=0)


def check_runs_on_meta_device(strategies: list[Strategy]) -> None:
    """No data-dependent host reads (.item(), float(), bool() of a tensor) on the update path:
    meta tensors hold no data, so any such read would raise. Terms come and go."""
    generator = torch.Generator().manual_seed(0)
    for strategy in strategies:
        for t, names in enumerate([("a", "b"), ("a", "b"), ("a", "b", "c"), ("b", "c"), ("a", "b", "c")]):
            k = len(names)
            rec = StepRecord(names, torch.ones(k, device="meta"), torch.ones(k, device="meta"), t, t, None, generator)
            w = strategy.update(rec)
            assert w.device.type == "meta" and w.shape == (k,)


def check_matches_reference(strategy: Strategy, reference: Callable[[list[list[float]]], list[list[float]]], *,
                            steps: int, update_every: int, rel: float, abs: float | None = None,
                            lr: float = 2e-2, **balancer_options) -> tuple[LossBalancer, list[list[float]]]:
    """Train the float64 tiny PINN (seed 1) with Adam through ``LossBalancer(..., history=100)``;
    every step's weights must match ``reference(losses of the update steps)`` (one weight list
    per update); the weights of a step are those of its update. Returns the balancer and the
    reference's weights."""
    model, losses = tiny_pinn(1, F64)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    balancer = LossBalancer(opt, strategy, update_every=update_every, history=100, **balancer_options)
    for _ in range(steps):
        balancer.step(losses())
    hist = balancer.history
    sequence = [[h["losses"][n] for n in NAMES] for h in hist if h["step"] % update_every == 0]
    expected = reference(sequence)
    for h in hist:
        got = [h["weights"][n] for n in NAMES]
        assert got == pytest.approx(expected[h["step"] // update_every], rel=rel, abs=abs)
    return balancer, expected


def train_with_sgd(strategy: Strategy, *, model_seed: int, steps: int, lr: float = 1e-3,
                   probe_layer: int | None = None, **balancer_options):
    """SGD through the balancer on the float64 tiny PINN of width 8 (``probe_layer``: the balancer
    probes that layer of the model). Returns the trained model, a copy of it as it was before
    training (for a reference run) and the weights after each step, in NAMES order."""
    model, losses = tiny_pinn(model_seed, F64, width=8)
    initial = copy.deepcopy(model)
    if probe_layer is not None:
        balancer_options["probe"] = list(model[probe_layer].parameters())
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=lr), strategy, **balancer_options)
    weights = []
    for _ in range(steps):
        balancer.step(losses())
        weights.append([balancer.weights[n] for n in NAMES])
    return model, initial, weights


def check_resume_bit_identical(make: Callable[[], Strategy], *, n: int, model_seed: int = 5,
                               steps_after_save: int = 0,
                               on_load: Callable[[LossBalancer], None] | None = None,
                               **balancer_options) -> tuple[LossBalancer, LossBalancer, dict[str, Any]]:
    """2n steps in one go against n steps + torch.save + fresh model, optimizer (Adam) and balancer
    + load + n steps: bit-identical weights and parameters. ``steps_after_save`` more steps of the
    saved run after saving (the saved state must not alias live tensors); ``on_load(balancer)``
    runs on the freshly loaded balancer. Returns (full run, resumed run, what was saved)."""

    def fresh():
        model, losses = tiny_pinn(model_seed)
        return model, losses, LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), make(), **balancer_options)

    model_a, losses_a, bal_a = fresh()
    for _ in range(2 * n):
        bal_a.step(losses_a())
    model_b, losses_b, bal_b = fresh()
    for _ in range(n):
        bal_b.step(losses_b())
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "balancer": bal_b.state_dict()}, buffer)
    for _ in range(steps_after_save):
        bal_b.step(losses_b())
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model_c, losses_c, bal_c = fresh()
    model_c.load_state_dict(saved["model"])
    bal_c.load_state_dict(saved["balancer"])
    if on_load is not None:
        on_load(bal_c)
    for _ in range(n):
        bal_c.step(losses_c())
    assert bal_a.weights == bal_c.weights
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa.detach(), pc.detach())
    return bal_a, bal_c, saved


def check_trains_with_adam(strategy: Strategy, *, model_seed: int, below: float, steps: int = 150,
                           **balancer_options) -> LossBalancer:
    """Adam (lr 1e-2) on the tiny PINN: the unweighted sum of the terms ends below ``below`` times
    where it started."""
    model, losses = tiny_pinn(model_seed)
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), strategy, **balancer_options)
    start = unweighted(losses)
    for _ in range(steps):
        balancer.step(losses())
    assert unweighted(losses) < below * start
    return balancer


def check_trains_with_lbfgs(strategy: Strategy, *, model_seed: int, below: float,
                            steps: int = 10) -> tuple[LossBalancer, list[dict[str, float]]]:
    """L-BFGS (strong Wolfe, 20 iterations a step) with ``balancer.step(closure=...)`` on the tiny
    PINN: every total is finite and the unweighted sum ends below ``below`` times where it started.
    Returns the balancer and its weights after each step."""
    model, losses = tiny_pinn(model_seed)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
    balancer = LossBalancer(opt, strategy)
    start = unweighted(losses)
    seen = []
    for _ in range(steps):
        assert torch.isfinite(balancer.step(closure=losses))
        seen.append(balancer.weights)
    assert unweighted(losses) < below * start
    return balancer, seen
