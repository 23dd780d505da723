"""Decode latency per token against a long cache, patched versus unpatched SmolLM2-135M,
interleaved in one process so machine noise hits every method alike.

    python benchmarks/bench_decode.py                    # 8k context, 2 rounds (~10 min on 2 cores)
    python benchmarks/bench_decode.py --context 4096 --rounds 3 --steps 32

Each round visits every method in turn: patch, prefill the context into a DynamicCache
(not timed), time `--steps` single-token steps, undo. The table keeps, per method, the
median step over all rounds and its ratio to the unpatched model (issue 3's target for
the relative methods: ≤ 2× at 8k). `ntk` is a control: it runs exactly the unpatched
decode path (only its inv_freq buffer differs), so its ratio shows the noise floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

METHODS = ["none", "ntk:scale=2", "rerope:window=4096", "leaky-rerope:window=2048,scale=16",
           "self-extend:window=1024,group=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default=";".join(METHODS))
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache

    import ropelab

    model, _ = ropelab.load_default_model("smollm2-135m")
    ids = torch.randint(0, model.config.vocab_size, (1, args.context + args.steps),
                        generator=torch.Generator().manual_seed(1))
    methods = [m for m in args.methods.split(";") if m]
    steps: dict[str, list[float]] = {m: [] for m in methods}
    with torch.inference_mode():
        for round_ in range(args.rounds):
            for method in methods:
                handle = None if method == "none" else ropelab.patch(model, method)
                try:
                    cache = DynamicCache(config=model.config)
                    model(ids[:, : args.context], past_key_values=cache, use_cache=True, logits_to_keep=1)
                    for t in range(args.context, args.context + args.steps):
                        start = time.perf_counter()
                        model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                        steps[method].append(time.perf_counter() - start)
                finally:
                    if handle is not None:
                        handle.undo()
                print(f"round {round_ + 1} {method}: median {1000 * statistics.median(steps[method][-args.steps:]):.1f} ms",
                      file=sys.stderr, flush=True)
    base = statistics.median(steps[methods[0]])
    print(f"| method | ms/token at {args.context} (median of {args.rounds}×{args.steps}) | × {methods[0]} |")
    print("|---|---|---|")
    for method in methods:
        ms = statistics.median(steps[method])
        print(f"| {method} | {1000 * ms:.1f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
