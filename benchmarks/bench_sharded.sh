#!/bin/bash
# Wall time of one sharded sweep: torchrun with 2 processes x 1 thread against 1 process x 2
# threads, interleaved (PAIRS pairs), each into a fresh --out under WORK. README, "Running at
# scale", has what was seen. Usage: benchmarks/bench_sharded.sh [WORK] [PAIRS]
set -u
WORK=${1:-/tmp/ropelab-bench-sharded}
PAIRS=${2:-2}
PY=${PYTHON:-python}
ARGS="eval --model default --methods rope,ntk:scale=2,yarn:scale=2,rerope:window=1024 --lengths 1k,2k --targets 512 --documents 1 --quiet"
mkdir -p "$WORK"
for i in $(seq "$PAIRS"); do
  rm -rf "$WORK/two$i" "$WORK/one$i"
  s=$(date +%s.%N)
  OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc-per-node=2 -m ropelab $ARGS --out "$WORK/two$i" > "$WORK/two$i.log" 2>&1
  rc=$?; e=$(date +%s.%N)
  echo "2x1 run $i rc=$rc wall=$(echo "$e - $s" | bc) load=$(cut -d' ' -f1 /proc/loadavg)"
  s=$(date +%s.%N)
  OMP_NUM_THREADS=2 $PY -m ropelab $ARGS --out "$WORK/one$i" > "$WORK/one$i.log" 2>&1
  rc=$?; e=$(date +%s.%N)
  echo "1x2 run $i rc=$rc wall=$(echo "$e - $s" | bc) load=$(cut -d' ' -f1 /proc/loadavg)"
done
