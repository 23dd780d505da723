"""The runner's own cost per job: everything `runner.run_jobs` and the result store do
outside the model's forward (planning, keys, the `with` block, building the record, JSON
encoding with the per-position losses, write, flush and fsync), against the forward of the
smallest real job of the main job.

    python benchmarks/bench_runner.py                 # 40 jobs per length, lengths 4096 and 16384
    python benchmarks/bench_runner.py --jobs 100 --lengths 2048

How: `run_jobs` runs with an `execute` that returns at once a result shaped like a real
perplexity record (a loss and `length - 1` per-position losses), into a result store on
disk, and `apply_method` is a no-op context manager; the wall time divided by the number
of jobs is the runner's overhead per job. The reference forward is SmolLM2-135M at 4k
tokens (13-21 s on 2 CPU cores, sweep.py's docstring), unless `--forward-seconds` says
otherwise. Timings on a shared machine vary; the ratio is what matters.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time

from ropelab.evals.results import ResultStore
from ropelab.evals.runner import Job, canonical_methods, run_jobs


def overhead(length: int, jobs: int, out: str) -> float:
    rng = random.Random(0)
    losses = [float(f"{rng.uniform(0, 8):.6g}") for _ in range(length - 1)]

    def execute(method, job):
        return {"loss": 1.0, "scored_tokens": length - 1, "forwards": 1, "seconds": 0.0, "losses": losses}

    entries = canonical_methods(["rope", "ntk:scale=2"])
    per_method = jobs // len(entries)
    start = time.perf_counter()
    with ResultStore(out, "perplexity") as store:
        store.begin({"kind": "perplexity", "model": "bench"})
        run_jobs(None, store, entries, lambda e: [Job({"document": f"d{i}", "length": length}) for i in range(per_method)],
                 execute, model_key="bench", params={"protocol": "fixed-target"}, base={"type": "perplexity"},
                 apply_method=lambda model, method: contextlib.nullcontext(), desc="bench", progress=False)
    return (time.perf_counter() - start) / (per_method * len(entries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--forward-seconds", type=float, default=13.0,
                        help="the reference forward: SmolLM2-135M at 4k on 2 CPU cores, the fastest measured")
    args = parser.parse_args()
    for length in (int(n) for n in args.lengths.split(",")):
        with tempfile.TemporaryDirectory() as out:
            seconds = overhead(length, args.jobs, out)
        print(f"length {length}: runner overhead {seconds * 1e3:.2f} ms per job "
              f"({seconds / args.forward_seconds:.1e} of a {args.forward_seconds:g} s forward)")


if __name__ == "__main__":
    main()
