"""Kept key forms are built lazily (patches/key_cache.py, "When the forms are built"): a
prefill into an empty cache keeps no rotated copy of its keys, the first call that finds
keys already cached builds them, and decoding stays exact.

Oracle: a full forward without a cache (the same patched model), as in
test_patch_key_cache.py; tolerance 1e-5 on logits for the same reason (float32 both sides,
only summation order differs). The prefill itself runs the same arithmetic as lean mode
(no forms handed to the kernel), so its logits must be bit-identical to lean mode's
(torch.equal). Tiny 2-layer models from tiny_models (milliseconds per forward).
"""

import pytest
import torch
from transformers import DynamicCache

import ropelab.kernels.plan as plan
import ropelab.patches as P
from ropelab.patches.key_cache import kept_forms
from tiny_models import build, left_pad, logits, tokens

ATOL = 1e-5  # float32 logits, cached decode against one full forward (module docstring)
SPECS = ["rerope:window=8", "leaky-rerope:window=8,scale=4", "self-extend:window=8,group=4",
         "dca:chunk_size=12,local_window=3", "string:shift=10,local_window=3"]


def _step(model, ids, cache, mask):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True, attention_mask=mask).logits


def _batch():
    return left_pad([tokens(36, seed=2)[0], tokens(27, seed=3)[0]])[:2]


@pytest.mark.parametrize("spec", SPECS)
def test_prefill_keeps_no_forms_and_decoding_after_it_is_exact(monkeypatch, spec):
    model = build("llama")
    ids, mask = _batch()
    with P.patched(model, spec, key_cache="lean"):
        lean = _step(model, ids[:, :28], DynamicCache(config=model.config), mask[:, :28])
    built, original = [], plan.rotate_rows  # rotate_key_forms' rotations: the forms built
    monkeypatch.setattr(plan, "rotate_rows", lambda x, *a, **k: built.append(x.shape[2]) or original(x, *a, **k))
    with P.patched(model, spec):
        full = logits(model, ids, attention_mask=mask)
        cache = DynamicCache(config=model.config)
        steps = [_step(model, ids[:, :28], cache, mask[:, :28])]
        assert all(kept_forms(layer) is None for layer in cache.layers)  # nothing kept by the prefill
        assert torch.equal(steps[0], lean) and built == []
        steps.append(_step(model, ids[:, 28:29], cache, mask[:, :29]))
        # the first decoding step built the forms of all 29 keys, once per layer and form
        assert all((kept_forms(layer).first, kept_forms(layer).stop) == (0, 29) for layer in cache.layers)
        forms = len(kept_forms(cache.layers[0]).buffers)
        assert built == [29] * (forms * len(cache.layers))
        steps += [_step(model, ids[:, t : t + 1], cache, mask[:, : t + 1]) for t in range(29, 36)]
        assert set(built[forms * len(cache.layers):]) <= {1}  # later steps: the new key only
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", SPECS[1:3] + SPECS[3:4])
def test_chunked_prefill_builds_the_forms_at_its_second_chunk_and_stays_exact(spec):
    model = build("llama")
    ids, mask = _batch()
    with P.patched(model, spec):
        full = logits(model, ids, attention_mask=mask)
        cache = DynamicCache(config=model.config)
        steps = [_step(model, ids[:, :12], cache, mask[:, :12])]
        assert kept_forms(cache.layers[0]) is None
        steps.append(_step(model, ids[:, 12:22], cache, mask[:, :22]))  # would rotate all 22 keys anyway
        assert (kept_forms(cache.layers[0]).first, kept_forms(cache.layers[0]).stop) == (0, 22)
        steps.append(_step(model, ids[:, 22:30], cache, mask[:, :30]))  # appends its 8 rows only
        assert kept_forms(cache.layers[0]).stop == 30
        steps += [_step(model, ids[:, t : t + 1], cache, mask[:, : t + 1]) for t in range(30, 36)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


def test_a_cache_cropped_to_nothing_keeps_no_forms_for_its_next_prefill():
    model = build("llama")
    ids, mask = _batch()
    with P.patched(model, SPECS[2]):
        cache = DynamicCache(config=model.config)
        _step(model, ids[:, :20], cache, mask[:, :20])
        _step(model, ids[:, 20:21], cache, mask[:, :21])
        assert kept_forms(cache.layers[0]) is not None
        cache.crop(-21)  # every key
        _step(model, ids[:, :20], cache, mask[:, :20])
        assert all(kept_forms(layer) is None for layer in cache.layers)


def test_generate_prefill_keeps_no_forms(monkeypatch):
    # generate() runs its prefill with a cache: the forms are first built by the second
    # forward (the first generated token), for every layer at once
    model = build("llama")
    ids, mask = _batch()
    seen = []
    original = DynamicCache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        seen.append((key_states.shape[2], kept_forms(self.layers[layer_idx]) if layer_idx < len(self.layers) else None))
        return original(self, key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(DynamicCache, "update", update)
    with P.patched(model, SPECS[1]), torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                  use_cache=False)
    # per layer: prefill (no forms before), 1st step (none before: built in it), later steps (kept)
    assert [n for n, _ in seen[:2]] == [36, 36] and all(f is None for _, f in seen[:4])
    assert all(f is not None for _, f in seen[4:])
    assert out.tolist() == uncached.tolist()
