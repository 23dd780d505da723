"""`ropelab lab eval`: every trained model at k× its training length (default 1, 4, 8, 16) with
every inference method that applies (methods.py), ending in Su-style tables (rows: training
position × inference method; columns: lengths; Su, Transformer升级之路 10-13) of loss and
per-token accuracy, and one loss/accuracy-versus-length figure per training position.

Protocol (Su's): each held-out window of W = the longest length is read in one forward per
method (every default method is prefix-consistent); the score at length N is the mean over
the predictions of tokens 1..N-1 of the window's first N tokens, so a column N is what a
model reading N tokens scores on average. Per-token accuracy: the share of those
predictions whose argmax is the next token. Several runs of one position (seeds) are
averaged per cell, with their standard deviation.

Records go to OUT/lab_results.jsonl through `ropelab.evals.ResultStore` (append-only,
resumable, keyed like the harness's jobs), so a rerun skips what is done; the per-position
losses and hits are kept, so any table can be redrawn from the file.
"""

from __future__ import annotations

import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from ..losses import check_head, hidden_states
from ..results import ResultStore, job_key
from . import methods as lab_methods
from .corpus import heldout_documents
from .figures import length_figure
from .positions import POSITIONS



@torch.inference_mode()
def losses_and_hits(model, ids, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, hit) of every next-token prediction of a 1-D token list: entry i scores token i+1."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    hidden = hidden_states(model, ids)[:-1]
    targets = ids[1:].to(hidden.device)
    head = model.get_output_embeddings()
    losses, hits = torch.empty(len(targets)), torch.empty(len(targets), dtype=torch.bool)
    for start in range(0, len(targets), chunk):
        logits = head(hidden[start : start + chunk]).float()
        t = targets[start : start + chunk]
        losses[start : start + chunk] = torch.nn.functional.cross_entropy(logits, t, reduction="none").cpu()
        hits[start : start + chunk] = (logits.argmax(-1) == t).cpu()
    return losses, hits


def read_run(run_dir) -> dict:
    """A finished training run's lab.json (ValueError when the folder holds none or is unfinished)."""
    path = Path(run_dir) / "lab.json"
    if not path.exists():
        raise ValueError(f"run={str(run_dir)!r}: no lab.json; not a `lab train` folder")
    record = json.loads(path.read_text())
    if "summary" not in record or not (Path(run_dir) / "model").is_dir():
        raise ValueError(f"run={str(run_dir)!r}: training has not finished; rerun `lab train` there to resume it")
    return record


def plan(runs, factors, methods) -> list[dict]:
    """Per run: its record, lengths and validated methods. Raises before any work starts."""
    if not runs:
        raise ValueError("runs=[]: give at least one trained run folder")
    if not factors or any(not isinstance(f, int) or f < 1 for f in factors):
        raise ValueError(f"factors={factors!r}: give integers >= 1 (multiples of the training length)")
    plans = []
    for run_dir in runs:
        record = read_run(run_dir)["run"]
        position, length = record["position"], record["train_length"]
        lengths = sorted({f * length for f in factors})
        specs = list(methods) if methods else lab_methods.default_methods(position, length, lengths[-1])
        checked = [lab_methods.check_method(position, spec) for spec in specs]
        plans.append({"dir": Path(run_dir), "name": Path(run_dir).resolve().name, "run": record,
                      "lengths": lengths, "methods": checked})
    names = [p["name"] for p in plans]
    if len(set(names)) != len(names):
        raise ValueError(f"runs={names}: two run folders share a name; results are keyed by it")
    return plans


def evaluate(runs, out, *, factors=(1, 4, 8, 16), methods=None, documents: int = 4, chunk: int = 1024,
             progress: bool = True) -> dict:
    """Evaluate (or resume evaluating) trained runs; write the tables and figures; return the table."""
    plans = plan(runs, list(factors), methods)
    if not isinstance(documents, int) or documents < 1:
        raise ValueError(f"documents={documents!r}: must be an integer >= 1")
    out = Path(out)
    with ResultStore(out, "lab") as store:
        store.begin({"kind": "lab-eval", "factors": sorted(set(factors)), "documents": documents,
                     "score": "mean over predictions of tokens 1..N-1 of each window's first N tokens; "
                              "accuracy = argmax hits; one forward per window of the longest length"})
        done = store.done()
        for p in plans:
            _evaluate_run(p, store, done, documents, chunk, progress)
        records = store.latest()
    table = summarise(records, {p["name"]: p["lengths"] for p in plans})
    write_outputs(table, out)
    return table


