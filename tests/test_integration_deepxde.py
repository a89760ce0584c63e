"""lossbalance.integrations.deepxde on a tiny 1-D Poisson problem (DeepXDE's PyTorch backend)."""
from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("DDE_BACKEND", "pytorch")
dde = pytest.importorskip("deepxde", reason="needs DeepXDE (optional): pip install 'lossbalance[deepxde]'")

from lossbalance.integrations import deepxde as integration  # noqa: E402
from lossbalance.integrations.deepxde import balance, balancer_of, default_names  # noqa: E402

pytestmark = pytest.mark.skipif(dde.backend.backend_name != "pytorch", reason="DeepXDE runs another backend")


def poisson_model(seed: int = 0, *, split_bcs: bool = True):
    """u'' = -pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0 (solution sin(pi x)), 16 x 16 tanh net."""
    dde.config.set_random_seed(seed)
    geom = dde.geometry.Interval(0, 1)

    def pde(x, y):
        return dde.grad.hessian(y, x) + math.pi**2 * torch.sin(math.pi * x)

    if split_bcs:
        bcs = [dde.icbc.DirichletBC(geom, lambda x: 0, lambda x, on: on and np.isclose(x[0], 0)),
               dde.icbc.DirichletBC(geom, lambda x: 0, lambda x, on: on and np.isclose(x[0], 1))]
    else:
        bcs = [dde.icbc.DirichletBC(geom, lambda x: 0, lambda x, on: on)]
    data = dde.data.PDE(geom, pde, bcs, num_domain=32, num_boundary=2, num_test=64,
                        solution=lambda x: np.sin(np.pi * x))
    net = dde.nn.FNN([1, 16, 16, 1], "tanh", "Glorot uniform")
    return dde.Model(data, net)


def error(model) -> float:
    x = np.linspace(0, 1, 101)[:, None]
    exact = np.sin(np.pi * x)
    return float(np.linalg.norm(model.predict(x) - exact) / np.linalg.norm(exact))


def test_default_names():
    assert default_names(3, [object(), object()]) == ["pde", "bc0", "bc1"]
    assert default_names(4, [object(), object()]) == ["pde0", "pde1", "bc0", "bc1"]
    assert default_names(2, None) == ["loss0", "loss1"]


