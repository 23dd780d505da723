"""Rotated keys kept with the KV cache, so a decoding step rotates only its new rows; and
which of the cache layer's keys attention really sees.

A patched model's cache holds keys before RoPE (patches/attention_fn.py). For a method
whose key rotations depend only on the key's own position (`key_rotations_cacheable`:
everything but dynamic NTK's length-dependent default mode), each key's rotated forms
(kernels/plan.py `rotate_key_forms`: the near form, and the far form of Leaky ReRoPE and
SelfExtend; ReRoPE's far keys are the raw keys) never change once computed. ChunkLlama
(An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models", arXiv
2402.17463) caches such keys once; so does this module.

`visible_keys` reads a transformers cache layer (cache_utils.py of transformers 5.17-5.23)
after its `update`: which of the returned rows are real keys and which index of the
layer's sequence the first of them has. A static layer hands over its whole buffer
(rows past the ones written are zeros, and must not be attended); a sliding-window layer
hands over the last keys only. Attention then gets consecutive keys ending at its queries.

The forms (`KeyForms`, attribute `ropelab_key_forms` of the layer's state) are indexed by
that sequence index, so they stay aligned with whatever slice a layer returns:
- DynamicLayer: every key; StaticLayer: the rows written so far.
- DynamicSlidingWindowLayer / StaticSlidingWindowLayer: forms of keys the layer has
  dropped are dropped too (a read pointer; the buffer is compacted when it fills).
- Fp8QuantizedLayer: a key's dequantised value never changes (its scale is frozen after
  the first update), so the form of the dequantised key is kept.
- QuantizedLayer (quanto, HQQ): the residual keys are re-quantised together with all
  others whenever the residual fills (every `residual_length` steps), which changes
  their dequantised values; the forms are rebuilt from the returned keys on the step
  after each such flush (one full rotation per `residual_length` steps) and after a beam
  reordering (transformers 5.17 reorders only the residual keys, 5.2x all of them; the
  rebuild follows whichever the layer does).
Other layer types (linear attention, indexed layers, offloaded ones) are not read: their
keys pass through as returned and are rotated per call.

When the forms are built (lazily, so a prefill holds no copy of its keys):
- A call into a layer that held no keys before it (the prefill of a fresh, reset or
  fully cropped cache, `generate()`'s first forward) stores no forms: the kernel rotates
  each part's keys itself, as in lean mode, and frees them part by part. Its peak is lean
  mode's (an eager copy had cost 30 layers x 3 heads x 16384 x 64 float32 = 360 MiB,
  +0.23x the prefill's peak, at 16k on SmolLM2-135M).
- The first call into a layer that already holds keys (the first decoding step, or the
  second chunk of a prompt fed in pieces) builds the forms of all of them: that call
  would have to rotate every cached key anyway, so building the forms costs no work
  twice, and every later call rotates only its new rows. A chunked prefill therefore
  holds the forms from its second chunk on; holding them back until the first short call
  would rotate every cached key again in each further chunk, and rotations are elementwise,
  so the forms are the same numbers whichever call builds them.

An evicting cache (patches/evict.py) moves the keys after its hole to other positions;
it drops the forms with `forget_forms` and the next call rebuilds them.

The layer's own batch and length operations are wrapped on that instance so the forms
follow them: beam-search `reorder_cache`, `crop`, `batch_select_indices`,
`batch_repeat_interleave`, `reset` and `offload` (which drop them). Before use the forms
are checked against the layer (batch, sequence range); anything they do not cover (an
operation this module does not know) rebuilds them from the raw keys, so a mismatch
costs time, never exactness.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

ATTRIBUTE = "ropelab_key_forms"
_WRAPPED = "ropelab_key_forms_follow"
MODES = ("kept", "lean")


def check_mode(key_cache: str) -> str:
    if key_cache not in MODES:
        raise ValueError(f"key_cache={key_cache!r}: must be one of {MODES} ('kept': rotated keys kept with the "
                         "KV cache, a step rotates only its new key; 'lean': no copies, every key rotated per call)")
    return key_cache


class KeyForms:
    """Rotated forms (name -> (B, Hkv, capacity, D) buffer) of the layer's keys with sequence
    indices [first, stop), held in buffer rows [lo, lo + stop - first)."""

    def __init__(self, forms: dict[str, torch.Tensor], first: int):
        self.buffers = dict(forms)
        self.lo, self.first = 0, first
        self.stop = first + next(iter(forms.values())).shape[2]
        self.batch = next(iter(forms.values())).shape[0]
        self.stale = False  # set when the layer's keys changed values (a quantised layer's flush)

    def view(self, start: int | None = None) -> dict[str, torch.Tensor]:
        a = self.lo + (self.first if start is None else start) - self.first
        return {name: buf[:, :, a : self.lo + self.stop - self.first] for name, buf in self.buffers.items()}

    def covers(self, batch: int, start: int, stop: int) -> bool:
        return not self.stale and self.batch == batch and self.first <= start <= self.stop == stop

    def drop_before(self, index: int) -> None:
        """Forget the forms of keys before sequence index `index` (the layer dropped them)."""
        index = min(max(index, self.first), self.stop)
        self.lo += index - self.first
        self.first = index

    def append(self, forms: dict[str, torch.Tensor]) -> None:
        n = next(iter(forms.values())).shape[2]
        live = self.stop - self.first
        if self.lo + live + n > next(iter(self.buffers.values())).shape[2]:
            # move the live rows to fresh buffers with a sixteenth to spare: a growing cache
            # copies its forms once every length/16 steps (16 rows a step on average, against
            # the 2·length rows DynamicLayer's own torch.cat copies every step), a sliding one
            # once every window/16 steps
            size = live + n + (live + n) // 16 + 1
            self.buffers = {name: _moved(buf, self.lo, live, size) for name, buf in self.buffers.items()}
            self.lo = 0
        for name, new in forms.items():
            self.buffers[name][:, :, self.lo + live : self.lo + live + n] = new
        self.stop += n

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.buffers = {name: fn(form) for name, form in self.view().items()}
        self.lo = 0
        self.batch = next(iter(self.buffers.values())).shape[0]

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf in self.buffers.values())


def _moved(buf: torch.Tensor, lo: int, live: int, size: int) -> torch.Tensor:
    grown = buf.new_empty(buf.shape[0], buf.shape[1], size, buf.shape[3])
    grown[:, :, :live] = buf[:, :, lo : lo + live]
    return grown


@dataclass
class LayerState:
    """What this module keeps on one cache layer: the rotated forms (None in lean mode or
    before a first cached call), and for a StaticLayer how many rows it has written (its
    own count is a device tensor; reading it every step would synchronise with the host)."""

    forms: KeyForms | None = None
    written: int | None = None
    # a quantised layer: its beam reordering of the quantised keys differs between
    # transformers releases (5.17 reorders only the residual), so a reorder rebuilds
    rebuild_on_reorder: bool = False


@dataclass(frozen=True)
class Visible:
    """The real keys attention gets: the first `count` rows returned, which are the layer's
    sequence indices [start, start + count); the layer keeps those from `keep_from` on."""

    start: int
    count: int
    keep_from: int
    stale_after: bool = False  # the layer changes these keys' values before its next call


def _dynamic(layer, state, key, new):
    return Visible(0, key.shape[2], 0) if layer.keys is key else None


def _dynamic_sliding(layer, state, key, new):
    # non-recording: layer.keys is a view of the returned tensor; recording: the reverse
    if key.untyped_storage().data_ptr() != layer.keys.untyped_storage().data_ptr():
        return None
    total = layer.cumulative_length
    return Visible(total - key.shape[2], key.shape[2], total - layer.sliding_window + 1)


def _static(layer, state, key, new):
    if layer.keys is not key:
        return None
    if state.written is None:
        state.written = int(layer.cumulative_length)  # once per layer: afterwards `update` counts (FOLLOW)
    return Visible(0, state.written, 0)


def _static_sliding(layer, state, key, new):
    total = layer.cumulative_length_int
    # its own buffer while it is filling (zeros past the written rows) and when full and
    # stepping one token (rolled: the last max_cache_len keys); otherwise the keys it joined
    count = min(total, layer.max_cache_len) if key is layer.keys else key.shape[2]
    return Visible(total - count, count, total - layer.max_cache_len)


def _fp8(layer, state, key, new):
    # the first update returns the raw keys, later ones the dequantised ones (frozen scale)
    S = key.shape[2]
    return Visible(0, S, 0, stale_after=S == new) if layer.cumulative_length == S else None


def _quantized(layer, state, key, new):
    # the first update returns the raw keys; an update that empties the residual has
    # re-quantised every key, so the next call's dequantised keys differ from these
    S = key.shape[2]
    if layer.cumulative_length != S:
        return None
    state.rebuild_on_reorder = True
    return Visible(0, S, 0, stale_after=S == new or layer.keys.numel() == 0)


_READERS: list = []


def _readers() -> list[tuple[type, Callable, bool]]:
    """(layer class, reader, exact type only) in the order they are tried (found once: every
    layer of every step asks)."""
    if not _READERS:
        _READERS.extend(_find_readers())
    return _READERS


def _find_readers() -> list[tuple[type, Callable, bool]]:
    from transformers import cache_utils as cu

    found = [(getattr(cu, "Fp8QuantizedLayer", None), _fp8, True), (cu.QuantizedLayer, _quantized, False),
             (cu.StaticSlidingWindowLayer, _static_sliding, True), (cu.StaticLayer, _static, True),
             (cu.DynamicSlidingWindowLayer, _dynamic_sliding, True), (cu.DynamicLayer, _dynamic, True)]
    return [entry for entry in found if entry[0] is not None]


def visible_keys(cache, layer_idx, key: torch.Tensor, new: int) -> tuple[object, Visible] | None:
    """(layer, Visible) for `key`, what layer `layer_idx` of `cache` returned from this
    step's update of `new` rows; None when the layer is of no type read here."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(layers):
        return None
    layer = layers[layer_idx]
    for cls, reader, exact in _readers():
        if type(layer) is cls or (not exact and isinstance(layer, cls)):
            state = layer.__dict__.get(ATTRIBUTE)
            if state is None:
                state = layer.__dict__[ATTRIBUTE] = LayerState()
                _follow(layer)
            seen = reader(layer, state, key, new)
            return None if seen is None else (layer, seen)
    return None


