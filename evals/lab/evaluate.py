"""`ropelab lab eval`: every trained model at k× its training length (default 1, 4, 8, 16) with
every inference method that applies (methods.py), ending in Su-style tables (rows: training
position × inference method; columns: lengths; Su, Transformer升级之路 10-13) of loss and
per-token accuracy, and one loss/accuracy-versus-length figure per training position.

Protocol (Su's): at length N each held-out window's first N tokens are read in one forward,
and the score is the mean over the predictions of tokens 1..N-1, so a column N is what a
model reading N tokens scores on average over every position. Per-token accuracy: the share
of those predictions whose argmax is the next token. Several runs of one position (seeds)
are averaged per cell, with their standard deviation; `paired` gives per-seed differences.

Each (trained model, inference method, length) is one job of the shared runner
(`ropelab.evals.runner.run_jobs`) into OUT/lab_results.jsonl of the result store (kind `lab`,
locked, append-only): a rerun skips the jobs done and retries the failed ones, and the tables
and figures are drawn from the store's records alone (`table_from_store`).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import torch

from ..losses import check_head, hidden_states
from ..results import ResultStore
from ..runner import Job, MethodEntry, run_jobs
from . import methods as lab_methods
from .corpus import heldout_documents
from .figures import length_figure
from .positions import POSITIONS

PROTOCOL = {"kind": "lab-eval", "score": "mean over the predictions of tokens 1..N-1 of each window's first N "
                                         "tokens, one forward per window and length; accuracy = argmax hits"}


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
    if not factors or any(not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in factors):
        raise ValueError(f"factors={factors!r}: give integers >= 1 (multiples of the training length)")
    plans = []
    for run_dir in runs:
        record = read_run(run_dir)["run"]
        position, length = record["position"], record["train_length"]
        lengths = sorted({f * length for f in factors})
        specs = list(methods) if methods else lab_methods.default_methods(position, length, lengths[-1])
        checked = [lab_methods.check_method(position, spec) for spec in specs]
        entries = list({m.spec(): MethodEntry(m.spec(), m) for m in checked}.values())  # canonical, deduplicated
        name = Path(run_dir).resolve().name
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]
        plans.append({"dir": Path(run_dir), "name": name, "model_key": f"{name}@{digest}", "run": record,
                      "lengths": lengths, "methods": entries})
    names = [p["name"] for p in plans]
    if len(set(names)) != len(names):
        raise ValueError(f"runs={names}: two run folders share a name; results are keyed by it")
    return plans


def evaluate(runs, out, *, factors=(1, 4, 8, 16), methods=None, documents: int = 4, chunk: int = 1024,
             device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate (or resume evaluating) trained runs; write the tables and figures; return the table."""
    from .train import check_device

    plans = plan(runs, list(factors), methods)
    if not isinstance(documents, int) or isinstance(documents, bool) or documents < 1:
        raise ValueError(f"documents={documents!r}: must be an integer >= 1")
    check_device(device)
    out = Path(out)
    with ResultStore(out, "lab") as store:
        store.begin(PROTOCOL)  # lengths and documents are in each job's key: any may be added later
        for p in plans:
            evaluate_run(p, store, documents, chunk, device, progress)
    return table_from_store(out, plans)


