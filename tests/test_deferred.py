"""Deferred finiteness checks (``check_every=N``): host syncs counted, and the rollback semantics.

A host synchronisation is counted as a read of a tensor's value on the host: every
``item()``/``bool()``/``float()``/``int()`` of a tensor goes through ``aten::_local_scalar_dense``
(seen by a dispatch mode), ``tolist()`` and ``numpy()`` are counted by wrapping them. On a GPU each
of these waits for the queued kernels; the count on CPU is the count a CUDA run would make. Reads
made inside ``torch.optim`` (Adam reads its step counter unless ``capturable=True``) are the
optimizer's, not the balancer's, and are not counted.
"""
from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.strategies.base import Strategy


def _in_optimizer() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if "/torch/optim/" in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back
    return False


class _Reads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def add(self) -> None:
        if not _in_optimizer():
            self.count += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.add()
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch):
    """Count the host reads of tensor values inside the block (``reads.count``)."""
    reads = _Reads()
    for method in ("tolist", "numpy"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, **kwargs):
            reads.add()
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    with reads:
        yield reads
    monkeypatch.undo()


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.linspace(0, 1, 16)[:, None]

    def losses(bad: str | None = None) -> dict[str, torch.Tensor]:
        u = model(x)
        terms = {"pde": (u - torch.sin(3 * x)).pow(2).mean(), "bc": u[0].pow(2).sum() + (u[-1] - 1).pow(2).sum()}
        if bad == "value":
            terms["bc"] = terms["bc"] * float("nan")
        elif bad == "gradient":  # a finite value (0) whose gradient is not: d sqrt(z)/dz at z = 0
            terms["bc"] = terms["bc"] + (u[0] * 0).abs().sqrt().sum()
        return terms

    return model, losses


def _strategy(name: str):
    return LRAnnealing(reference="pde") if name == "lra" else name


STRATEGIES = ["static", "relobralo", "softadapt", "dwa", "uncertainty", "lra"]


def _reads_per_call(monkeypatch, calls) -> list[int]:
    counts = []
    for call in calls:
        with host_reads(monkeypatch) as reads:
            call()
        counts.append(reads.count)
    return counts


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("path", ["step", "backward", "loss"])
def test_plain_calls_make_no_host_sync_and_update_calls_one(monkeypatch, strategy, path):
    model, losses = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    balancer = LossBalancer(opt, _strategy(strategy), update_every=4, check_every=1000)

    def call():
        if path == "step":
            balancer.step(losses())
        elif path == "backward":
            balancer.backward(losses())
            opt.step()
        else:
            opt.zero_grad()
            balancer.loss(losses()).backward()
            opt.step()

    call()  # the first call walks the graphs and registers the terms
    counts = _reads_per_call(monkeypatch, [call] * 12)
    updates = [i for i in range(1, 13) if i % 4 == 0]
    plain = [c for i, c in enumerate(counts, start=1) if i not in updates]
    assert plain == [0] * len(plain), counts
    if strategy != "static":  # static never updates
        assert [counts[i - 1] for i in updates] == [1] * len(updates), counts


def test_the_default_checks_every_plain_call_with_one_host_sync(monkeypatch):
    model, losses = _problem()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), "static")
    balancer.step(losses())
    assert _reads_per_call(monkeypatch, [lambda: balancer.step(losses())] * 3) == [1, 1, 1]


def test_reads_happen_every_n_calls_without_updates(monkeypatch):
    model, losses = _problem()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), "static", check_every=3)
    balancer.step(losses())  # call 0 (read? no: 1 call folded)
    counts = _reads_per_call(monkeypatch, [lambda: balancer.step(losses())] * 6)
    assert counts == [0, 1, 0, 0, 1, 0]


def _state(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    moments = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and v.dim()}
    return params, moments


def _assert_same_state(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key])


def _run(calls: list[str | None], *, check_every: int, update_every: int, nonfinite: str, strategy="relobralo"):
    model, losses = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    balancer = LossBalancer(
        opt, _strategy(strategy), update_every=update_every, check_every=check_every, nonfinite=nonfinite
    )
    totals, errors = [], []
    for bad in calls:
        try:
            totals.append(float(balancer.step(losses(bad))))
        except ValueError as error:
            errors.append(str(error))
            totals.append(None)
    return model, opt, balancer, totals, errors


