"""The main job's wall time, measured: `ropelab sweep-default` into a fresh run directory,
including the model load, the seven methods at 4k and 16k, the plot and the table. The
target is 15 minutes on 2 CPU cores (README, "Main job results"); the command exits 1 when
the run takes longer or fails, so CI can run it as a check.

    python benchmarks/bench_main_job.py                # about 14 minutes on 2 cores
    python benchmarks/bench_main_job.py --budget 900 --keep runs/bench-main

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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or Path(tmp) / "default")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "ropelab.evals", "sweep-default", "--out", str(out), "--quiet"])
        seconds = time.perf_counter() - start
    ok = result.returncode == 0 and seconds <= args.budget
    print(f"main job: exit {result.returncode}, {seconds / 60:.1f} min (budget {args.budget / 60:.1f} min): "
          f"{'within' if ok else 'OVER BUDGET OR FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
