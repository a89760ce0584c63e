"""Turn the benchmark JSON into the README tables (RST): every figure a ratio to the plain step.

    python benchmarks/table.py --run                 # run the suite (about 7 min), then print
    python benchmarks/table.py FILE.json             # print from an earlier run:
        # pytest benchmarks/ --benchmark-only --benchmark-json=FILE.json
    python benchmarks/table.py --run --json out.json -- --benchmark-max-time=0.05   # quick check

Every round of a variant sits between two blocks of as many plain steps (``conftest.Measure``);
a ratio is the median over the rounds of round time / geometric mean of its two plain blocks,
so a machine whose speed drifts during the run moves a round and its bracket alike. The plain step paired with
itself (``noise`` column) shows what is left of the noise. The memory table comes from the same
run (``test_memory``), or is measured now with ``--memory``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

WORKLOAD_LABELS = {"disjoint": "disjoint (PINN)", "heads": "shared heads", "residual": "shared residual"}
# variant -> (column head, legend)
COLUMNS = {
    "lra_every1": ("LRA/1", "LossBalancer + LRAnnealing(reference=...), update_every=1"),
    "lra_every10": ("LRA/10", "the same, update_every=10"),
    "static": ("static", 'loss-value strategy: "static" (no per-term gradients)'),
    "relobralo": ("ReLoBRaLo", 'loss-value strategy: "relobralo"'),
    "static_deferred": ("static/d", "static with check_every=1000: no host sync on plain steps (the flags stay on the device)"),
    "lra10_deferred": ("LRA/10/d", "LRA/10 with check_every=1000 (one host read per update)"),
    "probe_every1": ("probe/1", "LRA/1 with probe= the last layer's parameters"),
    "lean_every1": ("lean/1", 'LRA/1 with memory="lean"'),
    "scope_every1": ("scope/1", "LRA/1 with scope=: every term but the reference trains all but the first layer"),
    "floor": ("floor", "K autograd.grad calls summed into .grad, nothing else: the least an exact per-term method pays"),
    "naive": ("naive", "K autograd.grad(retain_graph=True) then a full backward (PhysicsNeMo's LRA loop)"),
    "torchjd_mean": ("torchjd", "torchjd (Jacobian descent) with the Mean aggregator"),
    "famo": ("FAMO", 'strategy "famo" (one backward of the weighted sum; target <= 1.10)'),
    "mconfig": ("mconfig", 'combine="mconfig", static weights, SGD (one term\'s backward per step; target <= 1.10)'),
    "plain": ("noise", "the plain step paired with itself (far from 1.00: a noisy run)"),
}
TARGETS = {"disjoint": (1.10, 1.03), "heads": (1.25, 1.05), "residual": (2.3, 1.15)}
PROBE_TARGETS = {"residual": 1.2}


def rst_table(head, rows) -> str:
    """An RST simple table (first column left-aligned, the others too; cells are strings)."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    rule = "  ".join("=" * w for w in widths)

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([rule, line(head), rule, *map(line, rows), rule])


