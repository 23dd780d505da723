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
scores about as many (query, key) pairs as plain causal attention and never holds a T×S
matrix: the far part is one causal call on q[w:] against k[:S-w]; the band is cut into
query chunks whose keys split into two triangles (one causal as is, one causal once rows
and keys are reversed) and a rectangle, so it needs no mask (masks cost the kernel an
extra pass per score); narrow bands use small per-block masks instead. Padding enters as
a (B, 1, 1, S) additive mask the kernel broadcasts, a sliding window as a second band
edge. Decoding rotates only the w keys of the window; ReRoPE's far keys are used as
cached (position 0 is no rotation), so its far part costs no per-key work.

On CUDA with flash-attn installed (the `cuda` extra) and float16/bfloat16 tensors, the
two parts are two flash-attn calls instead (rope/flash_cuda.py: its bottom-right causal
alignment and `window_size` express each part without a mask). Gemma-2 logit
soft-capping cannot be expressed to the CPU flash kernel (it caps each logit before the
softmax), so soft-capping on CPU, float32 or non-left padding on CUDA, and other devices
take an eager path that is exact and still works in query blocks (memory O(S·block)).

Conventions are shared/docs/methods.md's: the attention factor multiplies cos and sin
(rotary dims only), log-n multiplies whole query rows, keys sit at absolute positions
`s + position_offset` and the T queries are the last T keys (the KV-cache setting).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict

import torch

from . import flash_cuda
from .method import Method, RelativeMap
from .rotary import LAYOUTS, angles

__all__ = ["rotary_attention", "merge_by_lse", "flash_attention_lse"]

_NEG_INF = float("-inf")

# A band at least _CHUNK_MIN_WIDTH wide with at least _CHUNK_MIN_ROWS rows in it is
# computed as unmasked triangles and rectangles (`_band_chunk`), _CHUNK_MAX_ROWS rows at a
# time (768 rows is where the kernel switches to 256-row query tiles; at 8k and 16k
# tokens 768 timed best of 512-4096, and it bounds the temporaries). Narrower bands and
# a few decoding rows take one masked call per _MASKED_BLOCK rows: the masked waste is
# small there, and it is one call instead of three.
_CHUNK_MIN_WIDTH, _CHUNK_MIN_ROWS, _CHUNK_MAX_ROWS = 256, 32, 768
_MASKED_BLOCK = 128
# At most this many rows against a causal edge use one masked call (rows × keys mask);
# more use an unmasked rectangle plus a causal triangle and a merge.
_FEW_ROWS = 64
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
    `attn_mask` is additive, broadcastable to (B, H, T, S), and may be combined with
    `is_causal`. A row its mask hides entirely comes back as out 0 with lse 0, not -inf:
    it would weigh e^0 in a merge, so callers that can hide whole rows must set those to
    -inf. With no keys at all (S = 0) every row is out 0, lse -inf. Grouped-query heads
    (H a multiple of Hkv) are passed through: the kernel pairs query head h with key head
    h // (H/Hkv), like `repeat_interleave` (checked against expanded keys).
    """
    B, H, T, D = query.shape
    S = key.shape[2]
    if T == 0 or S == 0:
        # The kernel crashes the process (SIGFPE) on empty inputs.
        out = query.new_zeros(B, H, T, value.shape[-1])
        return out, torch.full((B, H, T), _NEG_INF, dtype=torch.float32, device=query.device)
    if attn_mask is not None and attn_mask.dtype != query.dtype:
        attn_mask = attn_mask.to(query.dtype)
    # The kernel walks rows by stride but assumes the head dimension is contiguous.
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out, lse


def merge_by_lse(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each.

    out (..., T, D), lse (..., T) with -inf for an empty key set. Returns (out, lse) with
    out = (e^lse1·out1 + e^lse2·out2)/(e^lse1 + e^lse2), computed as weights
    e^(lse_i - lse) with lse = logaddexp(lse1, lse2), so nothing overflows; rows empty in
    both parts come out 0 with lse -inf.
    """
    out = out1.clone(memory_format=torch.preserve_format)
    lse = _merge_into(out, lse1, out2, lse2)
    return out, lse


