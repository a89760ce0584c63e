"""Every script in examples/ runs end to end with a tiny budget (imported by path, ``main(argv)``)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from lossbalance.strategies import available_strategies

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUIET = ["--workers", "1", "--progress", "none", "--eval-n", "12"]

#: a tiny budget for each example; a new example must add its entry here
ARGS = {
    "helmholtz_wang2021": ["--steps", "12", "--seeds", "0", "--no-plots", *QUIET],
    "burgers": ["--steps", "12", "--no-plots", *QUIET],
    "burgers_config": ["--steps", "6", "--seeds", "0", "--eval-every", "3"],
    "adam_then_lbfgs": ["--steps", "12", "--lbfgs-steps", "2", "--max-iter", "4", "--lbfgs-points", "32",
                        "--eval-n", "12"],
    "inverse_problem": ["--steps", "600"],
    "multitask_pcgrad": ["--steps", "40"],
    "gradient_penalty": ["--steps", "30", "--eval-n", "500"],
    "lightning_module": ["--steps", "30"],
    "deepxde_poisson": ["--steps", "200", "--lbfgs-steps", "20"],
    "fsdp2": ["--steps", "12"],
}


def require_lightning():
    """``lightning.pytorch`` or ``pytorch_lightning`` (optional dependencies), else skip."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        if importlib.util.find_spec(name.partition(".")[0]) is not None:
            return pytest.importorskip(name)
    pytest.skip("needs PyTorch Lightning (optional): pip install lightning")


def load(name: str):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"lossbalance_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_every_example_has_a_tiny_budget():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(ARGS)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_example_runs(name, capsys):
    if name == "lightning_module":
        require_lightning()  # the run without Lightning: test_lightning_module_without_lightning
    if name == "deepxde_poisson":
        pytest.importorskip("deepxde", reason="needs DeepXDE (optional): pip install 'lossbalance[deepxde]'")
    module = load(name)
    assert module.__doc__ and callable(module.main)
    result = module.main(ARGS[name])
    out = capsys.readouterr().out
    if name == "multitask_pcgrad":
        assert list(result) == ["sum", "pcgrad", "config"]
        for combine, run in result.items():
            for task in ("a", "b"):  # both tasks' losses go down with every combination
                assert run["final"][task] < run["initial"][task], (combine, task, run["initial"], run["final"])
            diagnostics = run["diagnostics"]
            assert diagnostics["names"] == ["a", "b"] and diagnostics["step"] == 39
            assert run["conflict_fraction"] == diagnostics["conflict_fraction"] in (0.0, 1.0)
            assert 0.0 <= run["conflicting_steps"] <= 1.0 and len(run["balancer"].history) == 40
            assert run["weights"] == {"a": 1.0, "b": 1.0}
            assert run["balancer"].combiner.name == combine
        header = next(line for line in out.splitlines() if line.startswith("combine"))
        assert [c.strip() for c in header.split("|")] == [
            "combine", "loss a", "loss b", "conflict (last)", "conflicting steps", "wall time"]
        return
    if name == "burgers_config":
        assert [(r["method"], r["seed"]) for r in result] == [("adam", 0), ("config", 0), ("mconfig", 0)]
        for r in result:
            assert [step for step, _ in r["history"]] == [0, 3, 6] and r["best"] <= r["final"]
            assert math.isfinite(r["best"]) and r["best"] == min(e for _, e in r["history"])
        assert "published" in out and "mconfig" in out
        return
    if name == "gradient_penalty":
        assert list(result) == [
            "static, lambda = 1", "static, lambda = 10", "lra (authors' code)", "lra (paper formula)"]
        for label, run in result.items():
            assert all(math.isfinite(w) and w > 0 for w in run["weights"].values()), (label, run["weights"])
            assert all(math.isfinite(v) for v in run["terms"].values()) and math.isfinite(run["estimate"])
            assert run["weights"]["critic"] == 1.0  # the reference keeps its weight
        assert result["static, lambda = 1"]["weights"]["penalty"] == 1.0
        assert result["static, lambda = 10"]["weights"]["penalty"] == 10.0
        for label in ("lra (authors' code)", "lra (paper formula)"):  # three updates (steps 0, 10, 20)
            assert result[label]["weights"]["penalty"] != pytest.approx(1.0, rel=1e-3), result[label]["weights"]
        assert "true W1 = 2" in out
        return
    if name == "lightning_module":
        assert result["skipped"] is False and result["global_step"] == 30 and result["balancer_steps"] == 30
        weights = result["weights"]
        assert weights["pde"] == 1.0 and math.isfinite(weights["bc"]) and weights["bc"] > 0 and weights["bc"] != 1.0
        assert result["logged"]["weight/bc"] == pytest.approx(weights["bc"])  # self.log of the last step
        assert result["logged"]["weight/pde"] == 1.0 and math.isfinite(result["logged"]["loss/pde"])
        assert result["after"]["pde"] < result["before"]["pde"]
        assert "30 steps (automatic optimisation)" in out
        return
    if name == "fsdp2":
        first, second = result["ranks"]
        assert "appears to not have been used in the graph" in first["autograd.grad"]
        assert "out of bounds for storage of size 0" in first["input derivatives"]
        assert first["weights"] == second["weights"] and first["weights"]["bc"] != 1.0
        assert first["weights"] == pytest.approx(result["reference"], rel=1e-5) and result["gap"] < 1e-5
        assert "largest parameter difference" in out
        return
    if name == "deepxde_poisson":
        assert result["skipped"] is False and result["adam"].step_count == 200
        assert list(result["weights"]) == ["pde", "bc0", "bc1"] and result["weights"]["bc0"] != 1.0
        assert result["lbfgs"].weights == result["weights"] and result["lbfgs"].frozen
        assert result["lbfgs_error"] < result["adam_error"] < result["start_error"]
        assert "L-BFGS (frozen weights)" in out
        return
    if name == "inverse_problem":
        # 600 of the 3000 default steps: k is on its way (about 12 % off, from 60 % at k_init = 1)
        assert result["k_true"] == 2.5 and result["rel_error"] < 0.25
        assert "true k      2.5" in out and f"recovered k {result['k']:.6g}" in out and "relative error" in out
        # the scope came from the TOML by parameter-name prefix and survives the export
        net = [n for n, _ in result["model"].named_parameters() if n.startswith("net.")]
        assert result["config"]["scope"] == {"pde": ["coef"], "data": net}
        assert result["config"]["strategy"] == "relobralo"
        return
    if name == "adam_then_lbfgs":
        assert math.isfinite(result["adam_error"]) and math.isfinite(result["lbfgs_error"])
        # frozen L-BFGS phase: the new balancer starts from, and keeps, the Adam phase's weights
        assert result["weights"] == pytest.approx(result["adam"].weights)
        assert "Adam (12 steps, lra)" in out and "L-BFGS (2 x 4 iterations, frozen weights)" in out
        return
    header = next(line for line in out.splitlines() if line.startswith("strategy"))
    assert [c.strip() for c in header.split("|")] == ["strategy", "rel. L2 error", "final weights", "wall time"]
    labels = [r.label for r in result]
    if name == "helmholtz_wang2021":
        assert labels == ["static", "lra"]
        assert "2.03e-01" in out and "3.92e-02" in out  # the README's figures for the full setup
    else:
        expected = "relobralo" if "relobralo" in available_strategies() else "lra"
        assert labels == ["static", expected]
        assert f"balancing with {expected!r}" in out
    assert all(math.isfinite(r.error) for r in result)