def key_forms_for(layer, seen: Visible, key: torch.Tensor, new: int,
                  rotate: Callable[[torch.Tensor, slice], dict]) -> dict | None:
    """The rotated forms of the `seen.count` real keys of `key` (the last `new` of them
    added this step), from the forms kept on `layer` plus `rotate(keys, key index range)` of
    the new ones; rebuilt from every real key when the kept forms do not cover the others.
    None, keeping nothing, when the layer held no keys before this call (a prefill: see
    "When the forms are built" above)."""
    state: LayerState = layer.__dict__[ATTRIBUTE]
    B, S, start = key.shape[0], seen.count, seen.start
    if S <= new:  # every key is new: the caller rotates them per part, none is kept
        state.forms = None
        return None
    forms = state.forms
    if forms is not None and forms.covers(B, start, start + S - new):
        forms.append(rotate(key[:, :, S - new : S], slice(S - new, S)))
    else:
        forms = state.forms = KeyForms(rotate(key[:, :, :S], slice(0, S)), start)
    view = forms.view(start)
    forms.drop_before(seen.keep_from)
    forms.stale = seen.stale_after
    return view


def forget_forms(layer) -> None:
    """Drop the forms kept on `layer` (its keys moved; the next call rebuilds them)."""
    state = layer.__dict__.get(ATTRIBUTE)
    if state is not None:
        state.forms = None


