"""Opt-in eviction for sinks and lm-infinite (patches/evict.py): the cache drops the keys
no later query can see and decoding stays equal to the non-evicting run.

Oracle: the same patched model decoding with an ordinary DynamicCache (itself checked
against full prefill in test_patch_key_range.py). Tolerance 1e-5 on logits, the bound of
the other cached-decoding tests: after an eviction the keys after the hole are rotated at
their cache positions instead of their text positions (same distances, other angles), so
the float32 rotations round differently; generated tokens must be identical. Tiny 2-layer
models from tiny_models (milliseconds per forward).
"""

import pytest
import torch
from transformers import DynamicCache

import ropelab.patches as P
from ropelab.patches.evict import ATTRIBUTE, evicting_cache
from ropelab.patches.key_cache import kept_forms
from tiny_models import build, left_pad, logits, tokens

ATOL = 1e-5  # float32 logits; keys after the hole rotate at other angles (module docstring)
# (spec, first tokens kept, last keys kept): sinks keep `window`, lm-infinite n_local - 1
SPECS = [("sinks:sinks=2,window=9", 2, 9), ("lm-infinite:n_global=3,n_local=10", 3, 9)]
BLOCK = 4


def _batch():
    return left_pad([tokens(60, seed=2)[0], tokens(47, seed=3)[0]])


def _decode(model, cache, ids, mask, pos, prefill=20):
    with torch.no_grad():
        out = [model(ids[:, :prefill], past_key_values=cache, attention_mask=mask[:, :prefill],
                     position_ids=pos[:, :prefill]).logits]
        out += [model(ids[:, t : t + 1], past_key_values=cache, attention_mask=mask[:, : t + 1],
                      position_ids=pos[:, t : t + 1]).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(out, 1)


@pytest.mark.parametrize("key_cache", ["kept", "lean"])
@pytest.mark.parametrize("spec,first,keep", SPECS)
def test_evicting_decode_equals_the_full_cache_with_left_padding(spec, first, keep, key_cache):
    model = build("llama")
    ids, mask, pos = _batch()
    pads = int((mask == 0).sum(1).max())
    with P.patched(model, spec, key_cache=key_cache) as handle:
        full = _decode(model, DynamicCache(config=model.config), ids, mask, pos)
        prefill = logits(model, ids, attention_mask=mask, position_ids=pos)
        cache = evicting_cache(handle, block=BLOCK)
        evicted = _decode(model, cache, ids, mask, pos)
        # and the prefill longer than the window is cut right after it
        long = evicting_cache(handle, block=BLOCK)
        _decode(model, long, ids[:, :40], mask[:, :40], pos[:, :40], prefill=40)
    torch.testing.assert_close(evicted, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(evicted, prefill, atol=ATOL, rtol=0)
    for layer in cache.layers:
        hole = layer.__dict__[ATTRIBUTE]
        assert hole.prefix == pads + first  # the shorter sequence's first tokens are kept too
        assert hole.evicted > 0 and layer.keys.shape[2] + hole.evicted == ids.shape[1]
        assert layer.keys.shape[2] < hole.prefix + keep + BLOCK
        assert layer.get_seq_length() == ids.shape[1]
        if key_cache == "lean":
            assert kept_forms(layer) is None
    assert long.layers[0].keys.shape[2] == pads + first + keep


@pytest.mark.parametrize("spec,first,keep", SPECS)
def test_generate_and_beam_search_with_eviction_give_the_same_tokens(spec, first, keep):
    model = build("llama")
    ids, mask, _ = left_pad([tokens(26, seed=2)[0], tokens(19, seed=3)[0]])
    with P.patched(model, spec) as handle, torch.no_grad():
        for beams in (1, 3):
            kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, num_beams=beams)
            cache = evicting_cache(handle, block=BLOCK)
            out = model.generate(ids, past_key_values=cache, **kwargs)
            assert out.tolist() == model.generate(ids, **kwargs).tolist()
            assert cache.layers[0].__dict__[ATTRIBUTE].evicted > 0


def test_eviction_is_refused_where_it_is_not_exact():
    model = build("llama")
    with P.patched(model, "rerope:window=8") as handle:
        with pytest.raises(ValueError, match=r"^method='rerope:window=8,train_length=32': eviction is valid "
                                             r"for \['lm-infinite', 'sinks'\] only"):
            evicting_cache(handle)
    with P.patched(model, "sinks:sinks=2,window=9,logn=true") as handle:
        with pytest.raises(ValueError, match=r"^method='sinks:.*logn=true': eviction needs logn=false"):
            evicting_cache(handle)
    with P.patched(model, "ntk:scale=2") as handle:
        with pytest.raises(ValueError, match=r"^handle=.*: must be the PatchHandle of an attention-route patch"):
            evicting_cache(handle)
    with P.patched(model, "sinks:sinks=2,window=9") as handle:
        with pytest.raises(ValueError, match=r"^block=0: must be an integer >= 1"):
            evicting_cache(handle, block=0)
        cache = evicting_cache(handle)
    ids = tokens(12)
    with P.patched(model, "lm-infinite:n_global=3,n_local=10"), torch.no_grad():
        with pytest.raises(ValueError, match=r"^past_key_values: an evicting cache made for 'sinks:.*' used by a "
                                             r"model patched with 'lm-infinite:"):
            model(ids, past_key_values=cache)


def test_a_crop_that_would_expose_an_evicted_key_is_refused():
    model = build("llama")
    ids, mask, pos = _batch()
    keep = SPECS[0][2]
    with P.patched(model, SPECS[0][0]) as handle:
        full = logits(model, ids, attention_mask=mask, position_ids=pos)
        cache = evicting_cache(handle, block=BLOCK)
        _decode(model, cache, ids[:, :59], mask[:, :59], pos[:, :59])
        spare = cache.layers[0].keys.shape[2] - cache.layers[0].__dict__[ATTRIBUTE].prefix - keep
        assert spare == 3  # 59 = 28 + 7 · 4 + 3: three steps since the last eviction
        with pytest.raises(ValueError, match=rf"^tokens_to_remove=-4: an evicting layer may drop at most 3 keys"):
            cache.crop(-4)
        cache.crop(-2)  # leaves the last `keep` keys of the next query: allowed, and decoding stays exact
        with torch.no_grad():
            steps = [model(ids[:, t : t + 1], past_key_values=cache, attention_mask=mask[:, : t + 1],
                           position_ids=pos[:, t : t + 1]).logits for t in (57, 58)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 57:59], atol=ATOL, rtol=0)