def test_helmholtz_seeds_and_burgers_choice(capsys):
    results = load("helmholtz_wang2021").main(["--steps", "4", "--seeds", "0,1", "--no-plots", *QUIET])
    assert [r.label for r in results] == ["static seed 0", "lra seed 0", "static seed 1", "lra seed 1"]
    assert "mean rel. L2" in capsys.readouterr().out
    burgers = load("burgers")
    (only,) = burgers.main(["--steps", "4", "--strategy", "static", "--no-plots", *QUIET])
    assert only.label == "static" and "chosen with --strategy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        burgers.main(["--strategy", "nope", *QUIET])


def test_lbfgs_phase_can_keep_adapting(capsys):
    result = load("adam_then_lbfgs").main(
        ["--problem", "poisson", "--steps", "10", "--lbfgs-steps", "2", "--max-iter", "3", "--lbfgs-points", "16",
         "--lbfgs-update-every", "1", "--eval-n", "50"])
    assert math.isfinite(result["lbfgs_error"])
    assert result["weights"]["bc"] != pytest.approx(result["adam"].weights["bc"])
    assert "lra every 1" in capsys.readouterr().out


def test_inverse_problem_recovers_the_coefficient_within_one_percent(capsys):
    """The default budget of inverse_problem.toml (3000 Adam steps, ~7 s on one thread)."""
    result = load("inverse_problem").main([])
    out = capsys.readouterr().out
    assert result["steps"] == 3000
    assert result["rel_error"] < 0.01, out
    assert abs(result["k"] - 2.5) / 2.5 == pytest.approx(result["rel_error"])
    assert f"relative error {100 * result['rel_error']:.3f} %" in out


