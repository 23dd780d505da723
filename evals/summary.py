"""Numbers drawn from a run directory's result files alone (for plots and reports).

All means are token-weighted: a mean over documents adds up every scored token's loss and
divides by the number of tokens (not a mean of per-document means).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .results import ResultStore


def load(run_dir, name: str = "results.jsonl") -> tuple[dict | None, list[dict]]:
    """(protocol, latest record per key) of one result file; (None, []) when it does not exist."""
    path = Path(run_dir) / name
    if not path.exists():
        return None, []
    store = ResultStore(path)
    return store.protocol, store.latest()


def methods_in(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in records))


def _score(record: dict, n: int, protocol: dict) -> tuple[float, int] | None:
    """(sum of losses, tokens) that record contributes to the score at length n, or None."""
    if record.get("status") != "ok":
        return None
    if protocol["name"] == "position":
        if record["length"] == n or (record.get("prefix_consistent") and record["length"] >= n):
            losses = record["losses"][: n - 1]
            return float(np.sum(losses)), len(losses)
        return None
    if record["length"] != n:
        return None
    return record["loss"] * record["scored_tokens"], record["scored_tokens"]


def lengths_in(records: list[dict]) -> list[int]:
    return sorted({n for r in records for n in r.get("lengths", [r["length"]])})


def table(protocol: dict, records: list[dict]) -> dict[str, dict[int, float]]:
    """{method: {length: token-weighted mean loss}}; a length with no successful record is absent."""
    out: dict[str, dict[int, float]] = {}
    for method in methods_in(records):
        mine = [r for r in records if r["method"] == method]
        row = {}
        for n in lengths_in(records):
            parts = [s for r in mine if (s := _score(r, n, protocol)) is not None]
            if parts:
                row[n] = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        out[method] = row
    return out


def position_curves(records: list[dict]) -> dict[str, np.ndarray]:
    """{method: mean loss per position} from each method's longest successful forward, averaged over documents.

    Entry i is the loss of predicting token i+1 (context length i+1). Sliding-window records
    are left out: their positions do not share one context origin.
    """
    longest: dict[str, int] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("protocol") != "sliding":
            longest[r["method"]] = max(longest.get(r["method"], 0), r["length"])
    sums: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in records:
        if r.get("status") == "ok" and longest.get(r["method"]) == r["length"] and r.get("protocol") != "sliding":
            sums[r["method"]].append(np.asarray(r["losses"], dtype=np.float64))
    return {m: np.mean(np.stack(v), axis=0) for m, v in sums.items()}


def bucket_means(curve: np.ndarray, size: int) -> list[tuple[int, int, float]]:
    """[(first context length, last, mean loss)] over buckets of `size` positions."""
    out = []
    for start in range(0, len(curve), size):
        part = curve[start : start + size]
        out.append((start + 1, start + len(part), float(part.mean())))
    return out


def failures(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "error"]