@pytest.mark.parametrize("kind", ["value", "gradient"])
def test_a_nan_raises_at_the_next_read_and_undoes_every_call_since_the_last_clean_read(kind):
    calls = [None] * 6 + [kind] + [None] * 5
    model, opt, balancer, totals, errors = _run(calls, check_every=4, update_every=100, nonfinite="raise")
    # reads: call 0 (an update: the point), then every 4 calls: 4 (clean, the new point), 8 (finds call 6)
    assert len(errors) == 1 and totals[8] is None
    message = errors[0]
    assert "at step 6" in message and "found at step 8" in message and "since step 4" in message
    assert ("['bc']" in message) == (kind == "value")
    assert ("gradient of the weighted sum" in message) == (kind == "gradient")
    # the calls 4..8 were undone: the state is that of a clean run of calls 0..3, then calls 9.. went on
    reference = _run([None] * 4 + [None] * 3, check_every=1, update_every=100, nonfinite="raise")
    _assert_same_state(_state(model, opt), _state(reference[0], reference[1]))
    assert balancer.weights == reference[2].weights
    assert all(t is not None for t in totals[9:])


def test_a_skipped_nan_undoes_the_calls_since_the_last_clean_read_and_training_goes_on():
    calls = [None] * 6 + ["value"] + [None] * 5
    model, opt, balancer, totals, _ = _run(calls, check_every=4, update_every=3, nonfinite="skip")
    # reads at the updates (calls 0, 3, 6: call 6 itself is the NaN, read at once) and every 4 calls
    assert totals[6] != totals[6]  # NaN
    assert balancer._skipped == 4  # calls 3, 4, 5, 6: back to the start of call 3 (the last clean read)
    reference = _run([None] * 3 + [None] * 5, check_every=1, update_every=3, nonfinite="skip")
    _assert_same_state(_state(model, opt), _state(reference[0], reference[1]))
    assert balancer.weights == reference[2].weights


@settings(max_examples=25, deadline=None)
@given(
    every=st.integers(2, 6), update_every=st.integers(1, 7), bad=st.integers(0, 14),
    strategy=st.sampled_from(["relobralo", "lra", "static"]),
)
def test_after_a_skipped_nan_the_run_equals_a_clean_run_without_the_undone_calls(every, update_every, bad, strategy):
    n = 18
    calls = [None] * n
    calls[bad] = "value"
    model, opt, balancer, totals, _ = _run(calls, check_every=every, update_every=update_every, nonfinite="skip",
                                           strategy=strategy)
    pending = balancer._skipped == 0  # the NaN may still wait for its read at the end of the run
    balancer.check()
    undone = balancer._skipped
    nan = [i for i, t in enumerate(totals) if t != t]
    detected = n - 1 if pending else nan[-1]  # check() counts the calls up to the last one
    block = range(detected - undone + 1, detected + 1)
    assert bad in block  # the NaN call is among the undone ones
    assert 1 <= undone <= every + 1  # at most the N + 1 calls since the last clean read are lost
    assert all(t == t for i, t in enumerate(totals) if i not in block)  # nothing else is NaN
    kept = [None] * (n - undone)
    reference = _run(kept, check_every=1, update_every=update_every, nonfinite="skip", strategy=strategy)
    _assert_same_state(_state(model, opt), _state(reference[0], reference[1]))
    assert balancer.weights == reference[2].weights
    assert balancer.step_count == reference[2].step_count


def test_loss_path_rolls_back_the_parameters_and_the_optimizer_state():
    model, losses = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    balancer = LossBalancer(opt, "static", check_every=3, nonfinite="skip")
    states = []
    for i in range(6):
        states.append(_state(model, opt))
        opt.zero_grad()
        total = balancer.loss(losses("value" if i == 4 else None))
        total.backward()
        opt.step()
    # reads: calls 2 (clean: the point is the start of call 2) and 5 (finds call 4): back to call 2's start
    _assert_same_state(_state(model, opt), states[2])
    assert balancer._skipped == 4


def _a_pending_nan():
    """A balancer (check_every=100) after a clean call and a NaN call, nothing read yet; the
    state of the model and the optimizer before both."""
    model, losses = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    balancer = LossBalancer(opt, "static", check_every=100)
    start = _state(model, opt)
    balancer.step(losses())
    balancer.step(losses("value"))
    return model, opt, balancer, losses, start


def test_a_closure_call_reads_what_is_pending_first():
    model, opt, balancer, losses, start = _a_pending_nan()
    with pytest.raises(ValueError, match="at step 1"):
        balancer.step(closure=losses)
    _assert_same_state(_state(model, opt), start)
    assert balancer.step_count == 0


def test_check_every_needs_the_optimizer_and_no_scaler():
    model, _ = _problem()
    with pytest.raises(ValueError, match="check_every=4 undoes the optimizer's steps"):
        LossBalancer(model.parameters(), "static", check_every=4)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="check_every=4 cannot be used with scaler="):
        LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), "static", check_every=4, scaler=scaler)
    with pytest.raises(ValueError, match="check_every must be a positive integer, got 0"):
        LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), "static", check_every=0)


