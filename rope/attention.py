"""Exact attention for RoPE and the relative-position methods, from unrotated q and k.

ReRoPE and Leaky ReRoPE (Su, "Transformer升级之路 12/13", kexue.fm/archives/9708 and 9728;
code: github.com/bojone/rerope) and SelfExtend (Jin et al. 2024, "LLM Maybe LongLM",
arXiv 2401.01325; code: github.com/datamllab/LongLM) give a key at distance r = i - j
ordinary RoPE inside a window (r < w) and a remapped position outside it. No single
rotation of q and k produces both, so the logits come from two rotations:

* near part, r < w: q rotated at i, k rotated at j (a band of width w);
* far part, r ≥ w: q rotated at `far_query_position(i)`, k at `far_key_position(j)`, with
  the frequencies divided by `far_freq_divisor` (a causal triangle shifted by w).

The two parts partition the causal triangle, so each is computed with an attention kernel
that also returns the row log-sum-exp (torch's CPU flash kernel) and the two results are
merged exactly: out = (e^lse1·o1 + e^lse2·o2) / (e^lse1 + e^lse2). A prefill therefore
scores as many (query, key) pairs as plain causal attention and never holds a T×S matrix:
the far part is one causal call on q[w:] against k[:S-w], the band is computed in query
blocks with one small mask per block (the same mask for every interior block). Decoding
touches only the last w keys with the near rotation; ReRoPE's far keys are used unrotated.

Gemma-2 logit soft-capping cannot be expressed to the flash kernel (it caps each logit
before the softmax), and the kernel is CPU-only, so soft-capping and non-CPU tensors take
an eager path that is exact and still works in query blocks (memory O(S·block)).

Conventions are shared/docs/methods.md's: the attention factor multiplies cos and sin
(rotary dims only), log-n multiplies whole query rows, keys sit at absolute positions
`s + position_offset` and the T queries are the last T keys (the KV-cache setting).
"""

from __future__ import annotations

import math

import torch

from .method import Method, RelativeMap
from .rotary import LAYOUTS, apply_rotary, cos_sin

__all__ = ["rotary_attention", "merge_by_lse", "flash_attention_lse"]

_NEG_INF = float("-inf")

# Query rows per band block. The band kernel scores rows × (rows + width) pairs for
# rows × width useful ones, so a smaller block wastes less; a larger one pays the per-call
# and per-mask overhead less often. Chosen by timing at 4k-16k tokens (2 CPU threads).
_BAND_BLOCK_MIN, _BAND_BLOCK_MAX = 128, 512
# The eager (soft-capping) path materialises rows × keys × heads logits per block; this
# caps that at about 32 MB in float32.
_EAGER_BUDGET = 1 << 23


def _err(field: str, value, rule: str) -> ValueError:
    return ValueError(f"{field}={value!r}: {rule}")


# --------------------------------------------------------------------------------------
# kernels and merging
# --------------------------------------------------------------------------------------


def flash_attention_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its row log-sum-exp: (out (B, H, T, D), lse (B, H, T) float32).

    Torch's CPU flash kernel; `is_causal` is top-left aligned (query t sees keys ≤ t);
    `attn_mask` is additive, broadcastable to (B, H, T, S). Rows with no visible key get
    out 0 and lse -inf (the kernel itself reports lse 0 for rows its mask hides entirely,
    which would weigh them as e^0 in a merge; callers that mask whole rows must set -inf).
    Grouped-query heads (H a multiple of Hkv) are passed through: the kernel handles them.
    """
    B, H, T, D = query.shape
    S = key.shape[2]
    if T == 0 or S == 0:
        # The kernel crashes the process (SIGFPE) on empty inputs.
        out = query.new_zeros(B, H, T, value.shape[-1])
        return out, torch.full((B, H, T), _NEG_INF, dtype=torch.float32, device=query.device)
    if attn_mask is not None and attn_mask.dtype != query.dtype:
        attn_mask = attn_mask.to(query.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out, lse


def merge_by_lse(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each.

    out (..., T, D), lse (..., T) with -inf for an empty key set. Returns (out, lse) with
    out = (e^lse1·out1 + e^lse2·out2)/(e^lse1 + e^lse2), computed against the row maximum
    so nothing overflows; rows empty in both parts come out 0 with lse -inf.
    """
    out = out1.clone(memory_format=torch.preserve_format)
    lse = _merge_into(out, lse1, out2, lse2)
    return out, lse


