"""The one job runner for every eval kind (perplexity, passkey, the lm-eval bridge).

A job is (model identity, canonical method spec, the run's parameters, the job's own fields
such as document and length). The runner skips jobs whose last record succeeded, applies each
method once, in a `with` block, through `apply_method` (default `ropelab.patches.patched`),
runs that method's pending jobs, and appends one record per job: `status: ok` with the job's
result, or `status: error` with the message. A method that does not parse or that the patch
refuses fails all its jobs and the run goes on; a failed job is retried on the next run.
Methods reach a model only through `ropelab.patches` (docs/design.md, "Layers").

A store opened as a shard (`ResultStore(out, kind, shard="rank3")`; the CLI passes
`distributed.default_shard()`) in an initialised torch.distributed process group (`torchrun`;
`distributed.py`) makes a sharded run: every rank lists the same jobs, skips those done in
any shard of the run, takes its cost-balanced share of the rest, runs it into its own shard
file, and waits at a barrier for the others; each then returns the merged records of the
whole run. Without a shard name a process group changes nothing (tensor-parallel ranks, for
one, must all run every job together).
"""

from __future__ import annotations

import contextlib
import resource
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

import ropelab

from .checks import as_list
from .distributed import Rank, barrier, current_rank, share
from .results import ResultStore, job_key


@dataclass(frozen=True)
class MethodEntry:
    """One method of a run: its canonical spec and the parsed method, or the error that refused it."""

    spec: str
    method: Any = None
    error: Exception | None = None


@dataclass
class Job:
    fields: dict  # recorded and part of the key (document, length, depth, trial, task, ...)
    payload: Any = None  # what the job needs but the key does not (token ids, a prompt)
    extra: dict = field(default_factory=dict)  # recorded, not part of the key


def canonical_methods(methods) -> list[MethodEntry]:
    """Parse and deduplicate methods by their canonical spec; a spec that fails to parse is kept with its error.

    A single spec text or Method counts as one method (never iterated character by character).
    """
    entries: dict[str, MethodEntry] = {}
    for entry in as_list(methods, "methods", (str, ropelab.Method)):
        try:
            method = ropelab.parse_method(entry)
            spec = method.spec()
            entries.setdefault(spec, MethodEntry(spec, method))
        except (ValueError, TypeError) as exc:
            text = str(entry)
            entries.setdefault(text, MethodEntry(text, None, exc))
    if not entries:
        raise ValueError("methods=[]: give at least one method (see `ropelab methods`)")
    return list(entries.values())


def peak_memory_mb() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # process high-water mark
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _error(exc: BaseException) -> dict:
    return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


def run_jobs(model, store: ResultStore, methods: list[MethodEntry], make_jobs: Callable[[MethodEntry], list[Job]],
             execute: Callable[[Any, Job], dict], *, model_key: str, params: dict, base: dict,
             apply_method: Callable, desc: str, progress: bool = True) -> list[dict]:
    """Run (or resume) every method's jobs into `store`; return the latest record of each of them.

    `make_jobs(entry)` lists a method's jobs; `execute(method, job)` returns the result fields
    of one job on the patched model (or raises: recorded as an error). `base` is copied into
    every record (type, model, params). In a sharded run (module docstring) this rank runs
    only its share, and the records returned are the whole run's.
    """
    done = store.done()
    plan = []
    for entry in methods:
        jobs = [(job, job_key(model_key, entry.spec, params, job.fields)) for job in make_jobs(entry)]
        plan.append((entry, jobs))
    wanted = {key for _, jobs in plan for _, key in jobs}
    pending = [(key, job.fields.get("length") or 1) for _, jobs in plan for job, key in jobs if key not in done]
    rank = current_rank() if store.shard is not None else Rank()
    mine = set(share([k for k, _ in pending], [n for _, n in pending], rank,
                     {"model_key": model_key, "params": params, "methods": [e.spec for e in methods]}))
    bar = tqdm(total=len(mine), desc=desc if not rank.launched else f"{desc} rank {rank.rank}", unit="job",
               disable=not progress)

    def record(entry, job, key, result: dict) -> None:
        store.append({**base, "key": key, "model_key": model_key, "method": entry.spec, **job.fields, **job.extra,
                      **result})
        bar.update()

    for entry, jobs in plan:
        pending = [(job, key) for job, key in jobs if key in mine]
        if not pending:
            continue
        with contextlib.ExitStack() as stack:
            failure = entry.error
            if failure is None:
                try:
                    stack.enter_context(apply_method(model, entry.method))
                except Exception as exc:  # the patch refused this model or method: record, go on
                    failure = exc
            for job, key in pending:
                if failure is not None:
                    record(entry, job, key, _error(failure))
                    continue
                bar.set_postfix_str(f"{entry.spec} {job.fields}")
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                try:
                    result = {"status": "ok", **execute(entry.method, job), **peak_memory_mb()}
                except Exception as exc:  # OOM, kernel limits, a zero-token score: recorded, the run goes on
                    result = {**_error(exc), "traceback": traceback.format_exc(limit=4)}
                record(entry, job, key, result)
    bar.close()
    if rank.launched:
        barrier()  # every rank's share is on disk before anyone reads the run
    return [r for r in store.merged() if r["key"] in wanted]  # with what earlier runs left in other shards
