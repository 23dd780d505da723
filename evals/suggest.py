"""`ropelab suggest`: a starting setting for every method of the family, from rules alone.

No forward pass and no weights: the rules need only the model's training length L, its
rotary dimension d and RoPE base b, and the target length N. Each suggestion names its
rule and the paper, post or repository it comes from; docs/methods.md, "Defaults from the
sources", gives the evidence behind every rule:

- scaled methods (linear, ntk, ntk-old, beta-base, yarn, llama3): s = N/L, the extension
  ratio of PI (Chen et al. 2023) and YaRN (Peng et al. 2023), rounded up to 2 decimals;
- dynamic-ntk: α = 1, so s_eff = l/L at every length l (emozilla 2023) and N/L at N;
- rerope: w = L/2, the top of Su's L/4 to L/2 (Transformer升级之路 12), with and without
  log-n (his best row);
- leaky-rerope: w = L/4 and k = 16 (bojone/rerope's code default), raised to the smallest k
  with w + (N-1-w)/k ≤ L/2 (Su, Transformer升级之路 13);
- self-extend: W = min(1024, L/4) and the smallest G with (L-W)·G + W ≥ N (datamllab/LongLM
  README, "How to choose the group_size and neighbor_window");
- sinusoidal (XGLM only): NTK base change of the table's frequencies, s = N/L;
- dca, string, lm-infinite, sinks: their authors' settings for L, whatever N
  (`ropelab.position_maps.default_params`).

These are where to start, not tuned values: measure before trusting any of them.

Where the numbers come from (`model_facts`): for an embedded default, the GGUF file's
metadata (transformers reads it without the weights); for a local folder, its
`config.json`. `--train-length`, `--head-dim` and `--base` given together skip the model.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import ropelab
from ropelab.frequencies import yarn_default_attention_factor, yarn_ramp_bounds
from ropelab.position_maps import default_params
from ropelab.spec import parse_int_with_suffix

DEFAULT_MODEL_NAMES = ("smollm2-135m", "gemma3-270m")
MIN_TRAIN_LENGTH = 8  # the window rules split L into quarters and need L/2 - L/4 ≥ 2


class Suggestion(NamedTuple):
    spec: str  # a method spec `ropelab.parse_method` accepts
    rule: str  # how the parameters follow from L, N, d, b
    source: str  # where the rule comes from


class ModelFacts(NamedTuple):
    train_length: int  # L
    head_dim: int  # rotary dimension d (head_dim × partial_rotary_factor)
    base: float  # b (rope_theta; the full-attention layers' where layer types differ)
    origin: str  # where these came from, for the printout


def _check_int(field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}={value!r}: must be an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{field}={value!r}: must be an integer >= {minimum}")


def _validate(train_length, target_length, head_dim, base) -> None:
    _check_int("target_length", target_length, 1)
    _check_int("train_length", train_length, MIN_TRAIN_LENGTH)
    # NTK's exponent d/(d-2) needs d > 2; rotary dimensions come in pairs
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 4 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r}: must be an even integer >= 4")
    ok = isinstance(base, (int, float)) and not isinstance(base, bool) and math.isfinite(base) and base > 1
    if not ok:
        raise ValueError(f"base={base!r}: must be a finite number > 1 (the model's rope_theta)")


def _ratio(target_length: int, train_length: int) -> int | float:
    """s = N/L, at least 1, rounded up to 2 decimals (so s·L covers N); an int when whole."""
    s = max(1.0, math.ceil(target_length / train_length * 100 - 1e-9) / 100)
    return int(s) if s == int(s) else s


def _spec(name: str, **params) -> str:
    return ropelab.get_method(name, **params).spec()


def leaky_scale(train_length: int, target_length: int, window: int) -> int:
    """The smallest k ≥ 16 with w + (N-1-w)/k ≤ L/2 (Su, Transformer升级之路 13)."""
    far = target_length - 1 - window
    room = train_length / 2 - window
    return max(16, math.ceil(far / room - 1e-12)) if far > 0 else 16


def self_extend_group(train_length: int, target_length: int, window: int) -> int:
    """The smallest G with (L - W)·G + W ≥ N (LongLM README); 1 (plain RoPE) when N ≤ L."""
    return max(1, math.ceil((target_length - window) / (train_length - window) - 1e-12))


# Methods with no rule: said so by name, so a new method cannot be silently left out.
NO_RULE = {
    "longrope": "its per-dimension factors come from a per-model evolutionary search (Ding et al. 2024, "
                "LongRoPE); no rule gives them: use the factors a model's config publishes (Phi-3)",
    "inverse-leaky-rerope": "a training-time map (Su, Transformer升级之路 13): a model trained with it runs plain "
                            "RoPE at inference (`ropelab lab train --position inverse-leaky`)",
}


def suggest(train_length: int, target_length: int, head_dim: int, base: float) -> list[Suggestion]:
    """Rule-based settings of every method for a model trained at `train_length` (L) with
    rotary dimension `head_dim` (d) and RoPE base `base` (b), run at `target_length` (N).

    Returns one `Suggestion(spec, rule, source)` per method (two for rerope: with and
    without log-n). Raises ValueError naming the field, the value and the rule.
    """
    _validate(train_length, target_length, head_dim, base)
    L, N, d, b = train_length, target_length, head_dim, float(base)
    s = _ratio(N, L)
    ratio = f"s = N/L = {N}/{L}" + ("" if N / L == s else f" = {N / L:.4g}, rounded up to {s}")
    if N <= L:
        ratio = f"s = 1: N = {N} ≤ L = {L}, so every scaled method is plain RoPE"
    low, high = yarn_ramp_bounds(d, b, L, 32.0, 1.0)
    rerope_w, leaky_w = L // 2, L // 4
    k = leaky_scale(L, N, leaky_w)
    se_w = min(1024, L // 4)
    group = self_extend_group(L, N, se_w)
    group_note = "" if group <= 64 else "; beyond the 2-64 LongLM calls reasonable, measure first"
    beyond = f"beyond L = {L} its loss is expected to explode" if N > L else f"N ≤ L = {L}: nothing to extend"

    return [
        Suggestion("rope", f"the reference, unchanged; {beyond}", "Su et al. 2021, RoFormer (arXiv 2104.09864)"),
        Suggestion(_spec("linear", scale=s), f"{ratio}: every frequency divided by s",
                   "Chen et al. 2023, position interpolation (arXiv 2306.15595)"),
        Suggestion(_spec("ntk", scale=s), f"{ratio}: base b·s^(d/(d-2)) = {b * s ** (d / (d - 2)):.6g}",
                   "bloc97 2023, NTK-aware scaled RoPE (r/LocalLLaMA); YaRN paper eq. 16"),
        Suggestion(_spec("ntk-old", scale=s), f"{ratio}: base b·s = {b * s:.6g}", "Su, Transformer升级之路 10"),
        Suggestion(_spec("beta-base", scale=s), f"{ratio}; β = 0.625, the blog default (Su's patch for LLaMA-2 "
                   "uses s = 12, β = 0.75 with log-n)", "Su, Transformer升级之路 11; bojone/rerope ntk_patch.py"),
        Suggestion(_spec("dynamic-ntk", scale=1), f"α = 1: s_eff = max(1, l/L) at length l, so exactly N/L at "
                   f"N = {N}; larger α trades short-context loss for long", "emozilla 2023, Dynamically Scaled RoPE "
                   "(r/LocalLLaMA); transformers `dynamic`"),
        Suggestion(_spec("yarn", scale=s), f"{ratio}; β_fast = 32, β_slow = 1: pairs below {low} keep θ, above "
                   f"{high} get θ/s (d = {d}, b = {b:g}); attention factor 0.1·ln s + 1 = "
                   f"{yarn_default_attention_factor(s):.4f}", "Peng et al. 2023, YaRN (arXiv 2309.00071)"),
        Suggestion(_spec("llama3", scale=s), f"{ratio}; low_freq_factor 1, high_freq_factor 4 (Meta's own "
                   f"release used factor 8 for 8192 -> 131072, half of N/L)", "Meta, Llama 3.1; transformers `llama3`"),
        Suggestion(_spec("rerope", window=rerope_w), f"w = L/2 = {rerope_w}, the top of Su's L/4 to L/2 (his GAU runs: "
                   "w = 256 at L = 512)", "Su, Transformer升级之路 12; bojone/rerope"),
        Suggestion(_spec("rerope", window=rerope_w, logn=True), f"as above plus log-n, max(1, ln(p+1)/ln L): Su's "
                   "best row (ReRoPE-w256-logn†)", "Su, Transformer升级之路 12"),
        Suggestion(_spec("leaky-rerope", window=leaky_w, scale=k), f"w = L/4 = {leaky_w}; k = 16 (Su's code default) "
                   f"or the smallest k with w + (N-1-w)/k ≤ L/2: {leaky_w} + {max(0, N - 1 - leaky_w)}/{k} = "
                   f"{leaky_w + max(0, N - 1 - leaky_w) / k:.0f} ≤ {L // 2}",
                   "Su, Transformer升级之路 13; bojone/rerope leaky_rerope_patch.py"),
        Suggestion(_spec("self-extend", window=se_w, group=group), f"W = min(1024, L/4) = {se_w} (LongLM: 512-1536 "
                   f"for Llama-2); the smallest G with (L-W)·G + W ≥ N: ({L}-{se_w})·{group} + {se_w} = "
                   f"{(L - se_w) * group + se_w} ≥ {N}; larger G is sometimes better{group_note}",
                   "Jin et al. 2024, SelfExtend (arXiv 2401.01325); datamllab/LongLM README"),
        *_key_range_suggestions(L),
        Suggestion(_spec("sinusoidal", frequency_method=ropelab.get_method("ntk", scale=s)),
                   f"sinusoidal-position models only (XGLM): the NTK base change on the table's frequencies, {ratio}",
                   "Vaswani et al. 2017 (the table); bloc97 2023 (the base change)"),
    ]


# The chunked, shifted and masked methods: their authors' settings for a model trained at L,
# which do not depend on N (ropelab.position_maps.default_params;
# docs/methods.md, "Chunked, shifted and masked methods").
KEY_RANGE_RULES = {
    "dca": ("chunk size 3L/4 and local window L/8, the ChunkLlama defaults; any N",
            "An et al. 2024, Dual Chunk Attention (arXiv 2402.17463); HKUNLP/ChunkLlama"),
    "string": ("shift ⌊0.33·L⌋ and local window min(128, shift), STRING's defaults; any N",
               "An et al. 2024, STRING (arXiv 2410.18745); HKUNLP/STRING"),
    "lm-infinite": ("10 global tokens and a local window of L, LM-Infinite's Λ-shaped mask; any N",
                    "Han et al. 2023, LM-Infinite (arXiv 2308.16137)"),
    "sinks": ("4 sink tokens and a recent window of min(2000, L-4), StreamingLLM's setting; any N",
              "Xiao et al. 2023, StreamingLLM (arXiv 2309.17453)"),
}


def _key_range_suggestions(train_length: int) -> list[Suggestion]:
    out = []
    for name, (rule, source) in KEY_RANGE_RULES.items():
        params = default_params(name, train_length)
        shown = ", ".join(f"{key} = {value:g}" if isinstance(value, float) else f"{key} = {value}"
                          for key, value in params.items())
        out.append(Suggestion(_spec(name, **params), f"{rule}: {shown}", source))
    return out


# -- the model's numbers, without its weights --------------------------------------------


def _rope_parameters(config) -> tuple[dict, str]:
    """(the rope parameters to use, a note): Gemma-3 keeps one set per layer type; the
    full-attention layers are the ones that see the whole context."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        raise ValueError(f"config.rope_parameters={params!r}: expected a dict (transformers 5.x RoPE model)")
    if "rope_theta" in params:
        return params, ""
    nested = {k: v for k, v in params.items() if isinstance(v, dict) and "rope_theta" in v}
    if not nested:
        raise ValueError(f"config.rope_parameters={params!r}: no rope_theta in it")
    chosen = "full_attention" if "full_attention" in nested else sorted(nested)[0]
    bases = ", ".join(f"{k}: {v['rope_theta']:g}" for k, v in sorted(nested.items()))
    return nested[chosen], f"; bases per layer type {bases}, rules use {chosen}'s"


