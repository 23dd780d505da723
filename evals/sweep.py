"""The main job: SmolLM2-135M on the stdlib corpus, seven methods at twice the training
length, fixed-target protocol, ending in the loss-versus-context plot and the table.

Parameters (docs/methods.md, "Defaults from the sources"), for L = 8192, N_max = 16k:
- scaling methods (`linear`, `ntk`, `beta-base`, `yarn`): scale s = N_max / L = 2;
- `rerope`: window w = L/2 = 4096, the top of Su's "L/4 to L/2" and the window of the
  reference run in docs/design.md (ReRoPE w=4096: 1.706 at 4k, 1.634 at 16k);
- `leaky-rerope`: w = L/4 = 2048 and k = 16 (Su's code default). Su's rule (part 13)
  w + (N_max - 1 - w)/k ≤ L/2 cannot hold with w = L/2, hence the smaller window:
  2048 + 14335/16 = 2944 ≤ 4096. If a longer N_max breaks the rule, k is raised to meet it.

Budget (2 CPU cores), measured (README): in float32 a 16k forward of SmolLM2 takes
113-143 s and a 4k forward 13-21 s, so the seven methods at N ∈ {4k, 16k} took 16.5 min
(16.9 with loading): over the 15-minute target, and the 16k forwards alone are ≈ 14 min.
In bfloat16 the same sweep took 13.1 min (13.6 with loading) with every loss within
0.004 nats of float32, so the main job runs in bfloat16 (`--dtype float32` for the exact
run). K = 2048 targets and N ∈ {4k, 16k} match docs/design.md's reference run, so its numbers
(RoPE 1.706 / 7.317, ReRoPE 1.706 / 1.634) are there to check against; the 16k forward
also gives the per-position curve over every context length 1…16k (plotted, and bucketed
in the report), so the lengths in between are not lost. `--lengths 4k,8k,16k` adds ≈ 3
min. `budget_seconds` is the a·N + b·N² fit to docs/design.md's timings, for a first estimate.
"""

from __future__ import annotations

import math
import sys

from .perplexity import perplexity
from .protocols import Protocol

SWEEP_NAMES = ("rope", "linear", "ntk", "beta-base", "yarn", "rerope", "leaky-rerope")


def budget_seconds(lengths, methods: int = len(SWEEP_NAMES)) -> float:
    """Estimated seconds on 2 CPU cores for SmolLM2-135M (the fit in the module docstring)."""
    return methods * sum(2.9e-3 * n + 1.55e-7 * n * n for n in lengths)


def default_methods(train_length: int, max_length: int) -> list[str]:
    """The seven specs of the main job for a model trained at `train_length` (module docstring)."""
    scale = max(1, math.ceil(max_length / train_length))
    window, leaky_window = train_length // 2, train_length // 4
    k = 16
    while leaky_window + (max_length - 1 - leaky_window) / k > train_length / 2:
        k *= 2
    return [
        "rope",
        f"linear:scale={scale}",
        f"ntk:scale={scale}",
        f"beta-base:scale={scale}",
        f"yarn:scale={scale}",
        f"rerope:window={window}",
        f"leaky-rerope:window={leaky_window},scale={k}",
    ]


def run_default_sweep(out: str = "runs/default", *, model: str = "default", lengths=(4096, 16384), methods=None,
                      targets: int = 2048, progress: bool = True, dtype: str = "bfloat16", shard: str | None = None,
                      **loading) -> list[dict]:
    """Run (or resume) the main job into `out`; returns the records (plots/report: cli `_finish`).

    `shard`: this rank's shard of the result store in a sharded run (`distributed.default_shard`).
    `loading`: further keywords of `loading.load_model` (revision, device, device_map, ...)."""
    from .loading import load_model
    from .models import train_length

    lengths = sorted(lengths)
    protocol = Protocol("fixed-target", window=lengths[-1], targets=targets, data="stdlib", short="skip")
    protocol.check_lengths(lengths)
    print(f"loading model {model!r} ...", file=sys.stderr)
    net, tokenizer, source = load_model(model, dtype, **loading)
    methods = methods or default_methods(train_length(net), lengths[-1])
    print(f"methods: {', '.join(methods)}\nlengths: {lengths}, K={targets}; estimated "
          f"{budget_seconds(lengths, len(methods)) / 60:.0f} min on 2 CPU cores (SDPA timings; "
          "relative methods may take longer)", file=sys.stderr)
    return perplexity(net, tokenizer, "stdlib", methods, lengths, protocol=protocol, out=out, model_source=source,
                      shard=shard, progress=progress)
