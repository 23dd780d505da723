"""Float64 reference maps for the chunked, shifted and masked methods: `dca`, `string`,
`lm-infinite` and `sinks`. For every (query, key) pair a map says whether the key is
visible and at which positions RoPE rotates the query and the key. This module is the
oracle the attention kernels are tested against; it builds T×S tensors and is not a kernel.

Sources (what each map follows; the choices where paper and code differ are stated per
function):

- **dca**: An, Huang, Zhang, Gong, Qiu, Zhou, Kong 2024, "Training-Free Long-Context Scaling
  of Large Language Models" (ICML 2024, arXiv 2402.17463); code github.com/HKUNLP/ChunkLlama,
  `chunkllama_attn_replace.py` (prefill loop and its `has_kv_cache` decoding branch).
- **string**: An, Zhang, Zhong, Li, Gong, Luo, Xu, Kong 2024, "Why Does the Effective Context
  Length of LLMs Fall Short?" (arXiv 2410.18745); code github.com/HKUNLP/STRING,
  `string_for_llama.py`, `string_for_qwen2.py`, README.
- **lm-infinite**: Han, Wang, Xiong, Chen, Ji, Wang 2023, "LM-Infinite: Simple On-the-Fly
  Length Generalization for Large Language Models" (arXiv 2308.16137); code
  github.com/Glaciohound/LM-Infinite, `models/lambda_attention.py`, `models/llama.py`, README.
- **sinks**: Xiao, Tian, Chen, Han, Lewis 2023, "Efficient Streaming Language Models with
  Attention Sinks" (arXiv 2309.17453); code github.com/mit-han-lab/streaming-llm,
  `streaming_llm/kv_cache.py` (StartRecentKVCache), `pos_shift/modify_llama.py`,
  `examples/eval_long_ppl.py`.

Positions: `query_positions` (T,) and `key_positions` (S,) are positions in the text
(0 = first real token). Every map is causal (j ≤ i) and depends on (i, j) only, never on
the sequence length, so every method here is prefix-consistent. All four keep the model's
frequencies (`freq_divisor` 1); STRING multiplies cos and sin by an attention factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .position_checks import check_params
from .rotary import apply_rotary, cos_sin

__all__ = [
    "MAPS",
    "PairMap",
    "STRING_ATTENTION_FACTOR",
    "dca_map",
    "default_params",
    "lm_infinite_map",
    "pair_map",
    "reduces_to_rope",
    "reference_attention",
    "rope_map",
    "sinks_map",
    "string_map",
]

F64 = torch.float64

# STRING's authors multiply cos and sin by YaRN's factor at s = 2 (string_for_llama.py:
# "STRING will make the attention map smooth, we use the attention_factor to recover it").
STRING_ATTENTION_FACTOR = 0.1 * math.log(2) + 1


@dataclass(frozen=True)
class PairMap:
    """What a method does to each (query i, key j) pair, as (T, S) tensors.

    The logit of a visible pair is ⟨R(query_position)·q_i, R(key_position)·k_j⟩ with the
    frequencies θ/freq_divisor and cos, sin multiplied by attention_factor; it depends only
    on `distance` = (query_position - key_position)/freq_divisor, in units of θ.
    """

    visible: torch.Tensor  # (T, S) bool
    query_position: torch.Tensor  # (T, S) float64
    key_position: torch.Tensor  # (T, S) float64
    freq_divisor: float = 1.0
    attention_factor: float = 1.0

    @property
    def distance(self) -> torch.Tensor:
        """r' for every pair, float64; NaN where the key is not visible."""
        r = (self.query_position - self.key_position) / self.freq_divisor
        return r.masked_fill(~self.visible, math.nan)


def _grid(query_positions, key_positions):
    i = torch.as_tensor(query_positions, dtype=torch.int64)[:, None]
    j = torch.as_tensor(key_positions, dtype=torch.int64)[None, :]
    i, j = torch.broadcast_tensors(i, j)
    return i, j


def _f64(*xs):
    return tuple(x.to(F64) for x in xs)


def rope_map(query_positions, key_positions) -> PairMap:
    """Plain causal RoPE: q at i, k at j."""
    i, j = _grid(query_positions, key_positions)
    qp, kp = _f64(i, j)
    return PairMap(j <= i, qp, kp)


