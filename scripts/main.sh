#!/usr/bin/env bash
# Set up (if needed) and run the main job: the extrapolation sweep on the embedded default
# model (SmolLM2-135M, Python standard-library source, seven methods, up to 16k tokens),
# ending in runs/default/loss_vs_context.png and the table (also runs/default/report.md).
# Resumable: run it again after an interruption and it picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ropelab sweep-default --out "${1:-runs/default}"
