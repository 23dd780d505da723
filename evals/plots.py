"""Figures that compare methods (matplotlib Agg; PNG and SVG).

Each figure has a plain-data builder returning the matplotlib Figure (so tests can read its
lines, bands and labels) and a run-directory wrapper that reads the result files and saves:

- `loss_figure` / `loss_vs_context`: loss per context length, one line per method with its
  95% interval as a band (evals/uncertainty.py), the training length marked. When some
  methods explode (their loss leaves the others' range by more than `ZOOM_MARGIN` nats), a
  second panel zooms on the rest so their differences stay readable. Prefix-consistent
  methods under the `position` protocol get a point per bucket of their per-position curve
  (no extra forward). Under `fixed-target` (the main job: two context lengths), each
  prefix-consistent method also gets a dense line: the loss at every position of its longest
  forward, bucketed in quarter octaves of context length with block-bootstrap bands
  (`dense_curves_from_records`), read from the losses the record already keeps (no extra
  forward, no extra scoring); its fixed-target scores stay as markers with 95% bars. A method
  that is not prefix-consistent (`dynamic-ntk`: its positions depend on the forward's length)
  keeps its points only, labelled so. The zoomed panel then also narrows its x-range to the
  fixed-target lengths, where the methods part;
- `difference_figure` / `per_position`: per position, each method's loss minus a reference
  method's on the same tokens, averaged over buckets of positions, with a paired band, so
  the content's own swings cancel;
- `accuracy_heatmap` / `passkey`, `ruler_TASK`: task accuracy, depth × length, one panel per method
  (one heatmap per RULER-style task).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import protocols, summary  # noqa: E402
from .evidence import dense_rows  # noqa: E402
from .passkey import accuracy  # noqa: E402
from .ruler_run import depth_table  # noqa: E402
from .uncertainty import loss_interval  # noqa: E402

DENSE_START = 256  # first context length of a dense fixed-target line: below it a bucket holds too few tokens
BUCKETS_PER_OCTAVE = 4  # quarter octaves: 24 buckets from 256 to 16k, the narrowest 48 tokens wide
MIN_BUCKET = 16  # tokens: a narrower bucket is merged into the next (an interval needs >= 10 blocks)
ZOOM_MARGIN = 0.5  # nats above the best method at some length: such a method is left out of the zoomed panel
FIGURE_RESAMPLES = 1000  # bands are drawn, not tabulated: half the table's resamples is plenty


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for p in paths:
        fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def _mark_train_length(ax, train_length: int | None) -> None:
    if train_length:
        ax.axvline(train_length, color="grey", ls="--", lw=1, label=f"training length {length_label(train_length)}")


def zoom_set(curves: dict[str, dict[int, tuple[float, float, float]]], margin: float = ZOOM_MARGIN) -> list[str]:
    """Methods whose loss stays within `margin` nats of the best method at every length they share."""
    best: dict[int, float] = {}
    for row in curves.values():
        for n, (mean, _, _) in row.items():
            best[n] = min(best.get(n, np.inf), mean)
    return [m for m, row in curves.items() if row and all(mean - best[n] <= margin for n, (mean, _, _) in row.items())]


def _draw_points(ax, xs, mean, low, high, colour, label, joined: bool) -> None:
    """Fixed-target points: joined by a line with a band, or (beside a dense line) markers with 95% bars."""
    if joined:
        ax.plot(xs, mean, marker="o" if len(xs) <= 12 else None, ms=3, color=colour, label=label)
        if np.any(high > low):  # points without an interval (too few tokens) get no band
            ax.fill_between(xs, low, high, color=colour, alpha=0.2, lw=0)
        return
    ax.plot(xs, mean, ls="none", marker="o", ms=5, mec="black", mew=0.6, color=colour, label=f"_{label} points")
    ax.vlines(xs, low, high, color=colour, lw=1.5, label=f"_{label} bars")


def loss_figure(curves: dict[str, dict[int, tuple[float, float, float]]], *, train_length: int | None = None,
                ylabel: str = "loss (nats)", title: str = "", margin: float = ZOOM_MARGIN, dense=None,
                dense_note: str = ""):
    """curves: {method: {context length: (mean, low, high)}}. Returns the Figure (one or two panels).

    dense: optional {method: (xs, mean, low, high)}, a bucketed per-position line per method
    (`dense_curves_from_records`); those methods' `curves` points become markers with bars.
    When some methods have a dense line, the others' legend label says they have points only.
    """
    dense = dense or {}
    zoomed = zoom_set(curves, margin)
    two = 0 < len(zoomed) < sum(1 for row in curves.values() if row)
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(13 if two else 7, 4.8), squeeze=False)
    panels = [(axes[0][0], list(curves), "all methods")]
    if two:
        panels.append((axes[0][1], zoomed, f"zoom: methods within {margin:g} nats of the best"))
    colours = {m: f"C{i % 10}" for i, m in enumerate(curves)}
    lengths = sorted({n for row in curves.values() for n in row})
    for ax, methods, subtitle in panels:
        for m in methods:
            row = curves[m]
            if m in dense:
                xs, mean, low, high = (np.asarray(v, dtype=np.float64) for v in dense[m])
                ax.plot(xs, mean, color=colours[m], lw=1.2, label=m)
                ax.fill_between(xs, low, high, color=colours[m], alpha=0.12, lw=0)
            if not row:
                continue
            xs = sorted(row)
            mean, low, high = (np.array([row[x][i] for x in xs]) for i in range(3))
            label = f"{m} (points only: not prefix-consistent)" if dense and m not in dense else m
            _draw_points(ax, xs, mean, low, high, colours[m], label, joined=m not in dense)
        _mark_train_length(ax, train_length)
        ax.set_xscale("log", base=2)
        ticks = [n for n in lengths if n & (n - 1) == 0] or lengths  # powers of two only: dense curves stay legible
        if dense:  # the dense lines reach short contexts: a tick per octave they cover
            low = min(min(d[0]) for d in dense.values())
            ticks = sorted(set(ticks) | {2 ** k for k in range(int(np.ceil(np.log2(low))), int(np.log2(max(lengths))) + 1)})
        ax.set_xticks(ticks, [length_label(n) for n in ticks])
        ax.set_xlabel("context length N (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if two:
        _zoom_limits(panels[1][0], {m: curves[m] for m in zoomed}, {m: dense[m] for m in zoomed if m in dense})
    fig.suptitle(title + "\nbands" + (" and bars" if dense else "") + ": 95% bootstrap intervals", fontsize=10)
    if dense and dense_note:  # the caption, under the panels: which methods have lines and which points only
        fig.text(0.5, -0.01, textwrap.fill(dense_note, 150, break_on_hyphens=False), ha="center", va="top", fontsize=8)
    return fig


def _zoom_limits(ax, points: dict[str, dict], dense: dict[str, tuple]) -> None:
    """The zoomed panel's range: its methods' intervals; with dense lines, only over the points' lengths.

    A dense line's early buckets swing with the content (a hard passage costs a nat), which
    would stretch the axis over the differences the zoom is for; the x-range is narrowed to
    the fixed-target lengths (the points), and the y-range covers what is drawn there.
    """
    lows = [v[1] for row in points.values() for v in row.values()]
    highs = [v[2] for row in points.values() for v in row.values()]
    if dense and lows:
        lengths = [n for row in points.values() for n in row]
        left, right = min(lengths) / 1.2, max(max(lengths), max(max(d[0]) for d in dense.values())) * 1.1
        for xs, _, low, high in dense.values():
            inside = [i for i, x in enumerate(xs) if left <= x <= right]
            lows += [low[i] for i in inside]
            highs += [high[i] for i in inside]
        ax.set_xlim(left, right)
    if not lows:
        return
    pad = 0.05 * (max(highs) - min(lows) or 1.0)
    ax.set_ylim(min(lows) - pad, max(highs) + pad)


def bucket_curve(docs: list[np.ndarray], bucket: int, seed: int = 0):
    """(centres, mean, low, high) over buckets of `bucket` positions, block-bootstrap bands.

    A bucket too short for an interval (the last one, often) is dropped.
    """
    width = min(d.size for d in docs)
    xs, mean, low, high = [], [], [], []
    for start in range(0, width, bucket):
        try:
            iv = loss_interval([d[start : start + bucket] for d in docs], resamples=FIGURE_RESAMPLES, seed=seed)
        except ValueError:
            continue
        xs.append(start + min(bucket, width - start) / 2 + 1)  # bucket centre, as context length
        mean.append(iv.mean)
        low.append(iv.low)
        high.append(iv.high)
    return xs, mean, low, high


def position_buckets(width: int, start: int = DENSE_START, per_octave: int = BUCKETS_PER_OCTAVE) -> list[tuple[int, int]]:
    """Log-spaced buckets [a, b) of context lengths covering [start, width] of a `width`-token forward.

    Context length c is the prediction of token c from the c tokens before it: entry c - 1 of
    a record's `losses`, so a forward of W tokens has contexts 1 .. W - 1 and the last bucket
    ends at W. Edges closer than `MIN_BUCKET` tokens are merged. `start` falls to width // 16
    for short forwards, so a test-sized window still gets buckets.
    """
    if width < 2:
        raise ValueError(f"width={width}: a forward needs at least 2 tokens")
    start = max(1, min(start, width // 16))
    steps = max(1, int(np.ceil(np.log2(width / start) * per_octave)))
    edges = [start]
    for e in np.geomspace(start, width, steps + 1)[1:]:
        if int(round(e)) - edges[-1] >= MIN_BUCKET:
            edges.append(int(round(e)))
    if edges[-1] != width:  # the last step was too narrow: widen the last bucket to the end instead
        if len(edges) > 1:
            edges.pop()
        edges.append(width)
    return list(zip(edges, edges[1:]))


def bucketed_position_curve(docs: list[np.ndarray], seed: int = 0, start: int = DENSE_START,
                            per_octave: int = BUCKETS_PER_OCTAVE):
    """(centres, mean, low, high): per-position losses (entry i: context i + 1) averaged per bucket of
    `position_buckets`, with a 95% interval over documents and token blocks inside the bucket."""
    width = min(d.size for d in docs) + 1
    xs, mean, low, high = [], [], [], []
    for a, b in position_buckets(width, start, per_octave):
        m, lo, hi = _point([d[a - 1 : b - 1] for d in docs], seed)
        xs.append(float(np.sqrt(a * b)))  # the geometric centre: buckets are even on the log axis
        mean.append(m)
        low.append(lo)
        high.append(hi)
    return xs, mean, low, high


def difference_figure(losses: dict[str, list], reference: str, *, bucket: int = 256, train_length: int | None = None,
                      title: str = "", seed: int = 0, zoom: tuple[str, list[str]] | None = None):
    """losses: {method: per-document per-position loss arrays}, all on the same tokens.

    Plots, per bucket of `bucket` positions, the mean of (method - reference) with a 95%
    block-bootstrap band over the per-token differences (paired by construction). With the
    reference alone, its own per-position loss is drawn instead. zoom: (another reference,
    methods): a second panel of those methods' differences from it, for when the first
    reference explodes and its differences hide the rest (the main job's `rope`).
    """
    if reference not in losses:
        raise ValueError(f"reference={reference!r}: not among the methods ({', '.join(losses)})")
    if bucket < 1:
        raise ValueError(f"bucket={bucket}: must be an integer >= 1 (positions per bucket)")
    if zoom is not None and (zoom[0] not in losses or not set(zoom[1]) <= set(losses)):
        raise ValueError(f"zoom={zoom!r}: the reference and methods must be among the methods ({', '.join(losses)})")
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(13 if zoom else 7, 4.5), squeeze=False)
    colours = {m: f"C{i % 10}" for i, m in enumerate(losses)}
    panels = [(axes[0][0], reference, losses, title + "\n")]
    if zoom:
        panels.append((axes[0][1], zoom[0], {m: losses[m] for m in dict.fromkeys([zoom[0], *zoom[1]])},
                       f"zoom: differences from {zoom[0]}\n"))
    for ax, ref_name, these, heading in panels:
        alone = len(these) == 1
        _draw_differences(ax, these, ref_name, colours, bucket, seed)
        _mark_train_length(ax, train_length)
        ax.set_xlabel("context length (tokens before the predicted token)")
        what = "loss (nats)" if alone else f"loss minus {ref_name}'s (nats)"
        ax.set_ylabel(f"{what}, mean per {bucket} positions", fontsize=9 if len(what) < 40 else 7)
        ax.set_title(heading + f"bands: 95% {'' if alone else 'paired '}block bootstrap", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _draw_differences(ax, losses: dict[str, list], reference: str, colours: dict, bucket: int, seed: int) -> None:
    ref = [np.asarray(d, dtype=np.float64) for d in losses[reference]]
    if len(losses) == 1:
        xs, mean, low, high = bucket_curve(ref, bucket, seed)
        ax.plot(xs, mean, color=colours[reference], lw=1.2, label=reference)
        ax.fill_between(xs, low, high, color=colours[reference], alpha=0.2, lw=0)
        return
    ax.axhline(0.0, color="black", lw=0.8, label=f"reference: {reference}")
    for m, docs in losses.items():
        if m == reference:
            continue
        docs = [np.asarray(d, dtype=np.float64) for d in docs]
        if [d.size for d in docs] != [d.size for d in ref]:
            raise ValueError(f"losses[{m!r}]: positions differ from the reference's; the difference needs the same tokens")
        xs, mean, low, high = bucket_curve([d - r for d, r in zip(docs, ref)], bucket, seed)
        ax.plot(xs, mean, color=colours[m], lw=1.2, label=m)
        ax.fill_between(xs, low, high, color=colours[m], alpha=0.2, lw=0)


def accuracy_heatmap(cells: dict[str, dict[tuple[int, float], float]], *, title: str = "", what: str = "accuracy"):
    """cells: {method: {(length, depth): score in [0, 1]}}. One panel per method, depth × length."""
    if not cells:
        raise ValueError("cells={}: nothing to draw")
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells) + 1, 3.4), squeeze=False)
    for ax, (method, values) in zip(axes[0], cells.items()):
        lengths = sorted({n for n, _ in values})
        depths = sorted({d for _, d in values}, key=lambda d: -1 if d is None else d)
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (n, d), value in values.items():
            grid[depths.index(d), lengths.index(n)] = value
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), ["-" if d is None else f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length")
        ax.set_title(method, fontsize=9)
    axes[0][0].set_ylabel("depth of the needle")
    fig.colorbar(image, ax=axes[0].tolist(), label=what)
    fig.suptitle(title)
    return fig


# --- run-directory wrappers (records of the result store; rows keyed as in summary.labels) -------


def _point(docs: list[np.ndarray], seed: int) -> tuple[float, float, float]:
    """(mean, low, high); too few tokens for an interval: the point alone (low = high = mean), no band."""
    try:
        iv = loss_interval(docs, resamples=FIGURE_RESAMPLES, seed=seed)
        return iv.mean, iv.low, iv.high
    except ValueError:
        mean = float(np.concatenate(docs).mean())
        return mean, mean, mean


def _rows(records: list[dict]) -> dict[str, list[dict]]:
    """{row label: its successful records}; rows as in summary.labels (model, method, parameters)."""
    names = summary.labels(records)
    rows: dict[str, list[dict]] = {label: [] for label in names.values()}
    for r in records:
        if r.get("status") == "ok":
            rows[names[summary.group_of(r)]].append(r)
    return rows


def curves_from_records(protocol: dict, records: list[dict], points: int = 24, seed: int = 0):
    """{row label: {length: (mean, low, high)}} with intervals over documents and token blocks.

    Each record's own parameters (`params`) say how it was scored. fixed-target: each
    length's target losses. position: for a prefix-consistent method, `points` log-spaced
    lengths up to its longest forward (every prefix mean is a point, no extra forward);
    otherwise the lengths it was run at. sliding: the point alone.
    """
    out: dict[str, dict[int, tuple[float, float, float]]] = {}
    for label, mine in _rows(records).items():
        row = {}
        name = mine[0]["params"]["protocol"] if mine else None
        if name == "position" and all(r.get("prefix_consistent") for r in mine):
            longest = max(r["length"] for r in mine)
            docs = [np.asarray(r["losses"]) for r in mine if r["length"] == longest]
            shortest = min(min(r.get("lengths", [longest])) for r in mine)
            for n in sorted({int(round(x)) for x in np.geomspace(max(2, shortest), longest, points)}):
                row[n] = _point([d[: n - 1] for d in docs], seed)
        else:
            for n in sorted({r["length"] for r in mine}):
                here = [r for r in mine if r["length"] == n]
                if name == "fixed-target":
                    row[n] = _point([np.asarray(r["losses"][-r["params"]["targets"]:]) for r in here], seed)
                elif name == "position":
                    row[n] = _point([np.asarray(r["losses"][: n - 1]) for r in here], seed)
                else:
                    mean = sum(r["loss"] * r["scored_tokens"] for r in here) / sum(r["scored_tokens"] for r in here)
                    row[n] = (mean, mean, mean)
        out[label] = row
    return out


def dense_curves_from_records(records: list[dict], seed: int = 0) -> dict[str, tuple]:
    """{row label: (xs, mean, low, high)}: the bucketed per-position line of each fixed-target row
    whose every record is prefix-consistent, from its longest forward on every document.

    The losses are those the records keep already (the whole forward's, evals/protocols.py),
    so the line costs no forward and no scoring. Rows of other protocols, and rows of
    methods that are not prefix-consistent, get none.
    """
    out = {}
    lines, _ = dense_rows(records)
    for label, mine in _rows(records).items():
        if label not in lines:
            continue
        longest = max(r["length"] for r in mine)
        docs = [np.asarray(r["losses"], dtype=np.float64) for r in mine if r["length"] == longest]
        out[label] = bucketed_position_curve(docs, seed)
    return out


def dense_note(protocol: dict, dense: dict) -> str:
    """What the lines and markers of a fixed-target figure with dense lines are (its caption)."""
    if not dense:
        return ""
    return (f"markers: {protocols.get(protocol['name']).axis_label(protocol)} at each N; lines: loss at each "
            "position of the longest forward, mean per quarter octave of context (prefix-consistent methods; "
            "same forward, no extra cost); a method with points only is not prefix-consistent")


def loss_vs_context_figure(protocol: dict, records: list[dict]):
    dense = dense_curves_from_records(records) if protocol.get("name") == "fixed-target" else {}
    label = protocols.get(protocol['name']).axis_label(protocol)
    return loss_figure(curves_from_records(protocol, records), train_length=protocol.get("train_length"),
                       ylabel="loss (nats)" if dense else f"{label} (nats)", dense=dense,
                       dense_note=dense_note(protocol, dense),
                       title=f"{protocol['model']}: loss versus context ({protocol['name']} protocol, {protocol['data']})")


def _position_losses(records: list[dict]) -> dict[str, list[np.ndarray]]:
    """{row label: per-document losses of its longest forward}, documents in a fixed order, cut to a common width.

    Sliding-window records are left out: their positions do not share one context origin.
    """
    longest: dict[str, list[dict]] = {}
    for label, mine in _rows(records).items():
        mine = [r for r in mine if r["params"].get("protocol") != "sliding"]
        if mine:
            top = max(r["length"] for r in mine)
            longest[label] = [r for r in mine if r["length"] == top]
    by = {label: {r["document"]: np.asarray(r["losses"], dtype=np.float64) for r in rs} for label, rs in longest.items()}
    shared = sorted(set.intersection(*(set(v) for v in by.values()))) if by else []
    if not shared:
        return {}
    width = min(v[d].size for v in by.values() for d in shared)
    return {m: [v[d][:width] for d in shared] for m, v in by.items()}


def per_position_figure(protocol: dict, records: list[dict], reference: str | None = None, bucket: int | None = None):
    """The difference figure from each method's longest forward (one method: its own loss); None without data."""
    losses = _position_losses(records)
    if not losses:
        return None
    reference = reference or ("rope" if "rope" in losses else next(iter(losses)))
    width = len(next(iter(losses.values()))[0])
    return difference_figure(losses, reference, bucket=bucket or max(16, width // 64),
                             train_length=protocol.get("train_length"), zoom=difference_zoom(records, reference, losses),
                             title=f"{protocol['model']}: per-position loss difference (each method's longest forward)")


def difference_zoom(records: list[dict], reference: str, losses: dict) -> tuple[str, list[str]] | None:
    """(the best method, the methods within ZOOM_MARGIN of it) when `reference` is not among them, else None.

    The loss table's means decide, as the loss figure's zoom does (`zoom_set`); the best is
    the zoomed method with the lowest loss at the longest length."""
    means = {m: {n: (v, v, v) for n, v in row.items()} for m, row in summary.table(None, records).items() if m in losses}
    zoomed = zoom_set(means)
    if reference in zoomed or len(zoomed) < 2:
        return None
    longest = max(n for m in zoomed for n in means[m])
    best = min((m for m in zoomed if longest in means[m]), key=lambda m: means[m][longest][0])
    return best, [m for m in zoomed if m != best]


def passkey_figure(protocol: dict, records: list[dict]):
    """Passkey accuracy heatmap, one panel per row label (evals/passkey.py `accuracy`); None without data."""
    acc = accuracy(records)
    if not acc:
        return None
    return accuracy_heatmap(acc, title=f"{protocol['model']}: passkey retrieval (greedy)")


def run_figures(run_dir) -> dict:
    """{name: Figure} for every figure the run directory's result files allow."""
    figures = {}
    protocol, records = summary.load(run_dir)
    if protocol is not None and records:
        figures["loss_vs_context"] = loss_vs_context_figure(protocol, records)
        if (fig := per_position_figure(protocol, records)) is not None:
            figures["per_position"] = fig
    protocol, records = summary.load(run_dir, "passkey.jsonl")
    if protocol is not None and (fig := passkey_figure(protocol, records)) is not None:
        figures["passkey"] = fig
    protocol, records = summary.load(run_dir, "ruler.jsonl")
    if protocol is not None:
        for task, cells in depth_table(records).items():
            figures[f"ruler_{task}"] = accuracy_heatmap(cells, title=f"{protocol['model']}: {task} (RULER-style, greedy)",
                                                        what="mean score")
    return figures


def plot_run(run_dir, out=None) -> list[Path]:
    """Save every figure of `run_figures` as PNG and SVG; returns the paths written."""
    return [p for name, fig in run_figures(run_dir).items() for p in _save(fig, Path(out or run_dir), name)]
