"""Exact attention over a union of disjoint key sets from each set's (output, row
log-sum-exp): out = (e^lse1·o1 + e^lse2·o2) / (e^lse1 + e^lse2) (the "online softmax"
identity of Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", and
flash-attention's split-KV decoding, Dao 2023). Every backend of `rotary_attention`
computes its parts separately and merges them here.
"""

from __future__ import annotations

import torch

__all__ = ["merge_by_lse", "merge_into"]


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
    lse = merge_into(out, lse1, out2, lse2)
    return out, lse


def merge_into(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """merge_by_lse writing the merged rows into out1 in place; returns the merged lse.

    The weights are float32 (float64 for float64 outputs), the (..., T) lse vectors only;
    the T×D rows are weighted in place in their own dtype, so no float32 copy of a
    half-precision output is made (the price: two roundings to that dtype instead of one,
    at most one ulp more; tests/rope/test_kernels_layout.py bounds it). Few,
    large elementwise ops on purpose: on a busy 2-core machine every parallel op can
    stall for a scheduler tick.
    """
    work = torch.promote_types(torch.promote_types(lse1.dtype, lse2.dtype), torch.float32)
    lse1, lse2 = lse1.to(work), lse2.to(work)
    lse = torch.logaddexp(lse1, lse2)  # -inf only where both parts are empty
    # exp(-inf - -inf) is NaN exactly for rows empty in both parts; their weight is 0.
    w1 = torch.exp(lse1 - lse).nan_to_num_(0.0).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).nan_to_num_(0.0).unsqueeze(-1)
    if out1.dtype == work:
        out1.mul_(w1).addcmul_(out2, w2)
    else:  # half types: weights rounded once to the output dtype, rows combined in place
        out1.mul_(w1.to(out1.dtype)).addcmul_(out2, w2.to(out1.dtype))
    return lse
