"""Rotated keys kept with the KV cache (patches/key_cache.py): a decoding step rotates only
its new rows, and the kept forms follow every cache operation generate() uses (beam-search
reorder, batch expansion, crop, batch selection), with batch > 1 and left padding.
Oracle: a full forward without a cache (the same patched model), as in
test_patch_decoding.py; tolerance 1e-5 on logits for the same reason (only summation
order differs). Uses the 2-layer Llama from tiny_models (milliseconds per forward).
"""

import pytest
import torch
from transformers import DynamicCache

import ropelab
import ropelab.kernels.plan as plan
import ropelab.patches as P
from ropelab.patches.key_cache import kept_forms
from tiny_models import build, left_pad, logits, tokens

ATOL = 1e-5
CACHED = ["rerope:window=8", "leaky-rerope:window=8,scale=4", "self-extend:window=8,group=4",
          "rerope:window=8,logn=true"]


def _step(model, ids, cache, mask=None):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True, attention_mask=mask).logits


@pytest.mark.parametrize("spec", CACHED)
def test_decode_step_rotates_only_new_rows(monkeypatch, spec):
    model, ids = build("llama"), tokens(40)
    with P.patched(model, spec):
        expected = logits(model, ids)
        cache = DynamicCache(config=model.config)
        steps = [_step(model, ids[:, :28], cache)]
        rotated = []
        original = plan.rotate
        monkeypatch.setattr(plan, "rotate", lambda x, *a, **k: rotated.append(x.shape[2]) or original(x, *a, **k))
        for t in range(28, 40):
            steps.append(_step(model, ids[:, t : t + 1], cache))
    assert rotated and set(rotated) == {1}  # new query rows and the new key only
    assert all(kept_forms(layer) is not None for layer in cache.layers)
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=ATOL, rtol=0)


def test_kept_forms_cost_one_key_copy_per_rotated_part():
    model, ids = build("llama"), tokens(31)
    for spec, copies in (("rerope:window=8", 1), ("self-extend:window=8,group=4", 2)):
        with P.patched(model, spec):
            cache = DynamicCache(config=model.config)
            _step(model, ids[:, :30], cache)
            _step(model, ids[:, 30:], cache)  # the forms are built by the first decoding step
        layer = cache.layers[0]
        assert set(kept_forms(layer).view()) == ({"near"} if copies == 1 else {"near", "far"})
        kept = kept_forms(layer).nbytes()
        assert kept == copies * layer.keys.numel() * layer.keys.element_size()


def test_length_dependent_frequencies_are_not_kept_and_say_so():
    model, ids = build("llama", num_hidden_layers=1, layer_types=None), tokens(30)
    with P.patched(model, "dynamic-ntk:scale=2") as handle:
        cache = DynamicCache(config=model.config)
        _step(model, ids, cache)
        assert kept_forms(cache.layers[0]) is None
        with pytest.raises(ValueError, match="^method='dynamic-ntk:.*cannot be cached"):
            plan.rotate_key_forms(handle.method, torch.ones(8, dtype=torch.float64), 1.0, "half",
                                  torch.zeros(1, 2, 3, 16), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("spec", ["leaky-rerope:window=8,scale=4", "self-extend:window=8,group=4", "rerope:window=8"])
def test_beam_search_with_left_padding_matches_uncached(spec):
    # generate() expands the batch for the beams (batch_repeat_interleave) and reorders
    # the cache every step (reorder_cache); the kept forms must follow both.
    model = build("llama")
    ids, mask, _ = left_pad([tokens(26, seed=2)[0], tokens(19, seed=3)[0]])
    kwargs = dict(max_new_tokens=10, do_sample=False, num_beams=3, pad_token_id=0, attention_mask=mask)
    with P.patched(model, spec), torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.tolist() == uncached.tolist()


def test_crop_and_batch_selection_follow_the_cache():
    model = build("llama")
    long, short = tokens(36, seed=2)[0], tokens(27, seed=3)[0]
    ids, mask, _ = left_pad([long, short])
    spec = "self-extend:window=8,group=4"
    with P.patched(model, spec):
        full = logits(model, ids, attention_mask=mask)
        cache = DynamicCache(config=model.config)
        _step(model, ids[:, :30], cache, mask[:, :30])
        for t in range(30, 33):  # decode 3, then crop 2 of them away and decode again
            _step(model, ids[:, t : t + 1], cache, mask[:, : t + 1])
        cache.crop(-2)
        steps = [_step(model, ids[:, t : t + 1], cache, mask[:, : t + 1]) for t in range(31, 34)]
        torch.testing.assert_close(torch.cat(steps, 1), full[:, 31:34], atol=ATOL, rtol=0)
        cache.batch_select_indices(torch.tensor([1]))  # keep the short sequence only
        step = _step(model, ids[1:, 34:35], cache, mask[1:, :35])
        torch.testing.assert_close(step[0, -1], full[1, 34], atol=ATOL, rtol=0)


def test_an_unknown_change_to_the_keys_rebuilds_the_forms():
    # Keys replaced behind the cache's back (no wrapped operation): the forms no longer
    # line up, so they are rebuilt from the raw keys; the result stays exact.
    model, ids = build("llama"), tokens(36)
    with P.patched(model, "leaky-rerope:window=8,scale=4"):
        expected = logits(model, ids)
        cache = DynamicCache(config=model.config)
        _step(model, ids[:, :30], cache)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]
        step = _step(model, ids[:, 29:30], cache)
    torch.testing.assert_close(step[:, -1], expected[:, 29], atol=ATOL, rtol=0)
