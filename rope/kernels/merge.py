"""Exact attention over a union of disjoint key sets from each set's (output, row
log-sum-exp): out = (e^lse1·o1 + e^lse2·o2) / (e^lse1 + e^lse2) (the "online softmax"
identity of Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", and
flash-attention's split-KV decoding, Dao 2023). Every backend of `rotary_attention`
computes its parts separately and merges them here.
"""

from __future__ import annotations

import torch

__all__ = ["merge_by_lse", "merge_into", "merge_all"]


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
    _weighted_sum(out1, (out1, out2), (lse1, lse2), lse)
    return lse


def merge_all(out: torch.Tensor, lse: torch.Tensor, pieces) -> None:
    """The attention over the union of disjoint key sets from each set's (out_k, lse_k),
    written into out (..., T, D) and lse (..., T), which may be strided views of a larger
    buffer and must not alias a piece: out = Σ e^(lse_k - lse)·out_k, lse = log Σ e^lse_k.

    One pass over the rows per piece (a multiply, then a multiply-add per further piece)
    instead of merge_into's two per pair; weights float32 (float64 for float64 outputs),
    rounded once to a half-precision output's dtype, as in merge_into. Rows empty in every
    piece come out 0 with lse -inf.
    """
    work = torch.promote_types(torch.promote_types(pieces[0][1].dtype, lse.dtype), torch.float32)
    lses = [l.to(work) for _, l in pieces]
    total = torch.logsumexp(torch.stack(lses), 0)  # -inf only where every piece is empty
    _weighted_sum(out, [o for o, _ in pieces], lses, total)
    lse.copy_(total)


def _weighted_sum(out: torch.Tensor, outs, lses, total: torch.Tensor) -> None:
    """out = Σ_k e^(lses[k] - total)·outs[k], in place (outs[0] may be out itself). Weights are
    computed in the lse dtype and rounded once to a half-precision out's dtype; a row empty in
    every piece (exp(-inf - -inf) is NaN there) weighs 0, so it comes out 0."""
    for k, (o, l) in enumerate(zip(outs, lses)):
        w = torch.exp(l - total).nan_to_num_(0.0)
        w = (w if w.dtype == out.dtype else w.to(out.dtype)).unsqueeze(-1)
        if k > 0:
            out.addcmul_(o, w)
        elif o is out:
            out.mul_(w)
        else:
            torch.mul(o, w, out=out)
