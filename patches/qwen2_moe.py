"""Qwen2-MoE's sliding-window layers on the attention route.

`Qwen2MoeAttention` (transformers 5.23, modeling_qwen2_moe.py) keeps its window as the
module attribute `sliding_window` and applies it only through the 4D mask transformers
builds; unlike Qwen2 it does not pass `sliding_window=` to the attention function. The
ropelab attention takes the 2D padding mask and applies windows itself, so each sliding
layer gets an instance `forward` that adds its window to the keyword arguments, which the
module hands on to the attention function unchanged.
"""

from __future__ import annotations

from torch import nn


def route_attention(changes, attentions: list[nn.Module]) -> None:
    """Give each sliding Qwen2MoeAttention a forward passing its window (recorded in
    `changes`, a patches.changes.Changes, for undo)."""
    for attention in attentions:
        window = getattr(attention, "sliding_window", None)
        if not window:
            continue
        original = attention.forward

        def forward(*args, _original=original, _window=window, **kwargs):
            kwargs.setdefault("sliding_window", _window)
            return _original(*args, **kwargs)

        changes.set_attr(attention, "forward", forward)