def _merge_into(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """merge_by_lse writing the merged rows into out1 (saves a pass and a T×D buffer).

    Few, large elementwise ops on purpose: on a busy 2-core machine every parallel op can
    stall for a scheduler tick, which dominated decoding when this was written op by op.
    """
    work = torch.promote_types(torch.promote_types(lse1.dtype, lse2.dtype), torch.float32)
    lse1, lse2 = lse1.to(work), lse2.to(work)
    lse = torch.logaddexp(lse1, lse2)  # -inf only where both parts are empty
    # exp(-inf - -inf) is NaN exactly for rows empty in both parts; their weight is 0.
    w1 = torch.exp(lse1 - lse).nan_to_num_(0.0).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).nan_to_num_(0.0).unsqueeze(-1)
    if out1.dtype == work:
        out1.mul_(w1).addcmul_(out2, w2)
    else:  # half types: weight and add in float32, round once
        out1.copy_(out1.to(work) * w1 + out2.to(work) * w2)
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


def _fix_empty_rows(lse, keys: _Keys, i0: int, i1: int, lo: int, hi: int | None, j0: int, j1: int):
    """Set lse = -inf where a row i ∈ [i0, i1) of a call over keys [j0, j1) sees only padding."""
    if keys.pad_cum is None:
        return
    rows_i = torch.arange(i0, i1, device=lse.device)
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
    if n == 1 or c == 0:
        k, v = keys.slice(0, c + n)
        out, lse = flash_attention_lse(q, k, v, is_causal=n > 1, attn_mask=keys.pad(0, c + n), scale=scale)
        _fix_empty_rows(lse, keys, q_first, q_first + n, lo, None, 0, c + n)
        return out, lse
    if n <= small:
        # Few rows (decoding a handful of tokens): one call with an n × (c + n) mask.
        u = torch.arange(c + n, device=q.device)
        hide = u[None, :] > (c + torch.arange(n, device=q.device))[:, None]
        mask = torch.zeros(n, c + n, dtype=q.dtype, device=q.device).masked_fill_(hide, _NEG_INF)
        k, v = keys.slice(0, c + n)
        out, lse = flash_attention_lse(q, k, v, attn_mask=_combine(mask, keys.pad(0, c + n)), scale=scale)
        _fix_empty_rows(lse, keys, q_first, q_first + n, lo, None, 0, c + n)
        return out, lse
    k, v = keys.slice(0, c)
    out, lse = flash_attention_lse(q, k, v, attn_mask=keys.pad(0, c), scale=scale)
    _fix_empty_rows(lse, keys, q_first, q_first + n, lo, None, 0, c)
    k, v = keys.slice(c, c + n)
    out2, lse2 = flash_attention_lse(q, k, v, is_causal=True, attn_mask=keys.pad(c, c + n), scale=scale)
    _fix_empty_rows(lse2, keys, q_first, q_first + n, lo, None, c, c + n)
    lse = _merge_into(out, lse, out2, lse2)
    return out, lse


def _band_mask(rows: int, nk: int, offset: int, lo: int, hi: int, dtype, device) -> torch.Tensor:
    """Additive mask for rows i = i0 + t and keys j = i0 - offset + u: 0 where lo ≤ i - j < hi."""
    r = torch.arange(rows, device=device)[:, None] - torch.arange(nk, device=device)[None, :] + offset
    hide = (r < lo) | (r >= hi)
    return torch.zeros(rows, nk, dtype=dtype, device=device).masked_fill_(hide, _NEG_INF)


def _band_chunk(q, keys: _Keys, i0: int, lo: int, hi: int, scale: float):
    """Rows i0 … i0+n-1 (n ≤ W = hi - lo, every i ≥ hi - 1) over keys lo ≤ i - j < hi,
    without a mask: with a = i0 - lo, the keys [a, a+n) form a top-left causal triangle
    (row t sees u ≤ t), and the keys [a-W+1, a) an upper one (row t sees u ≥ t), which is a
    top-left causal triangle once rows and keys are both reversed. A partial chunk also
    has a rectangle [a-W+1+n, a) that every row sees.

    Masks cost the kernel an extra pass over every score (measured: a masked band took
    1.45× the time of the same number of unmasked scores), and a masked block also scores
    the two triangles it hides; this scores only the band, at the price of three calls,
    two merges and flipping one block of q, k and v.
    """
    n = q.shape[2]
    W = hi - lo
    a = i0 - lo
    k, v = keys.slice(a, a + n)
    out, lse = flash_attention_lse(q, k, v, is_causal=True, attn_mask=keys.pad(a, a + n), scale=scale)
    _fix_empty_rows(lse, keys, i0, i0 + n, lo, hi, a, a + n)
    m = min(n, W - 1)  # rows with keys in the upper triangle (row W-1 of a full chunk has none)
    if m > 0:
        j0 = a - W + 1
        k, v = keys.slice(j0, j0 + m)
        pad = keys.pad(j0, j0 + m)
        o, l = flash_attention_lse(q[:, :, :m].flip(2), k.flip(2), v.flip(2), is_causal=True,
                                   attn_mask=None if pad is None else pad.flip(-1), scale=scale)
        o, l = o.flip(2), l.flip(-1)
        _fix_empty_rows(l, keys, i0, i0 + m, lo, hi, j0, j0 + m)
        lse[..., :m] = _merge_into(out[:, :, :m], lse[..., :m], o, l)
    if W - 1 > m:
        j0, j1 = a - W + 1 + m, a
        k, v = keys.slice(j0, j1)
        o, l = flash_attention_lse(q, k, v, attn_mask=keys.pad(j0, j1), scale=scale)
        _fix_empty_rows(l, keys, i0, i0 + n, lo, hi, j0, j1)
        lse = _merge_into(out, lse, o, l)
    return out, lse