def dca_map(query_positions, key_positions, *, chunk_size: int, local_window: int) -> PairMap:
    """Dual Chunk Attention in ChunkLlama's parametrisation.

    The text is cut into chunks of `stride = chunk_size - local_window` tokens (ChunkLlama's
    `chunk_len`); every key is rotated at its position inside its chunk, `j mod stride`.
    For query i in chunk n = ⌊i/stride⌋ at offset t = i mod stride:

    - intra-chunk (key in chunk n): q at t, so r' = i - j;
    - successive-chunk (key in chunk n-1): q at min(t + stride, chunk_size), so r' = i - j
      while t ≤ local_window, then chunk_size - (j mod stride);
    - inter-chunk (key in chunks ≤ n-2): q at min(2·stride - 1, chunk_size) (= chunk_size
      under the rule 2·local_window < chunk_size), so r' = chunk_size - (j mod stride).

    Every key is visible (j ≤ i); the largest distance used is chunk_size, and positions up
    to chunk_size see plain RoPE. Paper ↔ code: the paper's chunk size s is the stride, its
    pretraining window c satisfies c - 1 = chunk_size, and its local window w (query
    offsets that keep true distances to the previous chunk) is local_window + 1; the paper's
    Figure 2 (s = 6, c = 10, w = 4) is chunk_size = 9, local_window = 3 here. Defaults are
    the code's, chunk_size = 3L/4 and local_window = L/8 (`replace_with_chunkllama`; an
    earlier revision used L/16). The later code's `mscale` (0.05·ln(l/L) + 1 on cos and sin,
    set from the longest sequence seen) is not part of the map: its comment says the paper's
    results did not use it. Chunks start at text position 0 (ChunkLlama takes
    `position_ids % chunk_len`).
    """
    stride = chunk_size - local_window
    i, j = _grid(query_positions, key_positions)
    ci, cj = torch.div(i, stride, rounding_mode="floor"), torch.div(j, stride, rounding_mode="floor")
    t = i - ci * stride
    q_intra = t
    q_succ = torch.clamp(t + stride, max=chunk_size)
    q_inter = torch.full_like(i, min(2 * stride - 1, chunk_size))
    gap = ci - cj
    qp = torch.where(gap == 0, q_intra, torch.where(gap == 1, q_succ, q_inter))
    kp = j - cj * stride
    return PairMap(j <= i, *_f64(qp, kp))


def string_map(query_positions, key_positions, *, shift: int, local_window: int,
               attention_factor: float = STRING_ATTENTION_FACTOR) -> PairMap:
    """STRING (shifted RoPE): r' = r for r < shift, else r - shift + local_window.

    Near part r < S: q at i, k at j. Shifted part r ≥ S: q at i - S + W, k at j (the code
    moves the query, `position_ids - diag_size + local_window`). Every key is visible.
    Choice where the authors' code differs from itself: its flash prefill gives the key at
    r = S to both parts (a window of `diag_size` is inclusive and the shifted triangle starts
    at r = S), its decoding branch to the shifted part only; this map follows decoding, so
    each key is counted once. Defaults: S = ⌊0.33·L⌋ and W = 128 (README, with L the
    model's `max_position_embeddings`; the RULER scripts take 0.33 × the test length, which
    equals it at L; W = 512 in the Qwen2 script), attention factor 0.1·ln 2 + 1 on cos and
    sin in every part (string_for_llama.py, string_for_qwen2.py).
    """
    i, j = _grid(query_positions, key_positions)
    near = (i - j) < shift
    qp = torch.where(near, i, i - shift + local_window)
    return PairMap(j <= i, *_f64(qp, j), attention_factor=float(attention_factor))


def lm_infinite_map(query_positions, key_positions, *, n_global: int, n_local: int) -> PairMap:
    """LM-Infinite's Λ-shaped attention with its distance limit.

    Visible: j ≤ i and (i - j < n_local or j < n_global). Local branch (r < n_local): q at
    i, k at j. Global branch (the first n_global keys at r ≥ n_local): key unrotated (at 0),
    query at n_local, so r' = n_local = min(r, n_local). This is `lambda_attention.py` with
    `limit_distance = local_branch`, as `convert_llama_model` sets it and as the README's
    runs use (4096/4096 on Llama-2, 2048/2048 on LLaMA); a separate limit is not offered,
    because with limit ≠ n_local the code's stationary query sits at min(limit, l - 1) (l the
    current length) and its prefill and decoding differ. Defaults: n_local = L, n_global =
    10 (README's drop-in `convert_llama_model(model, 4096, 10)`; its perplexity runs use
    100 and it says 10-100 behave alike).
    """
    i, j = _grid(query_positions, key_positions)
    local = (i - j) < n_local
    visible = (j <= i) & (local | (j < n_global))
    qp = torch.where(local, i, torch.full_like(i, n_local))
    kp = torch.where(local, j, torch.zeros_like(j))
    return PairMap(visible, *_f64(qp, kp))


def sinks_map(query_positions, key_positions, *, sinks: int, window: int) -> PairMap:
    """StreamingLLM: attention sinks plus a recent window, at positions within the cache.

    The authors' perplexity loop (eval_long_ppl.py) feeds one token at a time and, after
    each step, cuts the cache to its first `sinks` and last `window` entries once it holds
    more than C = sinks + window (StartRecentKVCache). Query i therefore sees j ≤ i with
    j < sinks or i - j ≤ window (the window previous tokens and itself). With position
    shifting (pos_shift/modify_llama.py) keys are rotated at their slot in the cache and the
    query at the next slot, min(i, C): a sink j sits at j, a recent key at j - i + min(i, C),
    so recent keys keep r' = i - j and sinks get r' = min(i, C) - j ≤ C. Positions up to C
    see plain RoPE. Defaults: 4 sinks (paper; `run_streaming_llama.py`) and a window of
    2000 (`run_streaming_llama.py`), capped at L - sinks: the README's FAQ keeps the cache
    within the pretraining window.
    """
    i, j = _grid(query_positions, key_positions)
    cache = sinks + window
    recent = (i - j) <= window
    visible = (j <= i) & (recent | (j < sinks))
    q_slot = torch.clamp(i, max=cache)
    kp = torch.where(recent, j - i + q_slot, j)
    return PairMap(visible, *_f64(q_slot, kp))