def facts_from_config(config, origin: str) -> ModelFacts:
    """L, d and b from a transformers config (the same reading as ropelab.patches)."""
    from ropelab.patches.architectures import rotary_dim

    config = config.get_text_config()
    params, note = _rope_parameters(config)
    length = (getattr(config, "original_max_position_embeddings", None)
              or params.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None))
    if not length:
        raise ValueError("config.max_position_embeddings=None: the model's training length is unknown")
    return ModelFacts(int(length), rotary_dim(config, params), float(params["rope_theta"]), origin + note)


def model_facts(model: str) -> ModelFacts:
    """L, d and b of 'default', an embedded default model or a local folder, without loading weights."""
    from transformers import AutoConfig

    name = DEFAULT_MODEL_NAMES[0] if model == "default" else model
    if name in DEFAULT_MODEL_NAMES:
        from ropelab.patches.loading import gguf_path

        path = gguf_path(name)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return facts_from_config(config, f"{name}: config from the GGUF metadata, weights not loaded")
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"--model={model!r}: the folder has no config.json (a save_pretrained folder is needed)")
        config = AutoConfig.from_pretrained(model, local_files_only=True, trust_remote_code=False)
        return facts_from_config(config, f"{os.path.abspath(model)}: config.json, weights not loaded")
    raise ValueError(f"--model={model!r}: must be 'default', one of {', '.join(DEFAULT_MODEL_NAMES)}, or a local "
                     "folder written by save_pretrained")