def _evaluate_run(p: dict, store: ResultStore, done: set, documents: int, chunk: int, progress: bool) -> None:
    """Every (method, held-out window) job of one trained run that is not done yet, into `store`."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = p["run"]
    window = p["lengths"][-1]
    model = AutoModelForCausalLM.from_pretrained(p["dir"] / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(p["dir"] / "model")
    check_head(model)
    docs = heldout_documents(run["data"], tokenizer, window, documents, run["heldout_every"])
    params = {"protocol": "lab-position", "window": window}
    jobs = [(m, d, job_key(p["name"], m.spec(), params, {"document": d.id, "length": window})) for m in p["methods"] for d in docs]
    jobs = [j for j in jobs if j[2] not in done]
    bar = tqdm(jobs, desc=f"lab eval {p['name']}", unit="job", disable=not progress)
    for method, doc, key in bar:
        record = {"type": "lab", "key": key, "run": p["name"], "position": run["position"], "seed": run["seed"],
                  "train_length": run["train_length"], "method": method.spec(), "document": doc.id,
                  "window": window}
        try:
            start = time.perf_counter()
            with lab_methods.apply_to(model, run["position"], method, run["train_length"], run["logn_length"]):
                losses, hits = losses_and_hits(model, doc.ids, chunk)
            record.update(status="ok", seconds=time.perf_counter() - start,
                          losses=[float(f"{x:.5g}") for x in losses.tolist()],
                          hits="".join("1" if h else "0" for h in hits.tolist()))
        except Exception as exc:  # recorded; the sweep goes on and retries it next time
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=4))
        store.append(record)
    bar.close()
    del model


def summarise(records, lengths_of: dict) -> dict:
    """{'rows': [{position, method, seeds, cells: {N: {loss, loss_sd, accuracy, accuracy_sd}}}], 'lengths': [...]}."""
    per_run: dict = {}  # (position, method) -> run -> N -> [loss sum, hit sum, count]
    train_lengths: dict = {}
    for r in records:
        if r.get("status") != "ok" or r.get("run") not in lengths_of:
            continue
        cells = per_run.setdefault((r["position"], r["method"]), {}).setdefault(r["run"], {})
        train_lengths[r["position"]] = r["train_length"]
        losses = r["losses"]
        for n in lengths_of[r["run"]]:
            acc = cells.setdefault(n, [0.0, 0, 0])
            acc[0] += sum(losses[: n - 1])
            acc[1] += r["hits"][: n - 1].count("1")
            acc[2] += n - 1
    rows = []
    for (position, method), runs in per_run.items():
        lengths = sorted({n for cells in runs.values() for n in cells})
        cells = {}
        for n in lengths:
            losses = [c[n][0] / c[n][2] for c in runs.values() if n in c]
            accs = [c[n][1] / c[n][2] for c in runs.values() if n in c]
            cells[n] = {"loss": statistics.fmean(losses), "accuracy": statistics.fmean(accs), "seeds": len(losses),
                        "loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
                        "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None}
        rows.append({"position": position, "method": method, "seeds": len(runs),
                     "train_length": train_lengths[position], "cells": cells})
    order = {p: i for i, p in enumerate(POSITIONS)}
    rows.sort(key=lambda r: order.get(r["position"], len(order)))  # stable: methods keep their order
    return {"rows": rows, "lengths": sorted({n for r in rows for n in r["cells"]})}


def _label(row: dict) -> str:
    method = row["method"]
    if row["position"] in ("learned", "alibi", "nope"):
        method = "as trained" + (" (clamped past L)" if row["position"] == "learned" else "")
    elif row["position"] == "rope-logn":
        method += " + training log-n"
    return f"{row['position']} · {method}"


def _cell(c: dict | None, key: str, scale: float, digits: int) -> str:
    if c is None:
        return "–"
    sd = c[f"{key}_sd"]
    text = f"{c[key] * scale:.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if sd is not None else "")


def markdown(table: dict) -> str:
    lengths = table["lengths"]
    lines = []
    for title, key, scale, digits in (("loss (nats)", "loss", 1, 3), ("per-token accuracy (%)", "accuracy", 100, 2)):
        lines += [f"### {title}", "", "| training position · inference method | seeds | "
                  + " | ".join(str(n) for n in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
        for row in table["rows"]:
            cells = " | ".join(_cell(row["cells"].get(n), key, scale, digits) for n in lengths)
            lines.append(f"| {_label(row)} | {row['seeds']} | {cells} |")
        lines.append("")
    note = ("Mean over the predictions of every position of an N-token held-out window (Su's protocol); "
            "± is the standard deviation over seeds (training runs).")
    return "\n".join(lines + [note, ""])


def write_outputs(table: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab_table.json").write_text(json.dumps(table, indent=2))
    (out / "lab_table.md").write_text(markdown(table))
    paths = [out / "lab_table.md"]
    for position in dict.fromkeys(r["position"] for r in table["rows"]):
        rows = [r for r in table["rows"] if r["position"] == position]
        by_method = {_label(r).split(" · ", 1)[1]: r["cells"] for r in rows}
        paths.append(length_figure(by_method, position, rows[0]["train_length"], out / f"loss_vs_length_{position}.png"))
    return paths
