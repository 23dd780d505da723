"""The numbers a report compares, with their uncertainty (evals/uncertainty.py), from a run's records.

- `scored_losses`: per row (summary.labels), length and document, the per-token losses that
  make the row's score at that length, as each record's protocol scores them
  (evals/protocols.py): fixed-target's last `targets` losses, position's first N - 1,
  sliding's every scored token;
- `loss_comparisons`: per length, a paired bootstrap (`uncertainty.compare`) over the rows
  scored on the same documents and tokens: each row's 95% interval and whether it is
  indistinguishable from the best row at that length. A row whose tokens differ from the
  others' gets its own interval and no tie mark;
- `dense_rows`: which fixed-target rows can draw a per-position line from their longest
  forward (every record prefix-consistent) and which keep their points only;
- `ruler_intervals`: the same scores' 95% intervals (a bootstrap stratified by task);
- `ruler_by_length` / `effective_lengths`: RULER-style scores per row and length, in
  percent (mean over tasks, each task weighted equally), and the effective length of each
  row under RULER's threshold (85.6, Llama-2-7B's 4k score; Hsieh et al. 2024, "RULER") and
  under the model-relative one (`ruler_run.RELATIVE_FRACTION` of the model's own best row
  score at the shortest length: one threshold for every row of the model, so rows compare).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import summary
from .ruler_run import RELATIVE_FRACTION, RULER_THRESHOLD, effective_length
from .uncertainty import Interval, compare, loss_interval, task_mean_interval


def _scored(record: dict, n: int) -> np.ndarray | None:
    """The losses `record` contributes to the score at length n (as its protocol scores them), or None."""
    params = record["params"]
    name = params.get("protocol")
    losses = np.asarray(record["losses"], dtype=np.float64)
    if name == "fixed-target":
        return losses[-params["targets"]:] if record["length"] == n else None
    if name == "position":
        if record["length"] == n or (record.get("prefix_consistent") and record["length"] >= n):
            return losses[: n - 1]
        return None
    if name == "sliding":
        return losses[np.isfinite(losses)] if record["length"] == n else None
    return None


def scored_losses(records: list[dict]) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """{row label: {length: {document: per-token losses scored at that length}}} over successful records.

    Under `position` a prefix-consistent row's longest forward serves every shorter length;
    the record of the length itself, when there is one, is preferred.
    """
    names = summary.labels(records)
    out: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    ok = sorted((r for r in records if r.get("status") == "ok" and "losses" in r), key=lambda r: -r["length"])
    for r in ok:  # longest first, so an exact-length record overwrites a longer forward's prefix
        for n in r.get("lengths", [r["length"]]):
            part = _scored(r, n)
            if part is not None and part.size:
                out.setdefault(names[summary.group_of(r)], {}).setdefault(n, {})[r["document"]] = part
    return out


def dense_rows(records: list[dict]) -> tuple[list[str], list[str]]:
    """(rows with a per-position line, rows with points only) among the fixed-target rows.

    A row gets the line when every successful record of it is prefix-consistent: position p of
    its longest forward then saw exactly the p tokens before it, as a forward of length p would.
    """
    names = summary.labels(records)
    rows: dict[str, bool] = {}
    for r in records:
        if r.get("status") == "ok" and r["params"].get("protocol") == "fixed-target":
            label = names[summary.group_of(r)]
            rows[label] = rows.get(label, True) and bool(r.get("prefix_consistent"))
    return [m for m, ok in rows.items() if ok], [m for m, ok in rows.items() if not ok]


@dataclass(frozen=True)
class Cell:
    interval: Interval | None  # None: too few tokens for an interval
    mean: float
    tied: bool | None  # indistinguishable from the best at this length (None: not compared)
    best: bool


def loss_comparisons(records: list[dict], seed: int = 0) -> dict[str, dict[int, Cell]]:
    """{row label: {length: Cell}}: intervals and the paired tie set at every length."""
    losses = scored_losses(records)
    lengths = sorted({n for row in losses.values() for n in row})
    out: dict[str, dict[int, Cell]] = {m: {} for m in losses}
    for n in lengths:
        rows = {m: row[n] for m, row in losses.items() if n in row}
        shape = lambda docs: tuple((d, docs[d].size) for d in sorted(docs))  # noqa: E731
        groups: dict[tuple, list[str]] = {}
        for m, docs in rows.items():
            groups.setdefault(shape(docs), []).append(m)
        biggest = max(groups.values(), key=len)
        paired = {m: [rows[m][d] for d in sorted(rows[m])] for m in biggest}
        try:
            comparison = compare(paired, seed=seed) if len(biggest) > 1 else None
        except ValueError:  # too few blocks for an interval
            comparison = None
        for m, docs in rows.items():
            arrays = [docs[d] for d in sorted(docs)]
            mean = float(sum(a.sum() for a in arrays) / sum(a.size for a in arrays))
            if comparison is not None and m in comparison.intervals:
                out[m][n] = Cell(comparison.intervals[m], mean, m in comparison.indistinguishable,
                                 m == comparison.best)
                continue
            try:
                interval = loss_interval(arrays, seed=seed)
            except ValueError:
                interval = None
            out[m][n] = Cell(interval, mean, None, False)
    return out


def ruler_scores(records: list[dict]) -> dict[str, dict[int, dict[str, list[float]]]]:
    """{row label: {length: {task: the 0/1 (or fractional) scores of its samples}}}, ok records only."""
    names = summary.labels(records)
    cells: dict[str, dict[int, dict[str, list[float]]]] = {}
    for r in records:
        if r.get("status") == "ok":
            row = cells.setdefault(names[summary.group_of(r)], {}).setdefault(r["length"], {})
            row.setdefault(r["task"], []).append(r["score"])
    return cells


def ruler_intervals(records: list[dict]) -> dict[str, dict[int, Interval | None]]:
    """{row label: {length: the score's 95% interval in [0, 1] (uncertainty.task_mean_interval), or None}}."""
    out: dict[str, dict[int, Interval | None]] = {}
    for m, row in ruler_scores(records).items():
        for n, tasks in sorted(row.items()):
            try:
                out.setdefault(m, {})[n] = task_mean_interval(tasks)
            except ValueError:  # too few samples for the stratified bootstrap
                out.setdefault(m, {})[n] = None
    return out


def ruler_by_length(records: list[dict]) -> dict[str, dict[int, float]]:
    """{row label: {length: score in percent}}: each task's mean over its samples, then the mean over tasks."""
    return {m: {n: 100 * float(np.mean([np.mean(v) for v in tasks.values()])) for n, tasks in sorted(row.items())}
            for m, row in ruler_scores(records).items()}


def effective_lengths(scores: dict[str, dict[int, float]]) -> tuple[float | None, dict[str, tuple[int | None, int | None]]]:
    """(the model-relative threshold, {row: (effective length at 85.6, at the relative threshold)}).

    The relative threshold is `RELATIVE_FRACTION` of the best row's score at the shortest
    length any row was tested at (None without scores).
    """
    shortest = min((n for row in scores.values() for n in row), default=None)
    if shortest is None:
        return None, {}
    top = max(row[shortest] for row in scores.values() if shortest in row)
    if top <= 0:  # no row scores anything at the shortest length: no model-relative threshold
        return None, {m: (effective_length(row, RULER_THRESHOLD), None) for m, row in scores.items()}
    relative = RELATIVE_FRACTION * top
    return relative, {m: (effective_length(row, RULER_THRESHOLD), effective_length(row, relative))
                      for m, row in scores.items()}
