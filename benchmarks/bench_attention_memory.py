"""Peak memory and time of `rotary_attention` (ReRoPE) against plain causal SDPA, side by side.

    python benchmarks/bench_attention_memory.py                      # 4k, 8k, 16k; w = S/4
    python benchmarks/bench_attention_memory.py --lengths 4096,8192 --window 2048 --reps 5

Shapes are SmolLM2-135M's attention: B=1, H=9 query heads, Hkv=3 key/value heads, D=64,
float32, rope_theta 1e5. The baseline is what transformers' "sdpa" backend runs for a
RoPE model without a padding mask: `F.scaled_dot_product_attention(q, k, v,
is_causal=True, enable_gqa=True)` on already-rotated q and k (so the baseline pays no
rotation; ReRoPE's time includes its rotations and the merge).

Peak memory: each (length, kernel) case runs in a fresh subprocess that builds its inputs,
warms the kernels up on a tiny problem, reads the process high-water mark
(`resource.getrusage(...).ru_maxrss`), runs the case once and reads it again. The
difference is the extra resident memory the call needed at its peak (inputs excluded,
output included). Large tensors are mmap-backed and returned to the OS when freed, and the
case is the first large computation in its process, so earlier allocations cannot hide
part of the peak. What it cannot see is memory allocated but never touched.

Time: one more subprocess per length alternates the two kernels `--reps` times and keeps
the fastest of each (the machine is shared; the minimum is the least disturbed run).
Decode: one query token against an 8k cache, the fastest of many calls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

B, H, HKV, D, BASE = 1, 9, 3, 64, 1e5


def _inputs(T: int, S: int):
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, HKV, S, D, generator=g)
    v = torch.randn(B, HKV, S, D, generator=g)
    return q, k, v


def _kernels(window: int):
    import torch
    import torch.nn.functional as F

    import ropelab
    from ropelab.attention import rotary_attention

    method = ropelab.get_method("rerope", window=window)
    inv_freq = method.frequencies(D, BASE).inv_freq

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)

    def rerope(q, k, v):
        return rotary_attention(q, k, v, method, inv_freq)

    torch.set_grad_enabled(False)
    return {"sdpa": sdpa, "rerope": rerope}


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_memory(kernel: str, S: int, window: int) -> dict:
    fn = _kernels(window)[kernel]
    fn(*_inputs(64, 64))  # load and initialise the kernels on something tiny
    q, k, v = _inputs(S, S)
    before = _maxrss_bytes()
    out = fn(q, k, v)
    peak = _maxrss_bytes() - before
    return {"peak_bytes": peak, "output_bytes": out.numel() * out.element_size()}


def child_time(S: int, window: int, reps: int, T: int) -> dict:
    kernels = _kernels(window)
    q, k, v = _inputs(T, S)
    best = {name: float("inf") for name in kernels}
    for name, fn in kernels.items():
        fn(q, k, v)  # warm-up
    for _ in range(reps):
        for name, fn in kernels.items():
            t = time.perf_counter()
            fn(q, k, v)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--window", type=int, default=None, help="ReRoPE window (default S/4)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per kernel")
    parser.add_argument("--decode-length", type=int, default=8192)
    parser.add_argument("--decode-reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = parser.parse_args()

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.child:
        kind, *rest = a.child
        if kind == "mem":
            kernel, S, window = rest[0], int(rest[1]), int(rest[2])
            print(json.dumps(child_memory(kernel, S, window)))
        else:
            S, window, reps, T = (int(x) for x in rest)
            print(json.dumps(child_time(S, window, reps, T)))
        return

    import torch

    threads = ["--threads", str(a.threads)] if a.threads else []
    print(f"torch {torch.__version__}, {a.threads or torch.get_num_threads()} threads, "
          f"B={B} H={H} Hkv={HKV} D={D} float32; ReRoPE window {a.window or 'S/4'}; "
          "peak = ru_maxrss rise in a fresh process (output included, inputs excluded)")
    header = (f"{'S':>6} {'w':>5} | {'sdpa s':>7} {'rerope s':>8} {'time x':>6} | "
              f"{'sdpa MB':>8} {'rerope MB':>9} {'mem x':>6} | {'out MB':>6} {'S×S fp32 MB':>11}")
    print(header)
    print("-" * len(header))
    for S in (int(x) for x in a.lengths.split(",")):
        w = a.window or S // 4
        mem = {kern: _run_child([*threads, "--child", "mem", kern, str(S), str(w)]) for kern in ("sdpa", "rerope")}
        times = _run_child([*threads, "--child", "time", str(S), str(w), str(a.reps), str(S)])
        ms, mr = mem["sdpa"]["peak_bytes"] / 2**20, mem["rerope"]["peak_bytes"] / 2**20
        ratio = times["rerope"] / times["sdpa"]
        print(f"{S:>6} {w:>5} | {times['sdpa']:>7.3f} {times['rerope']:>8.3f} {ratio:>6.2f} | "
              f"{ms:>8.1f} {mr:>9.1f} {mr / max(ms, 1e-9):>6.2f} | {mem['sdpa']['output_bytes'] / 2**20:>6.1f} "
              f"{H * S * S * 4 / 2**20:>11.0f}", flush=True)
    S = a.decode_length
    w = a.window or S // 4
    times = _run_child([*threads, "--child", "time", str(S), str(w), str(a.decode_reps), "1"])
    print(f"decode T=1, S={S}, w={w}: sdpa {times['sdpa'] * 1e3:.2f} ms, rerope {times['rerope'] * 1e3:.2f} ms, "
          f"ratio {times['rerope'] / times['sdpa']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
