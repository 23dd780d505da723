"""Exact attention for RoPE and the relative-position methods, from unrotated q and k.

ReRoPE and Leaky ReRoPE (Su, "Transformer升级之路 12/13", kexue.fm/archives/9708 and 9728;
code: github.com/bojone/rerope) and SelfExtend (Jin et al. 2024, "LLM Maybe LongLM",
arXiv 2401.01325; code: github.com/datamllab/LongLM) give a key at distance r = i - j
ordinary RoPE inside a window (r < w) and a remapped position outside it. No single
rotation of q and k produces both, so the logits come from two rotations, the parts of a
plan (rope/kernels/plan.py):

* near part, r < w: q rotated at i, k rotated at j (a band of width w);
* far part, r ≥ w: q rotated at `far_query_position(i)`, k at `far_key_position(j)`, with
  the frequencies divided by `far_freq_divisor` (a causal triangle shifted by w).

The parts partition the causal triangle, so each is computed with an attention kernel
that also returns the row log-sum-exp, and the results are merged exactly
(rope/kernels/merge.py). Backends, each a module that runs a plan:

* "cpu" (rope/kernels/cpu.py): torch's CPU flash kernel, chunked so no T×S matrix exists;
* "flash-attn" (rope/kernels/flash_attn.py): CUDA, float16/bfloat16, flash-attn ≥ 2.6.1;
* "flex" (rope/kernels/flex.py): torch's FlexAttention, block masks per part; the CUDA
  backend when flash-attn is absent;
* "eager" (rope/kernels/eager.py): explicit logits in blocks; soft-capping on CPU,
  autograd, and devices with no fused backend.

Conventions are the library's: the attention factor multiplies cos and sin (rotary dims
only), log-n multiplies whole query rows, keys sit at absolute positions
`s + position_offset` and the T queries are the last T keys (the KV-cache setting).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from .kernels import cpu, eager, flash_attn, flex
from .kernels.merge import merge_by_lse
from .kernels.plan import Plan, build_plan, rotate_key_forms
from .method import Method

__all__ = ["rotary_attention", "run_plan", "merge_by_lse", "flash_attention_lse", "rotate_key_forms",
           "choose_backend", "BACKENDS"]

flash_attention_lse = cpu.flash_attention_lse

BACKENDS = ("auto", "cpu", "eager", "flash-attn", "flex")
# Backends refused by name, with the reason.
REFUSED = {
    "flash-attn3": "flash-attn 3's flash_attn_interface has another signature and return convention; "
                   "ropelab supports flash-attn 2 (>= 2.6.1)",
}

_warned_slow_path = False


def _warn_slow_path() -> None:
    global _warned_slow_path
    if not _warned_slow_path:
        _warned_slow_path = True
        warnings.warn(
            "rotary_attention: autograd is recording (an input requires grad), so the slow, "
            "differentiable eager path is used and its memory grows as T×S; run inference "
            "under torch.no_grad() or torch.inference_mode() for the fused kernel",
            stacklevel=3,
        )


def choose_backend(plan: Plan, backend: str = "auto") -> str:
    """The backend that runs `plan`: the one asked for, or with "auto" the fastest that can."""
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (plan.query, plan.key, plan.value))
    if backend != "auto":
        return backend
    if recording:
        # The fused kernels' lse carries no gradient, and the merge weights depend on it.
        _warn_slow_path()
        return "eager"
    if flash_attn.usable(plan):
        return "flash-attn"
    if flex.usable(plan):  # CUDA without (a usable) flash-attn
        return "flex"
    return "cpu" if cpu.takes(plan) else "eager"


_RUN = {"cpu": cpu.run, "eager": eager.run, "flash-attn": flash_attn.run, "flex": flex.run}


def run_plan(plan: Plan, backend: str = "auto") -> torch.Tensor:
    """Attention of a plan (kernels/plan.py) by `backend` (one of BACKENDS), (B, H, T, Dv)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
    if plan.query.shape[2] == 0:
        return plan.query.new_zeros(*plan.query.shape[:3], plan.value.shape[-1])
    return _RUN[choose_backend(plan, backend)](plan)


def rotary_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    method: Method,
    inv_freq: torch.Tensor,
    *,
    attention_factor: float = 1.0,
    layout: str = "half",
    position_offset: torch.Tensor | int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    key_forms: Mapping[str, torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention with `method`'s rotary encoding applied inside, exactly.

    query (B, H, T, D) and key (B, Hkv, S, D) are *unrotated*; value is (B, Hkv, S, Dv);
    H % Hkv == 0 (grouped-query heads, kv head h serves query heads h·H/Hkv …). The queries
    are the last T of the S keys: key s sits at position s + position_offset[b] (negative
    under left padding) and query t at key index S - T + t. The first 2·len(inv_freq)
    dims are rotated (`layout` "half" or "interleaved"), the rest pass through; cos and sin
    are multiplied by `attention_factor`. `method.query_scale` (log-n) multiplies query
    rows. With `method.relative` (ReRoPE, Leaky ReRoPE, SelfExtend) distances r ≥ window
    use the far rotation; otherwise this is RoPE attention from a cache of unrotated keys.

    key_padding_mask (B, S), True = real token; keys at distance ≥ `sliding_window` are
    hidden; `scale` defaults to D**-0.5; `softcap` caps logits as Gemma-2 does
    (softcap·tanh(logit/softcap), after scaling). A query that sees no real key gets 0.
    `key_forms`: the keys already rotated, from `rotate_key_forms` over all S keys (a
    decoding step then rotates only its queries). `backend`: one of BACKENDS.

    Returns (B, H, T, Dv) in query.dtype. No T×S matrix is formed: extra memory is a few
    rotated copies of q and k plus O(block × S) per block (measured: 3× plain SDPA's peak
    at 16k tokens). Soft-capping on CPU, other non-CPU tensors without a fused backend and
    autograd take the exact eager backend, slower; inference should run under
    torch.no_grad() / torch.inference_mode().
    """
    if backend in REFUSED:
        raise ValueError(f"backend={backend!r}: not supported ({REFUSED[backend]}); use one of {BACKENDS}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
    plan = build_plan(query, key, value, method, inv_freq, attention_factor=attention_factor, layout=layout,
                      position_offset=position_offset, key_padding_mask=key_padding_mask,
                      sliding_window=sliding_window, scale=scale, softcap=softcap, key_forms=key_forms)
    return run_plan(plan, backend)