MAPS = {"rope": rope_map, "dca": dca_map, "string": string_map, "lm-infinite": lm_infinite_map,
        "sinks": sinks_map}


def default_params(name: str, train_length: int) -> dict:
    """The authors' defaults for a model trained at `train_length` tokens (see each map)."""
    L = train_length
    if name == "dca":
        return {"chunk_size": 3 * L // 4, "local_window": L // 8}
    if name == "string":
        shift = int(0.33 * L)
        return {"shift": shift, "local_window": min(128, shift), "attention_factor": STRING_ATTENTION_FACTOR}
    if name == "lm-infinite":
        return {"n_global": 10, "n_local": L}
    if name == "sinks":
        return {"sinks": 4, "window": min(2000, L - 4)}
    if name == "rope":
        return {}
    raise ValueError(f"name={name!r}: must be one of {sorted(MAPS)}")


def pair_map(name: str, query_positions, key_positions, params: dict, train_length: int | None = None) -> PairMap:
    """The map of method `name` with `params` (validated first, see position_checks.py)."""
    if name not in MAPS:
        raise ValueError(f"name={name!r}: must be one of {sorted(MAPS)}")
    check_params(name, params, train_length)
    return MAPS[name](query_positions, key_positions, **params)


def reduces_to_rope(name: str, params: dict, max_position: int) -> bool:
    """True when every pair among positions 0 … max_position gets plain causal RoPE
    (attention factor aside): the parameters reach past the sequence."""
    p = params
    if name == "rope":
        return True
    if name == "dca":
        # Chunk 0 is exact; chunk 1's queries keep true distances up to offset local_window,
        # i.e. position chunk_size; chunk 2 starts at 2·stride > chunk_size.
        return max_position <= p["chunk_size"]
    if name == "string":
        return max_position < p["shift"] or p["local_window"] == p["shift"]
    if name == "lm-infinite":
        # The one pair at r = n_local, (n_local, 0), keeps its true distance when key 0 is global.
        return max_position < p["n_local"] or (max_position == p["n_local"] and p["n_global"] >= 1)
    if name == "sinks":
        return max_position <= p["sinks"] + p["window"]
    raise ValueError(f"name={name!r}: must be one of {sorted(MAPS)}")


def reference_attention(q, k, v, method_name: str, params: dict, inv_freq, *, attention_factor: float = 1.0,
                        layout: str = "half", position_offset=None, key_padding_mask=None, sliding_window=None,
                        scale=None, softcap=None) -> torch.Tensor:
    """Brute-force float64 attention under a pair map; FOR TESTS ONLY (builds B·H·T·S·D).

    q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), unrotated; H a multiple of Hkv
    (grouped queries share key head h // (H/Hkv)). Keys sit at text positions
    arange(S) + position_offset[b] (negative for left padding) and the T queries are the
    last T keys. `attention_factor` (the frequency method's) multiplies cos and sin together
    with the map's own; only the first 2·len(inv_freq) dimensions rotate. Then scale
    (default D^-½), optional soft-cap c·tanh(x/c), the map's visibility, a sliding window on
    the text distance (r < sliding_window) and key padding (True = real) hide keys. Rows
    with no visible key come out 0.
    """
    if method_name not in MAPS:
        raise ValueError(f"method_name={method_name!r}: must be one of {sorted(MAPS)}")
    check_params(method_name, params)
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    B, H, T, D = q.shape
    S = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], 1)
    v = v.repeat_interleave(H // v.shape[1], 1)
    offsets = torch.as_tensor(0 if position_offset is None else position_offset).expand(B)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=F64)
    for b in range(B):
        kpos = torch.arange(S) + int(offsets[b])
        qpos = kpos[S - T:]
        m = MAPS[method_name](qpos, kpos, **params)
        freq = torch.as_tensor(inv_freq, dtype=F64) / m.freq_divisor
        factor = attention_factor * m.attention_factor

        def rot(x, pos):  # x (H, T or 1, S or 1, D) at positions (T, S)
            c, s = cos_sin(pos, freq, factor, layout, F64)
            return apply_rotary(x, c, s, layout)

        qr = rot(q[b][:, :, None, :], m.query_position)  # (H, T, S, D)
        kr = rot(k[b][:, None, :, :], m.key_position)
        logits = (qr * kr).sum(-1) * (D**-0.5 if scale is None else scale)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        hide = ~m.visible
        if sliding_window is not None:
            hide = hide | ((qpos[:, None] - kpos[None, :]) >= sliding_window)
        if key_padding_mask is not None:
            hide = hide | ~key_padding_mask[b][None, :]
        probs = torch.softmax(logits.masked_fill(hide, -math.inf), -1).nan_to_num(0.0)
        out[b] = probs @ v[b]
    return out