def _attend_part(q, keys: _Keys, q_first: int, lo: int, hi: int | None, scale: float):
    """Attention of rows i = q_first + t (every row has i ≥ lo) over keys lo ≤ i - j < hi.

    Returns (out (B, H, n, D), lse (B, H, n)). Rows with i < hi see every key down to 0
    and are one causal computation; the rest are a band, computed in chunks of its width
    as unmasked triangles (`_band_chunk`) or, for narrow bands, in masked blocks.
    """
    B, H, n, _ = q.shape
    Dv = keys.v.shape[-1]
    if hi is not None and hi > q_first + n - 1:
        hi = None  # the lower edge of the band is below key 0 for every row
    width = hi - lo if hi is not None else None
    n_tri = n if hi is None else max(0, min(n, hi - q_first))
    if n_tri == n:
        return _causal_from(q, keys, q_first, lo, scale, small=_FEW_ROWS)

    if n == 1:  # decoding one row: a single unmasked call over exactly its band
        return _band_block(q, keys, q_first, lo, hi, scale, {})
    # Pieces are written into one buffer as they come (not concatenated at the end), so
    # the peak holds one piece beside the output, not every piece twice.
    out = torch.empty(B, n, H, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, n, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)

    def put(t0, piece):
        out[:, :, t0 : t0 + piece[0].shape[2]].copy_(piece[0])
        lse[..., t0 : t0 + piece[1].shape[-1]].copy_(piece[1])

    if n_tri:
        put(0, _causal_from(q[:, :, :n_tri], keys, q_first, lo, scale, small=_FEW_ROWS))
    if width >= _CHUNK_MIN_WIDTH and n - n_tri >= _CHUNK_MIN_ROWS:
        rows = min(width, _CHUNK_MAX_ROWS)
        for t0 in range(n_tri, n, rows):
            t1 = min(n, t0 + rows)
            put(t0, _band_chunk(q[:, :, t0:t1], keys, q_first + t0, lo, hi, scale))
    else:
        masks: dict = {}
        for t0 in range(n_tri, n, _MASKED_BLOCK):
            put(t0, _band_block(q[:, :, t0 : t0 + _MASKED_BLOCK], keys, q_first + t0, lo, hi, scale, masks))
    return out, lse


def _band_block(q, keys: _Keys, i0: int, lo: int, hi: int, scale: float, masks: dict):
    """Rows i0 … i0+n-1 of q (all i ≥ hi - 1) over keys lo ≤ i - j < hi in one call with
    an n × (n + W - 1) mask; `masks` keeps the masks by shape (every full block shares one)."""
    n = q.shape[2]
    j0, j1 = i0 - hi + 1, i0 + n - lo  # keys [j0, j1)
    if n == 1:  # one row (decoding): the key range is exactly its band
        band = None
    else:
        if (n, j1 - j0) not in masks:
            masks[n, j1 - j0] = _band_mask(n, j1 - j0, i0 - j0, lo, hi, q.dtype, q.device)
        band = masks[n, j1 - j0]
    k, v = keys.slice(j0, j1)
    out, lse = flash_attention_lse(q, k, v, attn_mask=_combine(band, keys.pad(j0, j1)), scale=scale)
    _fix_empty_rows(lse, keys, i0, i0 + n, lo, hi, j0, j1)
    return out, lse


# --------------------------------------------------------------------------------------
# rotation helpers
# --------------------------------------------------------------------------------------


