"""lossbalance.integrations.pina: BalancedWeighting on a PINA PINN (tiny 2-D Poisson problem)."""
from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch

pytest.importorskip("pina.weighting", reason="needs PINA (optional): pip install 'lossbalance[pina]'")

from pina import Trainer  # noqa: E402
from pina.model import FeedForward  # noqa: E402
from pina.problem.zoo import Poisson2DSquareProblem  # noqa: E402
from pina.solver import PhysicsInformedSingleModelSolver as PINN  # noqa: E402

from lossbalance import LRAnnealing  # noqa: E402
from lossbalance.integrations.lightning import LossBalancerCallback  # noqa: E402
from lossbalance.integrations.pina import BalancedWeighting  # noqa: E402


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
        yield


def solver_and_trainer(epochs: int, *, seed: int = 0, val_size: float = 0.0, **options):
    torch.manual_seed(0)  # the same points in every run
    problem = Poisson2DSquareProblem()
    problem.discretise_domain(64, "random", domains=["D"])
    problem.discretise_domain(32, "random", domains=["boundary"])
    torch.manual_seed(seed)
    model = FeedForward(input_dimensions=2, output_dimensions=1, layers=[16, 16])
    weighting = BalancedWeighting(LRAnnealing(reference="D"), update_every=2)
    solver = PINN(problem, model, weighting=weighting)
    options = dict(dict(accelerator="cpu", logger=False, enable_checkpointing=False), **options)
    trainer = Trainer(solver, max_epochs=epochs, enable_progress_bar=False, enable_model_summary=False, shuffle=False,
                      train_size=1.0 - val_size, val_size=val_size, callbacks=[LossBalancerCallback(weighting)],
                      **options)
    return solver, weighting, trainer


def test_a_pinn_solver_is_balanced_and_validation_does_not_step_it():
    solver, weighting, trainer = solver_and_trainer(40, val_size=0.2)
    assert weighting.weights == {} and weighting.balancer is None  # built at the first training step
    trainer.train()
    balancer = weighting.balancer
    assert balancer.step_count == 40  # one per training step; PINA's validation aggregates do not step it
    assert set(balancer.weights) == {"boundary", "D"} and balancer.weights["D"] == 1.0
    assert balancer.weights["boundary"] != 1.0
    assert weighting.last_saved_weights() == pytest.approx(balancer.weights)
    logged = trainer.callback_metrics
    assert float(logged["weight/boundary"]) == pytest.approx(balancer.weights["boundary"])
    assert float(logged["loss/D"]) == pytest.approx(balancer.stats["D"]["loss"])
    history = [float(v) for k, v in logged.items() if k == "D_loss"]  # PINA's own per-condition log
    assert history and history[0] < 200


def test_the_balancer_state_goes_into_lightning_checkpoints_and_comes_back(tmp_path):
    """Saved by the callback, loaded into the weighting before its balancer exists, applied when
    the balancer is built at the first training step. (Not bit for bit: two identical PINA runs
    already differ, so the comparison is with the saved state.)"""
    _, first_weighting, first = solver_and_trainer(10)
    first.train()
    path = tmp_path / "pina.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["lossbalance"]
    assert saved["step"] == 10 and saved["weights"].tolist() == list(first_weighting.weights.values())

    _, weighting, again = solver_and_trainer(11, seed=3)
    again.train(ckpt_path=str(path))
    balancer = weighting.balancer
    assert balancer.step_count == 11  # continued from the checkpoint's 10
    # step 10 is an update step (update_every=2): its weight is LRA's average of the saved one and a new estimate
    assert balancer.state_dict()["updates"] == saved["updates"] + 1


def test_missing_pina_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "pina" or n.startswith("pina.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "lossbalance.integrations.pina")
    with pytest.raises(ImportError, match=r"pip install 'lossbalance\[pina\]'"):
        importlib.import_module("lossbalance.integrations.pina")