def load(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _records(data: dict) -> list[dict]:
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        if "suite" not in info:
            continue
        if info["suite"] not in ("memory", "lightning") and "paired_ratio" not in info:
            raise SystemExit(f"{bench.get('name')}: no paired_ratio in this JSON (written before the bracketed "
                             "timing of benchmarks/conftest.py): run the suite again")
        out.append({**info, "rounds": bench["stats"].get("rounds"), "name": bench.get("name")})
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def overhead_table(records: list[dict]) -> tuple[str, dict]:
    by_workload: dict[str, dict[str, dict]] = {}
    for r in records:
        if r["suite"] == "overhead":
            by_workload.setdefault(r["workload"], {})[r["variant"]] = r
    present = [v for v in COLUMNS if any(v in row for row in by_workload.values())]
    head = ["workload", "plain ms"] + [COLUMNS[v][0] for v in present]
    rows, ratios = [], {}
    for workload in [w for w in WORKLOAD_LABELS if w in by_workload]:
        row = by_workload[workload]
        plain_ms = statistics.median(r["baseline_step"] for r in row.values()) * 1e3
        ratio = {v: row[v]["paired_ratio"] if v in row else None for v in present}
        ratios[workload] = ratio
        rows.append([WORKLOAD_LABELS[workload], _fmt(plain_ms, 1)] + [_fmt(ratio[v]) for v in present])
    if not rows:
        return "", ratios
    legend = "\n".join(f"- {COLUMNS[v][0]}: {COLUMNS[v][1]}" for v in present)
    text = ("Time per training step (forward pass included) as a ratio to the plain step "
            "(``zero_grad(); sum(w_i L_i).backward(); step()``): the median over rounds of 10 steps of the "
            "round's time over the geometric mean of the blocks of 10 plain steps timed just before and "
            "after it. K = 4, MLP 2-50-50-50-1 tanh, SGD.\n\n"
            + rst_table(head, rows) + "\n\n" + legend)
    return text, ratios


def targets_table(ratios: dict) -> str:
    head = ["workload", "floor", "LRA/1", "target", "LRA/10", "target", "probe/1", "target"]
    rows = []
    for workload, (t1, t10) in TARGETS.items():
        if workload not in ratios:
            continue
        r = ratios[workload]

        def cell(value, target):
            if value is None or target is None:
                return _fmt(value), "" if target is None else f"<= {target:g}"
            return _fmt(value), f"<= {target:g} {'ok' if value <= target else 'MISSED'}"

        a = cell(r.get("lra_every1"), t1)
        b = cell(r.get("lra_every10"), t10)
        c = cell(r.get("probe_every1"), PROBE_TARGETS.get(workload))
        rows.append([WORKLOAD_LABELS[workload], _fmt(r.get("floor")), *a, *b, *c])
    return "Targets (ratios to the plain step)\n\n" + rst_table(head, rows) if rows else ""


ONE_BACKWARD = {"famo": "FAMO", "mconfig": "mconfig"}  # issue 18: <= 1.10x the plain step on every workload
ONE_BACKWARD_TARGET = 1.10


def one_backward_table(ratios: dict) -> str:
    """FAMO and momentum ConFIG against their target (they need no per-term gradients)."""
    present = [v for v in ONE_BACKWARD if any(r.get(v) is not None for r in ratios.values())]
    rows = []
    for workload, r in ratios.items():
        cells = []
        for v in present:
            value = r.get(v)
            verdict = "" if value is None else (" ok" if value <= ONE_BACKWARD_TARGET else " MISSED")
            cells.append(_fmt(value) + verdict)
        rows.append([WORKLOAD_LABELS[workload], _fmt(r.get("static")), *cells])
    if not present or not rows:
        return ""
    head = ["workload", "static", *(f"{ONE_BACKWARD[v]} (<= {ONE_BACKWARD_TARGET:g})" for v in present)]
    return "Balancing at the cost of a plain step (ratios to the plain step)\n\n" + rst_table(head, rows)


def _scale_rows(records, suite, key):
    return dict(sorted((r[key], r) for r in records if r["suite"] == suite))


def _scale_table(rows_by_key: dict, label, first: str, second: str, describe) -> str:
    """One scale table: a row per key with ``label(key)``, ``describe(row)``, the plain step and LRA/1."""
    rows = [[label(key), describe(r), _fmt(r["baseline_step"] * 1e3, 1), _fmt(r["paired_ratio"])]
            for key, r in rows_by_key.items()]
    return rst_table([first, second, "plain ms", "LRA/1"], rows)


def scale_tables(records: list[dict]) -> str:
    parts = []
    terms = _scale_rows(records, "scale_terms", "K")
    if terms:
        parts.append("Scale in the number of terms: disjoint workload (one residual term on 1024 points, K - 1 "
                     "boundary terms on 128 points each), MLP 2-50-50-50-1; LRA/1 as a ratio to the plain step.\n\n"
                     + _scale_table(terms, str, "K", "parameters", lambda r: f"{r['params']:,}"))
    params = _scale_rows(records, "scale_params", "params")
    if params:
        parts.append("Scale in the parameter count: disjoint workload, K = 4, MLP 2-w-w-w-1 widened; "
                     "LRA/1 as a ratio to the plain step.\n\n"
                     + _scale_table(params, lambda p: f"{p:,}", "parameters", "width",
                                    lambda r: str(r.get("width", ""))))
    return "\n\n".join(parts)


def combiner_table(records: list[dict]) -> str:
    """Native UPGrad / MGDA time over torchjd's on the same matrix, per K and P (``test_combiners``)."""
    rows = sorted((r["combiner"], r["K"], r["params"], r) for r in records if r["suite"] == "combiners")
    if not rows:
        return ""
    table = [[name, str(k), f"{p:,}", _fmt(r["baseline_step"] * 1e3, 3), _fmt(r["paired_ratio"])]
             for name, k, p, r in rows]
    return ("Native combiners against torchjd's aggregators on the same float32 matrix (rows 1..K-1 "
            "pushed against row 0): native time over torchjd time (target <= 0.5).\n\n"
            + rst_table(["combiner", "K", "P", "torchjd ms", "native/torchjd"], table))


def closure_table(records: list[dict]) -> str:
    """``step(closure=...)`` with L-BFGS against a plain closure step (``test_closure``)."""
    rows = [r for r in records if r["suite"] == "closure"]
    if not rows:
        return ""
    table = [[f"L-BFGS, history 50, max_iter=1, {r['params']:,} parameters", r["variant"],
              _fmt(r["baseline_step"] * 1e3, 1), _fmt(r["paired_ratio"]), "<= 1.05 " + ("ok" if r["paired_ratio"] <= 1.05 else "MISSED")]
             for r in rows]
    return ("``balancer.step(closure=...)`` against the plain closure step (``zero_grad(); sum(w_i L_i).backward()``), "
            "history full, each round of 5 steps between two plain blocks.\n\n"
            + rst_table(["optimizer", "weights", "plain ms", "ratio", "target"], table))


LOSS_PATH = {  # variant: column label
    "loss_lra_every1": "loss().backward() LRA/1", "backward_lra_every1": "backward() LRA/1",
    "step_lra_every1": "step() LRA/1", "loss_lra_every10": "loss() LRA/10", "loss_static": "loss() static",
}


def loss_path_table(records: list[dict]) -> str:
    """``loss().backward()`` against ``backward()`` and ``step()`` (``test_integrations``), and the
    Lightning automatic-optimisation step against a plain Lightning step."""
    by_workload: dict[str, dict[str, float]] = {}
    for r in records:
        if r["suite"] == "loss_path":
            by_workload.setdefault(r["workload"], {})[r["variant"]] = r["paired_ratio"]
    parts = []
    if by_workload:
        rows = [[WORKLOAD_LABELS.get(w, w)] + [_fmt(row.get(v)) for v in LOSS_PATH] for w, row in by_workload.items()]
        parts.append("The balanced loss for frameworks (ratios to the plain step, same run)\n\n"
                     + rst_table(["workload", *LOSS_PATH.values()], rows))
    lightning = [r for r in records if r["suite"] == "lightning"]
    for r in lightning:
        parts.append(f"Lightning automatic optimisation, ``training_step`` returning ``balancer.loss(losses)`` (LRA every "
                     f"step, 1-32-32-1 Poisson, batch 64): {r['balanced_step'] * 1e3:.2f} ms against "
                     f"{r['plain_step'] * 1e3:.2f} ms for a plain Lightning step (ratio {r['ratio']:.2f}).")
    return "\n\n".join(parts)


POINTWISE = {  # variant: (label, target over the plain step or None)
    "plain": ("plain step paired with itself (noise)", None),
    "residual": ("balancer, Residual without weighting (its mean)", None),
    "causal": ("Causal(chunks=32, eps=1)", 1.05),
    "causal_ftz": ("Causal, subnormals flushed (set_flush_denormal)", None),
    "rba": ("RBA()", 1.05),
    "sa_pinn": ("SAPINN() (its Adam ascent included)", None),
    "brdr": ("BRDR()", None),
}


def pointwise_table(records: list[dict]) -> str:
    """Pointwise weights on a PINN step against the plain step (``test_pointwise``)."""
    rows_by_variant = {r["variant"]: r for r in records if r["suite"] == "pointwise"}
    if not rows_by_variant:
        return ""
    table = []
    for variant, (label, target) in POINTWISE.items():
        r = rows_by_variant.get(variant)
        if r is None:
            continue
        verdict = "" if target is None else f"<= {target:g} " + ("ok" if r["paired_ratio"] <= target else "MISSED")
        table.append([label, _fmt(r["baseline_step"] * 1e3), _fmt(r["paired_ratio"]),
                      f"{_fmt(r['paired_q1'])}-{_fmt(r['paired_q3'])}", verdict])
    first = next(iter(rows_by_variant.values()))
    return (f"Pointwise weights (Poisson residual on {first['points']} points with ids and t, a boundary MSE, "
            f"MLP 2-50-50-50-1 tanh, {first['params']:,} parameters, SGD): a balancer step with the weighting "
            "against the plain step ``(mean(r^2) + bc).backward()``, rounds of 10 steps.\n\n"
            + rst_table(["pde term", "plain ms", "ratio", "quartiles", "target"], table))


def memory_section(records: list[dict], measure_now: bool) -> str:
    import memory

    results = next((r["memory"] for r in records if r["suite"] == "memory" and r.get("memory")), None)
    if results is None and measure_now:
        results = memory.measure()
    if results is None:
        return "(no memory figures in this run: run test_memory.py, or pass --memory to measure them now)"
    return memory.rst(results)


def header(data: dict, records: list[dict]) -> str:
    machine = data.get("machine_info", {})
    cpu = (machine.get("cpu") or {}).get("brand_raw", machine.get("processor", "?"))
    threads = sorted({r.get("threads") for r in records if r.get("threads") is not None})
    loads = [r.get(k) for r in records for k in ("load_before", "load_after") if r.get(k) is not None]
    versions = {}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    lines = [f".. {data.get('datetime', '?')}; {cpu}; {os.cpu_count()} CPUs here; torch threads "
             f"{', '.join(map(str, threads)) or '?'}; torch {versions.get('torch', '?')}; "
             f"python {machine.get('python_version', '?')}"]
    warnings = []
    # the benchmark itself keeps about `threads` cores busy; more than the machine has: others ran too
    if loads and max(loads) > (os.cpu_count() or 1) + 0.5:
        warnings.append(f"load average up to {max(loads):.1f}")
    for r in records:
        if r["suite"] == "overhead" and r["variant"] == "plain" and abs(r["paired_ratio"] - 1) > 0.05:
            warnings.append(f"the plain step paired with itself gave {r['paired_ratio']:.2f} on {r['workload']}")
    if warnings:
        lines.append(".. NOISY RUN: " + "; ".join(warnings) + ": rerun on a quiet machine before publishing")
    return "\n".join(lines)


def render(data: dict, *, measure_memory: bool = False) -> str:
    records = _records(data)
    overhead, ratios = overhead_table(records)
    sections = [header(data, records), overhead, targets_table(ratios), one_backward_table(ratios), scale_tables(records),
                combiner_table(records), closure_table(records), loss_path_table(records), pointwise_table(records),
                memory_section(records, measure_memory)]
    return "\n\n".join(s for s in sections if s) + "\n"


def run_suite(json_path: str, extra: list[str]) -> int:
    command = [sys.executable, "-m", "pytest", str(HERE), "--benchmark-only", f"--benchmark-json={json_path}",
               "-q", "-p", "no:cacheprovider", *extra]
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.call(command, cwd=ROOT, stdout=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", help="pytest-benchmark JSON (--benchmark-json=FILE)")
    parser.add_argument("--run", action="store_true", help="run `pytest benchmarks/ --benchmark-only` first")
    parser.add_argument("--json", help="with --run: where to keep the JSON (default: a temporary file)")
    parser.add_argument("--memory", action="store_true", help="measure the memory table now if the JSON lacks it")
    parser.add_argument("pytest_args", nargs="*", help="with --run: extra pytest arguments, after --")
    args = parser.parse_args(argv)
    code = 0
    if args.run:
        path = args.json or os.path.join(tempfile.mkdtemp(prefix="lossbalance-bench-"), "benchmarks.json")
        code = run_suite(path, args.pytest_args)
        print(f"benchmark JSON: {path}", file=sys.stderr)
        if not os.path.exists(path):
            return code or 1
    elif args.file:
        path = args.file
    else:
        parser.error("give a JSON file, or --run")
    print(render(load(path), measure_memory=args.memory), end="")
    return code


if __name__ == "__main__":
    sys.exit(main())
