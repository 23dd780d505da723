"""The FlexAttention backend of `rotary_attention`: each part of a plan (kernels/plan.py)
is one `flex_attention` call with a block mask for its distance band or its key ranges per
row (and padding), the
parts merged by the returned log-sum-exp (kernels/merge.py; a row its mask hides entirely
comes back as out 0, lse -inf, which the merge takes as an empty part); Gemma-2 soft-capping is a
`score_mod` (torch.nn.attention.flex_attention, torch ≥ 2.5; Dong et al. 2024, "Flex
Attention: A Programming Model for Generating Optimized Attention Kernels",
arXiv 2412.05496). No extra dependency: it is the CUDA backend when flash-attn is absent.

On CUDA the call and the block mask are compiled (uncompiled FlexAttention materialises
the scores); on the CPU it runs eagerly, which is how it is tested against the float64
reference. Not yet measured on a GPU (issue 9 lists what is owed).
"""

from __future__ import annotations

import functools

import torch

from .merge import merge_into
from .plan import Plan, Part

__all__ = ["available", "usable", "run"]

@functools.cache
def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception:
        return False
    return True


def usable(plan: Plan) -> bool:
    """Whether this plan can run here: CUDA (the fast case) with FlexAttention present."""
    return plan.query.device.type == "cuda" and available()


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None (torch's automatic dynamic), not False: a decoding step has one key more
    # than the last, and dynamic=False compiles anew for every key count (measured with this
    # call on the CPU, torch 2.13: 3 key counts, 3 graphs; with None, 4 key counts, 2 graphs),
    # until torch's recompile limit sends the rest to the unfused eager path.
    return torch.compile(flex_attention, dynamic=None)


def _attend(q, k, v, block_mask, score_mod, scale):
    """(out, lse natural-log float32) of one flex_attention call."""
    from torch.nn.attention import flex_attention as fa

    call = _compiled() if q.device.type == "cuda" else fa.flex_attention
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if hasattr(fa, "AuxRequest"):
        out, aux = call(q, k, v, return_aux=fa.AuxRequest(lse=True), **kw)
        return out, aux.lse.float()
    out, lse = call(q, k, v, return_lse=True, **kw)
    return out, lse.float()


def _mask_for(plan: Plan, part: Part, rows: int, keys: int):
    """The block mask of one part: query row t is key index q_first + first_row + t, key u is
    key_start + u; kept where lo ≤ i - j < hi, j ≤ i, and key j is not padding."""
    from torch.nn.attention.flex_attention import create_block_mask

    i0, j0, lo, hi = plan.q_first + part.first_row, part.key_start, part.lo, part.hi
    pad = plan.key_padding_mask
    ranges = part.ranges

    def mask_mod(b, h, q_idx, kv_idx):
        if ranges is not None:  # key index in [starts, stops) of this row (causality included)
            keep = (kv_idx + j0 >= ranges[0][b, q_idx]) & (kv_idx + j0 < ranges[1][b, q_idx])
        else:
            r = (q_idx + i0) - (kv_idx + j0)
            keep = r >= lo
            if hi is not None:
                keep = keep & (r < hi)
        if pad is not None:
            keep = keep & pad[b, kv_idx + j0]
        return keep

    B = plan.query.shape[0]
    per_sequence = pad is not None or ranges is not None
    return create_block_mask(mask_mod, B if per_sequence else None, None, rows, keys,
                             device=plan.query.device, _compile=plan.query.device.type == "cuda")


def run(plan: Plan) -> torch.Tensor:
    """(B, H, T, Dv) from the plan, one flex_attention call per part."""
    q_all, value = plan.query, plan.value
    B, H, T, D = q_all.shape
    Dv = value.shape[-1]
    width = max(D, Dv)

    def fit(t):
        return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))

    score_mod = None
    if plan.softcap is not None:
        cap = plan.softcap

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

    out = lse = None
    for part in plan.parts:
        qp, kp = plan.rotated_queries(part, tables=False), plan.rotated_keys(part, tables=False)
        vp = value[:, :, part.key_start : part.key_stop]
        mask = _mask_for(plan, part, qp.shape[2], kp.shape[2])
        o, l = _attend(fit(qp), fit(kp), fit(vp), mask, score_mod, plan.scale)
        del qp, kp
        if out is None:
            out, lse = o, l
        else:
            merged = merge_into(out[:, :, part.first_row :], lse[:, :, part.first_row :], o, l)
            if part is not plan.parts[-1]:  # a later part merges against it
                lse[:, :, part.first_row :] = merged
    return out if width == Dv else out[..., :Dv]
