"""Figures are checked for their content: lines, bands, labels, the training-length mark, the zoom."""

import matplotlib.collections as mcoll
import matplotlib.image as mimage
import numpy as np
import pytest

from ropelab.evals.plots import accuracy_heatmap, difference_figure, loss_figure, zoom_set


def lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def bands(ax):
    return [c for c in ax.collections if isinstance(c, mcoll.PolyCollection)]


CURVES = {
    "rope": {1024: (2.0, 1.9, 2.1), 4096: (2.1, 2.0, 2.2), 16384: (7.3, 7.1, 7.5)},  # explodes past training
    "yarn": {1024: (2.05, 1.95, 2.15), 4096: (1.95, 1.9, 2.0), 16384: (1.65, 1.6, 1.7)},
    "rerope": {1024: (2.0, 1.92, 2.08), 4096: (1.93, 1.88, 1.98), 16384: (1.636, 1.6, 1.67)},
}


def test_loss_figure_zooms_on_the_methods_that_do_not_explode():
    assert zoom_set(CURVES) == ["yarn", "rerope"]
    fig = loss_figure(CURVES, train_length=2048, ylabel="loss on the last 2048 tokens (nats)", title="t")
    full, zoom = fig.axes[:2]
    assert set(lines(full)) == {"rope", "yarn", "rerope", "training length 2k"}
    assert set(lines(zoom)) == {"yarn", "rerope", "training length 2k"}
    assert len(bands(full)) == 3 and len(bands(zoom)) == 2
    mark = lines(full)["training length 2k"]
    assert list(mark.get_xdata()) == [2048, 2048]
    # the zoom's y-range covers its bands and leaves rope's 7.3 out
    low, high = zoom.get_ylim()
    assert low < 1.6 and 2.15 <= high < 7.1  # yarn's 2.15 is the zoomed methods' highest bound
    assert list(lines(zoom)["rerope"].get_ydata()) == [2.0, 1.93, 1.636]
    assert full.get_ylabel() == "loss on the last 2048 tokens (nats)" and full.get_xlabel().startswith("context length")
    assert "95%" in fig._suptitle.get_text()


def test_band_vertices_are_the_interval_bounds():
    fig = loss_figure({"a": CURVES["yarn"]})
    assert len(fig.axes) == 1  # nothing explodes: one panel
    (band,) = bands(fig.axes[0])
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(1.6) and max(ys) == pytest.approx(2.15)


def test_dense_curve_keeps_its_points():
    dense = {n: (2.0 - 0.01 * i, 1.9 - 0.01 * i, 2.1 - 0.01 * i) for i, n in enumerate(range(64, 4096, 128))}
    fig = loss_figure({"ntk": dense}, train_length=1024)
    assert len(lines(fig.axes[0])["ntk"].get_xdata()) == len(dense) == 32


def test_difference_figure_cancels_shared_content():
    rng = np.random.default_rng(0)
    content = [np.repeat(rng.normal(3, 1, 32), 64) for _ in range(2)]  # large swings shared by every method
    losses = {
        "rope": [c + rng.normal(0, 0.05, c.size) for c in content],
        "better": [c - 0.2 + rng.normal(0, 0.05, c.size) for c in content],
    }
    fig = difference_figure(losses, "rope", bucket=256, train_length=1024)
    ax = fig.axes[0]
    ls = lines(ax)
    assert set(ls) == {"reference: rope", "better", "training length 1k"}
    y = np.asarray(ls["better"].get_ydata())
    assert len(y) == 2048 // 256 and np.all(np.abs(y + 0.2) < 0.02)  # noise sd 0.07 per token / sqrt(512 tokens) ~ 0.003
    assert len(bands(ax)) == 1 and "minus rope" in ax.get_ylabel()
    with pytest.raises(ValueError, match="reference='yarn'"):
        difference_figure(losses, "yarn")
    with pytest.raises(ValueError, match=r"losses\['short'\]"):
        difference_figure({**losses, "short": [c[:100] for c in content]}, "rope")


