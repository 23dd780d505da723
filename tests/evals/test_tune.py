"""Parameter search on synthetic objectives: it finds the minimum, caches and resumes, refuses bad ranges."""

import math

import pytest

from ropelab.evals.tune import Continuous, Grid, Search, tunable, tune_figure
from ropelab.evals.uncertainty import Interval


def bowl(method):
    """Minimum 1.5 at scale 3 (in log space)."""
    return 1.5 + (math.log(method.scale) - math.log(3.0)) ** 2


def test_golden_section_finds_the_minimum():
    search = Search("ntk", {"scale": Continuous(1.0, 16.0, log=True, evaluations=14)}, bowl)
    best = search.run()
    # bracket after 14 steps: log(16) * 0.618^12 = 0.0085 in log(scale), so scale within 1% of 3
    assert best.params["scale"] == pytest.approx(3.0, rel=0.01)
    assert len(search.evaluations) == 14


def test_grid_times_continuous_and_coordinate_descent():
    def objective(m):
        return (m.window - 1024) ** 2 / 1e6 + (m.scale - 20.0) ** 2 / 100

    search = Search("leaky-rerope", {"window": Grid((512, 1024, 2048)), "scale": Continuous(2.0, 64.0)}, objective,
                    fixed={"train_length": 8192})
    best = search.run()
    assert best.params["window"] == 1024 and best.params["scale"] == pytest.approx(20.0, abs=0.5)
    assert {e.params["window"] for e in search.evaluations} == {512, 1024, 2048}


def test_every_new_evaluation_reported_and_a_rerun_resumes_from_the_cache():
    stored, calls = {}, []

    def objective(m):
        calls.append(m.spec())
        return bowl(m)

    first = Search("yarn", {"scale": Continuous(1.0, 8.0, evaluations=6)}, objective,
                   on_result=lambda spec, params, value: stored.__setitem__(spec, value))
    first.run()
    assert sorted(stored) == sorted(calls) and len(calls) == 6
    calls.clear()
    again = Search("yarn", {"scale": Continuous(1.0, 8.0, evaluations=6)}, objective, cache=stored)
    assert again.run().spec == first.best().spec
    assert calls == [] and all(e.cached for e in again.evaluations)


def test_interval_objectives_compare_by_mean():
    search = Search("ntk", {"scale": Grid((2.0, 3.0, 4.0))},
                    lambda m: Interval(bowl(m), bowl(m) - 0.1, bowl(m) + 0.1, 1, 20, 10, "test"))
    assert search.run().params == {"scale": 3.0}


def test_bad_input_named():
    with pytest.raises(ValueError, match=r"range=\[2.0, 2.0\]: empty"):
        Continuous(2.0, 2.0)
    with pytest.raises(ValueError, match=r"values=\(\)"):
        Grid(())
    with pytest.raises(ValueError, match=r"beta range \[0.5, 1.5\]: crosses 'beta-base''s rule at beta=1.5"):
        Search("beta-base", {"beta": Continuous(0.5, 1.5)}, bowl, fixed={"scale": 2})
    with pytest.raises(ValueError, match=r"scale range \[0.25, 4.0\]: crosses 'yarn''s rule at scale=0.25"):
        Search("yarn", {"scale": Continuous(0.25, 4.0)}, bowl)
    with pytest.raises(ValueError, match="method='rope': nothing to tune"):
        Search("rope", {"base": Continuous(1e4, 1e6)}, bowl)
    with pytest.raises(ValueError, match="windw: not a tunable parameter of 'rerope'"):
        Search("rerope", {"windw": Grid((8,))}, bowl)
    with pytest.raises(ValueError, match=r"space=\{\}"):
        Search("ntk", {}, bowl)
    with pytest.raises(ValueError, match="method='nkt'.*did you mean"):
        Search("nkt", {"scale": Grid((2,))}, bowl)
    assert tunable("rope") == [] and tunable("yarn") == ["scale", "beta_fast", "beta_slow"]


def test_tune_figure_marks_best_and_default():
    search = Search("ntk", {"scale": Grid((2.0, 3.0, 5.0))},
                    lambda m: Interval(bowl(m), bowl(m) - 0.05, bowl(m) + 0.05, 1, 20, 10, "test"))
    search.run()
    ax = tune_figure(search.evaluations, "scale", default=2.0).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "best: ntk:scale=3" in labels  # the canonical spec text and "default scale=2.0" in labels
    assert len(ax.containers) == 1  # the error bars of the intervals
    assert ax.get_xlabel() == "scale"
    with pytest.raises(ValueError, match="parameter='beta'"):
        tune_figure(search.evaluations, "beta")