def test_check_every_travels_through_config():
    model, _ = _problem()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), "relobralo", check_every=7)
    config = balancer.config()
    assert config["check_every"] == 7
    again = LossBalancer.from_config(torch.optim.SGD(model.parameters(), lr=1e-3), config)
    assert again.check_every == 7


def test_loading_a_state_forgets_what_was_pending():
    model, losses = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    balancer = LossBalancer(opt, "static", check_every=5)
    balancer.step(losses())
    saved = balancer.state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    balancer.step(losses("value"))  # pending, not read yet (2 calls of 5)
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
    balancer.load_state_dict(saved)
    # the resumed run reads after its own 5th call: clean, nothing of the old NaN is reported
    totals = [balancer.step(losses()) for _ in range(7)]
    assert all(torch.isfinite(t) for t in totals) and balancer.skipped == 0


def test_check_reads_what_is_pending_and_rolls_back():
    model, opt, balancer, losses, start = _a_pending_nan()
    balancer.step(losses())
    with pytest.raises(ValueError, match="at step 1 .* the 3 call\\(s\\) since step 0 were undone"):
        balancer.check()
    _assert_same_state(_state(model, opt), start)
    assert balancer.step_count == 0
    balancer.check()  # nothing pending any more
    quiet = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-2), "static")
    quiet.step(losses())
    quiet.check()  # check_every=1: nothing to do


@pytest.mark.parametrize("strategy", ["relobralo", "softadapt", "dwa", "famo"])
@pytest.mark.parametrize("path", ["step", "backward"])
def test_an_update_of_a_loss_value_strategy_checks_the_values_with_the_gradients(monkeypatch, strategy, path):
    """The default checks (``check_every=1``): a loss-value strategy's update reads nothing of its
    own; the values are checked with the gradients of the one backward, one host sync per call."""
    model, losses = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    balancer = LossBalancer(opt, strategy)

    def call():
        if path == "step":
            balancer.step(losses())
        else:
            balancer.backward(losses())
            opt.step()

    call()
    updates = balancer._updates
    assert _reads_per_call(monkeypatch, [call] * 4) == [1] * 4
    assert balancer._updates == updates + 4


class _Picky(Strategy):
    """A loss-value strategy of a user's that raises its own error on a NaN value."""

    name = "picky"

    def update(self, record):
        if not bool(torch.isfinite(record.losses).all()):
            raise RuntimeError("picky: cannot take the log of nan")
        return record.weights


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_strategy_failing_on_an_unchecked_nan_value_gets_the_value_error(nonfinite):
    model, losses = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    balancer = LossBalancer(opt, _Picky(), nonfinite=nonfinite)
    balancer.step(losses())
    before = [p.detach().clone() for p in model.parameters()]
    if nonfinite == "raise":
        with pytest.raises(ValueError, match="'bc'"):
            balancer.step(losses("value"))
    else:
        assert torch.isnan(balancer.step(losses("value")))
        assert balancer._skipped == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert balancer._step == 1


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_a_state_saved_after_an_unread_nan_is_refused_on_load(nonfinite):
    # the checkpoint held the NaN parameters' state and the resumed run skipped every later step
    model, losses = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    balancer = LossBalancer(opt, "static", check_every=100, nonfinite=nonfinite)
    balancer.step(losses())
    clean = copy.deepcopy(balancer.state_dict())  # nothing non-finite unread: loads
    balancer.step(losses("value"))
    saved = copy.deepcopy(balancer.state_dict())  # no read, no rollback: the run is as it was
    assert balancer.step_count == 2 and balancer.skipped == 0
    fresh_model, fresh_losses = _problem()
    fresh = LossBalancer(torch.optim.SGD(fresh_model.parameters(), lr=1e-2), "static", check_every=100,
                         nonfinite=nonfinite)
    fresh.step(fresh_losses())
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"after a non-finite call \(step 1\) that no read had caught"):
        fresh.load_state_dict(saved)
    _assert_same_tree(fresh.state_dict(), before)
    fresh.load_state_dict(clean)
    assert fresh.step_count == 1
    if nonfinite == "skip":  # check() first: the rollback, then a state that loads
        balancer.check()
        fresh.load_state_dict(balancer.state_dict())
        assert fresh.step_count == 0


def _assert_same_tree(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys() and all(_assert_same_tree(a[k], b[k]) is None for k in a)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) and all(_assert_same_tree(x, y) is None for x, y in zip(a, b))
    else:
        assert a == b
