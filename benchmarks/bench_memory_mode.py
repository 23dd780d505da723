"""Memory mode (ropelab.patches.memory) against the plain forward: peak extra resident memory
and time of one decoder forward of SmolLM2-135M, float32, on CPU.

    python benchmarks/bench_memory_mode.py --length 16384 --chunk 2048 [--layers 2] [--parallel] [--keep DIR]

Each case runs in a fresh subprocess (the embedded model loaded, a 64-token warm-up, then the
forward `model.model(input_ids)` under inference mode) that samples its resident set every
2 ms; peak minus the resident set at the start is what the forward added (large blocks
always mmapped, see MALLOC). After the measured forward, outside it, the case computes the
next-token loss at every position from the final hidden states (LM head and cross-entropy in
slices of 1024 positions, so the 16k × 49152 logits never exist at once) and writes the
losses and all final hidden states to disk; the parent reads them only after both cases have
ended (one case in memory at a time). The cases run one after the other, off first (or at once
with `--parallel`: each peak is still its own process's, only the seconds suffer); printed:
the largest absolute difference of the per-position losses, of the mean loss and of the
final hidden states. The same sampler as benchmarks/bench_patch.py.

`--layers N` keeps the first N decoder layers only. Under inference mode a layer's
activations are freed before the next layer runs, so the peak should be one layer's
activations plus the residual stream whatever the depth; measured, the 30-layer peak at 4k
was 39-52 MB above the 2-layer one (README, "Memory mode"), while the time is N/30 of the
full forward's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


# glibc serves allocations above its mmap threshold with mmap and returns them on free, so
# the resident set follows the live tensors. Left alone, the threshold rises (up to 32 MB) as
# large blocks are freed (the model's loading frees many), and later tensors then reuse heap
# pages already resident: the forward's peak would hide in what loading left behind. A fixed
# threshold turns that off (glibc mallopt(3), M_MMAP_THRESHOLD).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    def __enter__(self):
        self.start = self.peak = current_rss_mb()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, current_rss_mb())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.extra_mb = max(self.peak, current_rss_mb()) - self.start


def position_losses(model, hidden, ids, piece: int = 1024):
    """Next-token cross-entropy at positions 0..S-2, float32, the LM head applied in slices."""
    import torch

    losses = []
    for start in range(0, len(ids) - 1, piece):
        stop = min(start + piece, len(ids) - 1)
        logits = model.lm_head(hidden[start:stop]).float()
        losses.append(torch.nn.functional.cross_entropy(logits, ids[start + 1 : stop + 1], reduction="none"))
    return torch.cat(losses)


def case(length: int, chunk: int, out: str, layers: int = 0) -> None:
    import torch

    from ropelab.patches import load_default_model
    from ropelab.patches.memory import memory_mode

    model, _ = load_default_model("smollm2-135m")
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    ids = (torch.arange(length) * 7919 % model.config.vocab_size)[None]
    mode = memory_mode(model, chunk) if chunk else None
    with torch.inference_mode():
        model.model(input_ids=ids[:, :64], use_cache=False)
        with PeakRSS() as rss:
            start = time.perf_counter()
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            seconds = time.perf_counter() - start
        losses = position_losses(model, hidden[0], ids[0])
    torch.save({"hidden": hidden[0].clone(), "losses": losses}, out + ".pt")
    with open(out, "w") as f:
        json.dump({"chunk": chunk, "seconds": seconds, "peak_mb": rss.extra_mb,
                   "modules": len(mode.modules) if mode else 0, "threads": torch.get_num_threads(),
                   "layers": len(model.model.layers)}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=0, help="keep the first N decoder layers (0: all)")
    parser.add_argument("--parallel", action="store_true",
                        help="run both cases at once (each peak is its own process's; the seconds then mean little)")
    parser.add_argument("--keep", metavar="DIR", help="keep each case's outputs in DIR; a case whose outputs are "
                        "there already is not run again (an interrupted run resumes)")
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case(int(args.case[0]), int(args.case[1]), args.case[2], int(args.case[3]))
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        name = f"{args.length}_{args.layers or 'all'}layers_chunk"
        outs = [os.path.join(folder, f"{name}{chunk}.json") for chunk in (0, args.chunk)]
        running = []
        for chunk, out in zip((0, args.chunk), outs):
            if os.path.exists(out) and os.path.exists(out + ".pt"):
                continue  # done by an earlier run (--keep)
            command = [sys.executable, __file__, "--case", str(args.length), str(chunk), out, str(args.layers)]
            running.append(subprocess.Popen(command, env={**os.environ, **MALLOC}))
            if not args.parallel:
                running[-1].wait()
        if any(p.wait() != 0 for p in running):
            sys.exit("a case failed (its error is above)")
        results = []
        for out in outs:
            with open(out) as f:
                results.append(json.load(f))
        off, on = (torch.load(out + ".pt") for out in outs)
    print(f"SmolLM2-135M float32, {args.length} tokens, decoder forward of {results[0]['layers']} layers, "
          f"{results[0]['threads']} threads")
    print("| memory mode | peak extra MB | seconds |")
    print("|---|---|---|")
    for r in results:
        label = f"chunk {r['chunk']} ({r['modules']} modules)" if r["chunk"] else "off"
        print(f"| {label} | {r['peak_mb']:.0f} | {r['seconds']:.1f} |")
    print(f"mean loss off / on: {off['losses'].mean().item():.9g} / {on['losses'].mean().item():.9g} "
          f"(|difference| {(off['losses'].mean() - on['losses'].mean()).abs().item():.3g})")
    print(f"largest |difference| of the {len(off['losses'])} per-position losses: "
          f"{(off['losses'] - on['losses']).abs().max().item():.3g}")
    print(f"largest |difference| of all {off['hidden'].shape[0]} final hidden states: "
          f"{(off['hidden'] - on['hidden']).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
