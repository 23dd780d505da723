"""The main job: SmolLM2-135M on the stdlib corpus, seven methods at twice the training
length, fixed-target protocol, ending in the loss-versus-context plot and the table.

Parameters (shared/docs/methods.md, "Defaults from the sources"), for L = 8192, N_max = 16k:
- scaling methods (`linear`, `ntk`, `beta-base`, `yarn`): scale s = N_max / L = 2;
- `rerope`: window w = L/2 = 4096, the top of Su's "L/4 to L/2" and the window of the
  reference run in design.md (ReRoPE w=4096: 1.706 at 4k, 1.634 at 16k);
- `leaky-rerope`: w = L/4 = 2048 and k = 16 (Su's code default). Su's rule (part 13)
  w + (N_max - 1 - w)/k ≤ L/2 cannot hold with w = L/2, hence the smaller window:
  2048 + 14335/16 = 2944 ≤ 4096. If a longer N_max breaks the rule, k is raised to meet it.

Budget (2 CPU cores). design.md measured a forward at 8k ≈ 34 s and the fixed-target sweep
N = 4k, 8k, 12k, 16k ≈ 196 s for plain RoPE. Fitting T(N) = a·N + b·N² to both gives
a ≈ 2.9e-3 s/token, b ≈ 1.55e-7 s/token², so T(4k) ≈ 14 s, T(8k) ≈ 34 s, T(12k) ≈ 59 s,
T(16k) ≈ 89 s. Seven methods with N ∈ {2k, 4k, 8k, 12k, 16k} would take ≈ 7 × 202 s ≈ 24
min; N ∈ {4k, 8k, 16k} ≈ 7 × 137 s ≈ 16 min: both over 15. The default N ∈ {4k, 16k} with
K = 2048 (the design's reference targets) costs ≈ 7 × 103 s ≈ 12 min, plus ≈ 15 s to load,
leaving ≈ 2.5 min for the relative methods' kernel overhead. The 16k forward also gives
the per-position curve over every context length 1…16k (plotted, and bucketed in the
report), so the in-between lengths are not lost, only measured under the per-position
protocol. Add 8k with `--lengths 4k,8k,16k` when time allows (+≈ 4 min).
"""

from __future__ import annotations

import math
import sys

from .perplexity import Protocol, perplexity

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
                      targets: int = 2048, progress: bool = True) -> list[dict]:
    """Run (or resume) the main job into `out`; returns the records (plots/report: cli `_finish`)."""
    from .models import load_model, train_length

    lengths = sorted(lengths)
    protocol = Protocol("fixed-target", window=lengths[-1], targets=targets, data="stdlib", short="skip")
    protocol.check_lengths(lengths)
    print(f"loading model {model!r} ...", file=sys.stderr)
    net, tokenizer, model_id = load_model(model)
    methods = methods or default_methods(train_length(net), lengths[-1])
    print(f"methods: {', '.join(methods)}\nlengths: {lengths}, K={targets}; estimated "
          f"{budget_seconds(lengths, len(methods)) / 60:.0f} min on 2 CPU cores (SDPA timings; "
          "relative methods may take longer)", file=sys.stderr)
    return perplexity(net, tokenizer, "stdlib", methods, lengths, protocol=protocol, out=out, model_id=model_id,
                      progress=progress)
