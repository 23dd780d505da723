"""One attention layer's prefill, per method, against the unpatched model's attention: the
op-level check of the CPU kernel (rope/kernels/cpu.py) without a 30-layer forward.

    python benchmarks/bench_attention_op.py --lengths 8192 --rounds 5
    python benchmarks/bench_attention_op.py --lengths 16384 --methods "rerope:window=4096;string"
    python benchmarks/bench_attention_op.py --batch-rows 0,256   # per-chunk band loop vs batched

What is timed, per call, with SmolLM2-135M's attention shapes (batch 1, 9 query heads,
3 key/value heads, head dim 64, rope base 100000, training length 8192), float32, random inputs, inference mode:

* "sdpa": what the unpatched model's attention costs on top of the rotation both models
  run (the patched model runs `apply_rotary_pos_emb` too, with cos = 1, sin = 0):
  `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` on rotated q and k;
* each method: `ropelab.attention.rotary_attention` on the unrotated q and k (rotations,
  parts and merge included).

`--batch-rows` runs each method once per value of the CPU kernel's `BAND.batch_rows` (0: a
band's chunks one at a time, the kernel before the batched band; kernels/band.py), so the
two strategies are compared in one run. Rounds interleave the cases (sdpa, method 1,
method 2, ..., again), so load drift on a shared machine hits all alike; each case's ratio
to sdpa is per round, and the median, min and max of those ratios are printed. The attention is most, not all, of a forward at
these lengths: `benchmarks/bench_patch.py` measures the model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ropelab.attention import rotary_attention
from ropelab.kernels import cpu
from ropelab.rotary import apply_rotary, cos_sin
from ropelab.spec import parse_method

METHODS = ["rerope:window=4096", "leaky-rerope:window=2048,scale=16", "self-extend:window=1024,group=8", "string",
           "dca", "lm-infinite", "sinks"]
HEADS, KV_HEADS, HEAD_DIM, BASE, TRAIN_LENGTH = 9, 3, 64, 100000.0, 8192


def _inputs(length: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, length, HEAD_DIM, generator=g)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=g)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=g)
    inv_freq = 1.0 / BASE ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    return q, k, v, inv_freq


def _cases(length: int, methods: list[str], batch_rows: list[int]):
    q, k, v, inv_freq = _inputs(length)
    cos, sin = cos_sin(torch.arange(length), inv_freq)
    qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    cases = {"sdpa": lambda: F.scaled_dot_product_attention(qr, kr, v, is_causal=True, enable_gqa=True)}
    for spec in methods:
        method = parse_method(spec).with_train_length(TRAIN_LENGTH)
        for rows in batch_rows:
            name = spec if len(batch_rows) == 1 else f"{spec} [batch_rows={rows}]"
            cases[name] = lambda m=method, r=rows: _with_rows(r, lambda: rotary_attention(q, k, v, m, inv_freq))
    return cases


def _with_rows(rows: int, run):
    saved = cpu.BAND.batch_rows
    cpu.BAND.batch_rows = rows
    try:
        return run()
    finally:
        cpu.BAND.batch_rows = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="8192")
    parser.add_argument("--methods", default=";".join(METHODS), help="';'-separated method specs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-rows", default=str(cpu.BAND.batch_rows),
                        help="comma-separated values of the CPU kernel's BAND.batch_rows to compare (0: off)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds}: must be >= 1")
    methods = [m for m in args.methods.split(";") if m]
    batch_rows = [int(x) for x in args.batch_rows.split(",")]
    if any(r < 0 for r in batch_rows):
        parser.error(f"--batch-rows={args.batch_rows}: values must be >= 0")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for length in [int(x) for x in args.lengths.split(",")]:
        cases = _cases(length, methods, batch_rows)
        times: dict[str, list[float]] = {name: [] for name in cases}
        with torch.inference_mode():
            for run in cases.values():
                run()  # warm-up: tables, lazy init
            for _ in range(args.rounds):
                for name, run in cases.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        print(f"\nlength {length}, {args.rounds} interleaved rounds")
        print("| case | median s | ratio to sdpa: median | min | max |")
        print("|---|---|---|---|---|")
        base = times["sdpa"]
        for name, ts in times.items():
            ratios = [t / b for t, b in zip(ts, base)]
            print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ratios):.3f} | {min(ratios):.3f} "
                  f"| {max(ratios):.3f} |")


if __name__ == "__main__":
    main()