def _merge_weights(lse1: torch.Tensor, lse2: torch.Tensor):
    top = torch.maximum(lse1, lse2)
    # A row empty in both parts has top = -inf; -inf - -inf would be NaN.
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    e1, e2 = torch.exp(lse1 - top), torch.exp(lse2 - top)
    total = e1 + e2
    lse = top + torch.log(total)
    total = torch.where(total == 0, torch.ones_like(total), total)
    return e1 / total, e2 / total, lse


def _merge_into(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """merge_by_lse writing the merged rows into out1 (saves a pass and a T×D buffer)."""
    w1, w2, lse = _merge_weights(lse1.float(), lse2.float())
    if out1.dtype in (torch.float32, torch.float64):
        out1.mul_(w1.unsqueeze(-1).to(out1.dtype)).addcmul_(out2, w2.unsqueeze(-1).to(out1.dtype))
    else:  # half types: weight and add in float32, round once
        out1.copy_(out1.float() * w1.unsqueeze(-1) + out2.float() * w2.unsqueeze(-1))
    return lse


# --------------------------------------------------------------------------------------
# one part: queries against the keys at distance lo ≤ i - j < hi
# --------------------------------------------------------------------------------------


class _Keys:
    """Key-side context for one part: rotated keys/values covering key indices
    [first, first + n), and the key padding as an additive mask and as a running count
    (the count finds rows whose visible keys are all padding, where the kernel's lse is 0)."""

    def __init__(self, k, v, first, pad_add, pad_cum):
        self.k, self.v, self.first = k, v, first
        self.pad_add = pad_add  # (B, 1, 1, S_total) additive, global key index, or None
        self.pad_cum = pad_cum  # (B, S_total + 1) int64 cumulative count of real keys, or None

    def slice(self, j0: int, j1: int):
        """Keys with global indices [j0, j1)."""
        a, b = j0 - self.first, j1 - self.first
        return self.k[:, :, a:b], self.v[:, :, a:b]

    def pad(self, j0: int, j1: int):
        return None if self.pad_add is None else self.pad_add[..., j0:j1]


def _combine(band: torch.Tensor | None, pad: torch.Tensor | None) -> torch.Tensor | None:
    if band is None:
        return pad
    if pad is None:
        return band
    return band + pad  # (B, 1, rows, keys): one block's worth only


def _fix_empty_rows(lse, keys: _Keys, rows_i: torch.Tensor, lo: int, hi: int | None, j0: int, j1: int):
    """Set lse = -inf where a row of a call over keys [j0, j1) sees only padding."""
    if keys.pad_cum is None:
        return
    lo_j = rows_i - (hi - 1) if hi is not None else torch.zeros_like(rows_i)
    lo_j = lo_j.clamp(min=j0)
    hi_j = (rows_i - lo).clamp(max=j1 - 1)
    count = keys.pad_cum[:, (hi_j + 1).clamp(min=0)] - keys.pad_cum[:, lo_j.clamp(max=keys.pad_cum.shape[1] - 1)]
    empty = (count <= 0) | (hi_j < lo_j)  # (B, rows)
    if bool(empty.any()):
        lse.masked_fill_(empty[:, None, :], _NEG_INF)


def _causal_from(q, keys: _Keys, q_first: int, lo: int, scale: float, small: int):
    """Rows i = q_first + t (all ≥ lo) against keys j ∈ [0, i - lo]: a causal triangle
    whose diagonal starts at key c = q_first - lo, i.e. a rectangle [0, c) that every row
    sees plus a top-left-aligned triangle [c, c + n)."""
    n = q.shape[2]
    c = q_first - lo
    rows_i = torch.arange(q_first, q_first + n, device=q.device)
    if n == 1 or c == 0:
        k, v = keys.slice(0, c + n)
        out, lse = flash_attention_lse(q, k, v, is_causal=n > 1, attn_mask=keys.pad(0, c + n), scale=scale)
        _fix_empty_rows(lse, keys, rows_i, lo, None, 0, c + n)
        return out, lse
    if n <= small:
        # Few rows (decoding a handful of tokens): one call with an n × (c + n) mask.
        u = torch.arange(c + n, device=q.device)
        hide = u[None, :] > (c + torch.arange(n, device=q.device))[:, None]
        mask = torch.zeros(n, c + n, dtype=q.dtype, device=q.device).masked_fill_(hide, _NEG_INF)
        k, v = keys.slice(0, c + n)
        out, lse = flash_attention_lse(q, k, v, attn_mask=_combine(mask, keys.pad(0, c + n)), scale=scale)
        _fix_empty_rows(lse, keys, rows_i, lo, None, 0, c + n)
        return out, lse
    k, v = keys.slice(0, c)
    out, lse = flash_attention_lse(q, k, v, attn_mask=keys.pad(0, c), scale=scale)
    _fix_empty_rows(lse, keys, rows_i, lo, None, 0, c)
    k, v = keys.slice(c, c + n)
    out2, lse2 = flash_attention_lse(q, k, v, is_causal=True, attn_mask=keys.pad(c, c + n), scale=scale)
    _fix_empty_rows(lse2, keys, rows_i, lo, None, c, c + n)
    lse = _merge_into(out, lse, out2, lse2)
    return out, lse


def _band_mask(rows: int, nk: int, offset: int, lo: int, hi: int, dtype, device) -> torch.Tensor:
    """Additive mask for rows i = i0 + t and keys j = i0 - offset + u: 0 where lo ≤ i - j < hi."""
    r = torch.arange(rows, device=device)[:, None] - torch.arange(nk, device=device)[None, :] + offset
    hide = (r < lo) | (r >= hi)
    return torch.zeros(rows, nk, dtype=dtype, device=device).masked_fill_(hide, _NEG_INF)


def _band_block_size(width: int) -> int:
    return int(min(_BAND_BLOCK_MAX, max(_BAND_BLOCK_MIN, 64 * round(width / 8 / 64))))


def _attend_part(q, keys: _Keys, q_first: int, lo: int, hi: int | None, scale: float):
    """Attention of rows i = q_first + t (every row has i ≥ lo) over keys lo ≤ i - j < hi.

    Returns (out (B, H, n, D), lse (B, H, n)). Rows with i < hi see every key down to 0
    and are one causal computation; the rest are band blocks with a per-block mask.
    """
    B, H, n, _ = q.shape
    Dv = keys.v.shape[-1]
    if hi is not None and hi > q_first + n - 1:
        hi = None  # the lower edge of the band is below key 0 for every row
    width = hi - lo if hi is not None else None
    block = _band_block_size(width) if width is not None else 0
    n_tri = n if hi is None else max(0, min(n, hi - q_first))
    if n_tri == n:
        return _causal_from(q, keys, q_first, lo, scale, small=_BAND_BLOCK_MAX)

    out = torch.empty(B, n, H, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, n, dtype=torch.float32, device=q.device)
    if n_tri:
        o, l = _causal_from(q[:, :, :n_tri], keys, q_first, lo, scale, small=_BAND_BLOCK_MAX)
        out[:, :, :n_tri].copy_(o)
        lse[:, :, :n_tri].copy_(l)
    masks: dict[tuple[int, int], torch.Tensor] = {}
    for t0 in range(n_tri, n, block):
        t1 = min(n, t0 + block)
        i0, i1 = q_first + t0, q_first + t1  # rows [i0, i1)
        j0, j1 = i0 - hi + 1, i1 - lo  # keys [j0, j1); j0 ≥ 1 > 0 since i0 ≥ hi
        shape = (t1 - t0, j1 - j0)
        if shape not in masks:  # every full interior block has the same band
            masks[shape] = _band_mask(shape[0], shape[1], i0 - j0, lo, hi, q.dtype, q.device)
        k, v = keys.slice(j0, j1)
        o, l = flash_attention_lse(
            q[:, :, t0:t1], k, v, attn_mask=_combine(masks[shape], keys.pad(j0, j1)), scale=scale
        )
        _fix_empty_rows(l, keys, torch.arange(i0, i1, device=q.device), lo, hi, j0, j1)
        out[:, :, t0:t1].copy_(o)
        lse[:, :, t0:t1].copy_(l)
    return out, lse


# --------------------------------------------------------------------------------------
# rotation helpers
# --------------------------------------------------------------------------------------


def _rotate(x, positions, inv_freq, factor, layout, dtype, row_scale=None):
    """x (B, H, n, D) rotated at positions (B, n) with `inv_freq`; cos and sin times `factor`
    and, when given, the whole row times `row_scale` (B, n) (log-n)."""
    cos, sin = cos_sin(positions, inv_freq, 1.0, layout, torch.float64)
    scale = torch.full_like(cos[..., :1], factor)
    if row_scale is not None:
        scale = scale * row_scale.to(torch.float64)[..., None]
    cos, sin = (cos * scale).to(dtype)[:, None], (sin * scale).to(dtype)[:, None]
    y = apply_rotary(x, cos, sin, layout)
    rotary_dim = cos.shape[-1]
    if row_scale is not None and rotary_dim < x.shape[-1]:
        y[..., rotary_dim:] *= row_scale.to(dtype)[:, None, :, None]
    return y


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(query, key, value, method, inv_freq, attention_factor, layout, position_offset,
              key_padding_mask, sliding_window, scale, softcap):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise _err(name, type(t).__name__, "must be a torch.Tensor")
        if t.dim() != 4:
            raise _err(f"{name}.shape", tuple(t.shape), "must be 4-D (batch, heads, length, head_dim)")
        if not t.is_floating_point():
            raise _err(f"{name}.dtype", t.dtype, "must be a floating-point dtype")
    B, H, T, D = query.shape
    Bk, Hkv, S, Dk = key.shape
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise _err("key.dtype/value.dtype", (key.dtype, value.dtype), f"must equal query.dtype={query.dtype}")
    if key.device != query.device or value.device != query.device:
        raise _err("key.device/value.device", (str(key.device), str(value.device)), f"must equal query.device={query.device}")
    if Bk != B or value.shape[0] != B:
        raise _err("key.shape[0]/value.shape[0]", (Bk, value.shape[0]), f"batch must equal query.shape[0]={B}")
    if Dk != D:
        raise _err("key.shape[3]", Dk, f"head_dim must equal query.shape[3]={D}")
    if tuple(value.shape[1:3]) != (Hkv, S):
        raise _err("value.shape", tuple(value.shape), f"heads and length must match key.shape={tuple(key.shape)}")
    if Hkv == 0 or H % Hkv:
        raise _err("key.shape[1]", Hkv, f"query heads H={H} must be a multiple of the key/value heads")
    if T > S:
        raise _err("query.shape[2]", T, f"must be <= key length S={S} (queries are the last T keys)")
    if not isinstance(method, Method):
        raise _err("method", method, "must be a ropelab method (ropelab.get_method(...))")
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or inv_freq.numel() == 0:
        raise _err("inv_freq", getattr(inv_freq, "shape", inv_freq), "must be a non-empty 1-D tensor (rotary_dim/2,)")
    if 2 * inv_freq.numel() > D:
        raise _err("inv_freq.shape", tuple(inv_freq.shape), f"rotary_dim = 2*{inv_freq.numel()} exceeds head_dim={D}")
    if not _is_number(attention_factor) or not math.isfinite(attention_factor) or attention_factor <= 0:
        raise _err("attention_factor", attention_factor, "must be a finite number > 0")
    if layout not in LAYOUTS:
        raise _err("layout", layout, f"must be one of {LAYOUTS}")
    if position_offset is None:
        offsets = torch.zeros(B, dtype=torch.int64, device=query.device)
    elif isinstance(position_offset, int) and not isinstance(position_offset, bool):
        offsets = torch.full((B,), position_offset, dtype=torch.int64, device=query.device)
    elif isinstance(position_offset, torch.Tensor):
        if position_offset.dtype.is_floating_point or position_offset.dtype == torch.bool or position_offset.is_complex():
            raise _err("position_offset.dtype", position_offset.dtype, "must be an integer dtype")
        if position_offset.dim() == 0:
            position_offset = position_offset.expand(B)
        if tuple(position_offset.shape) != (B,):
            raise _err("position_offset.shape", tuple(position_offset.shape), f"must be ({B},) (one offset per sequence)")
        offsets = position_offset.to(device=query.device, dtype=torch.int64)
    else:
        raise _err("position_offset", position_offset, "must be None, an int or a (B,) integer tensor")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise _err("key_padding_mask", getattr(key_padding_mask, "dtype", key_padding_mask), "must be a bool tensor (True = real token)")
        if tuple(key_padding_mask.shape) != (B, S):
            raise _err("key_padding_mask.shape", tuple(key_padding_mask.shape), f"must be (B, S) = ({B}, {S})")
    if sliding_window is not None and (not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 1):
        raise _err("sliding_window", sliding_window, "must be None or an integer >= 1")
    if scale is not None and (not _is_number(scale) or not math.isfinite(scale) or scale <= 0):
        raise _err("scale", scale, "must be None or a finite number > 0")
    if softcap is not None and (not _is_number(softcap) or not math.isfinite(softcap) or softcap <= 0):
        raise _err("softcap", softcap, "must be None or a finite number > 0")
    return offsets


# --------------------------------------------------------------------------------------
# the public kernel
# --------------------------------------------------------------------------------------


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

    Returns (B, H, T, Dv) in query.dtype. Memory beyond the inputs and output is O(S) per
    query block; no T×S matrix is formed.
    """
    offsets = _validate(query, key, value, method, inv_freq, attention_factor, layout, position_offset,
                        key_padding_mask, sliding_window, scale, softcap)
    B, H, T, D = query.shape
    Hkv, S, Dv = key.shape[1], key.shape[2], value.shape[-1]
    dtype, device = query.dtype, query.device
    if scale is None:
        scale = D**-0.5
    scale = float(scale)
    if T == 0:
        return query.new_zeros(B, H, 0, Dv)
    inv_freq = inv_freq.to(device=device, dtype=torch.float64)

    rel: RelativeMap | None = method.relative
    sw = sliding_window if sliding_window is not None and sliding_window < S else None
    w = rel.window if rel is not None and rel.window < S else None  # w ≥ S: no far pair exists
    near_hi = min(x for x in (w, sw) if x is not None) if (w or sw) else None
    has_far = w is not None and (sw is None or sw > w)

    q_first = S - T
    key_pos = torch.arange(S, device=device, dtype=torch.int64)[None, :] + offsets[:, None]  # (B, S)
    query_pos = key_pos[:, q_first:]
    row_scale = method.query_scale(query_pos)  # (B, T) float64 or None

    # Near part: only keys within near_hi of some query are rotated (decoding: the last w).
    kn0 = 0 if near_hi is None else max(0, q_first - near_hi + 1)
    q_near = _rotate(query, query_pos, inv_freq, attention_factor, layout, dtype, row_scale)
    k_near = _rotate(key[:, :, kn0:], key_pos[:, kn0:], inv_freq, attention_factor, layout, dtype)

    # Far part: rows with i ≥ w, keys j ≤ S-1-w (and within the sliding window).
    if has_far:
        tf0 = max(0, w - q_first)
        kf0 = 0 if sw is None else max(0, q_first + tf0 - sw + 1)
        kf1 = S - w
        far_freq = inv_freq / rel.far_freq_divisor
        far_kpos = rel.far_key_position(key_pos[:, kf0:kf1])
        if not bool(far_kpos.any()):
            # ReRoPE: every far key sits at position 0, i.e. is not rotated at all, so the
            # cache is used as is and the key's attention factor moves onto the query.
            k_far = key[:, :, kf0:kf1]
            q_factor = attention_factor**2
        else:
            k_far = _rotate(key[:, :, kf0:kf1], far_kpos, far_freq, attention_factor, layout, dtype)
            q_factor = attention_factor
        far_qpos = rel.far_query_position(query_pos[:, tf0:])
        q_far = _rotate(query[:, :, tf0:], far_qpos, far_freq, q_factor,
                        layout, dtype, None if row_scale is None else row_scale[:, tf0:])

    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None

    if softcap is not None or device.type != "cpu":
        return _eager(q_near, k_near, kn0, (q_far, k_far, kf0, tf0) if has_far else None, value, w, sw,
                      key_padding_mask, scale, softcap)

    # The flash kernel needs one head size for q, k and v: pad the shorter side with zeros
    # (zeros add nothing to q·k, and padded value dims are cut off the output).
    width = max(D, Dv)
    v_all = value
    if Dv < width:
        v_all = torch.nn.functional.pad(value, (0, width - Dv))
    if D < width:
        q_near, k_near = (torch.nn.functional.pad(t, (0, width - D)) for t in (q_near, k_near))
        if has_far:
            q_far, k_far = (torch.nn.functional.pad(t, (0, width - D)) for t in (q_far, k_far))

    pad_add = pad_cum = None
    if key_padding_mask is not None:
        pad_add = torch.zeros(B, 1, 1, S, dtype=dtype, device=device).masked_fill_(~key_padding_mask[:, None, None, :], _NEG_INF)
        pad_cum = torch.nn.functional.pad(key_padding_mask.to(torch.int64).cumsum(-1), (1, 0))

    near_keys = _Keys(k_near, v_all[:, :, kn0:], kn0, pad_add, pad_cum)
    out, lse = _attend_part(q_near, near_keys, q_first, 0, near_hi, scale)
    if has_far and tf0 < T:
        far_keys = _Keys(k_far, v_all[:, :, kf0:kf1], kf0, pad_add, pad_cum)
        o_far, l_far = _attend_part(q_far, far_keys, q_first + tf0, w, sw, scale)
        lse_tail = lse[:, :, tf0:]
        _merge_into(out[:, :, tf0:], lse_tail, o_far, l_far)
    else:
        pass
    if width != Dv:
        out = out[..., :Dv]
    return out


# --------------------------------------------------------------------------------------
# eager path: soft-capping, or tensors the CPU kernel cannot take
# --------------------------------------------------------------------------------------


def _eager(q_near, k_near, kn0, far, value, w, sw, key_padding_mask, scale, softcap):
    """Exact attention in query blocks with explicit logits (memory O(block · S · H))."""
    B, H, T, D = q_near.shape
    Hkv, S, Dv = value.shape[1], value.shape[2], value.shape[-1]
    g = H // Hkv
    device = q_near.device
    work = torch.float64 if q_near.dtype == torch.float64 else torch.float32
    q_first = S - T
    out = torch.empty(B, T, H, Dv, dtype=q_near.dtype, device=device).transpose(1, 2)
    span = S if sw is None else min(S, sw)
    block = max(1, min(T, _EAGER_BUDGET // max(1, B * H * span)))
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        rows = t1 - t0
        i0, i1 = q_first + t0, q_first + t1
        j0 = 0 if sw is None else max(0, i0 - sw + 1)
        j1 = i1  # keys j ≤ i
        i = torch.arange(i0, i1, device=device)
        j = torch.arange(j0, j1, device=device)
        r = i[:, None] - j[None, :]  # (rows, nk)
        logits = torch.full((B, Hkv, g, rows, j1 - j0), _NEG_INF, dtype=work, device=device)

        a = j0 if w is None else max(j0, i0 - w + 1)
        qb = q_near[:, :, t0:t1].reshape(B, Hkv, g * rows, D).to(work)
        kb = k_near[:, :, a - kn0 : j1 - kn0].to(work)
        logits[..., a - j0 :] = (qb @ kb.transpose(-1, -2)).view(B, Hkv, g, rows, j1 - a)

        if far is not None:
            q_far, k_far, kf0, tf0 = far
            s0 = max(t0, tf0)  # rows with far keys
            fa, fb = max(j0, kf0), min(j1, i1 - w)
            if s0 < t1 and fb > fa:
                qf = q_far[:, :, s0 - tf0 : t1 - tf0].reshape(B, Hkv, g * (t1 - s0), D).to(work)
                kf = k_far[:, :, fa - kf0 : fb - kf0].to(work)
                lf = (qf @ kf.transpose(-1, -2)).view(B, Hkv, g, t1 - s0, fb - fa)
                region = logits[..., s0 - t0 :, fa - j0 : fb - j0]
                is_far = r[s0 - t0 :, fa - j0 : fb - j0] >= w
                region.copy_(torch.where(is_far, lf, region))

        logits.mul_(scale)
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        hide = r < 0
        if sw is not None:
            hide = hide | (r >= sw)
        hide = hide.expand(B, 1, 1, rows, j1 - j0)
        if key_padding_mask is not None:
            hide = hide | ~key_padding_mask[:, None, None, None, j0:j1]
        logits.masked_fill_(hide, _NEG_INF)
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a row with no real key: 0
        vb = value[:, :, j0:j1].to(work)
        ob = probs.view(B, Hkv, g * rows, j1 - j0) @ vb
        out[:, :, t0:t1].copy_(ob.view(B, H, rows, Dv))
    return out
