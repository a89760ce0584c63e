"""MetricsLogger (W&B, MLflow, any log_fn), BalancedAggregator, and the missing-framework messages."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.integrations.aggregator import BalancedAggregator
from lossbalance.logging import MetricsLogger, balancer_metrics
from lossbalance.tensorboard import TensorBoardLogger


def problem(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.linspace(0, 1, 16)[:, None]

    def losses():
        u = net(x)
        return {"fit": (u - torch.sin(3 * x)).pow(2).mean(), "small": 10 * u.pow(2).mean()}

    return net, losses


def test_metrics_logger_logs_flat_floats_on_steps_0_n_2n():
    net, losses = problem()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
    balancer = LossBalancer(optimizer, LRAnnealing(reference="fit"), update_every=2, diagnose_every=1)
    calls = []
    balancer.register_step_hook(MetricsLogger(lambda m, s: calls.append((s, m)), every=3))
    for _ in range(7):
        balancer.step(losses())
    assert [s for s, _ in calls] == [0, 3, 6]
    for _, metrics in calls:
        assert set(metrics) == {"weight/fit", "weight/small", "loss/fit", "loss/small",
                                "grad_norm/fit", "grad_norm/small", "grad_mean/fit", "grad_mean/small",
                                "grad_max/fit", "grad_max/small", "conflict_fraction"}
        assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    assert calls[-1][1]["weight/small"] == balancer.weights["small"]
    plain = LossBalancer(torch.optim.SGD(net.parameters(), lr=1e-2), "static")
    plain.step(losses())
    assert set(balancer_metrics(plain)) == {"weight/fit", "weight/small", "loss/fit", "loss/small"}
    prefixed = MetricsLogger(lambda m, s: None, prefix="lb").metrics(plain, 0)
    assert set(prefixed) == {"lb/weight/fit", "lb/weight/small", "lb/loss/fit", "lb/loss/small"}
    with pytest.raises(ValueError, match="positive integer"):
        MetricsLogger(print, every=0)
    with pytest.raises(TypeError, match="callable"):
        MetricsLogger("wandb.log")


def test_tensorboard_logger_is_a_metrics_logger():
    written = []

    class Writer:
        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

    logger = TensorBoardLogger(Writer(), every=2)
    assert isinstance(logger, MetricsLogger)
    net, losses = problem()
    balancer = LossBalancer(torch.optim.SGD(net.parameters(), lr=1e-2), "lra")
    balancer.register_step_hook(logger)
    balancer.step(losses())
    assert {t for t, _, _ in written} >= {"lossbalance/weight/fit", "lossbalance/loss/small"}


def test_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="needs wandb (optional): pip install 'lossbalance[trackers]'")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="lossbalance-test")
    try:
        run.define_metric("lossbalance/step")
        run.define_metric("weight/*", step_metric="lossbalance/step")
        net, losses = problem()
        balancer = LossBalancer(torch.optim.SGD(net.parameters(), lr=1e-2), "lra", update_every=1)
        balancer.register_step_hook(MetricsLogger(lambda m, s: run.log({**m, "lossbalance/step": s}), every=2))
        for _ in range(5):
            balancer.step(losses())
        summary = dict(run.summary)
    finally:
        run.finish()
    assert summary["lossbalance/step"] == 4
    assert summary["weight/small"] == pytest.approx(balancer.history[-1]["weights"]["small"] if balancer.history
                                                    else balancer.weights["small"])
    assert any(tmp_path.rglob("*.wandb"))


def test_mlflow_local_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="needs mlflow (optional): pip install 'lossbalance[trackers]'")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.7 prefers a database; skinny has none
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    try:
        with mlflow.start_run() as active:
            net, losses = problem()
            balancer = LossBalancer(torch.optim.SGD(net.parameters(), lr=1e-2), "lra")
            balancer.register_step_hook(MetricsLogger(mlflow.log_metrics, every=2))
            for _ in range(5):
                balancer.step(losses())
        client = mlflow.tracking.MlflowClient()
        history = client.get_metric_history(active.info.run_id, "weight/small")
    finally:
        mlflow.set_tracking_uri(None)
    assert [m.step for m in history] == [0, 2, 4]
    assert history[-1].value == pytest.approx(balancer.weights["small"])


def test_balanced_aggregator_is_balancer_loss():
    net, losses = problem()
    reference = LossBalancer(torch.optim.SGD(net.parameters(), lr=0.0), LRAnnealing(reference="fit"))
    reference.backward(losses())
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    aggregator = BalancedAggregator(LossBalancer(net.parameters(), LRAnnealing(reference="fit")))
    assert isinstance(aggregator, nn.Module) and list(aggregator.parameters()) == []
    total = aggregator(losses(), step=0)
    total.backward()
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    assert aggregator.weights == reference.weights
    state = aggregator.state_dict()
    other = BalancedAggregator(LossBalancer(net.parameters(), LRAnnealing(reference="fit")))
    other.load_state_dict(state)
    assert other.balancer.step_count == 1 and other.weights == aggregator.weights
    with pytest.raises(TypeError, match="wraps a LossBalancer"):
        BalancedAggregator(net)


def test_the_aggregator_evaluates_in_a_validation_pass():
    # a PhysicsNeMo-style validation block (no_grad, or the module in eval mode) does not step the balancer
    net, losses = problem()
    aggregator = BalancedAggregator(LossBalancer(net.parameters(), LRAnnealing(reference="fit")))
    aggregator(losses(), step=0).backward()
    weights = aggregator.weights
    with torch.no_grad():
        total = aggregator(losses(), step=1)
    assert aggregator.balancer.step_count == 1 and not total.requires_grad
    aggregator.eval()
    expected = sum(weights[n] * v for n, v in losses().items())
    torch.testing.assert_close(aggregator(losses(), step=1), expected)
    assert aggregator.balancer.step_count == 1 and aggregator.weights == weights
    aggregator.train()
    aggregator(losses(), step=1).backward()
    assert aggregator.balancer.step_count == 2


def test_pointwise_figures_reach_the_logger():
    """The minimum causal weight (and any other figure of a term in ``stats``) is logged per term."""
    from lossbalance import Causal, Residual

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    points = torch.rand(32, 2)
    balancer = LossBalancer(torch.optim.SGD(net.parameters(), lr=1e-2), "static",
                            pointwise={"pde": Causal(chunks=4, eps=1.0)})
    calls = []
    balancer.register_step_hook(MetricsLogger(lambda m, s: calls.append(m)))
    r = net(points)[:, 0] - points[:, 0]
    balancer.step({"pde": Residual(r, t=points[:, 1], kind="residual"), "bc": net(points[:2]).pow(2).mean()})
    figures = balancer.stats["pde"]
    logged = {key.split("/")[0] for key in calls[0] if key.endswith("/pde")}
    assert "causal_min" in logged and calls[0]["causal_min/pde"] == float(figures["causal_min"])