# -- the command ------------------------------------------------------------------------


def _parse_positive(flag: str, text: str) -> int:
    try:
        value = parse_int_with_suffix(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{flag}={text!r}: must be an integer > 0 (forms: 16384, 16k)")
    return value


def cmd_suggest(args) -> int:
    target = _parse_positive("--target-length", args.target_length)  # checked before any model is read
    given = [args.train_length, args.head_dim, args.base]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("--train-length/--head-dim/--base: give all three (to skip the model) or none")
    if all(v is not None for v in given):
        try:
            base = float(args.base)
        except ValueError:
            raise ValueError(f"--base={args.base!r}: must be a finite number > 1") from None
        facts = ModelFacts(_parse_positive("--train-length", args.train_length),
                           _parse_positive("--head-dim", args.head_dim), base, "given on the command line")
    else:
        facts = model_facts(args.model)
    suggestions = suggest(facts.train_length, target, facts.head_dim, facts.base)
    print(f"model: {facts.origin}\nL = {facts.train_length}, d = {facts.head_dim}, b = {facts.base:g}; "
          f"target N = {target} ({target / facts.train_length:.3g} × L)\n"
          "rule-based starting points (docs/methods.md, \"Defaults from the sources\"); measure before trusting them\n")
    for item in suggestions:
        print(f"{item.spec}\n    rule:   {item.rule}\n    source: {item.source}")
    for name, reason in NO_RULE.items():
        print(f"{name}: no suggestion; {reason}")
    return 0


def add_parser(subparsers):
    """Register `ropelab suggest` on an argparse subparsers object; returns the parser."""
    help_text = "rule-based defaults for every method at a target length (no forward pass, no weights loaded)"
    p = subparsers.add_parser("suggest", help=help_text, description=help_text)
    p.add_argument("--model", default="default",
                   help="'default' (smollm2-135m), 'gemma3-270m', or a local save_pretrained folder (config only)")
    p.add_argument("--target-length", required=True, help="the length N to run at, e.g. 16384 or 16k")
    p.add_argument("--train-length", default=None, help="L; with --head-dim and --base, skips reading the model")
    p.add_argument("--head-dim", default=None, help="rotary dimension d (head_dim × partial_rotary_factor)")
    p.add_argument("--base", default=None, help="RoPE base b (rope_theta)")
    p.set_defaults(func=cmd_suggest)
    return p
