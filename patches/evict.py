"""Opt-in eviction for `sinks` and `lm-infinite`: a KV cache that drops the keys no later
query can see, so decoding holds a bounded cache.

StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
Sinks", its StartRecentKVCache) keeps `sinks` starting tokens plus a rolling window;
LM-Infinite (Han et al. 2023, "LM-Infinite: Simple On-the-Fly Length Generalization for
Large Language Models") keeps `n_global` starting tokens plus a local window of `n_local`.
The maps are in rope/position_maps.py. After a call whose last key sits at index S - 1,
the next query sees the first `first` positions (sinks / n_global) and the last `keep`
keys (window for sinks: i - j <= window; n_local - 1 for lm-infinite: i - j < n_local);
everything between can go.

    cache = evicting_cache(handle)              # handle = ropelab.patch(model, "sinks")
    model.generate(ids, past_key_values=cache, ...)

Why it stays exact without touching the kernel: the kernel takes a layer's keys as
consecutive positions (key index k at offset + k). After eviction the attention function
(patches/attention_fn.py) hands it *cache positions*: every position after the hole minus
the number of keys evicted, the padding mask with the hole cut out. Both maps only use
  - the distance i - j within the recent/local band, which the hole does not change for
    the keys after it (the hole lies before all of them);
  - whether j < first, true for the same keys on both sides: the kept prefix is cut at
    `prefix = max_b(first - offset_b)` (every sequence's first `first` positions, whatever
    its left padding), so every key after the hole stays at a cache position >= first;
  - constants once the query is past first + keep: the sinks' query slot min(i, sinks +
    window) and LM-Infinite's global query at n_local. Cache positions of queries after an
    eviction are >= prefix + keep >= first + keep, so both sides take the constant.
The keys kept before the hole but not among the first positions (a shorter sequence's
tokens in a left-padded batch) are at distance > keep from every later query on both
sides, so invisible on both. The rotations differ (a key after the hole is rotated at
its cache position, not its text position), so the logits agree to float32 rounding,
not bit for bit.

Refused (ValueError naming the method and the rule): every other method (their maps see
every earlier key, or, like DCA and STRING, at distances the hole would change), log-n
(its query scale reads the absolute position), frequencies that follow the sequence
length (dynamic NTK). Only full-attention `DynamicLayer`s evict; sliding-window layers
already drop their own keys and are left as they are.

Cost: keys are cut out `block` at a time (a copy of the kept keys and values each time,
and the layer's kept key forms, patches/key_cache.py, rebuilt by its next call, since the
keys after the hole moved to other cache positions), so the cache holds fewer than prefix +
keep + block keys after each call. A crop (assisted decoding) is refused once it would
expose an evicted key to the next query. The layer reports its full length (`get_seq_length`: kept + evicted),
so generate()'s positions and mask sizes stay those of the text.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from . import key_cache

ATTRIBUTE = "ropelab_eviction"  # on the cache: its Eviction; on a layer: its LayerEviction
METHODS = {"sinks": ("sinks", "window", 0), "lm-infinite": ("n_global", "n_local", -1)}


@dataclass(frozen=True)
class Eviction:
    """What a cache may drop: all keys but the first `first` positions and the last `keep`,
    `block` or more at a time, for attention under `method`."""

    method: object
    first: int
    keep: int
    block: int


@dataclass
class LayerEviction:
    """One layer's hole: keys [prefix, prefix + evicted) of the text are gone."""

    keep: int  # the rule's last keys kept: a crop must leave that many after the hole
    prefix: int = 0
    evicted: int = 0


