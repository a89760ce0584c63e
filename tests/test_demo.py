"""The training runner (lossbalance.demo) and the ``python -m lossbalance demo`` command line."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from lossbalance.__main__ import main as cli
from lossbalance.demo import RunSpec, format_table, resolve_strategies, run_many, train

TINY = ["--steps", "12", "--workers", "1", "--progress", "none", "--eval-n", "12"]


def test_cli_prints_the_table(capsys, tmp_path):
    out = tmp_path / "figures"
    assert cli(["demo", *TINY, "--no-plots", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Helmholtz 2-D (a1=1, a2=4)" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    assert [c.strip() for c in lines[header].split("|")] == ["strategy", "rel. L2 error", "final weights", "wall time"]
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in lines[header + 2:header + 4]}
    assert set(rows) == {"static", "lra"}                      # the fixed baseline always runs first
    assert lines[header + 2].startswith("static")
    assert rows["static"][2] == "pde=1, bc=1"
    assert rows["lra"][2].startswith("pde=1, bc=") and rows["lra"][2] != "pde=1, bc=1"
    for row in rows.values():
        assert math.isfinite(float(row[1])) and row[3].endswith(" s")
    assert "total wall time" in text
    assert not out.exists()                                    # --no-plots writes nothing


def test_cli_writes_the_figures(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures"
    assert cli(["demo", *TINY, "--strategies", "lra,static", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("weights.png", "losses.png", "error_fields.png", "conflicts.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(path) in text


def test_unknown_strategy_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["demo", "--steps", "5", "--strategies", "lra,relobralooo", "--no-plots"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--strategies: unknown strategy 'relobralooo'" in err
    assert "Known:" in err and "lra" in err and "static" in err
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        resolve_strategies("nope")


def test_cli_help_and_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["--help"])
    assert exc.value.code == 0 and "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli(["train"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli(["demo", "--help"])
    help_text = capsys.readouterr().out
    assert exc.value.code == 0 and "--strategies" in help_text and "--no-plots" in help_text
    assert resolve_strategies(" lra, static ,lra") == ["static", "lra"]


def test_train_history_schedule_and_seeding():
    a = train("helmholtz", "lra", steps=25, lr_decay_every=10, history_every=5, eval_n=10, seed=3)
    b = train("helmholtz", "static", steps=25, lr_decay_every=10, history_every=5, eval_n=10, seed=3)
    assert [r["step"] for r in a.history] == [0, 5, 10, 15, 20, 24]
    # lr = 1e-3 * 0.9 ** (step / 10), continuous (the value used on the recorded step)
    for record in a.history:
        assert record["lr"] == pytest.approx(1e-3 * 0.9 ** (record["step"] / 10), rel=1e-12)
    # the same seed: the same initial network and points, so the first step's losses agree
    assert a.history[0]["losses"] == b.history[0]["losses"]
    assert b.weights == {"pde": 1.0, "bc": 1.0}
    assert a.weights["bc"] > 1.0 and a.weights["pde"] == 1.0
    # LRA (update_every=10) changes the weight on steps 0, 10, 20 only
    bc = {r["step"]: r["weights"]["bc"] for r in a.history}
    assert bc[0] != bc[5] or bc[0] != 1.0
    assert bc[5] != bc[10] and bc[15] == bc[10] and bc[20] != bc[15] and bc[24] == bc[20]
    assert a.losses == a.history[-1]["losses"]
    assert len(a.points) == len(a.abs_error) == 100 and a.error == pytest.approx(
        math.sqrt(sum(e * e for e in a.abs_error))
        / torch.linalg.vector_norm(torch.tensor(a.points)[:, 0].mul(math.pi).sin()
                                   * torch.tensor(a.points)[:, 1].mul(4 * math.pi).sin()).item(), rel=1e-4)
    again = train("helmholtz", "lra", steps=25, lr_decay_every=10, history_every=5, eval_n=10, seed=3)
    assert again.error == a.error and again.weights == a.weights
    assert isinstance(a.model, torch.nn.Module) and a.balancer is not None
    assert a.portable().model is None and a.portable().balancer is None


def test_processes_side_by_side_match_in_process_runs():
    specs = [RunSpec(name, steps=6, eval_n=8, history_every=2) for name in ("static", "lra")]
    parallel = run_many(specs, workers=2, progress="none")
    sequential = run_many(specs, workers=1, progress="none")
    assert [r.label for r in parallel] == ["static", "lra"]
    for p, s in zip(parallel, sequential):
        assert p.model is None                               # stripped before crossing processes
        assert p.error == pytest.approx(s.error, rel=1e-5)
        assert p.weights == pytest.approx(s.weights, rel=1e-5)
        assert [r["step"] for r in p.history] == [0, 2, 4, 5]
        # the conflict diagnostics cross the process boundary with the history
        assert [r["step"] for r in p.history if "cosine" in r and "grad_norm" in r] == [0, 2, 4]
        for a, b in zip(p.history[:3], s.history[:3]):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["cosine"][0][1] == pytest.approx(b["cosine"][0][1], rel=1e-4, abs=1e-6)
    table = format_table(parallel)
    assert table.splitlines()[2].startswith("static") and table.splitlines()[3].startswith("lra")


def test_workers_fork_where_safe_and_spawn_elsewhere(monkeypatch):
    from lossbalance.demo.parallel import _start_method
    from lossbalance.problems import Poisson1D

    cpu = [RunSpec("static", problem="poisson", steps=2, hidden=(4,))] * 2
    expected = "fork" if sys.platform == "linux" else "spawn"
    assert _start_method(cpu, None) == expected
    assert _start_method([*cpu, RunSpec("static", device="cuda:0")], None) == "spawn"   # CUDA never forks
    assert _start_method(cpu, "spawn") == "spawn"
    with pytest.raises(ValueError, match="start_method must be one of"):
        _start_method(cpu, "thread")
    with pytest.raises(ValueError, match="start_method must be one of"):
        run_many(cpu, workers=2, progress="none", start_method="thread")
    # a forked worker sees this process's state (torch and the problem already imported), a spawned
    # one starts afresh: the evaluation grid set here reaches the forked runs only
    here = run_many(cpu, workers=1, progress="none")
    monkeypatch.setattr(Poisson1D, "default_eval_n", 7)
    spawned = run_many(cpu, workers=2, progress="none", start_method="spawn")
    assert [len(r.points) for r in spawned] == [1001, 1001]
    assert [r.error for r in spawned] == pytest.approx([r.error for r in here], rel=1e-5)   # as in-process
    if expected == "fork":
        forked = run_many(cpu, workers=2, progress="none")
        assert [len(r.points) for r in forked] == [7, 7] and len({r.pid for r in forked}) == 2
        assert all(r.pid != os.getpid() for r in forked)


def test_a_failing_run_is_reported():
    # names are checked before any process starts
    with pytest.raises(ValueError, match="run 'x': unknown problem 'nope'"):
        run_many([RunSpec("static", eval_n=8), RunSpec("static", problem="nope", label="x")], progress="none")
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        run_many([RunSpec("static", eval_n=8), RunSpec("nope")], progress="none")
    # a run that fails inside its process: the traceback comes back, the other run is stopped
    specs = [RunSpec("static", steps=3, eval_n=8), RunSpec("static", problem_options={"bogus": 1}, label="broken")]
    with pytest.raises(RuntimeError, match=r"(?s)run 'broken' failed.*TypeError.*bogus"):
        run_many(specs, workers=2, progress="none")


def test_plain_progress_lines(capsys):
    import io

    stream = io.StringIO()
    run_many([RunSpec("static", steps=10, eval_n=8)], workers=1, progress="print", stream=stream)
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert len(lines) == 10 and lines[-1].strip().startswith("[static] step 10/10")


def test_lra_by_name_references_the_problems_first_term():
    from lossbalance.demo import strategy_settings

    lra, every = strategy_settings("lra", terms=("momentum_x", "bc"))
    assert (lra.reference, every) == ("momentum_x", 10)
    assert strategy_settings("lra", {"reference": "bc"}, terms=("momentum_x", "bc"))[0].reference == "bc"
    run = train("kovasznay", "lra", steps=11, hidden=(4,), eval_n=4, history_every=5)
    assert run.weights["momentum_x"] == 1.0 and run.weights["bc"] != 1.0     # the reference keeps 1
    assert len(run.abs_error) == len(run.points) == 16                       # one value per point


def test_train_takes_objects_and_balancer_options():
    from lossbalance.problems import Poisson1D
    from lossbalance.strategies.lra import LRAnnealing

    result = train(Poisson1D(), LRAnnealing(reference="pde"), steps=5, hidden=(8,), eval_n=20,
                   balancer_options={"max_weight": 2.0, "update_every": 1, "history": 0})
    assert result.label == "lra" and result.strategy.startswith("LRAnnealing(reference='pde'")
    assert result.weights["bc"] == 2.0 and len(result.history) == 5
    assert result.balancer.update_every == 1
    with pytest.raises(ValueError, match="lives on cpu"):
        train(Poisson1D(), "static", steps=1, device="meta")


def test_the_demo_records_conflict_diagnostics_for_every_strategy():
    results = run_many([RunSpec(name, steps=31, eval_n=8, history_every=5) for name in ("static", "lra")],
                       workers=1, progress="none")
    for result in results:
        steps = [r["step"] for r in result.history]
        assert steps == [0, 5, 10, 15, 20, 25, 30]
        for record in result.history:  # diagnose_every defaults to history_every: every record has them
            assert set(record["grad_norm"]) == {"pde", "bc"}
            assert all(v > 0 and math.isfinite(v) for v in record["grad_norm"].values())
            cosine = record["cosine"]
            assert len(cosine) == 2 and cosine[0][0] == cosine[1][1] == 1.0
            assert cosine[0][1] == pytest.approx(cosine[1][0]) and -1.0 <= cosine[0][1] <= 1.0
            assert record["conflict_fraction"] == float(cosine[0][1] < 0)
    # the same network and points on step 0: the same diagnostics whatever the weights
    assert results[0].history[0]["cosine"][0][1] == pytest.approx(results[1].history[0]["cosine"][0][1])
    assert results[0].history[0]["grad_norm"] == pytest.approx(results[1].history[0]["grad_norm"])


def test_diagnostics_can_be_switched_off_and_follow_the_balancer_options():
    off = train("helmholtz", "static", steps=6, history_every=2, diagnose_every=0, eval_n=8)
    assert off.balancer.diagnose_every == 0 and not any("cosine" in r for r in off.history)
    lra = train("helmholtz", "lra", steps=6, history_every=2, diagnose_every=0, eval_n=8)
    assert [r["step"] for r in lra.history if "cosine" in r] == [0]  # LRA's own update steps (every 10)
    lean = train("helmholtz", "static", steps=4, history_every=2, eval_n=8, balancer_options={"memory": "lean"})
    assert lean.balancer.diagnose_every == 0  # the diagnostics need the kept gradients: off, no error
    assert train("helmholtz", "static", steps=3, eval_n=8).balancer.diagnose_every == 1
    with pytest.raises(ValueError, match="diagnose_every"):
        train("helmholtz", "static", steps=3, diagnose_every=-1)
