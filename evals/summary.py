"""Numbers drawn from a run directory's result files alone (for plots and reports).

Records are grouped by what made them: the model identity, the canonical method and the
parameters each record carries (`params`: protocol, window, targets or stride, seed, ...), so
records made under different settings never share a cell; when a run holds more than one
setting of a method, its rows are labelled with the parameters that differ. All means are
token-weighted: a mean over documents adds up every scored token's loss and divides by the
number of tokens (not a mean of per-document means). How a protocol's record contributes to
the score at a length is the protocol's own (`protocols.py`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import protocols
from .results import read_run

_FILES = {"results.jsonl": "perplexity", "passkey.jsonl": "passkey", "lm_eval.jsonl": "lm-eval", "ruler.jsonl": "ruler",
          "tune.jsonl": "tune"}


def load(run_dir, name: str = "results.jsonl") -> tuple[dict | None, list[dict]]:
    """(header, latest record per key) of one eval kind (a file name or a kind); (None, []) when absent."""
    contents = read_run(Path(run_dir), _FILES.get(name, name))
    return contents.header, contents.records


def skipped_lines(run_dir) -> list[str]:
    """'FILE line N: why' for every complete line of the run's result files that is not a record."""
    out = []
    for kind in ("perplexity", "passkey", "lm-eval", "ruler", "tune"):
        out += [f"{name} line {n}: {why}" for name, n, why in read_run(Path(run_dir), kind).skipped]
    return out


def group_of(record: dict) -> tuple[str, str, str]:
    return record.get("model_key", record.get("model", "")), record["method"], json.dumps(
        record.get("params", {}), sort_keys=True)


def labels(records: list[dict]) -> dict[tuple, str]:
    """{group: row label}: the method, plus the parameters (and model) that differ between its groups."""
    groups = list(dict.fromkeys(group_of(r) for r in records))
    by_method = defaultdict(list)
    for g in groups:
        by_method[g[1]].append(g)
    out = {}
    for method, gs in by_method.items():
        if len(gs) == 1:
            out[gs[0]] = method
            continue
        params = [json.loads(g[2]) for g in gs]
        differ = sorted({k for p in params for k in p if len({json.dumps(q.get(k)) for q in params}) > 1})
        models = len({g[0] for g in gs}) > 1
        for g, p in zip(gs, params):
            extra = [f"{k}={p.get(k)}" for k in differ]
            if models:
                model = next(r.get("model", "") for r in records if group_of(r) == g)
                extra.insert(0, f"model={model}")
            out[g] = f"{method} [{', '.join(extra) or g[0][:40]}]"
    return out


def methods_in(records: list[dict]) -> list[str]:
    return list(labels(records).values())


def _score(record: dict, n: int) -> tuple[float, int] | None:
    """(sum of losses, tokens) that record contributes to the score at length n, or None."""
    if record.get("status") != "ok":
        return None
    return protocols.get(record["params"]["protocol"]).contribution(record, n)


def lengths_in(records: list[dict]) -> list[int]:
    return sorted({n for r in records for n in r.get("lengths", [r["length"]])})


def table(protocol: dict | None, records: list[dict]) -> dict[str, dict[int, float]]:
    """{row label: {length: token-weighted mean loss}}; a length with no successful record is absent.

    `protocol` (the header) is not used for the numbers: each record's own parameters are.
    """
    names = labels(records)
    out: dict[str, dict[int, float]] = {}
    for group, label in names.items():
        mine = [r for r in records if group_of(r) == group]
        row = {}
        for n in lengths_in(records):
            parts = [s for r in mine if (s := _score(r, n)) is not None]
            if parts:
                row[n] = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        out[label] = row
    return out


def position_curves(records: list[dict]) -> dict[str, np.ndarray]:
    """{row label: mean loss per position} from each group's longest successful forward, averaged over documents.

    Entry i is the loss of predicting token i+1 (context length i+1). Sliding-window records
    are left out: their positions do not share one context origin.
    """
    names = labels(records)
    usable = [r for r in records if r.get("status") == "ok" and r["params"].get("protocol") != "sliding"]
    longest: dict[tuple, int] = {}
    for r in usable:
        longest[group_of(r)] = max(longest.get(group_of(r), 0), r["length"])
    sums: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in usable:
        if longest[group_of(r)] == r["length"]:
            sums[names[group_of(r)]].append(np.asarray(r["losses"], dtype=np.float64))
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