def eviction_for(method, block: int = 64) -> Eviction:
    """The eviction rule of `method`, or a ValueError naming the method and the rule."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block={block!r}: must be an integer >= 1 (keys evicted at a time)")
    spec = method.spec() if hasattr(method, "spec") else repr(method)
    name = getattr(method, "name", None)
    if name not in METHODS:
        raise ValueError(f"method={spec!r}: eviction is valid for {sorted(METHODS)} only, whose queries see just "
                         "the first tokens and a recent window; other methods see every earlier key")
    if method.logn:
        raise ValueError(f"method={spec!r}: eviction needs logn=false (log-n scales each query by its absolute "
                         "position, which eviction replaces by the cache position)")
    if not method.key_rotations_cacheable:
        raise ValueError(f"method={spec!r}: eviction needs frequencies that do not follow the sequence length")
    first_field, window_field, adjust = METHODS[name]
    params = method.map_params()
    return Eviction(method, params[first_field], params[window_field] + adjust, block)


def evicting_cache(handle, block: int = 64):
    """A DynamicCache for `handle.model` (patched by `handle`, patches/handle.py) that evicts
    what no later query can see; refused for a method it is not valid for."""
    from transformers import DynamicCache

    if getattr(handle, "route", None) != "attention":
        raise ValueError(f"handle={handle!r}: must be the PatchHandle of an attention-route patch "
                         "(ropelab.patch(model, 'sinks') or 'lm-infinite')")
    rule = eviction_for(handle.method, block)
    cache = DynamicCache(config=handle.model.config)
    setattr(cache, ATTRIBUTE, rule)
    return cache


def layer_eviction(cache, layer, method) -> LayerEviction | None:
    """The hole of `layer` when `cache` evicts and `layer` is a full-attention DynamicLayer;
    None otherwise. A cache made for another method is refused."""
    rule = getattr(cache, ATTRIBUTE, None)
    if rule is None or not _evicts(layer):
        return None
    if rule.method != method:
        raise ValueError(f"past_key_values: an evicting cache made for {rule.method.spec()!r} used by a model "
                         f"patched with {method.spec()!r}; make the cache with evicting_cache(handle) of this patch")
    state = layer.__dict__.get(ATTRIBUTE)
    if state is None:
        state = layer.__dict__[ATTRIBUTE] = LayerEviction(rule.keep)
        _report_full_length(layer)
    return state


def cut_mask(mask: torch.Tensor | None, state: LayerEviction) -> torch.Tensor | None:
    """The padding mask of the text (B, kept + evicted) -> that of the cache (B, kept)."""
    if mask is None or state.evicted == 0:
        return mask
    return torch.cat([mask[:, : state.prefix], mask[:, state.prefix + state.evicted :]], 1)


def after_call(cache, layer, state: LayerEviction, offset: torch.Tensor) -> None:
    """Drop from `layer` the keys the next query cannot see, once there are `block` of
    them. `offset` (B,): the cache position of key index 0 in each sequence."""
    rule: Eviction = getattr(cache, ATTRIBUTE)
    S = layer.keys.shape[-2]
    if S - rule.keep - state.prefix < rule.block:
        return
    if state.evicted == 0:  # the first cut fixes the prefix: every sequence's first positions
        state.prefix = min(S, max(0, int((rule.first - offset).max())))
    prefix, stop = state.prefix, S - rule.keep
    if stop - prefix < rule.block:
        return
    layer.keys = torch.cat([layer.keys[:, :, :prefix], layer.keys[:, :, stop:]], 2)
    layer.values = torch.cat([layer.values[:, :, :prefix], layer.values[:, :, stop:]], 2)
    state.evicted += stop - prefix
    key_cache.forget_forms(layer)  # the keys after the hole now sit at other cache positions


def _evicts(layer) -> bool:
    from transformers.cache_utils import DynamicLayer

    return type(layer) is DynamicLayer


def _report_full_length(layer) -> None:
    """Make `layer.get_seq_length()` count the evicted keys (generate()'s positions and mask
    sizes follow the text), and refuse a crop after which the next query would see an
    evicted key (one leaving fewer than `keep` keys after the hole)."""
    ref = weakref.ref(layer)
    kept_length, crop = layer.get_seq_length, layer.crop

    def get_seq_length(*args, **kwargs):
        owner = ref()
        return kept_length(*args, **kwargs) + (0 if owner is None else owner.__dict__[ATTRIBUTE].evicted)

    def cropped(tokens_to_remove, *args, **kwargs):
        owner = ref()
        state = owner.__dict__[ATTRIBUTE]
        spare = owner.keys.shape[-2] - state.prefix - state.keep if state.evicted else None
        if spare is not None and tokens_to_remove < 0 and -tokens_to_remove > spare:
            raise ValueError(f"tokens_to_remove={tokens_to_remove}: an evicting layer may drop at most {spare} "
                             f"keys now (the next query sees the last {state.keep}; those before were evicted)")
        return crop(tokens_to_remove, *args, **kwargs)

    layer.get_seq_length = get_seq_length
    layer.crop = cropped
