"""lossbalance.integrations.pina: BalancedWeighting on a PINA PINN (tiny 2-D Poisson problem)."""
from __future__ import annotations

import importlib
import random
import sys
import warnings

import pytest
import torch

pytest.importorskip("pina.weighting", reason="needs PINA (optional): pip install 'lossbalance[pina]'")

from pina import Trainer  # noqa: E402
from pina.model import FeedForward  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from pina.problem.zoo import AdvectionProblem, Poisson2DSquareProblem  # noqa: E402
from pina.solver import CausalPhysicsInformedSingleModelSolver as CausalPINN  # noqa: E402
from pina.solver import CompetitivePhysicsInformedSolver as CompetitivePINN  # noqa: E402
from pina.solver import GradientPhysicsInformedSingleModelSolver as GradientPINN  # noqa: E402
from pina.solver import PhysicsInformedSingleModelSolver as PINN  # noqa: E402
from pina.solver import RBAPhysicsInformedSingleModelSolver as RBAPINN  # noqa: E402
from pina.solver import SelfAdaptivePhysicsInformedSolver as SAPINN  # noqa: E402
from pina.weighting import ScalarWeighting  # noqa: E402

from _ddp_frameworks import run_two_ranks  # noqa: E402
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


def poisson(problem_class=Poisson2DSquareProblem):
    """PINA's 2-D Poisson problem on 64 interior and 32 boundary points, the same in every run (the
    boundary, a union of four sides, is sampled with Python's ``random``: seeded here too)."""
    random.seed(0)
    torch.manual_seed(0)
    problem = problem_class()
    problem.discretise_domain(64, "random", domains=["D"])
    problem.discretise_domain(32, "random", domains=["boundary"])
    return problem


def advection():
    """PINA's 1-D advection problem (time-dependent: the causal solver's), 32 + 16 points."""
    random.seed(0)
    torch.manual_seed(0)
    problem = AdvectionProblem()
    problem.discretise_domain(32, "random", domains=["D"])
    problem.discretise_domain(16, "random", domains=["t0"])
    return problem


def solver_and_trainer(epochs: int, *, seed: int = 0, val_size: float = 0.0, weighting="lra", solver=PINN,
                       problem=poisson, solver_options=None, callbacks=(), **options):
    """A PINA solver on ``problem()`` with ``weighting`` (``"lra"``: BalancedWeighting(LRA, every 2
    steps); None: PINA's own) and its Trainer (one step per epoch: the whole set is one batch)."""
    problem = problem()
    torch.manual_seed(seed)
    model = FeedForward(input_dimensions=2, output_dimensions=1, layers=[16, 16])
    if weighting == "lra":
        weighting = BalancedWeighting(LRAnnealing(reference="D"), update_every=2)
    solver = solver(problem, model, weighting=weighting, **(solver_options or {}))
    callbacks = [*callbacks, *([LossBalancerCallback(weighting)] if isinstance(weighting, BalancedWeighting) else [])]
    options = dict(dict(accelerator="cpu", logger=False, enable_checkpointing=False), **options)
    trainer = Trainer(solver, max_epochs=epochs, enable_progress_bar=False, enable_model_summary=False, shuffle=False,
                      train_size=1.0 - val_size, val_size=val_size, callbacks=callbacks, **options)
    return solver, weighting, trainer


