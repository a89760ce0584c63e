"""The figures (lossbalance.plots): conflicts of a history or of runs, and the figure set of runs."""
from __future__ import annotations

import pytest

from lossbalance.demo import train


def _history(names, cosines, steps):
    """A synthetic balancer-style history: cosines[i] is the (K x K) matrix of step steps[i]."""
    return [{"step": s, "weights": {n: 1.0 + i for i, n in enumerate(names)},
             "losses": {n: 1.0 for n in names}, "grad_norm": {n: 10.0 ** i for i, n in enumerate(names)},
             "cosine": c, "conflict_fraction": 0.0} for s, c in zip(steps, cosines)]


def test_plot_conflicts_draws_every_pair_on_a_centred_scale(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.collections import QuadMesh

    from lossbalance.plots import plot_conflicts

    def matrix(a, b, c):  # pairs (x, y) = a, (x, z) = b, (y, z) = c
        return [[1.0, a, b], [a, 1.0, c], [b, c, 1.0]]

    history = _history(["x", "y", "z"], [matrix(-0.9, 0.2, 0.5), matrix(-0.5, 0.1, -0.3)], [0, 10])
    history.insert(1, {"step": 5, "weights": {"x": 1.0}, "losses": {"x": 1.0}})  # no diagnostics: skipped
    path = tmp_path / "c.png"
    fig = plot_conflicts(history, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heat, norms = fig.axes[0], fig.axes[1]
    (mesh,) = [c for c in heat.collections if isinstance(c, QuadMesh)]
    assert mesh.get_clim() == (-1.0, 1.0)  # diverging scale centred at 0
    assert mesh.get_array().reshape(3, 2).tolist() == [[-0.9, -0.5], [0.2, 0.1], [0.5, -0.3]]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["x / y", "x / z", "y / z"]
    assert "conflicting: 50%" in heat.get_title()
    assert norms.get_yscale() == "log"
    solid = {line.get_label(): line.get_ydata().tolist() for line in norms.get_lines()}
    assert solid["||grad x||"] == [1.0, 1.0] and solid["||grad z||"] == [100.0, 100.0]
    assert solid["weight x ||grad y||"] == [20.0, 20.0]  # weight 2 x norm 10
    # runs (objects with label and history): one column each; a run without diagnostics is left out
    class Run:
        def __init__(self, label, history):
            self.label, self.history = label, history
    fig = plot_conflicts([Run("a", history), Run("b", history), Run("none", history[1:2])])
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 4
    with pytest.raises(ValueError, match="diagnose_every"):
        plot_conflicts(history[1:2])


def test_save_figures_writes_conflicts_only_with_diagnostics(tmp_path):
    pytest.importorskip("matplotlib")
    from lossbalance.plots import save_figures

    with_diag = train("helmholtz", "static", steps=4, history_every=1, eval_n=8)
    without = train("helmholtz", "static", steps=4, history_every=1, diagnose_every=0, eval_n=8)
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(save_figures([without], tmp_path / "a")) == ["weights.png", "losses.png", "error_fields.png"]
    paths = save_figures([without, with_diag], tmp_path / "b")
    assert names(paths) == ["weights.png", "losses.png", "error_fields.png", "conflicts.png"]
    assert all(p.stat().st_size > 0 for p in paths) and not (tmp_path / "a" / "conflicts.png").exists()


def test_plot_pointwise_draws_a_band_per_weighting_and_the_causal_minimum(tmp_path):
    pytest.importorskip("matplotlib")
    from lossbalance.plots import has_pointwise, plot_pointwise

    def entry(step, scale):
        return {"step": step, "weights": {"pde": 1.0, "ic": 1.0}, "losses": {"pde": 1.0, "ic": 1.0},
                "pointwise": {"pde": {"causal_min": 0.1 * scale, "causal_eps": 1.0},
                              "ic": {f"rba_{k}": v * scale for k, v in
                                     {"min": 0.1, "p10": 0.2, "p50": 0.5, "mean": 0.5, "p90": 0.8, "max": 1.0}.items()}}}

    history = [entry(0, 1.0), {"step": 1, "weights": {"pde": 1.0}, "losses": {"pde": 1.0}}, entry(2, 2.0)]
    assert has_pointwise(history) and not has_pointwise(history[1:2])
    path = tmp_path / "p.png"
    fig = plot_pointwise(history, path, label="run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pde, ic = [ax for ax in fig.axes if ax.get_visible()]
    assert pde.get_title() == "run: pde" and ic.get_title() == "run: ic"
    assert [line.get_label() for line in pde.get_lines()] == ["causal_min"]
    assert [list(line.get_ydata()) for line in pde.get_lines()] == [[0.1, 0.2]]
    labels = [line.get_label() for line in ic.get_lines()]
    assert labels == ["rba median", "rba min", "rba max"] and len(ic.collections) == 1  # the 10-90 % band
    assert list(ic.get_lines()[0].get_ydata()) == [0.5, 1.0]
    with pytest.raises(ValueError, match="pointwise"):
        plot_pointwise(history[1:2])


def test_plot_weights_takes_a_balancer_history_and_draws_its_numbers():
    # it took only runs with .history: plot_weights(balancer.history) raised AttributeError
    pytest.importorskip("matplotlib")
    from lossbalance.plots import plot_losses, plot_weights

    history = _history(["pde", "bc"], [[[1.0, 0.0], [0.0, 1.0]]] * 3, [0, 5, 10])
    fig = plot_weights(history)
    line = fig.axes[1].get_lines()[0]  # the panel of bc
    assert list(line.get_xdata()) == [0, 5, 10] and list(line.get_ydata()) == [2.0, 2.0, 2.0]
    assert len(plot_losses(history).axes[0].get_lines()) == 1


def test_a_diverged_run_does_not_flatten_the_shared_error_scale():
    # with the NaN run first, max() stuck on NaN and the scale fell back to 1: every field saturated
    pytest.importorskip("matplotlib")
    import types

    from lossbalance.plots import plot_error_fields

    points = [[x, y] for y in (0, 1, 2, 3) for x in (0.0, 0.5, 1.0)]
    errors = [10 * p[0] + p[1] for p in points]
    ok = types.SimpleNamespace(label="a", error=0.1, points=points, abs_error=errors, history=[])
    bad = types.SimpleNamespace(label="n", error=float("nan"), points=points, abs_error=[float("nan")] + errors[1:], history=[])
    for runs in ([ok, bad], [bad, ok]):
        assert plot_error_fields(runs).axes[0].get_images()[0].get_clim() == (0, 13)