def test_adam_balances_then_lbfgs_continues_with_the_learned_weights(capsys):
    model = poisson_model()
    model.compile("adam", lr=1e-2)
    balancer = balance(model, "lra", update_every=10, history=500)
    start = error(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LRAnnealing")  # the reference is DeepXDE's pde term, silently
        model.train(iterations=300, display_every=100, verbose=0)
    assert balancer.strategy.reference == "pde"
    assert balancer.step_count == 300  # one call per iteration: DeepXDE's evaluations do not step it
    assert list(balancer.weights) == ["pde", "bc0", "bc1"]
    weights = balancer.weights
    assert weights["pde"] == 1.0 and weights["bc0"] > 2 and weights["bc1"] > 2  # LRA lifts the boundary terms
    assert len({round(h["weights"]["bc0"], 6) for h in balancer.history}) > 10  # and keeps adapting
    adam_error = error(model)
    assert adam_error < 0.1 * start
    # DeepXDE records the unweighted terms
    train_loss = model.losshistory.loss_train[-1]
    assert len(train_loss) == 3 and train_loss[0] == pytest.approx(balancer.history[-1]["losses"]["pde"], rel=0.5)

    model.compile("L-BFGS")
    lbfgs = balance(model)
    assert lbfgs is not balancer and lbfgs is balancer_of(model)
    assert lbfgs.weights == weights and lbfgs.frozen  # carried over, held fixed for the line search
    dde.optimizers.set_LBFGS_options(maxiter=40)
    calls, train_step = [], model.train_step

    def counted(*args):
        calls.append(1)
        return train_step(*args)

    model.train_step = counted
    try:
        model.train(verbose=0)
    finally:
        dde.optimizers.set_LBFGS_options()
    # one balancer step per train_step; the closure's re-evaluations are not steps
    assert lbfgs.step_count == len(calls) > 0 and lbfgs.weights == weights
    assert error(model) < adam_error


def test_loss_weights_of_compile_are_the_initial_weights():
    model = poisson_model(split_bcs=False)
    model.compile("adam", lr=1e-3, loss_weights=[1.0, 10.0])
    balancer = balance(model, "static")
    assert balancer.weights == {"pde": 1.0, "bc0": 10.0}
    assert model.loss_weights is None  # DeepXDE must not multiply a second time
    model.train(iterations=3, verbose=0)
    assert balancer.step_count == 3 and balancer.stats["bc0"]["weight"] == 10.0
    # names=
    model.compile("adam", lr=1e-3)
    renamed = balance(model, "lra", names=["residual", "walls"])
    model.train(iterations=2, verbose=0)
    assert list(renamed.weights) == ["residual", "walls"] and renamed.step_count == 2
    with pytest.raises(ValueError, match="2 loss terms, but 3 names"):
        model.compile("adam", lr=1e-3)
        balance(model, names=["a", "b", "c"])
        model.train(iterations=1, verbose=0)


def test_loss_weights_or_names_of_the_wrong_length_are_refused_by_balance():
    model = poisson_model()  # three terms: pde, bc0, bc1
    model.compile("adam", lr=1e-3, loss_weights=[1, 2])
    train_step = model.train_step
    message = r"compile\(loss_weights=\[1, 2\]\) has 2 entries, but DeepXDE computes 3 loss terms \['pde', 'bc0', 'bc1'\]"
    with pytest.raises(ValueError, match=message):
        balance(model, "lra")
    with pytest.raises(ValueError, match=r"3 loss terms \['residual', 'left', 'right'\]"):
        balance(model, "lra", names=["residual", "left", "right"])
    with pytest.raises(ValueError, match="DeepXDE computes 3 loss terms, but 2 names were given"):
        balance(model, "lra", names=["residual", "walls"])
    # nothing installed or changed by the refused calls
    assert balancer_of(model) is None and model.train_step is train_step and model.loss_weights == [1, 2]
    assert "losses_train" not in vars(model.data)
    model.compile("adam", lr=1e-3, loss_weights=[1, 2, 3])
    balancer = balance(model, "lra")
    assert balancer.weights == {"pde": 1.0, "bc0": 2.0, "bc1": 3.0}
    with pytest.raises(ValueError, match="DeepXDE computes 3 loss terms, but 4 names were given"):
        balance(model, "lra", names=["a", "b", "c", "d"])  # the balancer installed before stays
    model.train(iterations=2, verbose=0)
    assert balancer_of(model) is balancer and balancer.step_count == 2


def test_a_second_balance_of_the_same_compile_replaces_the_first():
    model = poisson_model()
    model.compile("adam", lr=1e-3)
    first = balance(model, "lra")
    second = balance(model, "lra")
    model.train(iterations=4, verbose=0)
    assert first.step_count == 0 and second.step_count == 4


def test_a_compile_without_a_new_balance_warns_that_the_terms_are_no_longer_balanced():
    # DeepXDE silently trained the unweighted sum after a recompile without balance(model)
    model = poisson_model()
    model.compile("adam", lr=1e-3, loss_weights=[1, 5, 5])
    balancer = balance(model, "lra")
    model.train(iterations=2, verbose=0)
    model.compile("adam", lr=1e-3)
    with pytest.warns(UserWarning, match=r"compiled again after balance\(model\): its loss terms are no longer balanced"):
        model.train(iterations=2, verbose=0)
    assert balancer.step_count == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.compile("adam", lr=1e-3)
        again = balance(model)  # carries the learned weights over, and warns no more
        model.train(iterations=2, verbose=0)
    assert again.step_count == 2 and again is not balancer


def test_the_balancer_state_travels_in_deepxde_checkpoints(tmp_path):
    def run(model, iterations):
        model.train(iterations=iterations, display_every=1000, verbose=0)

    model = poisson_model()
    model.compile("adam", lr=1e-2)
    balancer = balance(model, "lra", update_every=5)
    run(model, 40)
    path = model.save(str(tmp_path / "poisson"))
    assert "lossbalance" in torch.load(path, weights_only=True)
    run(model, 40)  # the uninterrupted run

    resumed = poisson_model(seed=1)  # other initial parameters: all come from the checkpoint
    resumed.compile("adam", lr=1e-2)
    other = balance(resumed, "lra", update_every=5)
    resumed.restore(path)
    assert other.step_count == 40 and other.weights != {"pde": 1.0, "bc0": 1.0, "bc1": 1.0}
    run(resumed, 40)
    assert other.weights == balancer.weights and other.step_count == 80
    for a, b in zip(model.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)  # bit for bit


def test_clear_errors():
    model = poisson_model()
    with pytest.raises(RuntimeError, match="not compiled: call model.compile"):
        balance(model)
    with pytest.raises(TypeError, match="deepxde.Model"):
        balance(torch.nn.Linear(1, 1))


def test_other_backend_is_refused(monkeypatch):
    model = poisson_model()
    model.compile("adam", lr=1e-3)
    monkeypatch.setattr(dde.backend, "backend_name", "jax")
    with pytest.raises(RuntimeError, match="PyTorch backend only.*DDE_BACKEND=pytorch"):
        balance(model)


def test_missing_deepxde_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepxde", None)
    with pytest.raises(ImportError, match=r"pip install 'lossbalance\[deepxde\]'"):
        integration.balance(object())
