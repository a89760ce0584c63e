"""``python -m lossbalance compare`` / :func:`lossbalance.demo.compare_strategies`: the sweep, its
cache, user problems, error reporting, the tuned static baseline and the submitit engine."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lossbalance.__main__ import main as cli
from lossbalance.demo import SweepConfigError, SweepError, best_static_grid, compare_strategies

ROOT = Path(__file__).resolve().parents[1]
#: a tiny budget: Poisson 1-D, an 8-wide network, a coarse evaluation grid
TINY = dict(problem="poisson", steps=12, hidden=(8,), eval_n=16, progress="none", plots=False)
TINY_CLI = ["--problem", "poisson", "--steps", "12", "--hidden", "8", "--eval-n", "16", "--progress", "none"]

USER_PROBLEM = '''
import torch
from lossbalance.problems import Poisson1D


class Shifted(Poisson1D):
    """Poisson 1-D scored by MSE; sampling raises for seed {bad_seed} (a run that fails)."""
    name = "shifted"
    error_metric = "mse"

    def sample(self, batch_size=128, generator=None):
        if generator is not None and generator.initial_seed() == {bad_seed}:
            raise FloatingPointError("seed {bad_seed} is cursed")
        return super().sample(batch_size, generator)


def make(kappa=1.0, device=None):
    return Shifted(kappa=kappa, device=device)
'''


def _user_module(tmp_path: Path, bad_seed: int = -1, name: str = "my_problem") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(USER_PROBLEM.format(bad_seed=bad_seed))
    return path


def _cached(out: Path) -> set[str]:
    return {p.name for p in (out / "runs").glob("*.json")}


def test_cli_sweep_end_to_end(capsys, tmp_path):
    out = tmp_path / "sweep"
    assert cli(["compare", *TINY_CLI, "--strategies", "lra,relobralo", "--seeds", "2", "--workers", "2",
                "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    assert [c.strip() for c in lines[header].split("|")] == [
        "strategy", "rel. L2 (mean ± std)", "seeds", "final weights", "wall time", "time/step vs static"]
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in lines[header + 2:header + 5]}
    assert list(rows) == ["static", "lra", "relobralo"]        # static first: the time reference
    assert rows["static"][5] == "1.00x" and rows["static"][3] == "pde=1, bc=1"
    for row in rows.values():
        mean, std = row[1].split(" ± ")
        assert math.isfinite(float(mean)) and float(std) >= 0 and row[2] == "2"
    assert "6 to run" in text and "overhead" in text
    assert len(_cached(out)) == 6
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["strategy"] for r in table] == ["static", "lra", "relobralo"]
    assert all(len(r["errors"].split(";")) == 2 for r in table)
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["steps"] == 12 and data["ran"] == 6 and len(data["runs"]) == 6
    run = data["runs"][0]
    assert [s for s, _ in run["error_history"]][-1] == 12 and run["weight_history"][0][0] == 0


def test_cli_writes_the_figures(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    assert cli(["compare", *TINY_CLI, "--problem", "burgers", "--strategies", "lra", "--seeds", "2",
                "--workers", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("error_vs_step.png", "weights_vs_step.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(out / name) in text
    # the published Burgers result (Raissi et al. 2019) is cited beside ours
    assert "published: 6.7e-04" in text and "Raissi" in text


def test_cli_compares_on_kovasznay_flow(capsys, tmp_path):
    """A three-output problem whose first term is not "pde": LRA takes it as the reference."""
    assert cli(["compare", "--problem", "kovasznay", "--strategies", "lra", "--seeds", "1", "--steps", "3",
                "--hidden", "8", "--eval-n", "8", "--workers", "1", "--progress", "none", "--no-plots",
                "--out", str(tmp_path / "kovasznay")]) == 0
    text = capsys.readouterr().out
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in text.splitlines()
            if line.startswith(("static ", "lra "))}
    assert rows["static"][3] == "momentum_x=1, momentum_y=1, continuity=1, bc=1"
    lra = dict(item.split("=") for item in rows["lra"][3].split(", "))
    assert list(lra) == ["momentum_x", "momentum_y", "continuity", "bc"] and lra["momentum_x"] == "1"
    assert any(float(lra[k]) != 1.0 for k in ("momentum_y", "continuity", "bc"))   # the others rescaled
    assert all(math.isfinite(float(row[1].split()[0])) for row in rows.values())
    assert "published:" in text and "NSFnets" in text


def test_python_api_table_and_files(tmp_path):
    table = compare_strategies(strategies=["lra"], seeds=[3, 5], workers=1, out=None, **TINY)
    assert [row["strategy"] for row in table.rows] == ["static", "lra"]
    static, lra = table.rows
    assert static["seeds"] == [3, 5] and len(static["errors"]) == 2
    assert static["error_mean"] == pytest.approx(sum(static["errors"]) / 2)
    assert static["error_std"] == pytest.approx(abs(static["errors"][0] - static["errors"][1]) / math.sqrt(2))
    assert static["weights"] == {"pde": 1.0, "bc": 1.0} and lra["weights"]["bc"] != 1.0
    assert static["time_ratio"] == 1.0 and lra["time_ratio"] > 0
    assert table.ran == 4 and table.cached == 0 and table.files == []
    assert str(table).splitlines()[0].startswith("strategy | rel. L2 (mean ± std)")
    csv_path, json_path = table.to_csv(tmp_path / "t.csv"), table.to_json(tmp_path / "t.json")
    with open(csv_path) as f:
        assert [r["strategy"] for r in csv.DictReader(f)] == ["static", "lra"]
    assert json.loads(json_path.read_text())["rows"][1]["errors"] == lra["errors"]


def test_second_run_skips_what_is_done_and_new_seeds_reuse_the_rest(tmp_path):
    out = tmp_path / "sweep"
    first = compare_strategies(strategies="lra", seeds=2, workers=1, out=out, **TINY)
    assert (first.ran, first.cached) == (4, 0)
    again = compare_strategies(strategies="lra", seeds=2, workers=1, out=out, **TINY)
    assert (again.ran, again.cached) == (0, 4) and again.timing == {}
    assert [r["errors"] for r in again.rows] == [r["errors"] for r in first.rows]   # loaded, not retrained
    more = compare_strategies(strategies="lra", seeds=3, workers=1, out=out, **TINY)
    assert (more.ran, more.cached) == (2, 4) and len(_cached(out)) == 6


def test_resume_after_a_killed_sweep(tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "lossbalance", "compare", *TINY_CLI, "--steps", "1500", "--strategies", "lra",
            "--seeds", "3", "--workers", "1", "--no-plots", "--out", str(out)]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "runs").exists() and _cached(out)) and time.monotonic() < deadline:
            assert process.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    done = _cached(out)
    assert 1 <= len(done) < 6                                     # killed half-way
    (out / "runs" / "torn.json.tmp").write_text('{"spec": ')     # debris of the kill is ignored
    resumed = compare_strategies(strategies="lra", seeds=3, workers=1, out=out, **{**TINY, "steps": 1500})
    assert resumed.cached == len(done) and resumed.ran == 6 - len(done)
    assert _cached(out) >= done and len(_cached(out)) == 6


def test_a_partial_cache_with_a_torn_file_reruns_only_the_missing_runs(tmp_path):
    out = tmp_path / "sweep"
    compare_strategies(strategies="lra", seeds=2, workers=1, out=out, **TINY)
    files = sorted((out / "runs").glob("*.json"))
    files[0].unlink()
    files[1].write_text(files[1].read_text()[:40])                # a half-written result
    resumed = compare_strategies(strategies="lra", seeds=2, workers=1, out=out, **TINY)
    assert (resumed.ran, resumed.cached) == (2, 2)


def test_one_seed_has_no_spread_rather_than_a_zero_one():
    # it printed "± 0.0e+00": a sample std over one seed is undefined
    table = compare_strategies(seeds=1, strategies="static", workers=1, **TINY)
    row = table.row("static")
    assert row["error_std"] is None and len(row["errors"]) == 1
    assert f"| {row['error_mean']:.3e} (one seed) |" in str(table) and "± 0.0" not in str(table)


def test_another_configuration_in_the_folder_is_refused_before_any_run(tmp_path, capsys):
    out = tmp_path / "sweep"
    compare_strategies(seeds=1, strategies="static", workers=1, out=out, **TINY)
    before = _cached(out)
    with pytest.raises(SweepConfigError, match=r"another configuration \(steps: 12 there, 13 asked\)"):
        compare_strategies(seeds=1, strategies="static", workers=1, out=out, **{**TINY, "steps": 13})
    with pytest.raises(SweepConfigError, match="lr: 0.001 there, 0.01 asked"):
        compare_strategies(seeds=1, strategies="static", workers=1, out=out, lr=1e-2, **TINY)
    assert _cached(out) == before
    with pytest.raises(SystemExit) as exc:
        cli(["compare", *TINY_CLI, "--steps", "13", "--seeds", "1", "--strategies", "static", "--out", str(out)])
    assert exc.value.code == 2 and "another configuration" in capsys.readouterr().err
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(SweepConfigError, match="not empty and holds no sweep.json"):
        compare_strategies(seeds=1, strategies="static", workers=1, out=stranger, **TINY)


def test_a_user_problem_from_a_file_and_a_module_path(tmp_path, monkeypatch, capsys):
    path = _user_module(tmp_path)
    out = tmp_path / "sweep"
    assert cli(["compare", *TINY_CLI, "--problem", f"{path}:Shifted", "--problem-option", "kappa=2.0",
                "--strategies", "lra", "--seeds", "1", "--workers", "1", "--out", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("shifted:") and "MSE (mean ± std)" in text
    data = json.loads((out / "results.json").read_text())
    assert data["metric"] == "mse" and data["config"]["problem_options"] == {"kappa": 2.0}
    assert data["config"]["problem_source"]                         # an edited problem file reruns
    monkeypatch.syspath_prepend(str(tmp_path))                      # the spawned workers inherit sys.path
    table = compare_strategies(**{**TINY, "problem": "my_problem:make"}, strategies="static", seeds=2, workers=2)
    assert table.metric == "mse" and table.rows[0]["failed"] == 0 and len(table.rows[0]["errors"]) == 2
    assert all(e >= 0 and math.isfinite(e) for e in table.rows[0]["errors"])


def test_a_raising_run_is_reported_while_the_others_complete(tmp_path):
    path = _user_module(tmp_path, bad_seed=1, name="cursed")
    out = tmp_path / "sweep"
    table = compare_strategies(**{**TINY, "problem": f"{path}:make"}, strategies="lra", seeds=2, workers=2, out=out)
    for row in table.rows:
        assert (row["runs"], row["failed"], row["seeds"]) == (2, 1, [0])
        assert row["failures"] == ["FloatingPointError: seed 1 is cursed"]
        assert math.isfinite(row["error_mean"])
    assert "(1 failed: FloatingPointError: seed 1 is cursed)" in str(table)
    assert len(_cached(out)) == 2                                   # failures are not cached: a rerun retries them
    again = compare_strategies(**{**TINY, "problem": f"{path}:make"}, strategies="lra", seeds=2, workers=1, out=out)
    assert (again.ran, again.cached) == (2, 2)


def test_bad_inputs_fail_before_any_run(tmp_path, capsys):
    out = tmp_path / "never"
    broken = tmp_path / "broken_problem.py"
    broken.write_text("import no_such_dependency_xyz\n")
    cases = [
        (dict(problem="burger"), "unknown problem 'burger'. Did you mean 'burgers'?"),
        (dict(strategies="lra,relobralooo"), "unknown strategy 'relobralooo'. Did you mean 'relobralo'?"),
        (dict(problem=f"{broken}:P"), "importing .*broken_problem.py' failed: ModuleNotFoundError"),
        (dict(problem="no_such_pkg_xyz.mod:P"), "importing 'no_such_pkg_xyz.mod' failed"),
        (dict(steps=0), "budget must be at least 1 step"),
        (dict(seeds=0), "at least 1 seed"),
        (dict(problem_options={"bogus": 1}), "could not be built: TypeError"),
    ]
    for change, message in cases:
        with pytest.raises(SweepError, match=message):
            compare_strategies(**{**TINY, "out": out, "workers": 1, **change})
        assert not out.exists()
    for argv, message in [(["--problem", "helmholz"], "Did you mean 'helmholtz'"), (["--steps", "0"], "budget"),
                          (["--strategies", "lraa"], "Did you mean 'lra'")]:
        with pytest.raises(SystemExit) as exc:
            cli(["compare", *TINY_CLI, "--out", str(out), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_best_static_grid_and_row():
    assert best_static_grid(("pde", "ic", "bc")) == [
        {"pde": 1.0, "ic": a, "bc": b} for a in (1.0, 10.0, 100.0) for b in (1.0, 10.0, 100.0)]
    tied = best_static_grid(("pde", "a", "b", "c", "d"), max_size=27)     # 81 > 27: one shared value
    assert tied == [{"pde": 1.0, "a": v, "b": v, "c": v, "d": v} for v in (1.0, 10.0, 100.0)]
    with pytest.raises(SweepError, match="positive"):
        best_static_grid(("pde", "bc"), (0.0, 1.0))
    table = compare_strategies(strategies="static,best_static", seeds=2, workers=1, **TINY)
    assert table.ran == 2 + 2 * 2  # the bc=1 setting is the static row's runs, not trained twice
    best = table.row("best_static")
    grid = best["grid"]
    assert [g["weights"] for g in grid] == [{"pde": 1.0, "bc": v} for v in (1.0, 10.0, 100.0)]
    winner = min(grid, key=lambda g: g["error_mean"])
    assert best["error_mean"] == winner["error_mean"] and best["weights"] == winner["weights"]
    assert best["setting"] == f"static[bc={winner['weights']['bc']:.3g}]"
    # the grid's bc=1 setting is the plain static run: the same numbers
    assert grid[0]["error_mean"] == pytest.approx(table.row("static")["error_mean"])
    # values equal to three digits are still two settings, each over its own seeds
    close = compare_strategies(strategies="best_static", seeds=2, workers=1, best_static_values=(1.0, 1.0001), **TINY)
    best = close.row("best_static")
    assert best["runs"] == 2 and best["seeds"] == [0, 1]
    assert [g["weights"]["bc"] for g in best["grid"]] == [1.0, 1.0001]
    assert best["setting"] in ("static[bc=1]", "static[bc=1.0001]")


def test_the_best_static_setting_is_one_that_finished_on_every_seed():
    # bc=10 failed on 2 of 3 seeds and its one survivor is the best error: it won before
    from lossbalance.demo.runner import RunResult
    from lossbalance.demo.sweep import _grid_label, _rows

    grid = best_static_grid(["pde", "bc"], (1.0, 10.0, 100.0))
    labels = [_grid_label(w) for w in grid]

    def run(label, seed, error, failure=None):
        return RunResult(label=label, strategy="static", problem="p", steps=10, seed=seed, error=error, weights={},
                         losses={}, wall_time=1.0, failure=failure)

    nan = float("nan")
    results = [run("static", s, e) for s, e in enumerate((0.10, 0.11, 0.12))]  # the all-ones setting
    results += [run(labels[1], 0, nan, "NaN"), run(labels[1], 1, nan, "NaN"), run(labels[1], 2, 0.05)]
    results += [run(labels[2], 0, 0.09), run(labels[2], 1, nan, "NaN"), run(labels[2], 2, 0.2)]
    best = _rows(["static"], grid, results, 10)[-1]
    assert best["setting"] == labels[0] and best["failed"] == 0 and best["error_mean"] == pytest.approx(0.11)
    assert [g["failed"] for g in best["grid"]] == [0, 2, 1]
    every = [run(label, 0, nan, "NaN") for label in labels[:2]] + [run(labels[2], 0, 0.3), run(labels[2], 1, nan, "NaN")]
    best = _rows(["lra"], grid, every, 10)[-1]  # no setting finished everywhere: the fewest failures
    assert best["setting"] == labels[2] and best["failed"] == 1


def test_a_four_run_sweep_uses_both_cores_and_reports_its_overhead():
    table = compare_strategies(strategies="lra", seeds=2, workers=2, **{**TINY, "steps": 100})
    runs = table.results
    assert len({r.pid for r in runs}) == 2                          # two worker processes ...
    assert len(runs) == 4 and all(r.pid != os.getpid() for r in runs)
    spans = sorted((r.started, r.finished) for r in runs)
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:]))       # ... running at the same time
    timing = table.timing
    assert timing["processes"] == 2 and timing["runs"] == pytest.approx(sum(r.run_time for r in runs))
    busiest = max(sum(r.run_time for r in runs if r.pid == pid) for pid in {r.pid for r in runs})
    assert timing["busiest_process"] == pytest.approx(busiest)
    assert timing["overhead"] == pytest.approx(timing["wall"] / busiest - 1) and timing["overhead"] > 0
    assert 0 < timing["utilisation"] <= 1


def test_the_submitit_engine_locally(tmp_path):
    submitit = pytest.importorskip("submitit")
    out = tmp_path / "sweep"
    executor = submitit.AutoExecutor(folder=str(tmp_path / "jobs"), cluster="local")
    executor.update_parameters(timeout_min=10)
    problem = f"{_user_module(tmp_path, bad_seed=1, name='cursed_job')}:make"   # seed 1 raises in its job
    table = compare_strategies(**{**TINY, "problem": problem}, strategies="static", seeds=2, out=out,
                               engine="submitit", executor=executor)
    assert table.ran == 2 and all(r.pid != os.getpid() for r in table.results)   # each run its own job
    for row in table.rows:
        assert row["seeds"] == [0] and row["failures"] == ["FloatingPointError: seed 1 is cursed"]
    here = compare_strategies(**{**TINY, "problem": problem}, strategies="static", seeds=[0], workers=1)
    for a, b in zip(table.rows, here.rows):                         # the same runs as on this machine
        assert a["errors"] == pytest.approx(b["errors"], rel=1e-5) and a["weights"] == pytest.approx(b["weights"])
    again = compare_strategies(**{**TINY, "problem": problem}, strategies="static", seeds=[0], out=out,
                               engine="submitit", executor=executor)
    assert (again.ran, again.cached) == (0, 1)                      # the cache works for cluster runs too