class _TableCache:
    """cos/sin tables over a range of integer positions, per (frequencies, factor, dtype,
    device), shared by every call.

    Every decoding step rotates the w keys of its window again (the cache holds keys
    before RoPE), and every layer does it with the same frequencies; float64 cos and sin
    of w × d/2 angles took longer than the attention over 8k keys. Looking the rows up in
    a table computed once (float64 angles, cast after cos and sin, as `cos_sin` does)
    gives the same numbers for the price of a gather. A table grows by a quarter beyond
    what is asked, so a growing sequence rebuilds it rarely; one that would exceed
    `_TABLE_LIMIT` elements is not kept, and those positions are computed directly.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, inv_freq: torch.Tensor, factor: float, dtype, lo: int, hi: int):
        """(first position, cos, sin) with cos/sin (n, d/2) covering positions [lo, hi]."""
        key = (inv_freq.detach().cpu().numpy().tobytes(), float(factor), dtype, str(inv_freq.device))
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and entry[0] <= lo and hi < entry[0] + entry[1].shape[0]:
                self.entries.move_to_end(key)
                return entry
        start, stop = min(lo, 0), hi + 1
        if entry is not None:
            start, stop = min(start, entry[0]), max(stop, entry[0] + entry[1].shape[0])
        stop += (stop - start) // 4
        if (stop - start) * inv_freq.numel() > _TABLE_LIMIT:
            return None
        theta = angles(torch.arange(start, stop, device=inv_freq.device), inv_freq)
        entry = (start, (theta.cos() * factor).to(dtype), (theta.sin() * factor).to(dtype))
        with self.lock:
            self.entries[key] = entry
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return entry


_TABLE_LIMIT = 1 << 22  # elements per table: 16 MB each for cos and sin in float32 (131k positions at d=64)
_TABLES = _TableCache(size=4)


def _tables(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float, dtype):
    """cos, sin (B, n, d/2) in `dtype` for positions (B, n), both times `factor`."""
    if positions.is_floating_point():
        rounded = positions.round()
        if torch.equal(rounded, positions):  # ReRoPE's w, SelfExtend's groups: integers
            positions = rounded.to(torch.int64)
    if not positions.is_floating_point() and positions.numel():
        lo, hi = (int(x) for x in torch.aminmax(positions))
        entry = _TABLES.get(inv_freq, factor, dtype, lo, hi)
        if entry is not None:
            start, cos, sin = entry
            index = positions - start
            return cos[index], sin[index]
    theta = angles(positions, inv_freq)
    return (theta.cos() * factor).to(dtype), (theta.sin() * factor).to(dtype)


def _rotate(x, positions, inv_freq, factor, layout, dtype, row_scale=None):
    """x (B, H, n, D) rotated at positions (B, n) with `inv_freq`; cos and sin times `factor`
    and, when given, the whole row times `row_scale` (B, n) (log-n).

    Same result as `apply_rotary` with `cos_sin` tables (float64 angles, cast after cos and
    sin). Written as four fused multiply-adds into one buffer with half-width tables,
    because it runs over every query twice and `rotate_half`'s concatenations would cost
    as much again as the arithmetic.
    """
    half = inv_freq.numel()
    rotary_dim = 2 * half
    cos, sin = _tables(positions, inv_freq, factor, dtype)
    if row_scale is not None:
        cos, sin = cos * row_scale.to(dtype)[..., None], sin * row_scale.to(dtype)[..., None]
    cos, sin = cos[:, None], sin[:, None]
    if torch.is_grad_enabled() and x.requires_grad:  # out= ops cannot be differentiated
        if layout == "half":
            x1, x2 = x[..., :half], x[..., half:rotary_dim]
            rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
            rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        rest = x[..., rotary_dim:]
        if row_scale is not None:
            rest = rest * row_scale.to(dtype)[:, None, :, None]
        return torch.cat((rot, rest), dim=-1) if rotary_dim < x.shape[-1] else rot
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if layout == "half":
        x1, x2 = x[..., :half], x[..., half:rotary_dim]
        o1, o2 = out[..., :half], out[..., half:rotary_dim]
    else:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        o1, o2 = out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    if rotary_dim < x.shape[-1]:
        if row_scale is None:
            out[..., rotary_dim:].copy_(x[..., rotary_dim:])
        else:
            torch.mul(x[..., rotary_dim:], row_scale.to(dtype)[:, None, :, None], out=out[..., rotary_dim:])
    return out


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


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
    _, Hkv, S, Dk = key.shape
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise _err(f"{name}.dtype", t.dtype, f"must equal query.dtype={query.dtype}")
        if t.device != query.device:
            raise _err(f"{name}.device", str(t.device), f"must equal query.device={query.device}")
        if t.shape[0] != B:
            raise _err(f"{name}.shape[0]", t.shape[0], f"batch must equal query.shape[0]={B}")
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
        dt = position_offset.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise _err("position_offset.dtype", position_offset.dtype, "must be an integer dtype")
        if position_offset.dim() == 0:
            position_offset = position_offset.expand(B)
        if tuple(position_offset.shape) != (B,):
            raise _err("position_offset.shape", tuple(position_offset.shape),
                       f"must be ({B},) (one offset per sequence)")
        offsets = position_offset.to(device=query.device, dtype=torch.int64)
    else:
        raise _err("position_offset", position_offset, "must be None, an int or a (B,) integer tensor")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise _err("key_padding_mask", getattr(key_padding_mask, "dtype", key_padding_mask),
                       "must be a bool tensor (True = real token)")
        if tuple(key_padding_mask.shape) != (B, S):
            raise _err("key_padding_mask.shape", tuple(key_padding_mask.shape), f"must be (B, S) = ({B}, {S})")
    if sliding_window is not None and (
        not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 1
    ):
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

    Returns (B, H, T, Dv) in query.dtype. No T×S matrix is formed: extra memory is a few
    rotated copies of q and k plus O(block × S) per block (measured: 3× plain SDPA's peak
    at 16k tokens). On CUDA, float16/bfloat16 go through flash-attn when it is installed
    (no extra memory beyond the rotated copies). Soft-capping on CPU, other non-CPU
    tensors and autograd (an input requiring grad with grad mode on) take an exact eager path, slower; inference should run under
    torch.no_grad() / torch.inference_mode().
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
    # Positions below 0 are left padding; log-n of them would be NaN (log of a negative),
    # and a NaN in a padded row poisons real rows of the next layer through 0·NaN.
    row_scale = method.query_scale(query_pos.clamp(min=0))  # (B, T) float64 or None

    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None

    # Near part: only keys within near_hi of some query are rotated (decoding: the last w).
    kn0 = 0 if near_hi is None else max(0, q_first - near_hi + 1)
    q_near = _rotate(query, query_pos, inv_freq, attention_factor, layout, dtype, row_scale)
    k_near = _rotate(key[:, :, kn0:], key_pos[:, kn0:], inv_freq, attention_factor, layout, dtype)

    # Far part: rows with i ≥ w (from tf0), keys j ≤ S-1-w (and within the sliding window).
    if has_far:
        tf0 = max(0, w - q_first)
        kf0 = 0 if sw is None else max(0, q_first + tf0 - sw + 1)
        kf1 = S - w

        def far_inputs():
            far_freq = inv_freq / rel.far_freq_divisor
            far_kpos = rel.far_key_position(key_pos[:, kf0:kf1])
            if not bool(far_kpos.any()):
                # ReRoPE: every far key sits at position 0, i.e. is not rotated at all, so
                # the cache is used as is and the key's attention factor moves onto q.
                k_far = key[:, :, kf0:kf1]
                q_factor = attention_factor**2
            else:
                k_far = _rotate(key[:, :, kf0:kf1], far_kpos, far_freq, attention_factor, layout, dtype)
                q_factor = attention_factor
            far_qpos = rel.far_query_position(query_pos[:, tf0:])
            q_far = _rotate(query[:, :, tf0:], far_qpos, far_freq, q_factor, layout, dtype,
                            None if row_scale is None else row_scale[:, tf0:])
            return q_far, k_far

    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if recording:
        _warn_slow_path()
    if not recording and flash_cuda.usable(query, value, key_padding_mask):
        far = (*far_inputs(), kf0, tf0) if has_far else None
        return flash_cuda.two_part_attention(q_near, k_near, kn0, far, value, w, sw, near_hi, key_padding_mask,
                                             scale, softcap)
    if softcap is not None or device.type != "cpu" or recording:
        # The flash kernel's lse carries no gradient, and the merge weights depend on it,
        # so gradients need the eager path too.
        far = (*far_inputs(), kf0, tf0) if has_far else None
        return _eager(q_near, k_near, kn0, far, value, w, sw, key_padding_mask, scale, softcap)

    # The flash kernel needs one head size for q, k and v: pad the shorter side with zeros
    # (zeros add nothing to q·k, and padded value dims are cut off the output).
    width = max(D, Dv)

    def fit(t):
        return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))

    v_all = fit(value)
    pad_add = pad_cum = None
    if key_padding_mask is not None:
        pad_add = torch.zeros(B, 1, 1, S, dtype=dtype, device=device)
        pad_add.masked_fill_(~key_padding_mask[:, None, None, :], _NEG_INF)
        pad_cum = torch.nn.functional.pad(key_padding_mask.to(torch.int64).cumsum(-1), (1, 0))

    near_keys = _Keys(fit(k_near), v_all[:, :, kn0:], kn0, pad_add, pad_cum)
    out, lse = _attend_part(fit(q_near), near_keys, q_first, 0, near_hi, scale)
    # The near rotations are dead now; dropping them before the far ones are built keeps
    # the peak at one rotated copy of q.
    del q_near, k_near, near_keys
    if has_far:
        q_far, k_far = far_inputs()
        far_keys = _Keys(fit(k_far), v_all[:, :, kf0:kf1], kf0, pad_add, pad_cum)
        o_far, l_far = _attend_part(fit(q_far), far_keys, q_first + tf0, w, sw, scale)
        del q_far, k_far, far_keys
        _merge_into(out[:, :, tf0:], lse[:, :, tf0:], o_far, l_far)
    return out if width == Dv else out[..., :Dv]


# --------------------------------------------------------------------------------------
# eager path: soft-capping, or tensors the CPU kernel cannot take
# --------------------------------------------------------------------------------------


def _eager(q_near, k_near, kn0, far, value, w, sw, key_padding_mask, scale, softcap):
    """Exact attention in query blocks with explicit logits: memory O(block · S · H) per
    block. Written without in-place ops so autograd can run through it (when it records,
    the saved blocks add up to T × S: the price of gradients without a fused kernel)."""
    B, H, T, D = q_near.shape
    Hkv, S, Dv = value.shape[1], value.shape[2], value.shape[-1]
    g = H // Hkv
    device = q_near.device
    work = torch.float64 if q_near.dtype == torch.float64 else torch.float32
    q_first = S - T
    span = S if sw is None else min(S, sw)
    block = max(1, min(T, _EAGER_BUDGET // max(1, B * H * span)))
    outs = []
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        rows = t1 - t0
        i0, i1 = q_first + t0, q_first + t1
        j0 = 0 if sw is None else max(0, i0 - sw + 1)
        j1 = i1  # keys j ≤ i
        r = torch.arange(i0, i1, device=device)[:, None] - torch.arange(j0, j1, device=device)[None, :]

        # Near logits cover every (row, key) with r < w; far logits every one with r ≥ w
        # that the sliding window keeps. Entries outside both are masked below.
        a = j0 if w is None else max(j0, i0 - w + 1)
        qb = q_near[:, :, t0:t1].reshape(B, Hkv, g * rows, D).to(work)
        kb = k_near[:, :, a - kn0 : j1 - kn0].to(work)
        logits = (qb @ kb.transpose(-1, -2)).view(B, Hkv, g, rows, j1 - a)
        logits = torch.nn.functional.pad(logits, (a - j0, 0), value=_NEG_INF)
        if far is not None:
            q_far, k_far, kf0, tf0 = far
            s0 = max(t0, tf0)  # rows with far keys
            fa, fb = max(j0, kf0), min(j1, i1 - w)
            if s0 < t1 and fb > fa:
                qf = q_far[:, :, s0 - tf0 : t1 - tf0].reshape(B, Hkv, g * (t1 - s0), D).to(work)
                kf = k_far[:, :, fa - kf0 : fb - kf0].to(work)
                lf = (qf @ kf.transpose(-1, -2)).view(B, Hkv, g, t1 - s0, fb - fa)
                lf = torch.nn.functional.pad(lf, (fa - j0, j1 - fb, s0 - t0, 0), value=_NEG_INF)
                logits = torch.where(r >= w, lf, logits)

        logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        hide = r < 0
        if sw is not None:
            hide = hide | (r >= sw)
        hide = hide.expand(B, 1, 1, rows, j1 - j0)
        if key_padding_mask is not None:
            hide = hide | ~key_padding_mask[:, None, None, None, j0:j1]
        probs = torch.softmax(logits.masked_fill(hide, _NEG_INF), dim=-1)
        probs = probs.nan_to_num(0.0)  # a row with no real key: all -inf, softmax NaN -> 0
        ob = probs.view(B, Hkv, g * rows, j1 - j0) @ value[:, :, j0:j1].to(work)
        outs.append(ob.view(B, H, rows, Dv).to(q_near.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
