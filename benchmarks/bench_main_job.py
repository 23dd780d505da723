"""The main job's wall time, measured: `ropelab sweep-default` into a fresh run directory,
including the model load, the seven methods at 4k and 16k, the plot and the table. The
target is 15 minutes on 2 CPU cores (README, "Main job results"); the command exits 1 when
the run takes longer or fails, so CI can run it as a check.

    python benchmarks/bench_main_job.py                # about 14 minutes on 2 cores
    python benchmarks/bench_main_job.py --budget 900 --keep runs/bench-main
    python benchmarks/bench_main_job.py --finish-only runs/default   # figures + report of a finished run

`--finish-only` times the last step alone (the figures, with the per-position lines drawn from
the stored losses, and report.md) on a copy of a finished run's results.jsonl, three times.

This replaces the unit test that compared `sweep.budget_seconds` (the code's own a·N + b·N²
estimate) with the budget: an estimate checked against itself can not fail.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=15 * 60, help="seconds the main job may take")
    parser.add_argument("--keep", default=None, help="run directory to keep (default: a temporary one)")
    parser.add_argument("--finish-only", default=None, help="a finished run directory: time its figures and report")
    args = parser.parse_args()
    if args.finish_only:
        return finish_only(Path(args.finish_only))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or Path(tmp) / "default")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "ropelab.evals", "sweep-default", "--out", str(out), "--quiet"])
        seconds = time.perf_counter() - start
    ok = result.returncode == 0 and seconds <= args.budget
    print(f"main job: exit {result.returncode}, {seconds / 60:.1f} min (budget {args.budget / 60:.1f} min): "
          f"{'within' if ok else 'OVER BUDGET OR FAILED'}")
    return 0 if ok else 1


def finish_only(run: Path) -> int:
    """Seconds of `plot_run` + `write_report` on a copy of `run`'s results.jsonl (3 rounds)."""
    import shutil

    from ropelab.evals import plot_run, write_report

    if not (run / "results.jsonl").is_file():
        print(f"--finish-only {run}: no results.jsonl in it", file=sys.stderr)
        return 2
    times = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(run / "results.jsonl", tmp)
            start = time.perf_counter()
            plot_run(tmp)
            write_report(tmp)
            times.append(time.perf_counter() - start)
    print("figures and report: " + ", ".join(f"{t:.1f} s" for t in times) + f" (median {sorted(times)[1]:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
