"""The CPU backend of `rotary_attention`: each part of a plan (kernels/plan.py) through
torch's CPU flash kernel, which returns the row log-sum-exp the parts are merged by.

A prefill scores about as many (query, key) pairs as plain causal attention and never
holds a T×S matrix: the far part is one causal call on q[w:] against k[:S-w]; the band is
cut into query chunks whose keys split into two triangles (one causal as is, one causal
once rows and keys are reversed) and a rectangle, so it needs no mask (masks cost the
kernel an extra pass per score), and its whole chunks go through the kernel as one batch
per shape (kernels/band.py); narrow bands use small per-block masks instead. A part
with key ranges per row (DCA's chunks, sink and global prefixes) is cut into row blocks
whose ranges move together; a block is one unmasked rectangle, a rectangle plus a causal
triangle, or one call with a block-rows × range mask (`_attend_ranges`). Padding
enters as a (B, 1, 1, S) additive mask the kernel broadcasts, a sliding window as a second
band edge. (Kernel: torch's `_scaled_dot_product_flash_attention_for_cpu`, after Dao
2023, "FlashAttention-2".)
"""

from __future__ import annotations

import torch

from .band import attend_band, band_rows
from .cpu_flash import flash_attention_lse
from .merge import merge_into
from .plan import Plan

__all__ = ["run", "takes", "single_row", "flash_attention_lse", "BAND"]

_NEG_INF = float("-inf")


class BandSettings:
    """Where the band switches strategy (module-level so a test can force either one).

    A band at least `chunk_min_width` wide with at least `chunk_min_rows` rows in it is
    computed as unmasked triangles and rectangles. Without key padding, its whole chunks
    of `batch_rows` rows (below the band's width) take three batched calls per sequence
    and batch (band.py; 0, the default, turns that off). Off by default because on an idle
    machine it did not pay: one layer at 16k, three interleaved idle runs of
    benchmarks/bench_attention_op.py (session 6), the per-chunk loop's median ratio to SDPA
    was at or below the batched one's for rerope, leaky-rerope, self-extend and string (5
    rounds: 1.045/1.045/1.094/1.063 against 1.093/1.102/1.109/1.103 at 256 rows). On a loaded
    machine, where every small op waits a scheduler tick, batching 256 rows cut the ratios
    (contended, 8k: leaky-rerope 2.19 -> 1.71), so `BAND.batch_rows = 256` is the setting for a
    shared host. At most `batch_max_rows` rows go in one batch: a batch holds about five copies of
    its rows' queries (flipped queries, three outputs, one flipped back), so this bounds the
    peak (2048 rows: ~24 MB at 9 heads × 64 dims float32) at a few calls per 16k-row band.
    The rest, and bands with padded keys (each chunk its own mask slice), go one
    chunk at a time (`_band_chunk`), `chunk_max_rows` rows at once (768 timed best of
    512-4096 for that loop, at 8k and 16k tokens; it bounds the temporaries). Narrower bands and
    a few decoding rows take one masked call per `masked_block` rows: the masked waste is
    small there, and it is one call instead of three. At most `few_rows` rows against a
    causal edge use one masked call (rows × keys mask); more use an unmasked rectangle
    plus a causal triangle and a merge.
    """

    chunk_min_width = 256
    chunk_min_rows = 32
    chunk_max_rows = 768
    batch_rows = 0
    batch_max_rows = 2048
    masked_block = 128
    few_rows = 64


