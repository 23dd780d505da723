"""Patched versus unpatched SmolLM2-135M, side by side in one run: prefill time and peak
memory at 4k, 8k, 16k tokens, and decode latency per token against an 8k cache
(issue 3's targets: frequency-only methods ≤ 1.03× time and ≤ 1.02× memory; rerope,
leaky-rerope, self-extend ≤ 1.6× time and ≤ 1.25× memory at 16k, decode ≤ 2×).

    python benchmarks/bench_patch.py                         # the full table (~20 min on 2 cores)
    python benchmarks/bench_patch.py --lengths 4096 --skip-decode

What is measured: the decoder forward that the harness runs (`model.model(input_ids,
use_cache=False)`, final hidden states; the LM head is applied in chunks by the harness and
is the same for every method), float32, under `torch.inference_mode()`. `--cache kept|lean`
measures instead a prefill into a DynamicCache, as `generate` runs it, with the patch's
`key_cache` mode: "kept" also keeps one rotated copy of every layer's keys on the cache
(patches/key_cache.py; 30 layers x 3 heads x 16384 x 64 float32 = 360 MiB at 16k), "lean"
keeps none. Before this option existed the bench called `model.model(input_ids)`, whose
default `use_cache=True` built such a cache (kept mode for patched models), so its peaks
held the cache too.

Peak memory: every (length, method) case runs in a fresh subprocess that loads the model
(from a float32 state dict saved once, so loading takes seconds), warms up on 64 tokens,
and samples its resident set every 2 ms during the forward; the peak minus the resident
set at the start is the extra memory the forward needed (activations, attention
workspace, the kernel's tables, the cache when there is one). The subprocess runs with
glibc's mmap threshold fixed (`MALLOC`), so every large tensor is mmap-backed and returned
to the OS on free and the resident set follows what is alive; left alone, the threshold
rises as loading frees large blocks, later tensors reuse heap pages already resident, and
the peak depends on what loading left behind.

Time: a second subprocess per case times the same forward with glibc's allocator left as
it is (what a user's process runs): with the mmap threshold fixed, every tensor over 128 KB
is a fresh mapping whose pages fault in on first touch, a cost per allocation that falls on
the patched forward's many temporaries (the rotated forms, each part's output) more than on
the unpatched one's, so times taken with it overstate the patch's cost (session 7: at 16k,
`leaky-rerope` 1.09-1.11x with it; the time-with-threshold column keeps it visible). At these
sizes a forward takes 10-100 s, far above timer noise; `--rounds N` repeats every case N
times, methods interleaved and in reverse order every other round, so load drift hits all
methods alike, and the ratio to the unpatched model is taken per round (median, min-max).
Peaks are measured once (first round). Decode: prefill 8k with a DynamicCache, then the
median of 16 single-token steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

METHODS = ["none", "ntk:scale=2", "yarn:scale=2", "rerope:window=4096", "leaky-rerope:window=2048,scale=16",
           "self-extend:window=1024,group=8"]
TARGETS = {"frequencies": (1.03, 1.02), "attention": (1.6, 1.25)}
CACHES = ("none", "kept", "lean")
# glibc mallopt(3) M_MMAP_THRESHOLD, fixed (as in benchmarks/bench_memory_mode.py).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples the resident set every 2 ms while in the block; `.extra_mb` = peak - start.

    The process high-water mark (ru_maxrss) cannot be used here: loading the model peaks
    higher than a forward at short lengths, hiding it. Torch ops release the GIL, so the
    sampler runs during them; tensors live for many milliseconds at these sizes.
    """

    def __enter__(self):
        self.start = self.peak = _current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _current_rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_mb())
        self.extra_mb = self.peak - self.start


