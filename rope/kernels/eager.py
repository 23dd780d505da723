"""The eager backend of `rotary_attention`: explicit logits in query blocks, exact, for
what the fused kernels cannot take: Gemma-2 logit soft-capping on CPU (it caps each
logit before the softmax; Gemma Team 2024, "Gemma 2", arXiv 2408.00118), devices with no
fused backend, and autograd (the fused kernels' lse carries no gradient and the merge
weights depend on it). Each logit comes from the part whose distance band or key range
holds it (kernels/plan.py), so no merge is needed; a key no part holds is hidden. Memory O(block · S · H) per block.
"""

from __future__ import annotations

import torch

from .plan import Plan

__all__ = ["run", "EAGER_BUDGET"]

_NEG_INF = float("-inf")
# Materialised rows × keys × heads logits per block: about 32 MB in float32.
EAGER_BUDGET = 1 << 23


def _in_ranges(part, t0: int, t1: int, j0: int, j1: int, device) -> torch.Tensor:
    """(B, 1, 1, t1 - t0, j1 - j0) bool: key j in [starts, stops) of query row t (rows before
    the part's first row hold nothing)."""
    starts, stops = part.ranges
    s0 = max(t0, part.first_row)
    a = starts[:, s0 - part.first_row : t1 - part.first_row, None]
    b = stops[:, s0 - part.first_row : t1 - part.first_row, None]
    u = torch.arange(j0, j1, device=device)[None, None, :]
    inside = (u >= a) & (u < b)
    inside = torch.nn.functional.pad(inside, (0, 0, s0 - t0, 0), value=False)
    return inside[:, None, None]


def run(plan: Plan) -> torch.Tensor:
    """Written without in-place ops so autograd can run through it (when it records, the
    saved blocks add up to T × S: the price of gradients without a fused kernel)."""
    query, value = plan.query, plan.value
    B, H, T, D = query.shape
    Hkv, S, Dv = value.shape[1], value.shape[2], value.shape[-1]
    g = H // Hkv
    device = query.device
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    q_first, sw = plan.q_first, plan.sliding_window
    parts = [(part, plan.rotated_queries(part), plan.rotated_keys(part)) for part in plan.parts]
    ranged = any(not part.is_band for part in plan.parts)
    span = S if sw is None else min(S, sw)
    block = max(1, min(T, EAGER_BUDGET // max(1, B * H * span)))
    outs = []
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        rows = t1 - t0
        i0, i1 = q_first + t0, q_first + t1
        j0 = 0 if sw is None else max(0, i0 - sw + 1)
        j1 = i1  # keys j ≤ i
        r = torch.arange(i0, i1, device=device)[:, None] - torch.arange(j0, j1, device=device)[None, :]
        logits = held = None
        for part, qp, kp in parts:
            s0 = max(t0, part.first_row)  # rows with keys in this part
            # keys this block's rows can reach in the part: i - hi < j ≤ i - lo
            fa = max(j0, part.key_start) if part.hi is None else max(j0, part.key_start, i0 - part.hi + 1)
            fb = min(j1, part.key_stop, i1 - part.lo)
            if s0 >= t1 or fb <= fa:
                continue
            qb = qp[:, :, s0 - part.first_row : t1 - part.first_row].reshape(B, Hkv, g * (t1 - s0), D).to(work)
            kb = kp[:, :, fa - part.key_start : fb - part.key_start].to(work)
            lp = (qb @ kb.transpose(-1, -2)).view(B, Hkv, g, t1 - s0, fb - fa)
            lp = torch.nn.functional.pad(lp, (fa - j0, j1 - fb, s0 - t0, 0), value=_NEG_INF)
            if part.is_band:
                inside = r >= part.lo if part.hi is None else (r >= part.lo) & (r < part.hi)
            else:
                inside = _in_ranges(part, t0, t1, j0, j1, device)  # (B, 1, 1, rows, keys)
            # Bands alone cover every causal pair (what they leave, the window hides);
            # beside key ranges, keys outside every part are hidden (after the soft-cap).
            if ranged:
                held = inside if held is None else held | inside
            logits = lp if logits is None else torch.where(inside, lp, logits)
        if logits is None:  # no part reaches these rows
            logits = torch.full((B, Hkv, g, rows, j1 - j0), _NEG_INF, dtype=work, device=device)
        logits = logits * plan.scale
        if plan.softcap is not None:
            logits = torch.tanh(logits / plan.softcap) * plan.softcap
        hide = r < 0
        if sw is not None:
            hide = hide | (r >= sw)
        hide = hide.expand(B, 1, 1, rows, j1 - j0)
        if ranged:
            hide = hide | (~held if held is not None else True)
        if plan.key_padding_mask is not None:
            hide = hide | ~plan.key_padding_mask[:, None, None, None, j0:j1]
        probs = torch.softmax(logits.masked_fill(hide, _NEG_INF), dim=-1)
        probs = probs.nan_to_num(0.0)  # a row with no real key: all -inf, softmax NaN -> 0
        ob = probs.view(B, Hkv, g * rows, j1 - j0) @ value[:, :, j0:j1].to(work)
        outs.append(ob.view(B, H, rows, Dv).to(query.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
