"""Decode latency per token against a long cache, patched versus unpatched SmolLM2-135M,
interleaved in one process so machine noise hits every method alike; and each method's
KV-cache memory.

    python benchmarks/bench_decode.py                    # 8k context, 5 rounds of 16 steps
    python benchmarks/bench_decode.py --context 4096 --rounds 7 --steps 32
    python benchmarks/bench_decode.py --key-cache kept,lean   # both modes, interleaved
    python benchmarks/bench_decode.py --threads 1 --thread-time  # CPU time beside wall time
    python benchmarks/bench_decode.py --context 4096 --evict \
        --methods "none;sinks:sinks=4,window=1020;lm-infinite:n_global=10,n_local=1024"

`--key-cache` (patch(..., key_cache=...)): "kept" keeps each cached key's rotated forms
with the cache (a step rotates its new key only), "lean" keeps none (every key rotated in
each call, cache memory 1.0×). With both, each patched method runs in each mode as its own
entry, every round visiting all entries in turn.

Each method gets its own cache of `--context` tokens, filled with random keys and values
of the model's shapes (the default: a decode step's cost does not depend on the cached
values, and an 8k prefill per method takes many minutes on a shared 2-core machine) or,
with `--prefill`, by a real prefill. Then each round visits every method in turn: patch,
one untimed warm-up step (the first step of a patched model on a cache it did not fill
rotates the cached keys once, patches/key_cache.py), `--steps` timed single-token steps,
crop the cache back to the context (so every round decodes against the same length; the
crop also exercises the rotated keys following the cache), undo. Per round and method the median step is
kept; the table gives, per method, the median over rounds and the median of the per-round
ratios to the unpatched model with their min-max over rounds (with 5 rounds, the interval
that holds the true median ratio with probability 1 - 2·0.5^5 ≈ 94%). Issue 9's target for
rerope, leaky-rerope and self-extend: ≤ 1.10× at 8k. `ntk` is a control: it runs exactly
the unpatched decode path (only its inv_freq buffer differs), so its ratio shows the noise.

`--evict` (patches/evict.py): each `sinks` or `lm-infinite` method also runs as a second
entry "[evict]" decoding with `evicting_cache`, which drops the keys no later query can
see; its cache is filled again from the same random keys every round (an evicting cache
cannot be cropped back past what it dropped), its untimed warm-up step does the first
eviction, and its cache size is the one left after the round. Give these methods windows
well below `--context` (their defaults follow the training length).

`--thread-time` (with `--threads 1`, where the decoding thread does all the work) also
times every step by the CPU time of that thread (`time.thread_time`) and reports it beside
the wall time, the same statistics from the same steps. On a shared machine a step's wall
time includes the time other processes held the core; its CPU time does not (it still
feels their pressure on caches and memory bandwidth), so the CPU-time ratio is the steadier
of the two there, and on an idle machine the two agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

METHODS = ["none", "ntk:scale=2", "rerope:window=4096", "leaky-rerope:window=2048,scale=16",
           "self-extend:window=1024,group=8"]


def cache_bytes(cache) -> tuple[int, int]:
    """(keys + values bytes, rotated-key-form bytes) over the cache's layers."""
    from ropelab.patches.key_cache import kept_forms

    kv = forms = 0
    for layer in cache.layers:
        kv += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        kept = kept_forms(layer)
        if kept is not None:  # the buffers as allocated, spare rows included
            forms += kept.nbytes()
    return kv, forms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", default=";".join(METHODS))
    parser.add_argument("--prefill", action="store_true", help="fill each cache by a real prefill")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--key-cache", default="kept", help="'kept', 'lean' or 'kept,lean' (both, interleaved)")
    parser.add_argument("--thread-time", action="store_true",
                        help="also report each step's CPU time of the decoding thread (needs --threads 1)")
    parser.add_argument("--evict", action="store_true",
                        help="also decode sinks/lm-infinite methods with an evicting cache (patches/evict.py)")
    args = parser.parse_args()
    if args.evict and args.prefill:
        parser.error("--evict with --prefill: an evicting entry refills its cache every round, from random keys")
    if args.thread_time and args.threads != 1:
        parser.error(f"--thread-time with --threads={args.threads}: needs --threads 1 (the CPU time of the "
                     "decoding thread leaves out torch's other threads)")
    for name in ("context", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    modes = [m for m in args.key_cache.split(",") if m]
    for mode in modes:
        if mode not in ("kept", "lean"):
            parser.error(f"--key-cache={args.key_cache!r}: each mode must be 'kept' or 'lean'")

    import torch
    from transformers import DynamicCache

    import ropelab
    from ropelab.patches.evict import evicting_cache

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = ropelab.load_default_model("smollm2-135m")
    ids = torch.randint(0, model.config.vocab_size, (1, args.context + args.steps + 1),
                        generator=torch.Generator().manual_seed(1))
    # entries: (label, method, key_cache mode); the unpatched model once
    entries = []
    for method in (m for m in args.methods.split(";") if m):
        for mode in ([None] if method == "none" else modes):
            label = method if mode is None or len(modes) == 1 else f"{method} [{mode}]"
            entries.append((label, method, mode))
        if args.evict and method.split(":")[0] in ("sinks", "lm-infinite"):
            entries.append((f"{method} [evict]", method, modes[0]))
    methods = [label for label, _, _ in entries]
    spec = {label: (method, mode) for label, method, mode in entries}
    evicting = {label for label in methods if label.endswith(" [evict]")}
    caches, filled = {}, []
    clocks = ["wall", "cpu"] if args.thread_time else ["wall"]
    # clock -> method -> the median step of each round
    rounds: dict[str, dict[str, list[float]]] = {clock: {m: [] for m in methods} for clock in clocks}
    with torch.inference_mode():
        if not args.prefill:  # the same random keys and values (per layer) for every method
            config, param = model.config, next(model.parameters())
            heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
            g = torch.Generator().manual_seed(2)
            filled = [torch.randn(2, 1, heads, args.context, dim, generator=g).to(param.dtype)
                      for _ in range(config.num_hidden_layers)]
        for method in methods:
            if method in evicting:
                continue  # filled anew every round
            caches[method] = DynamicCache(config=model.config)
            if not args.prefill:
                for layer, kv in enumerate(filled):
                    caches[method].update(kv[0], kv[1], layer)
                continue
            handle = None if spec[method][0] == "none" else ropelab.patch(model, spec[method][0],
                                                                          key_cache=spec[method][1])
            try:
                model(ids[:, : args.context], past_key_values=caches[method], use_cache=True, logits_to_keep=1)
            finally:
                if handle is not None:
                    handle.undo()
            print(f"prefilled {method}", file=sys.stderr, flush=True)
        for round_ in range(args.rounds):
            for method in methods:
                handle = None if spec[method][0] == "none" else ropelab.patch(model, spec[method][0],
                                                                              key_cache=spec[method][1])
                if method in evicting:
                    caches[method] = evicting_cache(handle)
                    for layer, kv in enumerate(filled):
                        caches[method].update(kv[0], kv[1], layer)
                cache, steps = caches[method], {clock: [] for clock in clocks}
                try:
                    model(ids[:, args.context : args.context + 1], past_key_values=cache, use_cache=True)  # warm-up
                    for t in range(args.context + 1, args.context + 1 + args.steps):
                        start, cpu = time.perf_counter(), time.thread_time()
                        model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                        steps["wall"].append(time.perf_counter() - start)
                        if args.thread_time:
                            steps["cpu"].append(time.thread_time() - cpu)
                    if method not in evicting:
                        cache.crop(-(args.steps + 1))
                finally:
                    if handle is not None:
                        handle.undo()
                for clock in clocks:
                    rounds[clock][method].append(statistics.median(steps[clock]))
                print(f"round {round_ + 1} {method}: median " +
                      ", ".join(f"{1000 * rounds[c][method][-1]:.1f} ms {c}" for c in clocks), file=sys.stderr,
                      flush=True)
    base = methods[0]
    kv_base = cache_bytes(caches[base])[0]
    head = "".join(f"| {c} ms/token | {c} × {base} (median, min-max) " for c in clocks)
    print(f"ms/token at {args.context}: median of {args.rounds} round medians ({args.steps} steps each); "
          f"× {base}: median of the per-round ratios, min-max over rounds")
    print(f"| method {head}| KV cache MB | rotated keys MB | cache × {base} |")
    print("|---" * (4 + 2 * len(clocks)) + "|")
    for method in methods:
        cells = ""
        for clock in clocks:
            ratios = sorted(a / b for a, b in zip(rounds[clock][method], rounds[clock][base]))
            cells += (f"| {1000 * statistics.median(rounds[clock][method]):.1f} | {statistics.median(ratios):.2f} "
                      f"({ratios[0]:.2f}-{ratios[-1]:.2f}) ")
        kv, forms = cache_bytes(caches[method])
        print(f"| {method} {cells}| {kv / 2**20:.0f} | {forms / 2**20:.0f} | {(kv + forms) / kv_base:.2f} |")


if __name__ == "__main__":
    main()
