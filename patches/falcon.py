"""Falcon (RoPE variants only; ALiBi Falcon is refused by architectures.family_of).

`FalconAttention.forward` computes attention itself (SDPA or eager, chosen by comparing
`_attn_implementation` with "sdpa") instead of dispatching through
ALL_ATTENTION_FUNCTIONS, so switching `_attn_implementation` alone would leave it on the
eager path with an unrotated cache. For the attention route each FalconAttention gets an
instance `forward` that is transformers 5.23's own up to the cache update (the rotary is
an identity then, so q and k stay unrotated) and then calls ropelab's attention function.
Frequency-only methods need none of this: Falcon uses the model-level rotary as every
family does.
"""

from __future__ import annotations

from torch import nn

from . import attention_fn as afn


def _forward(self: nn.Module, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
             use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    if alibi is not None:
        raise NotImplementedError("Falcon with alibi: no rotary embedding to patch")
    fused_qkv = self.query_key_value(hidden_states)  # (B, T, qkv)
    num_kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query, key, value = self._split_heads(fused_qkv)  # each (B, T, heads, D)
    batch, length = query.shape[:2]
    query = query.transpose(1, 2).reshape(batch, self.num_heads, length, self.head_dim)  # (B, H, T, D)
    key = key.transpose(1, 2).reshape(batch, num_kv_heads, length, self.head_dim)  # (B, Hkv, T, D)
    value = value.transpose(1, 2).reshape(batch, num_kv_heads, length, self.head_dim)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)  # keys before RoPE
    out, _ = afn.ropelab_attention(self, query, key, value, attention_mask, scaling=self.inv_norm_factor,
                                   position_ids=position_ids)  # (B, T, H, D)
    out = out.reshape(batch, length, self.num_heads * self.head_dim)
    return self.dense(out), None


def route_attention(changes, attentions: list[nn.Module]) -> None:
    """Give each FalconAttention the dispatching forward (recorded in `changes`, a
    patches.changes.Changes, for undo)."""
    for attention in attentions:
        changes.set_attr(attention, "forward", _forward.__get__(attention))