def test_accuracy_heatmap_cells():
    cells = {"rope": {(1024, 0.0): 1.0, (1024, 1.0): 0.5, (4096, 0.0): 0.0, (4096, 1.0): 0.0},
             "yarn": {(1024, 0.0): 1.0, (4096, 1.0): 0.8}}
    fig = accuracy_heatmap(cells, title="niah-single")
    panels = [ax for ax in fig.axes if ax.get_title() in cells]
    assert [ax.get_title() for ax in panels] == ["rope", "yarn"]
    (image,) = [a for a in panels[0].get_children() if isinstance(a, mimage.AxesImage)]
    np.testing.assert_array_equal(image.get_array(), [[1.0, 0.0], [0.5, 0.0]])  # rows: depth, columns: length
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["1k", "4k"]
    grid = [a for a in panels[1].get_children() if isinstance(a, mimage.AxesImage)][0].get_array()
    assert grid.mask[0, 1] and grid[1, 1] == pytest.approx(0.8)  # missing cells stay empty
    with pytest.raises(ValueError, match="cells"):
        accuracy_heatmap({})


def test_loss_axis_label_comes_from_the_protocol_registry(monkeypatch):
    from ropelab.evals import protocols
    from ropelab.evals.plots import loss_vs_context_figure

    monkeypatch.setattr(protocols.get("fixed-target"), "axis_label", lambda header: f"custom {header['targets']}")
    header = {"name": "fixed-target", "targets": 7, "model": "m", "data": "d", "train_length": 64}
    records = [{"status": "ok", "method": "rope", "model_key": "k", "document": "a", "length": 32, "loss": 1.0,
                "scored_tokens": 7, "params": {"protocol": "fixed-target", "window": 32, "targets": 7},
                "losses": [1.0] * 31}]
    assert loss_vs_context_figure(header, records).axes[0].get_ylabel() == "custom 7 (nats)"


# --- dense per-position lines under fixed-target (the main job's figure) ------------------------

from ropelab.evals.plots import (  # noqa: E402
    MIN_BUCKET, bucketed_position_curve, dense_curves_from_records, loss_vs_context_figure, position_buckets)


def test_position_buckets_tile_the_contexts_in_quarter_octaves():
    buckets = position_buckets(16384)
    assert buckets[0][0] == 256 and buckets[-1][1] == 16384 and len(buckets) == 24  # 6 octaves x 4
    assert all(a < b and b - a >= MIN_BUCKET for a, b in buckets)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(buckets, buckets[1:]))  # contiguous, no context left out
    ratios = [b / a for a, b in buckets]
    assert max(ratios) == pytest.approx(2 ** 0.25, abs=0.01)  # rounding to whole tokens moves a ratio by < 1%
    short = position_buckets(32)  # a test-sized window: start falls to 32 // 16 and narrow steps merge
    assert short[0][0] == 2 and short[-1][1] == 32 and all(b - a >= MIN_BUCKET for a, b in short[:-1])
    with pytest.raises(ValueError, match="width=1"):
        position_buckets(1)


def test_bucketed_curve_is_the_mean_of_the_right_positions():
    rng = np.random.default_rng(1)
    docs = [rng.normal(2, 0.5, 4095), rng.normal(2, 0.5, 4095)]  # a 4096-token forward: contexts 1..4095
    xs, mean, low, high = bucketed_position_curve(docs)
    buckets = position_buckets(4096)
    assert len(xs) == len(buckets)
    for (a, b), x, m, lo, hi in zip(buckets, xs, mean, low, high):
        brute = np.concatenate([d[a - 1 : b - 1] for d in docs])  # entry c - 1 is the prediction with c tokens of context
        assert m == pytest.approx(brute.mean(), rel=1e-12)  # the same float64 sum in another order
        assert a <= x <= b and lo < m < hi


def _ft_record(method, n, losses, prefix=True, document="d"):
    return {"status": "ok", "method": method, "model_key": "k", "document": document, "length": n,
            "loss": float(np.mean(losses[-512:])), "scored_tokens": 512, "prefix_consistent": prefix,
            "params": {"protocol": "fixed-target", "window": 4096, "targets": 512}, "losses": list(losses),
            "seconds": 1.0, "tokens_per_second": 1.0, "peak_rss_mb": 1.0}


def _ft_records():
    rng = np.random.default_rng(2)
    content = np.repeat(rng.normal(2.0, 0.4, 64), 64)[:4095]  # shared swings, as a document's content gives
    rope = content + np.where(np.arange(4095) >= 2048, 5.0, 0.0)  # explodes past a training length of 2048
    yarn = content - 0.05
    records = []
    for method, full in (("rope", rope), ("yarn:scale=2", yarn)):
        records += [_ft_record(method, 4096, full), _ft_record(method, 1024, full[:1023])]
    records += [_ft_record("dynamic-ntk:scale=2", n, yarn[:n - 1], prefix=False) for n in (1024, 4096)]
    return records


