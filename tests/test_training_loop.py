"""Training-loop integration: checkpoints with an LR scheduler, mixed precision, logging hooks."""
import io

import pytest
import torch

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.tensorboard import TensorBoardLogger

from _models import PINN1D, TwoHeads


def make(seed=0, scaler=None, strategy=None):
    problem = PINN1D(seed=seed)
    opt = torch.optim.Adam(problem.model.parameters(), lr=1e-2)
    balancer = LossBalancer(opt, strategy or LRAnnealing("pde"), update_every=2, scaler=scaler)
    scheduler = torch.optim.lr_scheduler.StepLR(balancer.optimizer, step_size=3, gamma=0.7)
    return problem, balancer, scheduler


@pytest.mark.parametrize("strategy", ["lra", "relobralo"])
def test_checkpoint_with_scheduler_resumes_identically(strategy):
    def train(problem, balancer, scheduler, steps):
        for _ in range(steps):
            balancer.step(problem.losses())
            scheduler.step()

    make_strategy = (lambda: LRAnnealing("pde")) if strategy == "lra" else (lambda: "relobralo")
    straight = make(strategy=make_strategy())
    train(*straight, 10)

    first = make(strategy=make_strategy())
    train(*first, 4)
    buffer = io.BytesIO()
    problem, balancer, scheduler = first
    torch.save({"model": problem.model.state_dict(), "balancer": balancer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed = make(seed=5, strategy=make_strategy())
    resumed[0].x = straight[0].x
    resumed[0].model.load_state_dict(checkpoint["model"])
    resumed[1].load_state_dict(checkpoint["balancer"])
    resumed[2].load_state_dict(checkpoint["scheduler"])
    train(*resumed, 6)
    for a, b in zip(straight[0].model.parameters(), resumed[0].model.parameters()):
        assert torch.equal(a, b)
    assert straight[1].weights == resumed[1].weights
    assert straight[1].param_groups[0]["lr"] == resumed[1].param_groups[0]["lr"]


def test_bfloat16_autocast_on_cpu():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), LRAnnealing("a"))
    start = {k: v.item() for k, v in model.losses().items()}
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model.losses()
        balancer.step(losses)
    assert balancer._terms.weights.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    end = {k: v.item() for k, v in model.losses().items()}
    assert end["b"] < start["b"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.losses()
    balancer.backward(losses)
    got = [p.grad.clone() for p in model.parameters()]
    w = balancer.weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.losses()
    want = torch.autograd.grad(w["a"] * losses["a"] + w["b"] * losses["b"], list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), rtol=1e-2, atol=1e-3)


def test_grad_scaler_unscales_statistics_and_skips_overflow():
    plain = make(seed=1)
    scaled = make(seed=1, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000))
    for _ in range(4):  # power-of-two scale: unscaled statistics and steps agree with the plain run
        plain[1].step(plain[0].losses())
        scaled[1].step(scaled[0].losses())
    assert scaled[1].weights == pytest.approx(plain[1].weights, rel=1e-5)
    for a, b in zip(plain[0].model.parameters(), scaled[0].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    problem, balancer, _ = make(seed=2, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**127))
    params = [p.detach().clone() for p in problem.model.parameters()]
    balancer.step(problem.losses())  # the scaled gradients overflow float32
    assert balancer.weights == {"pde": 1.0, "dirichlet": 1.0, "neumann": 1.0}
    for a, b in zip(params, problem.model.parameters()):
        assert torch.equal(a, b)
    assert balancer.scaler.get_scale() < 2.0**127
    with pytest.raises(TypeError, match="GradScaler cannot be used with a closure"):
        balancer.step(closure=problem.losses)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_autocast_with_grad_scaler_on_cuda():
    model = TwoHeads().cuda()
    model.x, model.ya, model.yb = model.x.cuda(), model.ya.cuda(), model.yb.cuda()
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), LRAnnealing("a"),
                            scaler=torch.amp.GradScaler("cuda"))
    start = model.losses()["b"].item()
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.float16):
            losses = model.losses()
        balancer.step(losses)
    assert model.losses()["b"].item() < start
    assert all(torch.isfinite(torch.tensor(list(balancer.weights.values()))))


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_tensorboard_logger_writes_weights_losses_and_diagnostics():
    problem, balancer, _ = make()
    writer = FakeWriter()
    handle = balancer.register_step_hook(TensorBoardLogger(writer, every=2))
    for _ in range(4):
        balancer.step(problem.losses())
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"lossbalance/weight/pde", "lossbalance/loss/neumann", "lossbalance/grad_norm/dirichlet",
            "lossbalance/conflict_fraction"} <= tags
    assert sorted({step for _, _, step in writer.scalars}) == [0, 2]
    weight_at_2 = [v for tag, v, step in writer.scalars if tag == "lossbalance/weight/dirichlet" and step == 2]
    assert len(weight_at_2) == 1 and weight_at_2[0] > 0
    handle.remove()
    balancer.step(problem.losses())
    assert max(step for _, _, step in writer.scalars) == 2


def test_tensorboard_logger_with_a_real_summary_writer(tmp_path):
    pytest.importorskip("tensorboard")
    problem, balancer, _ = make()
    logger = TensorBoardLogger(log_dir=str(tmp_path))
    balancer.register_step_hook(logger)
    balancer.step(problem.losses())
    logger.writer.flush()
    assert any(tmp_path.iterdir())