def kept_forms(layer) -> KeyForms | None:
    """The rotated forms kept on a cache layer, or None."""
    state = layer.__dict__.get(ATTRIBUTE)
    return None if state is None else state.forms


def _after_update(state: LayerState, layer, key_states, *args, **kwargs):
    if state.written is not None:
        state.written += key_states.shape[-2]


def _after_reorder(state: LayerState, layer, beam_idx, *args, **kwargs):
    if state.forms is not None and state.rebuild_on_reorder:
        state.forms.stale = True
    elif state.forms is not None:
        state.forms.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))


def _after_crop(state: LayerState, layer, *args, **kwargs):
    forms = state.forms
    if forms is not None:
        forms.stop = max(forms.first, min(forms.stop, layer.get_seq_length()))


def _after_repeat(state: LayerState, layer, repeats, *args, **kwargs):
    if state.forms is not None:
        state.forms.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))


def _after_select(state: LayerState, layer, indices, *args, **kwargs):
    if state.forms is not None:
        state.forms.map_batch(lambda t: t[indices, ...])


def _drop(state: LayerState, layer, *args, **kwargs):
    layer.__dict__.pop(ATTRIBUTE, None)


# The layer operations that change its keys' batch or length, and how the state follows.
FOLLOW = {
    "update": _after_update,
    "reorder_cache": _after_reorder,
    "crop": _after_crop,
    "batch_repeat_interleave": _after_repeat,
    "batch_select_indices": _after_select,
    "reset": _drop,
    "offload": _drop,
}


def _follow(layer) -> None:
    """Wrap `layer`'s batch/length operations (on the instance) so its state follows them."""
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
            state = None if owner is None else owner.__dict__.get(ATTRIBUTE)
            if state is not None:
                _after(state, owner, *args, **kwargs)
            return result

        setattr(layer, name, wrapped)
    layer.__dict__[_WRAPPED] = True