def parameters(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def static_run_equals_scalar_weighting(weights, steps=3, **setup):
    """A static balancer of ``weights`` against PINA's ScalarWeighting of the same weights, each
    trained ``steps`` steps: every parameter bit for bit equal; returns (PINA's solver, ours)."""
    alone, _, run = solver_and_trainer(steps, weighting=ScalarWeighting(weights), **setup)
    run.train()
    static, _, run = solver_and_trainer(steps, weighting=BalancedWeighting("static", weights=weights), **setup)
    run.train()
    assert static.weighting.balancer.step_count == steps
    for a, b in zip(parameters(alone), parameters(static)):  # every model of the solver
        assert torch.equal(a, b)
    return alone, static


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


def test_step_hooks_given_to_the_weighting_see_every_step_from_the_first():
    # the balancer is built at the first training step: a hook could not be registered before it
    from lossbalance.logging import MetricsLogger

    logged = []
    weighting = BalancedWeighting(LRAnnealing(reference="D"), update_every=2,
                                  hooks=[MetricsLogger(lambda metrics, step: logged.append((step, metrics)))])
    _, _, trainer = solver_and_trainer(3, weighting=weighting)
    trainer.train()
    assert [step for step, _ in logged] == [0, 1, 2]
    assert logged[-1][1]["weight/boundary"] == pytest.approx(weighting.balancer.weights["boundary"])


def test_a_resume_from_a_model_checkpoint_file_continues_bit_for_bit(tmp_path):
    """A checkpoint written by Lightning's ModelCheckpoint during ``trainer.train()`` and resumed
    with ``trainer.train(ckpt_path=...)``: the callback stores the balancer's state, the weighting
    holds it until its balancer is built at the first step, and the resumed run ends bit for bit
    where the uninterrupted one does (PINA's own weightings keep their weights outside the
    checkpoint: ``KeyError: 'boundary'`` on resume)."""
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    straight, straight_weighting, first = solver_and_trainer(10, callbacks=[saving], enable_checkpointing=True)
    first.train()
    path = tmp_path / "epoch=4-step=5.ckpt"
    saved = torch.load(path, weights_only=False)["lossbalance"]
    assert saved["step"] == 5 and saved["weights"] is not None

    resumed, weighting, again = solver_and_trainer(10, seed=3)  # other initial parameters
    assert weighting.balancer is None
    again.train(ckpt_path=str(path))
    assert weighting.balancer.step_count == straight_weighting.balancer.step_count == 10
    assert weighting.weights == straight_weighting.weights != {"D": 1.0, "boundary": 1.0}
    assert weighting.balancer.state_dict()["strategy"] == straight_weighting.balancer.state_dict()["strategy"]
    for a, b in zip(parameters(straight), parameters(resumed)):
        assert torch.equal(a, b)


POINTWISE_SOLVERS = {  # PINA's solvers with pointwise weights inside a condition's loss
    "rba": (RBAPINN, poisson, {}),
    "causal": (CausalPINN, advection, dict(n_steps=4, eps=1.0, regularized_conditions="D")),
}


@pytest.mark.parametrize("kind", list(POINTWISE_SOLVERS))
def test_rba_and_causal_solvers_compose_with_balanced_weighting(kind):
    """PINA's RBA and causal solvers weight the points (or time steps) inside each condition's
    loss and hand the weighting one scalar per condition; BalancedWeighting weights those
    scalars. No double weighting: a static balancer trains bit for bit like PINA's solver alone
    (the pointwise weights applied once, each one updated once per step), and LRA adapts on top."""
    solver, problem, options = POINTWISE_SOLVERS[kind]
    setup = dict(solver=solver, problem=problem, solver_options=options)
    weights = {"D": 1.0, "boundary" if kind == "rba" else "t0": 10.0}
    alone, static = static_run_equals_scalar_weighting(weights, steps=4, **setup)
    if kind == "rba":
        for condition in ("D", "boundary"):  # RBA's attention buffers
            assert torch.equal(getattr(alone, f"weight_{condition}"), getattr(static, f"weight_{condition}"))
        assert float(static.weight_D.min()) > 0  # PINA's attention weights were updated

    balanced, weighting, run = solver_and_trainer(4, **setup)
    run.train()
    other = next(c for c in weighting.weights if c != "D")
    assert weighting.weights["D"] == 1.0 and weighting.weights[other] != 1.0
    assert all(torch.isfinite(p).all() for p in balanced.parameters())


def test_lossbalance_pointwise_weights_are_refused_with_the_pina_solver_to_use():
    """PINA reduces each condition to a scalar before the weighting sees it, so lossbalance's own
    per-point weights (``pointwise=``) could never apply: refused, naming PINA's solvers."""
    from lossbalance.pointwise import RBA

    with pytest.raises(ValueError, match="pointwise=.*RBAPhysicsInformedSingleModelSolver"):
        BalancedWeighting("lra", pointwise={"D": RBA()})


def test_ddp_two_ranks_have_identical_weights():
    """``Trainer(solver, strategy="ddp", devices=2)`` (2 CPU processes, each with half the points
    of every batch): the balancer averages over the ranks, so both hold the same weights and
    parameters (PINA's own gradient-based weightings compute them per rank, and differ)."""
    ranks = run_two_ranks("pina")
    assert all(r["distributed"] for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"] == ranks[0]["pina_weights"] == ranks[1]["pina_weights"]
    assert ranks[0]["weights"]["boundary"] != 1.0
    assert ranks[0]["step_count"] == ranks[0]["global_step"] > 0
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))


