#!/usr/bin/env bash
# The documented long runs of issue 12 (not CI): losses and accuracies only, so machine load does
# not change their numbers. Every step writes into a resumable result store: run this script
# again after an interruption and finished evaluations are read back, not repeated.
# Order (since session 5): the headline first, then tuning, then the small cells.
#   c   the main job's seven methods over 4 documents at 4k and 16k (multidoc/: the headline intervals)
#   b   chat template on|off for passkey and niah-single (RULER-style, templates/ruler.jsonl):
#       per length, depth 0.5 first (3 samples per template), then depths 0.1 and 0.9
#       (9 samples per task x length x template cell); 1k to 8k after the tuning
#   a   tuned versus default at 16k for ntk, beta-base, yarn, rerope, leaky-rerope (tune/METHOD/tune.jsonl),
#       tuned on stdlib document 5 (--skip-documents 4), reported on document 1 (heldout/)
#   screen  every RULER-style task at 1k (10 samples): which ones the default model scores above chance on
# Usage: [SEED=main-job-dir] nice -n 19 bash scripts/evidence_runs.sh [OUT]   (default /work/runs/evidence2)
# SEED: a finished main-job store (results.jsonl of `ropelab sweep-default`, bf16) copied in as
# document 1 of c and the defaults of the held-out comparison, so they are not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/work/runs/evidence2}"
R=.venv/bin/ropelab
mkdir -p "$OUT"
DT="--dtype bfloat16"   # the main job's dtype (its README: within 0.004 nats of float32)

ruler_cells() {  # $1: one length; the middle depth for both templates first, then the other depths
  for depths in 0.5 0.1,0.5,0.9; do
    for tpl in off on; do
      $R ruler --quiet $DT --tasks passkey,niah-single --lengths "$1" --depths "$depths" --samples 3 \
        --chat-template "$tpl" --out "$OUT/templates" || true
    done
  done
}

for d in multidoc heldout; do
  if [ -n "${SEED:-}" ] && [ ! -e "$OUT/$d/results.jsonl" ]; then mkdir -p "$OUT/$d"; cp "$SEED/results.jsonl" "$OUT/$d/"; fi
done

# c: document 1 first (the main job itself), then documents 1-4 in the same store
$R sweep-default --quiet --out "$OUT/multidoc" || true
$R eval --quiet $DT --methods rope,linear:scale=2,ntk:scale=2,beta-base:scale=2,yarn:scale=2,rerope:window=4096 \
  --methods leaky-rerope:window=2048,scale=16 --lengths 4k,16k --targets 2048 --documents 4 --out "$OUT/multidoc" || true

tune() {  # $1 method, then --param/--fixed arguments
  local m="$1"; shift
  $R tune $DT --method "$m" --target-length 16k --targets 2048 --documents 1 --skip-documents 4 "$@" \
    --out "$OUT/tune/$m" | tail -1 > "$OUT/tune/$m.best.json" || true
}
mkdir -p "$OUT/tune"
tune ntk --param 'scale=2|3|4'
tune beta-base --param 'scale=2|3|4'
tune yarn --param 'scale=2|3|4'
tune rerope --param 'window=2048|4096|6144'
tune leaky-rerope --param 'scale=8|16|32' --fixed window=2048
# held out: the defaults (sweep.default_methods for L=8k, N=16k) and each tuned best, on document 1
BEST=$(.venv/bin/python -c "
import json, pathlib
out = []
for m in ('ntk', 'beta-base', 'yarn', 'rerope', 'leaky-rerope'):
    p = pathlib.Path('$OUT/tune') / f'{m}.best.json'
    try:
        out.append(json.loads(p.read_text())['best'])
    except (OSError, ValueError, KeyError):
        pass
print(','.join(out))")
$R eval $DT --methods ntk:scale=2,beta-base:scale=2,yarn:scale=2,rerope:window=4096,leaky-rerope:window=2048,scale=16 \
  ${BEST:+--methods "$BEST"} --lengths 16k --targets 2048 --documents 1 --out "$OUT/heldout" || true

ruler_cells 1k
ruler_cells 2k
ruler_cells 4k
ruler_cells 8k
$R plot "$OUT/templates" || true

# which RULER-style tasks the default model scores above chance on (the CPU default set): 1k, 10 samples
TASKS=niah-single,niah-multikey,niah-multivalue,niah-multiquery,variable-tracking,common-words,frequent-words,passkey
$R ruler --quiet $DT --tasks "$TASKS" --lengths 1k --depths 0.5 --samples 10 --chat-template off --out "$OUT/screen-off" || true

