"""Rotated keys kept with the KV cache, so a decoding step rotates only its new rows.

A patched model's cache holds keys before RoPE (patches/attention_fn.py). For a method
whose key rotations depend only on the key's own position (`key_rotations_cacheable`:
everything but dynamic NTK's length-dependent default mode), each key's rotated forms
(kernels/plan.py `rotate_key_forms`: the near form, and the far form of Leaky ReRoPE and
SelfExtend; ReRoPE's far keys are the raw keys) never change once computed. ChunkLlama
(An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models", arXiv
2402.17463) caches such keys once; so does this module.

The forms live on the transformers cache layer itself (`DynamicLayer`, attribute
`ropelab_key_forms`), in buffers with spare capacity so a step writes its rows in place,
and the layer's own batch and length operations are wrapped on that instance so the forms
move with the keys: beam-search `reorder_cache`, `crop`, `batch_select_indices`,
`batch_repeat_interleave`, `reset` (and `offload`, which drops them). Before use the forms
are checked against the layer: the layer must have returned exactly the key tensor the
attention sees, with the forms' batch and the keys before this step's; anything else
(an operation this module does not know) rebuilds the forms from the raw keys, so a
mismatch costs time, never exactness. Sliding-window, static and quantised layers return
other tensors than they hold, so they are never cached here; attention then rotates as
before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

ATTRIBUTE = "ropelab_key_forms"
_WRAPPED = "ropelab_key_forms_follow"


class KeyForms:
    """Rotated forms (name -> (B, Hkv, capacity, D) buffer) of the first `length` keys."""

    def __init__(self, forms: dict[str, torch.Tensor]):
        self.buffers = dict(forms)
        first = next(iter(forms.values()))
        self.length = first.shape[2]
        self.batch = first.shape[0]

    def view(self) -> dict[str, torch.Tensor]:
        return {name: buf[:, :, : self.length] for name, buf in self.buffers.items()}

    def append(self, forms: dict[str, torch.Tensor]) -> None:
        n = next(iter(forms.values())).shape[2]
        need = self.length + n
        for name, new in forms.items():
            buf = self.buffers[name]
            if buf.shape[2] < need:
                # grow by a quarter: a growing cache copies its forms once every length/4 steps
                grown = buf.new_empty(buf.shape[0], buf.shape[1], need + need // 4, buf.shape[3])
                grown[:, :, : self.length] = buf[:, :, : self.length]
                self.buffers[name] = buf = grown
            buf[:, :, self.length : need] = new
        self.length = need

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.buffers = {name: fn(buf[:, :, : self.length]) for name, buf in self.buffers.items()}
        self.batch = next(iter(self.buffers.values())).shape[0]

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf in self.buffers.values())


def _after_reorder(forms: KeyForms, layer, beam_idx, *args, **kwargs):
    forms.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))


def _after_crop(forms: KeyForms, layer, *args, **kwargs):
    forms.length = min(forms.length, layer.get_seq_length())


def _after_repeat(forms: KeyForms, layer, repeats, *args, **kwargs):
    forms.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))


def _after_select(forms: KeyForms, layer, indices, *args, **kwargs):
    forms.map_batch(lambda t: t[indices, ...])


def _drop(forms: KeyForms, layer, *args, **kwargs):
    layer.__dict__.pop(ATTRIBUTE, None)


# The layer operations that change its keys' batch or length, and how the forms follow.
FOLLOW = {
    "reorder_cache": _after_reorder,
    "crop": _after_crop,
    "batch_repeat_interleave": _after_repeat,
    "batch_select_indices": _after_select,
    "reset": _drop,
    "offload": _drop,
}


def _follow(layer) -> None:
    """Wrap `layer`'s batch/length operations (on the instance) so its forms follow them."""
    if layer.__dict__.get(_WRAPPED):
        return
    ref = weakref.ref(layer)
    for name, after in FOLLOW.items():
        original = getattr(layer, name, None)
        if original is None:
            continue

        def wrapped(*args, _original=original, _after=after, **kwargs):
            result = _original(*args, **kwargs)
            owner = ref()
            forms = None if owner is None else owner.__dict__.get(ATTRIBUTE)
            if forms is not None:
                _after(forms, owner, *args, **kwargs)
            return result

        setattr(layer, name, wrapped)
    layer.__dict__[_WRAPPED] = True


def cacheable_layer(cache, layer_idx, key: torch.Tensor):
    """The DynamicLayer of `cache` that holds exactly `key` (the tensor attention got), or None."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer) is not DynamicLayer or layer.keys is not key:
        return None
    return layer


def key_forms_for(layer, key: torch.Tensor, new: int, rotate: Callable[[torch.Tensor, slice], dict]) -> dict:
    """The rotated forms of all S keys of `layer` (whose keys are `key`, the last `new` of them
    added this step), from the forms kept on the layer plus `rotate(keys, index range)` of
    the new ones; rebuilt from every raw key when the kept forms do not line up."""
    B, S = key.shape[0], key.shape[2]
    forms = layer.__dict__.get(ATTRIBUTE)
    if forms is not None and forms.batch == B and forms.length == S - new:
        forms.append(rotate(key[:, :, S - new :], slice(S - new, S)))
    else:
        forms = KeyForms(rotate(key, slice(0, S)))
        _follow(layer)
        layer.__dict__[ATTRIBUTE] = forms
    return forms.view()
