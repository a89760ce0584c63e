"""lossbalance.integrations.lightning: automatic optimisation with ``balancer.loss()``."""
from __future__ import annotations

import importlib
import math
import sys
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="needs Lightning (optional): pip install 'lossbalance[lightning]'")

from lossbalance import LossBalancer, LRAnnealing  # noqa: E402
from lossbalance.integrations.lightning import LossBalancerCallback  # noqa: E402

WEIGHTS = {"pde": 1.0, "bc": 10.0}


@pytest.fixture(autouse=True)
def quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", message=".*GPU available.*")
        yield


def poisson_losses(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    u = net(x)
    (u_x,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (u_xx,) = torch.autograd.grad(u_x.sum(), x, create_graph=True)
    ends = torch.tensor([[0.0], [1.0]], dtype=x.dtype)
    return {"pde": (u_xx + math.pi**2 * torch.sin(math.pi * x)).pow(2).mean(), "bc": net(ends).pow(2).sum()}


class PINN(pl.LightningModule):
    """``mode``: "balanced" (``balancer.loss``), or "plain" (the static weighted sum, no balancer)."""

    def __init__(self, mode: str = "balanced", strategy=None, *, seed: int = 0, build_late: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        self.mode = mode
        self.strategy = strategy
        self.build_late = build_late
        self.balancer = None if build_late or mode == "plain" else self.make_balancer()

    def make_balancer(self) -> LossBalancer:
        strategy = self.strategy or LRAnnealing(reference="pde")
        return LossBalancer(self.parameters(), strategy, weights=WEIGHTS, update_every=2)

    def configure_optimizers(self):
        if self.build_late:
            self.balancer = self.make_balancer()
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        losses = poisson_losses(self.net, batch[0])
        if self.mode == "plain":
            return sum(WEIGHTS[k] * v for k, v in losses.items())
        return self.balancer.loss(losses)


def loader(points: int = 64, batch_size: int = 16):
    x = torch.rand(points, 1, generator=torch.Generator().manual_seed(1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch_size, shuffle=False)


def trainer(**options):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **options})


def test_clipping_accumulation_and_scheduler_apply_unchanged():
    """A static balancer's ``loss()`` trains exactly like the plain weighted sum under Lightning's
    gradient clipping, accumulation and LR schedule (the surrogate's gradient is the sum's)."""
    options = dict(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.05)
    plain, balanced = PINN("plain"), PINN("balanced", "static")
    trainer(**options).fit(plain, loader())
    fit = trainer(callbacks=[LossBalancerCallback()], **options)
    fit.fit(balanced, loader())
    assert fit.global_step == 4 and balanced.balancer.step_count == 8  # a balancer step per micro-batch
    assert fit.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(5e-3)
    for a, b in zip(plain.parameters(), balanced.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    unclipped = PINN("balanced", "static")
    trainer(**{**options, "gradient_clip_val": None}).fit(unclipped, loader())
    assert not torch.allclose(unclipped.net[0].weight, balanced.net[0].weight)  # the clipping was active


def test_resume_at_an_epoch_boundary_continues_bit_for_bit(tmp_path):
    options = dict(gradient_clip_val=1.0, accumulate_grad_batches=2)
    straight = PINN()
    trainer(max_epochs=2, callbacks=[LossBalancerCallback()], **options).fit(straight, loader())

    first = PINN()
    run = trainer(max_epochs=1, callbacks=[LossBalancerCallback()], **options)
    run.fit(first, loader())
    path = tmp_path / "epoch1.ckpt"
    run.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["lossbalance"]
    assert saved["step"] == 4 and saved["weights"] is not None

    resumed = PINN(seed=7, build_late=True)  # other parameters; its balancer is built after the restore
    again = trainer(max_epochs=2, callbacks=[LossBalancerCallback()], **options)
    again.fit(resumed, loader(), ckpt_path=path)
    assert again.global_step == 4 and resumed.balancer.step_count == 8
    assert resumed.balancer.weights == straight.balancer.weights != WEIGHTS
    assert resumed.balancer.state_dict()["strategy"] == straight.balancer.state_dict()["strategy"]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bf16_mixed_trains_and_logs():
    module = PINN()
    fit = trainer(max_epochs=3, precision="bf16-mixed", callbacks=[LossBalancerCallback()])
    before = {k: v.item() for k, v in poisson_losses(module.net, torch.rand(32, 1)).items()}
    fit.fit(module, loader())
    weights = module.balancer.weights
    assert module.balancer.step_count == 12 and weights["bc"] != WEIGHTS["bc"]
    assert all(math.isfinite(w) and w > 0 for w in weights.values())
    logged = fit.callback_metrics
    assert float(logged["weight/bc"]) == pytest.approx(weights["bc"])
    assert float(logged["loss/pde"]) == pytest.approx(module.balancer.stats["pde"]["loss"])
    after = {k: v.item() for k, v in poisson_losses(module.net, torch.rand(32, 1)).items()}
    assert after["bc"] < before["bc"]


def test_the_given_balancer_wins_and_a_missing_one_is_a_clear_error():
    module = PINN()
    other = LossBalancer(module.parameters(), "static")
    assert LossBalancerCallback(other).balancer(module) is other
    assert LossBalancerCallback().balancer(module) is module.balancer
    module.balancer = None
    with pytest.raises(RuntimeError, match="found no balancer: PINN has no attribute 'balancer'"):
        LossBalancerCallback().balancer(module)
    with pytest.raises(TypeError, match="takes a LossBalancer"):
        LossBalancerCallback(module.net)


def test_missing_lightning_says_how_to_install(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "lossbalance.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'lossbalance\[lightning\]'"):
        importlib.import_module("lossbalance.integrations.lightning")
