"""torch's CPU flash kernel with its row log-sum-exp, the one call every part of the CPU
backend (rope/kernels/cpu.py, band.py) goes through (kernel: Dao 2023, "FlashAttention-2",
as `aten._scaled_dot_product_flash_attention_for_cpu` implements it)."""

from __future__ import annotations

import torch

__all__ = ["flash_attention_lse"]

_NEG_INF = float("-inf")


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