def test_missing_pina_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "pina" or n.startswith("pina.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "lossbalance.integrations.pina")
    with pytest.raises(ImportError, match=r"pip install 'lossbalance\[pina\]'"):
        importlib.import_module("lossbalance.integrations.pina")


def record_aggregates(weighting):
    """A spy on ``weighting.aggregate`` in training steps: per call, the training batch, the
    condition losses, the weights applied, the returned total and the balancer's step count."""
    calls = []
    aggregate = weighting.aggregate

    def spy(losses):
        total = aggregate(losses)
        trainer = weighting.solver.trainer
        if trainer.training and torch.is_grad_enabled():
            calls.append(dict(
                batch=trainer.fit_loop.total_batch_idx, losses={k: float(v.detach()) for k, v in losses.items()},
                weights=dict(weighting.last_saved_weights()), total=float(total.detach()),
                steps=weighting.balancer.step_count if weighting.balancer is not None else 0,
            ))
        return total

    weighting.aggregate = spy
    return calls


def assert_totals_are_weighted_sums(calls):
    for call in calls:
        expected = sum(call["weights"][k] * loss for k, loss in call["losses"].items())
        assert call["total"] == pytest.approx(expected, rel=1e-5)


def test_gradient_enhanced_solver_balances_the_penalised_condition_losses():
    """GradientPhysicsInformedSingleModelSolver adds each condition's residual-gradient penalty to
    its loss before the weighting sees it (one scalar per condition, one aggregate per step,
    automatic optimisation): the balancer weights the penalised losses, steps once per step, and
    the solver's loss is the balanced total; a static balancer trains bit for bit like PINA's
    ScalarWeighting (the penalty counted once)."""
    static_run_equals_scalar_weighting({"D": 1.0, "boundary": 10.0}, solver=GradientPINN)

    _, weighting, run = solver_and_trainer(4, solver=GradientPINN)
    calls = record_aggregates(weighting)
    run.train()
    assert weighting.balancer.step_count == 4 and [c["steps"] for c in calls] == [1, 2, 3, 4]
    assert weighting.weights["D"] == 1.0 and weighting.weights["boundary"] != 1.0
    assert calls[-1]["weights"] == weighting.weights
    assert_totals_are_weighted_sums(calls)
    assert float(run.callback_metrics["train_loss"]) == pytest.approx(calls[-1]["total"])

    _, plain_weighting, run = solver_and_trainer(1)  # the same model and points, no gradient penalty
    plain_calls = record_aggregates(plain_weighting)
    run.train()
    for condition in ("D", "boundary"):
        assert calls[0]["losses"][condition] > plain_calls[0]["losses"][condition]


MIN_MAX_SOLVERS = {  # PINA's solvers with a second model and its own optimizer: (solver, its name, model's pass)
    "self_adaptive": (SAPINN, "weights", 1),  # the pointwise weights ascend first, then the model descends
    "competitive": (CompetitivePINN, "discriminator", 0),  # the model descends first, then the discriminator ascends
}


@pytest.mark.parametrize("kind", list(MIN_MAX_SOLVERS))
def test_min_max_solvers_balance_the_model_and_leave_the_second_model_to_its_optimizer(kind):
    """The self-adaptive (SA-PINN) and competitive solvers train a second model (the pointwise
    weights, the discriminator) with its own optimizer, by ascent, and aggregate the conditions
    twice per training step (once per optimizer). The balancer is built on the model's parameters
    only and steps once per training step, on the pass that trains the model; the second model's
    pass gets the weighted sum with the current weights and its optimizer ascends it as PINA
    intends (a static balancer trains both models bit for bit like PINA's ScalarWeighting)."""
    solver_class, second, model_pass = MIN_MAX_SOLVERS[kind]
    alone, static = static_run_equals_scalar_weighting({"D": 1.0, "boundary": 10.0}, solver=solver_class)

    solver, weighting, run = solver_and_trainer(3, solver=solver_class)
    initial = parameters(getattr(solver, second))
    calls = record_aggregates(weighting)
    run.train()
    balancer = weighting.balancer
    assert len(calls) == 6 and [c["batch"] for c in calls] == [0, 0, 1, 1, 2, 2]
    assert balancer.step_count == 3  # not 6: only the model's pass steps it
    assert [c["steps"] for c in calls] == ([0, 1, 1, 2, 2, 3] if model_pass == 1 else [1, 1, 2, 2, 3, 3])
    balanced = {id(p) for group in balancer.param_groups for p in group["params"]}
    assert balanced == {id(p) for p in solver.model.parameters()}  # not the second model's
    assert weighting.weights["D"] == 1.0 and weighting.weights["boundary"] != 1.0
    assert_totals_are_weighted_sums(calls)
    assert float(run.callback_metrics["train_loss"]) == pytest.approx(calls[-1]["total"])

    trained = parameters(getattr(solver, second))
    assert all(not torch.equal(a, b) for a, b in zip(initial, trained))  # its optimizer stepped
    if kind == "self_adaptive":  # the ascent raised every point's weight (the logits start at 0)
        assert all(bool((p > 0).all()) for p in trained)


@pytest.mark.parametrize("kind", list(MIN_MAX_SOLVERS))
def test_min_max_solvers_in_another_pass_order_are_refused(kind, monkeypatch):
    """Which aggregate of a step trains the model is PINA 0.3's order; a solver that orders its
    passes otherwise (simulated: the other index) is caught, the model still holding the other
    pass's gradients, with a clear error instead of a balancer stepped on the wrong pass."""
    from lossbalance.integrations import pina as integration

    solver_class, _, model_pass = MIN_MAX_SOLVERS[kind]
    monkeypatch.setattr(integration, "_model_pass", lambda solver: 1 - model_pass)
    _, _, run = solver_and_trainer(2, solver=solver_class)
    expected = f"aggregate {1 - model_pass} of each {solver_class.__name__}.*ScalarWeighting"
    with pytest.raises(RuntimeError, match=expected):
        run.train()


@pytest.mark.parametrize("kind", list(MIN_MAX_SOLVERS))
def test_min_max_solvers_resume_bit_for_bit(kind, tmp_path):
    """A resume of a min-max solver continues bit for bit, both models: the balancer is built on
    the first training aggregate of the resumed run (for the self-adaptive solver, the weights'
    pass, before the model's), so that pass already applies the restored weights."""
    solver_class, _, _ = MIN_MAX_SOLVERS[kind]
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    straight, straight_weighting, first = solver_and_trainer(4, solver=solver_class, callbacks=[saving],
                                                             enable_checkpointing=True)
    first.train()
    path, = tmp_path.iterdir()  # PINA's manual optimisation counts the step after ModelCheckpoint looks: one file
    assert 0 < torch.load(path, weights_only=False)["lossbalance"]["step"] < 4

    resumed, weighting, again = solver_and_trainer(4, solver=solver_class, seed=3)
    again.train(ckpt_path=str(path))
    assert weighting.balancer.step_count == straight_weighting.balancer.step_count == 4
    assert weighting.weights == straight_weighting.weights
    for a, b in zip(parameters(straight), parameters(resumed)):
        assert torch.equal(a, b)


def inverse_poisson():
    """PINA's inverse Poisson problem (unknowns mu1, mu2) on the points of :func:`poisson`."""
    from pina.problem.zoo import InversePoisson2DSquareProblem

    return poisson(InversePoisson2DSquareProblem)


def test_an_inverse_problems_unknowns_are_balanced_with_the_model():
    """PINA keeps an inverse problem's unknowns in a dict outside the modules (not in
    solver.parameters()) and trains them with the model's optimizer: the balancer holds them
    too, and a static balancer trains model and unknowns bit for bit as ScalarWeighting."""
    from pina.weighting import ScalarWeighting

    plain, balanced = static_run_equals_scalar_weighting({"D": 1.0, "boundary": 3.0}, problem=inverse_poisson)
    unknowns = balanced.problem.unknown_parameters
    held = {id(p) for group in balanced.weighting.balancer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in unknowns.values())
    for name, p in unknowns.items():
        assert torch.equal(p.detach(), plain.problem.unknown_parameters[name].detach()), name
    untrained, _, _ = solver_and_trainer(1, problem=inverse_poisson)  # its initial unknowns
    assert any(not torch.equal(p.detach(), untrained.problem.unknown_parameters[name].detach())
               for name, p in unknowns.items())  # they trained


def test_a_checkpoint_loaded_for_testing_gives_its_weights_before_any_training_step(tmp_path):
    """``trainer.test(ckpt_path=...)`` on a fresh solver: the restored weights weight the test
    sum (the balancer itself is built at the first training step only), as PINA's ScalarWeighting
    of the learned weights does on the same checkpoint."""
    def run(weighting, **options):
        problem = poisson()
        torch.manual_seed(0)
        solver = PINN(problem, FeedForward(input_dimensions=2, output_dimensions=1, layers=[16, 16]), weighting=weighting)
        callbacks = [LossBalancerCallback(weighting)] if isinstance(weighting, BalancedWeighting) else []
        trainer = Trainer(solver, max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, shuffle=False, train_size=0.7, test_size=0.3, callbacks=callbacks,
                          **options)
        return weighting, trainer

    learned, trainer = run(BalancedWeighting(LRAnnealing(reference="D"), update_every=1),
                           enable_checkpointing=True, default_root_dir=str(tmp_path))
    trainer.train()
    path = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    assert learned.weights["boundary"] != 1.0
    fresh, tester = run(BalancedWeighting(LRAnnealing(reference="D"), update_every=1), enable_checkpointing=False)
    ours = tester.test(ckpt_path=path)[0]
    assert fresh.balancer is None and fresh.weights == learned.weights
    _, reference = run(ScalarWeighting(weights=learned.weights), enable_checkpointing=False)
    theirs = reference.test(ckpt_path=path)[0]
    key = next(k for k in ours if "test" in k and "loss" in k)
    assert ours[key] == pytest.approx(theirs[key], rel=1e-12)