BAND = BandSettings()


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
    lse = merge_into(out, lse, out2, lse2)
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
        lse[..., :m] = merge_into(out[:, :, :m], lse[..., :m], o, l)
    if W - 1 > m:
        j0, j1 = a - W + 1 + m, a
        k, v = keys.slice(j0, j1)
        o, l = flash_attention_lse(q, k, v, attn_mask=keys.pad(j0, j1), scale=scale)
        _fix_empty_rows(l, keys, i0, i0 + n, lo, hi, j0, j1)
        lse = merge_into(out, lse, o, l)
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
        return _causal_from(q, keys, q_first, lo, scale, small=BAND.few_rows)

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
        put(0, _causal_from(q[:, :, :n_tri], keys, q_first, lo, scale, small=BAND.few_rows))
    if width >= BAND.chunk_min_width and n - n_tri >= BAND.chunk_min_rows:
        t_rest = n_tri
        batch_rows = band_rows(width, BAND.batch_rows)
        if BAND.batch_rows and keys.pad_add is None and n - n_tri >= batch_rows:
            # Whole chunks of the band in three calls per sequence (band.py); padding
            # would need a mask per chunk, so padded keys take the loop below.
            t_rest = n_tri + (n - n_tri) // batch_rows * batch_rows
            group = max(1, BAND.batch_max_rows // batch_rows) * batch_rows
            for b in range(B):
                for g0 in range(n_tri, t_rest, group):
                    g1 = min(t_rest, g0 + group)
                    j0 = q_first + g0 - hi + 1 - keys.first  # first key of row g0, in keys.k
                    attend_band(q[b : b + 1, :, g0:g1], keys.k[b : b + 1], keys.v[b : b + 1], j0, width,
                                batch_rows, scale, out[b, :, g0:g1], lse[b, :, g0:g1])
        rows = min(width, BAND.chunk_max_rows)
        for t0 in range(t_rest, n, rows):
            t1 = min(n, t0 + rows)
            put(t0, _band_chunk(q[:, :, t0:t1], keys, q_first + t0, lo, hi, scale))
    else:
        masks: dict = {}
        for t0 in range(n_tri, n, BAND.masked_block):
            put(t0, _band_block(q[:, :, t0 : t0 + BAND.masked_block], keys, q_first + t0, lo, hi, scale, masks))
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
# one part with a key range per row: [starts[b, t], stops[b, t])
# --------------------------------------------------------------------------------------


def _segments(starts: torch.Tensor, stops: torch.Tensor, most: int) -> list[tuple[int, int]]:
    """Row blocks [t0, t1) of at most `most` rows, cut where a range edge jumps (moves by
    anything but 0 or +1 from one row to the next: a new chunk, the end of a prefix)."""
    n = starts.shape[0]
    ds, de = starts[1:] - starts[:-1], stops[1:] - stops[:-1]
    jumps = (((ds != 0) & (ds != 1)) | ((de != 0) & (de != 1))).nonzero().flatten().add(1).tolist()
    edges = [0, *jumps, n]
    blocks = []
    for a, b in zip(edges[:-1], edges[1:]):
        blocks += [(t, min(b, t + most)) for t in range(a, b, most)]
    return blocks


def _range_empty(lse, keys: _Keys, batch: slice, starts, stops) -> None:
    """lse = -inf for rows whose range holds no real key (the kernel gives a hidden row 0)."""
    if keys.pad_cum is None:
        empty = (stops <= starts)[None, :]
    else:
        cum = keys.pad_cum[batch]
        empty = (cum[:, stops] - cum[:, starts]) <= 0  # (b, rows)
    if bool(empty.any()):
        lse.masked_fill_(empty[:, None, :], _NEG_INF)


def _range_block(q, keys: _Keys, batch: slice, i0: int, starts, stops, scale: float):
    """Rows i0 … of q (sequences `batch`) over keys [starts[t], stops[t]) (host-side (n,)
    tensors): a rectangle when every row has the same range, a rectangle plus a top-left
    causal triangle when the ranges share a start and end at the diagonal, else one call
    with an n × range mask."""
    n = q.shape[2]
    a, b = int(starts.min()), int(stops.max())
    if b <= a:
        out = q.new_zeros(q.shape[:3] + keys.v.shape[-1:])
        return out, torch.full(q.shape[:3], _NEG_INF, dtype=torch.float32, device=q.device)
    rows = torch.arange(i0, i0 + n, device=q.device)
    same_start = bool((starts == a).all())

    def pad(j0, j1):
        p = keys.pad(j0, j1)
        return None if p is None else p[batch]

    def call(j0, j1, **kw):
        k, v = keys.slice(j0, j1)
        return flash_attention_lse(q, k[batch], v[batch], scale=scale, **kw)

    if same_start and bool((stops == b).all()):
        out, lse = call(a, b, attn_mask=pad(a, b))
    elif same_start and bool((stops == rows + 1).all()) and a <= i0:
        out, lse = call(i0, i0 + n, is_causal=True, attn_mask=pad(i0, i0 + n))
        if a < i0:
            o, l = call(a, i0, attn_mask=pad(a, i0))
            lse = merge_into(out, lse, o, l)
    else:
        u = torch.arange(a, b, device=q.device)
        hide = (u[None, :] < starts[:, None]) | (u[None, :] >= stops[:, None])
        mask = torch.zeros(n, b - a, dtype=q.dtype, device=q.device).masked_fill_(hide, _NEG_INF)
        out, lse = call(a, b, attn_mask=_combine(mask, pad(a, b)))
    _range_empty(lse, keys, batch, starts, stops)
    return out, lse


def _attend_ranges(q, keys: _Keys, i0: int, ranges, scale: float):
    """Rows i = i0 + t over keys [starts[b, t], stops[b, t]); (out (B, H, n, Dv), lse (B, H, n)).
    Sequences with equal ranges (no padding, or equal padding) share every call."""
    starts, stops = ranges
    B, H, n, _ = q.shape
    out = torch.empty(B, n, H, keys.v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, n, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    shared = B == 1 or (bool((starts == starts[:1]).all()) and bool((stops == stops[:1]).all()))
    batches = [slice(None)] if shared else [slice(b, b + 1) for b in range(B)]
    for batch in batches:
        s, e = starts[batch][0], stops[batch][0]
        for t0, t1 in _segments(s, e, BAND.chunk_max_rows):
            o, l = _range_block(q[batch, :, t0:t1], keys, batch, i0 + t0, s[t0:t1], e[t0:t1], scale)
            out[batch, :, t0:t1] = o
            lse[batch, :, t0:t1] = l
    return out, lse


def single_row(plan: Plan) -> torch.Tensor:
    """One query row (a decoding step) in float32/float64: every part's logits written into
    one row of keys, one softmax, one product with the values.

    For one row the parts' keys are disjoint ranges (far [S - sw, S - w), near [S - w, S);
    a sink prefix and a recent band), so no merge is needed, and a plain matrix-vector product
    costs fewer calls than the flash kernel twice plus a merge: at decode the per-call
    overhead, not the arithmetic, is what the parts add to plain attention.
    """
    q, value = plan.query, plan.value
    B, H, _, D = q.shape
    Hkv, S = value.shape[1], value.shape[2]
    g = H // Hkv
    j0 = min(part.key_start for part in plan.parts)
    bands = all(part.is_band for part in plan.parts)
    logits = q.new_empty(B, Hkv, g, S - j0)
    # Bands tile [j0, S) for one row; key-range parts may leave gaps (keys no part shows),
    # hidden after the soft-cap (which would turn -inf into -softcap).
    held = None if bands else torch.zeros(B, 1, 1, S - j0, dtype=torch.bool, device=q.device)
    for part in plan.parts:
        qp = plan.rotated_queries(part).view(B, Hkv, g, D)
        kp = plan.rotated_keys(part)
        a, b = part.key_start - j0, part.key_stop - j0
        if part.is_band:
            torch.matmul(qp, kp.transpose(-1, -2), out=logits[..., a:b])
            if held is not None:
                held[..., a:b] = True
        else:  # this row's keys [start, stop) of the part, per sequence
            u = torch.arange(part.key_start, part.key_stop, device=q.device)
            starts, stops = part.ranges
            inside = ((u >= starts[:, -1:]) & (u < stops[:, -1:]))[:, None, None, :]  # (B, 1, 1, keys)
            span = logits[..., a:b]
            span.copy_(torch.where(inside, torch.matmul(qp, kp.transpose(-1, -2)), span))
            held[..., a:b] |= inside
        del qp, kp
    logits.mul_(plan.scale)
    if plan.softcap is not None:
        logits.div_(plan.softcap).tanh_().mul_(plan.softcap)
    if held is not None:
        logits.masked_fill_(~held, _NEG_INF)
    if plan.key_padding_mask is not None:
        logits.masked_fill_(~plan.key_padding_mask[:, None, None, j0:], _NEG_INF)
    probs = torch.softmax(logits, dim=-1)
    if plan.key_padding_mask is not None or held is not None:
        probs.nan_to_num_(0.0)  # a row whose keys are all padding: softmax of all -inf
    return torch.matmul(probs, value[:, :, j0:]).view(B, H, 1, value.shape[-1])


def _one_row(plan: Plan) -> bool:
    return plan.query.shape[2] == 1 and plan.query.dtype in (torch.float32, torch.float64)


def takes(plan: Plan) -> bool:
    """Whether this backend can run `plan`: CPU tensors, and soft-capping only for one row in
    float32/float64 (the flash kernel cannot cap logits)."""
    return plan.query.device.type == "cpu" and (plan.softcap is None or _one_row(plan))


def run(plan: Plan) -> torch.Tensor:
    """Attention of the plan's queries over its keys, (B, H, T, Dv) in query.dtype."""
    q, value = plan.query, plan.value
    if _one_row(plan):
        return single_row(plan)
    B, H, T, D = q.shape
    S, Dv = value.shape[2], value.shape[-1]
    dtype, device = q.dtype, q.device
    # The flash kernel needs one head size for q, k and v: pad the shorter side with zeros
    # (zeros add nothing to q·k, and padded value dims are cut off the output).
    width = max(D, Dv)

    def fit(t):
        return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))

    v_all = fit(value)
    pad_add = pad_cum = None
    mask = plan.key_padding_mask
    if mask is not None:
        pad_add = torch.zeros(B, 1, 1, S, dtype=dtype, device=device)
        pad_add.masked_fill_(~mask[:, None, None, :], _NEG_INF)
        pad_cum = torch.nn.functional.pad(mask.to(torch.int64).cumsum(-1), (1, 0))

    out = lse = None
    for part in plan.parts:
        keys = _Keys(fit(plan.rotated_keys(part)), v_all[:, :, part.key_start : part.key_stop], part.key_start,
                     pad_add, pad_cum)
        if part.is_band:
            o, l = _attend_part(fit(plan.rotated_queries(part)), keys, plan.q_first + part.first_row, part.lo,
                                part.hi, plan.scale)
        else:
            o, l = _attend_ranges(fit(plan.rotated_queries(part)), keys, plan.q_first + part.first_row, part.ranges,
                                  plan.scale)
        # This part's rotated copies die here, before the next part's are built.
        del keys
        if out is None and part.first_row == 0:
            out, lse = o, l  # the first part covers every row (the near part always does)
            continue
        if out is None:
            out = q.new_zeros(B, H, T, width)
            lse = torch.full((B, H, T), _NEG_INF, dtype=l.dtype, device=device)
        merged = merge_into(out[:, :, part.first_row :], lse[:, :, part.first_row :], o, l)
        if part is not plan.parts[-1]:  # a later part merges against it
            lse[:, :, part.first_row :] = merged
    if out is None:  # no part holds a pair (possible only for rows that see nothing)
        out = q.new_zeros(B, H, T, width)
    return out if width == Dv else out[..., :Dv]