def test_inverse_problem_scope_and_config_errors(tmp_path):
    import torch

    from lossbalance import LossBalancer
    from lossbalance.config import ConfigError

    module = load("inverse_problem")
    config = module.load_config(module.DEFAULT_CONFIG)
    model = module.InverseModel(config["training"]["hidden"], 1.0, torch.Generator().manual_seed(0))
    balancer = LossBalancer.from_config(torch.optim.Adam(model.parameters()), config["balancer"], model=model)
    data = module.make_data(config["problem"])
    balancer.backward(module.losses(model, *data))  # the first step: both weights are 1
    # the residual trains only the coefficient, the observations only the network
    reference = module.losses(model, *data)
    net = list(model.net.parameters())
    (want_coef,) = torch.autograd.grad(reference["pde"], [model.coef], retain_graph=True)
    want_net = torch.autograd.grad(reference["data"], net)
    assert balancer.weights == {"pde": 1.0, "data": 1.0}
    torch.testing.assert_close(model.coef.grad, want_coef)
    for param, want in zip(net, want_net):
        torch.testing.assert_close(param.grad, want)
    net_names = [n for n, _ in model.net.named_parameters(prefix="net")]
    assert balancer.config(model)["scope"] == {"pde": ["coef"], "data": net_names}
    # a misspelt prefix in the TOML is reported by from_config, naming the parameters
    text = module.DEFAULT_CONFIG.read_text().replace('pde = ["coef"]', 'pde = ["coeff"]')
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"coeff.*match no parameter"):
        module.main(["--config", str(bad), "--steps", "1"])


def test_lightning_module_without_lightning(monkeypatch, capsys):
    """Lightning is optional: without it the example says how to install it and returns."""
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # "import name" now raises ImportError
    module = load("lightning_module")
    assert module.import_lightning() is None
    result = module.main(["--steps", "1"])
    assert result["skipped"] is True
    assert "pip install lightning" in capsys.readouterr().out


def test_deepxde_poisson_without_deepxde(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepxde", None)
    result = load("deepxde_poisson").main(["--steps", "1"])
    assert result["skipped"] is True and "pip install 'lossbalance[deepxde]'" in capsys.readouterr().out


def test_lightning_module_resumes_with_the_balancer_state(tmp_path, capsys):
    """``on_save_checkpoint`` stores the balancer's state; a resumed fit starts from its weights."""
    require_lightning()
    module = load("lightning_module")
    path = str(tmp_path / "run.ckpt")
    first = module.main(["--steps", "16", "--save", path])  # one epoch: 1024 points / 64
    resumed = module.main(["--steps", "32", "--ckpt-path", path])
    assert resumed["start_weights"] == first["weights"] != {"pde": 1.0, "bc": 1.0}
    assert resumed["global_step"] == 32 and resumed["balancer_steps"] == 32
    assert resumed["before"] == first["after"]  # the "start" row is the checkpoint's network


# the Allen-Cahn examples (their own tests below; added here so that the budget check sees them)
ARGS.update({
    "allen_cahn_validation": ["--steps", "6", "--seeds", "0", "1", "--width", "16", "--fourier-dim", "16",
                              "--batch-size", "64", "--update-every", "2", "--rba-gradnorm"],
    "allen_cahn_jaxpi": ["--device", "cpu", "--steps", "6", "--eval-every", "3", "--batch-size", "64",
                         "--width", "16", "--fourier-dim", "16", "--update-every", "2", "--ablation"],
})


def test_allen_cahn_validation_table(capsys):
    """Every method, both seeds, a finite error; the table has one row per method with the timing."""
    result = load("allen_cahn_validation").main(ARGS["allen_cahn_validation"])
    names = ["fixed", "grad-norm", "grad-norm + causal", "RBA", "RBA + grad-norm"]
    assert list(result) == names
    for name, runs in result.items():
        assert len(runs) == 2 and all(math.isfinite(r["error"]) and r["seconds"] > 0 for r in runs)
        gradnorm = "grad-norm" in name
        assert (runs[0]["weights"]["ic"] != 1.0) == gradnorm, (name, runs[0]["weights"])
    out = capsys.readouterr().out
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    assert list(rows) == ["method", *names] and rows["fixed"].rstrip().endswith("ms)")
    assert "1.00x" in rows["fixed"]


def test_allen_cahn_jaxpi_smoke(capsys):
    """The GPU configuration runs on the CPU with a tiny budget: three set-ups, finite errors, history."""
    result = load("allen_cahn_jaxpi").main(ARGS["allen_cahn_jaxpi"])
    assert [r["name"] for r in result] == ["grad-norm + causal", "grad-norm", "causal (fixed weights)"]
    for r in result:
        assert [step for step, _ in r["history"]] == [3, 6] and math.isfinite(r["error"])
    assert result[2]["weights"] == {"pde": 1.0, "ic": 1.0} and result[0]["weights"]["ic"] != 1.0
    out = capsys.readouterr().out
    assert "5.840e-04" in out and "RWF (1, 0.1)" in out and "batch 64 + 512 ic" in out
