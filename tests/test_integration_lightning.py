"""lossbalance.integrations.lightning: automatic optimisation with ``balancer.loss()``."""
from __future__ import annotations

import importlib
import math
import sys
import types
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="needs Lightning (optional): pip install 'lossbalance[lightning]'")

from _ddp_frameworks import LIGHTNING_BATCH, LIGHTNING_OPTIONS, LIGHTNING_POINTS, run_two_ranks  # noqa: E402
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


def test_ddp_two_ranks_have_identical_weights_equal_to_one_process_on_the_union():
    """Automatic optimisation under ``Trainer(strategy="ddp", devices=2)``: the balancer averages
    the per-term gradients over the ranks, the surrogate's backward accumulates that direction and
    DDP's reducer all-reduces ``.grad`` once more (a mean of equal tensors: unchanged), also
    after accumulating micro-batches under DDP's ``no_sync``. Rank r trains on points r, r+2, ...
    so a step's two batches are one process's batch of 64."""
    ranks = run_two_ranks("lightning")
    assert all(r["distributed"] for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"] != WEIGHTS  # identical, and adapted
    assert ranks[0]["state"]["strategy"] == ranks[1]["state"]["strategy"]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert ranks[0]["global_step"] == 2 and ranks[0]["step_count"] == 4  # 2 micro-batches per optimizer step

    single = PINN(build_late=True)
    union = loader(LIGHTNING_POINTS, 2 * LIGHTNING_BATCH)
    trainer(callbacks=[LossBalancerCallback()], **LIGHTNING_OPTIONS).fit(single, union)
    assert single.balancer.weights == pytest.approx(ranks[0]["weights"], rel=1e-5)
    for a, b in zip(single.parameters(), ranks[0]["params"]):  # twice-averaged .grad would differ here
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_balancer_built_before_the_processes_started_is_refused():
    """Built in ``__init__``, before ``Trainer.fit`` initialised torch.distributed, a balancer
    would balance each rank alone: refused at the start of training, with the fix."""
    module = PINN()
    ddp_trainer = types.SimpleNamespace(world_size=2)
    with pytest.raises(RuntimeError, match="built before torch.distributed was initialised.*configure_optimizers"):
        LossBalancerCallback().on_train_start(ddp_trainer, module)
    LossBalancerCallback().on_train_start(types.SimpleNamespace(world_size=1), module)  # one process: fine


class Snapshot(pl.Callback):
    """The balancer's state when training starts (after LossBalancerCallback restored it) and at the end."""

    def __init__(self):
        self.states = {}

    def on_train_start(self, trainer, pl_module):
        self.states["start"] = pl_module.balancer.state_dict()

    def on_train_end(self, trainer, pl_module):
        self.states["end"] = pl_module.balancer.state_dict()


def same_batches(batches: int = 4):
    """One epoch of ``batches`` identical batches: a run's data do not depend on where in the epoch it resumes."""
    x = torch.rand(16, 1, generator=torch.Generator().manual_seed(1)).repeat(batches, 1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16, shuffle=False)


@pytest.mark.filterwarnings("ignore:.*ended before the epoch ended:UserWarning")
@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint:UserWarning")
def test_a_mid_epoch_checkpoint_resumes_the_balancer_bit_for_bit(tmp_path):
    """Saved by ``ModelCheckpoint(every_n_train_steps=3)`` in the middle of the first epoch: the
    restored balancer equals the saved one (step counter, weights, LRA's state), and with every
    batch the same (so that Lightning's data position after a mid-epoch resume does not matter)
    the resumed run ends bit for bit where the uninterrupted one does."""
    options = dict(max_steps=8, gradient_clip_val=1.0)
    saving = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    straight, end = PINN(), Snapshot()
    trainer(callbacks=[LossBalancerCallback(), saving, end], enable_checkpointing=True, **options).fit(
        straight, same_batches())
    path = tmp_path / "epoch=0-step=3.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["lossbalance"]["step"] == 3
    assert saved["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0  # mid-epoch

    resumed, restored = PINN(seed=7), Snapshot()
    again = trainer(callbacks=[LossBalancerCallback(), restored], **options)
    again.fit(resumed, same_batches(), ckpt_path=path)
    assert_states_equal(restored.states["start"], saved["lossbalance"])
    assert again.global_step == 8 and resumed.balancer.step_count == 8
    assert_states_equal(restored.states["end"], end.states["end"])
    assert resumed.balancer.weights == straight.balancer.weights != WEIGHTS
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def assert_states_equal(a, b) -> None:
    """Two ``state_dict()``s equal exactly (tensors included, any nesting)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_states_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_states_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


class ValidatedPINN(PINN):
    """``validation_step``/``test_step`` call ``self.balancer.loss`` as training does (a PINN's
    derivatives need gradients: ``with_grad``), and record what they get."""

    def __init__(self, *args, with_grad: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.with_grad, self.seen = with_grad, []

    def _evaluated(self, batch):
        with torch.set_grad_enabled(self.with_grad):
            losses = poisson_losses(self.net, batch[0]) if self.with_grad else {
                "pde": self.net(batch[0]).pow(2).mean(), "bc": self.net(batch[0][:2]).pow(2).sum()}
            total = self.balancer.loss(losses)
        weights = self.balancer.weights or WEIGHTS  # before the first step (the sanity check): weights=
        self.seen.append((total.detach(), sum(weights[k] * v.detach() for k, v in losses.items())))
        self.log("val_loss", total.detach(), batch_size=len(batch[0]))

    def validation_step(self, batch, batch_idx):
        self._evaluated(batch)

    def test_step(self, batch, batch_idx):
        self._evaluated(batch)


@pytest.mark.parametrize("with_grad", [True, False])
def test_validation_and_test_steps_get_the_weighted_total_and_step_nothing(with_grad):
    """With the callback, ``balancer.loss()`` in validation and test (sanity check included) is
    ``sum_i w_i L_i`` with the current weights and steps nothing: training is bit for bit the
    run without validation, and the balancer counts the training steps only."""
    alone = PINN("balanced")
    fit = trainer(max_epochs=2, callbacks=[LossBalancerCallback()])
    fit.fit(alone, loader())
    validated = ValidatedPINN("balanced", with_grad=with_grad)
    run = trainer(max_epochs=2, callbacks=[LossBalancerCallback()], num_sanity_val_steps=2, inference_mode=False)
    run.fit(validated, loader(), loader())
    run.test(validated, loader())
    assert validated.balancer.step_count == alone.balancer.step_count == 8
    assert validated.balancer.weights == alone.balancer.weights != WEIGHTS
    for a, b in zip(alone.parameters(), validated.parameters()):
        assert torch.equal(a, b)
    assert len(validated.seen) == 2 + 2 * 4 + 4  # sanity check, two validation epochs, one test
    for total, expected in validated.seen:
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    assert not validated.balancer.evaluating