def test_fixed_target_figure_has_dense_lines_for_prefix_consistent_methods_only():
    header = {"name": "fixed-target", "targets": 512, "model": "m", "data": "d", "train_length": 2048}
    records = _ft_records()
    fig = loss_vs_context_figure(header, records)
    full, zoom = fig.axes[:2]
    ls = lines(full)
    points_only = "dynamic-ntk:scale=2 (points only: not prefix-consistent)"
    assert set(ls) == {"rope", "yarn:scale=2", "_rope points", "_yarn:scale=2 points", points_only,
                       "training length 2k"}
    width = len(position_buckets(4096))
    assert len(ls["rope"].get_xdata()) == len(ls["yarn:scale=2"].get_xdata()) == width
    # the dense line is the bucket means of the longest forward's kept losses (no other data)
    rope_4k = np.asarray(records[0]["losses"])
    for (a, b), y in zip(position_buckets(4096), ls["rope"].get_ydata()):
        assert y == pytest.approx(rope_4k[a - 1 : b - 1].mean(), rel=1e-12)
    # the fixed-target scores stay, as markers without a connecting line, with 95% bars
    marks = ls["_rope points"]
    assert list(marks.get_xdata()) == [1024, 4096] and marks.get_linestyle() == "None"
    assert list(marks.get_ydata()) == pytest.approx([np.mean(rope_4k[:1023][-512:]), np.mean(rope_4k[-512:])])
    bars = [c for c in full.collections if isinstance(c, mcoll.LineCollection) and c.get_label() == "_rope bars"]
    assert len(bars) == 1 and len(bars[0].get_segments()) == 2
    # dynamic-ntk keeps its two points, joined, with a band; every dense line has a band too
    assert list(ls[points_only].get_xdata()) == [1024, 4096]
    assert len(bands(full)) == 3
    # the caption says which is which; the zoom drops rope and narrows to the fixed-target lengths
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "prefix-consistent" in caption and "markers" in caption and "last 512 tokens" in caption
    assert "rope" not in lines(zoom) and "yarn:scale=2" in lines(zoom)
    assert zoom.get_xlim()[0] == pytest.approx(1024 / 1.2) and zoom.get_ylim()[1] < 5.0
    assert "bars" in fig._suptitle.get_text()


def test_no_dense_line_outside_fixed_target_or_without_prefix_consistency():
    records = _ft_records()
    assert set(dense_curves_from_records(records)) == {"rope", "yarn:scale=2"}
    position = [{**r, "params": {**r["params"], "protocol": "position"}} for r in records]
    assert dense_curves_from_records(position) == {}


def test_difference_figure_zooms_on_a_non_exploding_reference():
    from ropelab.evals.plots import difference_zoom, per_position_figure

    records = _ft_records()  # rope explodes past 2048; yarn and dynamic-ntk hold
    assert difference_zoom(records, "rope", {"rope": 0, "yarn:scale=2": 0, "dynamic-ntk:scale=2": 0}) == (
        "yarn:scale=2", ["dynamic-ntk:scale=2"])  # equal losses: the first of the tied best
    header = {"name": "fixed-target", "targets": 512, "model": "m", "data": "d", "train_length": 2048}
    fig = per_position_figure(header, records)
    full, zoom = fig.axes[:2]
    assert set(lines(full)) == {"reference: rope", "yarn:scale=2", "dynamic-ntk:scale=2", "training length 2k"}
    assert set(lines(zoom)) == {"reference: yarn:scale=2", "dynamic-ntk:scale=2", "training length 2k"}
    # dynamic-ntk's record here has yarn's losses: its difference from yarn is 0 at every bucket, not rope's -5
    assert np.allclose(lines(zoom)["dynamic-ntk:scale=2"].get_ydata(), 0.0, atol=1e-12)
    assert min(lines(full)["yarn:scale=2"].get_ydata()) == pytest.approx(-5.05)
    assert len(bands(zoom)) == 1 and "minus yarn:scale=2" in zoom.get_ylabel()
    with pytest.raises(ValueError, match="zoom="):
        from ropelab.evals.plots import difference_figure
        difference_figure({"a": [np.zeros(4)]}, "a", zoom=("b", []))
