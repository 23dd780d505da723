"""Frequency maps on a sinusoidal-position decoder: XGLM (Vaswani et al. 2017's absolute
encoding, added to the token embeddings; docs/methods.md, "Absolute").

XGLM's table (`XGLMSinusoidalPositionalEmbedding.get_embedding`, tensor2tensor's form) is
row n = [sin(n·ω_0..ω_{h-1}), cos(n·ω_0..ω_{h-1})] with ω_i = 10000^(-i/(h-1)), h = d/2,
looked up at n = position + 2 (`offset`), with the row `padding_idx` zeroed. In the rotary
convention ω_i = b'^(-2i/d) that is base b' = 10000^(d/(d-2)), so every frequency map of the
family applies as `method.frequencies(d, b')`. The patch replaces the module's forward with
one that builds the rows for the requested positions from the mapped ω (float64 angles).

Accepted: frequency-only methods (rope, linear, ntk, ntk-old, beta-base, llama3, yarn with
attention_factor 1) and `sinusoidal` (its own base, optionally over a frequency_method).
Relative maps, dynamic-ntk (either mode: per_query=true encodes each key anew for every
query) and log-n act inside attention or change past positions, which an additive absolute
table cannot express: refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..method import Method


def _mapped_inv_freq(method: Method, d_model: int, train_length: int) -> torch.Tensor:
    if method.needs_attention_route:
        raise ValueError(f"method={method.spec()!r}: XGLM adds absolute sinusoidal positions to its embeddings; "
                         "only frequency maps apply (not relative maps, dynamic-ntk or logn)")
    half = d_model // 2
    if half < 2:
        raise NotImplementedError(f"d_model={d_model}: too small for a sinusoidal table")
    base = 10000.0
    if method.name == "sinusoidal":
        base = float(method.base)
        method = method.frequency_method or Method()
    method = method.with_train_length(train_length)
    freq = method.frequencies(2 * half, base ** (2 * half / (2 * half - 2)))
    if not math.isclose(freq.attention_factor, 1.0):
        raise ValueError(f"method={method.spec()!r}: attention_factor={freq.attention_factor:g} has no meaning for an "
                         "additive sinusoidal table; set it to 1")
    return freq.inv_freq  # (h,) float64


def plan(model: nn.Module, method: Method):
    """(apply, check) for the sinusoidal route (patches/routes/sinusoidal.py): the new table
    forward, recorded in a `Changes`, and a probe that it is used."""
    embed = model.model.embed_positions if hasattr(model, "model") else model.embed_positions
    if type(embed).__name__ != "XGLMSinusoidalPositionalEmbedding":
        raise NotImplementedError(f"{type(model).__name__}: found no XGLMSinusoidalPositionalEmbedding")
    inv_freq = _mapped_inv_freq(method, embed.embedding_dim, model.config.max_position_embeddings)
    calls = [0]

    def forward(position_ids, past_key_values_length=0):
        index = position_ids + embed.offset  # (B, T) table rows
        theta = index.to(torch.float64)[..., None] * inv_freq.to(index.device)  # (B, T, h)
        table = torch.cat([theta.sin(), theta.cos()], dim=-1)  # (B, T, 2h)
        if embed.embedding_dim % 2:
            table = nn.functional.pad(table, (0, 1))
        if embed.padding_idx is not None:
            table = table.masked_fill((index == embed.padding_idx)[..., None], 0.0)
        calls[0] += 1
        return table.to(embed.weights.dtype)

    def apply(changes) -> None:
        changes.set_attr(embed, "forward", forward)

    def check() -> None:
        device = model.get_input_embeddings().weight.device
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4]], device=device), use_cache=False)
        if calls[0] == 0:
            raise RuntimeError("patch check: XGLM did not use the patched sinusoidal table in a probe forward")

    return apply, check