def _load(model_dir: str, method: str, key_cache: str = "kept"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import ropelab

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(torch.load(f"{model_dir}/weights.pt", mmap=True), assign=True)
    handle = None if method == "none" else ropelab.patch(model, method, key_cache=key_cache)
    return model, handle


def _case(model_dir: str, method: str, length: int, decode: bool, cache: str = "none") -> dict:
    import torch
    from transformers import DynamicCache

    model, handle = _load(model_dir, method, "kept" if cache == "none" else cache)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model.model(ids[:, :64], use_cache=False)  # warm-up: kernels, tables, lazy init
        if decode:
            kv = DynamicCache(config=model.config)
            model(ids, past_key_values=kv, use_cache=True, logits_to_keep=1)
            step, times = ids[:, -1:], []
            for _ in range(16):
                start = time.perf_counter()
                model(step, past_key_values=kv, use_cache=True)
                times.append(time.perf_counter() - start)
            times.sort()
            return {"decode_ms": 1000 * times[len(times) // 2]}
        kwargs = {"use_cache": False} if cache == "none" else {"use_cache": True,
                                                               "past_key_values": DynamicCache(config=model.config)}
        with PeakRSS() as rss:
            start = time.perf_counter()
            model.model(ids, **kwargs)
            seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": rss.extra_mb, "route": None if handle is None else handle.route}


def _run_case(model_dir, method, length, decode, cache="none", fixed_threshold=True) -> dict:
    """One case in a fresh subprocess; `fixed_threshold`: glibc's mmap threshold fixed (peaks)."""
    args = [sys.executable, __file__, "--case", model_dir, method, str(length), str(int(decode)), cache]
    env = {**os.environ, **MALLOC} if fixed_threshold else {k: v for k, v in os.environ.items() if k not in MALLOC}
    out = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--methods", default=";".join(METHODS), help="';'-separated specs; 'none' is the baseline")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--decode-length", type=int, default=8192)
    parser.add_argument("--cache", default="none", choices=CACHES,
                        help="prefill without a cache (the harness's forward), or into a DynamicCache with the "
                             "patch's key_cache mode kept/lean")
    parser.add_argument("--rounds", type=int, default=1, help="timed forwards per case, interleaved (ratios per round)")
    parser.add_argument("--skip-peak", action="store_true", help="time only (no fixed-threshold peak runs)")
    parser.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        model_dir, method, length, decode, cache = args.case
        print(json.dumps(_case(model_dir, method, int(length), bool(int(decode)), cache)))
        return

    import torch

    import ropelab

    methods = [m for m in args.methods.split(";") if m]
    if methods[0] != "none":
        methods.insert(0, "none")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, cache "
          f"{args.cache}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as model_dir:
        model, _ = ropelab.load_default_model("smollm2-135m")
        # a GGUF-loaded model refuses save_pretrained: keep its config and dequantised weights
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(model_dir)
        torch.save(model.state_dict(), f"{model_dir}/weights.pt")
        del model
        rows = []
        for length in [int(x) for x in args.lengths.split(",")]:
            timed: dict[str, list[dict]] = {m: [] for m in methods}
            peaks: dict[str, dict] = {}
            for r in range(args.rounds):
                for m in (methods if r % 2 == 0 else methods[::-1]):
                    timed[m].append(_run_case(model_dir, m, length, False, args.cache, fixed_threshold=False))
                    print(f"  {length:>6} round {r} {m:<36} {json.dumps(timed[m][-1])}", file=sys.stderr)
                    if r == 0 and not args.skip_peak:
                        peaks[m] = _run_case(model_dir, m, length, False, args.cache, fixed_threshold=True)
                        print(f"  {length:>6} peak    {m:<36} {json.dumps(peaks[m])}", file=sys.stderr)
            for m in methods:
                rows.append((length, m, _summary(timed[m], timed["none"], peaks.get(m), peaks.get("none"))))
        decode = {}
        if not args.skip_decode:
            decode = {m: _run_case(model_dir, m, args.decode_length, True) for m in methods}
    _print_table(rows, decode, args.decode_length)


def _summary(runs: list[dict], base_runs: list[dict], peak: dict | None, base_peak: dict | None) -> dict:
    """One table row: median time and per-round ratio (min-max), and the fixed-threshold peak
    with that process's time; an error in any run is the row."""
    for r in (*runs, *base_runs, peak or {}, base_peak or {}):
        if "error" in r:
            return {"error": r["error"]}
    ratios = sorted(r["seconds"] / b["seconds"] for r, b in zip(runs, base_runs))
    row = {"route": runs[0]["route"], "seconds": statistics.median(r["seconds"] for r in runs),
           "ratio": statistics.median(ratios), "ratio_range": (ratios[0], ratios[-1])}
    if peak is not None and base_peak is not None:
        row.update(peak_mb=peak["peak_mb"], peak_ratio=peak["peak_mb"] / base_peak["peak_mb"],
                   fixed_ratio=peak["seconds"] / base_peak["seconds"])
    return row


def _print_table(rows, decode, decode_length) -> None:
    print("| length | method | route | time s | time × (min–max) | peak MB | peak × | time × with the threshold fixed "
          "| target (time, mem) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length, method, r in rows:
        if "error" in r:
            print(f"| {length} | {method} | error: {r['error']} | | | | | | |")
            continue
        route = r.get("route") or "unpatched"
        lo, hi = r["ratio_range"]
        target = TARGETS.get(route)
        target_text = f"≤ {target[0]}×, ≤ {target[1]}×" if target else ""
        peak = (f"{r['peak_mb']:.0f} | {r['peak_ratio']:.2f} | {r['fixed_ratio']:.2f}" if "peak_mb" in r
                else "– | – | –")
        print(f"| {length} | {method} | {route} | {r['seconds']:.1f} | {r['ratio']:.3f} ({lo:.3f}–{hi:.3f}) | "
              f"{peak} | {target_text} |")
    if decode:
        base = decode["none"]["decode_ms"]
        print(f"\n| decode at {decode_length} | ms/token | × unpatched (target ≤ 2× for relative methods) |")
        print("|---|---|---|")
        for method, r in decode.items():
            if "error" in r:
                print(f"| {method} | error: {r['error']} | |")
            else:
                print(f"| {method} | {r['decode_ms']:.1f} | {r['decode_ms'] / base:.2f} |")


if __name__ == "__main__":
    main()