def evaluate_run(p: dict, store: ResultStore, documents: int, chunk: int, device: str, progress: bool) -> list[dict]:
    """One trained run's (method, length) jobs through the runner (done jobs skipped); their latest records.

    The held-out windows are tokenized only when a job is pending (the tiny model is always loaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = p["run"]
    params = {"protocol": "lab-length", "documents": documents, "data": run["data"],
              "heldout_every": run["heldout_every"]}
    base = {"type": "lab", "run": p["name"], "position": run["position"], "seed": run["seed"],
            "train_length": run["train_length"], "params": params}
    state: dict = {}

    def windows() -> list:
        if "docs" not in state:
            tokenizer = AutoTokenizer.from_pretrained(p["dir"] / "model")
            state["docs"] = heldout_documents(run["data"], tokenizer, p["lengths"][-1], documents, run["heldout_every"])
        return state["docs"]

    def make_jobs(entry: MethodEntry) -> list[Job]:
        return [Job({"length": n}) for n in p["lengths"]]

    model = AutoModelForCausalLM.from_pretrained(p["dir"] / "model", dtype=torch.float32).to(device).eval()
    check_head(model)

    def execute(method, job: Job) -> dict:  # on the model as `apply_method` patched it
        n = job.fields["length"]
        per_doc = []
        for doc in windows():
            losses, hits = losses_and_hits(model, doc.ids[:n], chunk)
            per_doc.append((float(losses.double().sum()), int(hits.sum())))
        count = (n - 1) * len(per_doc)
        return {"loss": sum(x for x, _ in per_doc) / count, "accuracy": sum(h for _, h in per_doc) / count,
                "predictions": count, "documents": [d.id for d in windows()],
                "text_starts": [d.start for d in windows()],
                "document_loss": [x / (n - 1) for x, _ in per_doc], "document_hits": [h for _, h in per_doc]}

    def apply_method(model, method):
        return lab_methods.apply_to(model, run["position"], method, run["train_length"], run["logn_length"])

    return run_jobs(model, store, p["methods"], make_jobs, execute, model_key=p["model_key"], params=params,
                    base=base, apply_method=apply_method, desc=f"lab eval {p['name']}", progress=progress)


def table_from_store(out, plans) -> dict:
    """The tables and figures of `plans`' runs, drawn from the store's records in `out` alone."""
    with ResultStore(Path(out), "lab") as store:
        records = store.merged()
    table = summarise(records, {p["name"]: p["lengths"] for p in plans})
    write_outputs(table, Path(out))
    return table


def _cells(records, lengths_of: dict) -> dict:
    """(position, method) -> run -> length -> its successful record."""
    cells: dict = {}
    for r in records:
        if r.get("type") != "lab" or r.get("status") != "ok" or r.get("length") not in lengths_of.get(r.get("run"), ()):
            continue
        cells.setdefault((r["position"], r["method"]), {}).setdefault(r["run"], {})[r["length"]] = r
    return cells


def summarise(records, lengths_of: dict) -> dict:
    """{'rows': [{position, method, seeds, train_length, cells: {N: {loss, loss_sd, accuracy, accuracy_sd,
    seeds}}}], 'lengths': [...]} from the store's records of the runs in `lengths_of` (run -> lengths)."""
    rows = []
    for (position, method), runs in _cells(records, lengths_of).items():
        lengths = sorted({n for by_length in runs.values() for n in by_length})
        cells = {}
        for n in lengths:
            losses = [c[n]["loss"] for c in runs.values() if n in c]
            accs = [c[n]["accuracy"] for c in runs.values() if n in c]
            cells[n] = {"loss": statistics.fmean(losses), "accuracy": statistics.fmean(accs), "seeds": len(losses),
                        "loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
                        "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None}
        train_length = next(iter(next(iter(runs.values())).values()))["train_length"]
        rows.append({"position": position, "method": method, "seeds": len(runs), "train_length": train_length,
                     "cells": cells})
    order = {p: i for i, p in enumerate(POSITIONS)}
    rows.sort(key=lambda r: order.get(r["position"], len(order)))  # stable: methods keep their order
    return {"rows": rows, "lengths": sorted({n for r in rows for n in r["cells"]})}


def paired(records, lengths_of: dict, a: tuple[str, str], b: tuple[str, str], key: str = "loss") -> dict:
    """Per-seed differences a - b of `key` at each length, pairing the runs of the two rows by seed.

    a, b: (position, method) rows. Returns {N: {"seeds": [...], "differences": [...], "mean", "sd"}}
    over the seeds both rows have at N (sd None for one seed).
    """
    cells = _cells(records, lengths_of)
    out = {}
    for n in sorted({n for row in (a, b) for runs in cells.get(row, {}).values() for n in runs}):
        first, second = ({c[n]["seed"]: c[n][key] for c in cells.get(row, {}).values() if n in c} for row in (a, b))
        seeds = sorted(set(first) & set(second))
        if seeds:
            diffs = [first[s] - second[s] for s in seeds]
            out[n] = {"seeds": seeds, "differences": diffs, "mean": statistics.fmean(diffs),
                      "sd": statistics.stdev(diffs) if len(diffs) > 1 else None}
    return out


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
