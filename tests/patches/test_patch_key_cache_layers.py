"""Rotated keys kept on every cache layer type patches/key_cache.py reads (static,
sliding-window, quantised), and the lean mode that keeps none.

Oracles: a full forward without a cache (the same patched model) for the exact layers,
as in test_patch_key_cache.py, tolerance 1e-5 on logits (only summation order differs);
for quantised layers, whose keys are lossy, the same cached decode in lean mode (every key
rotated in the call, as before kept forms existed): both rotate the same dequantised
values elementwise, so only the kernel's summation order can differ (1e-5 again).
Tiny 2-layer models from tiny_models (milliseconds per forward).
"""

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers import cache_utils as cu

import ropelab.kernels.plan as plan
import ropelab.patches as P
from ropelab.patches.key_cache import kept_forms
from tiny_models import WINDOW, build, left_pad, logits, tokens

ATOL = 1e-5
SPECS = ["rerope:window=8", "leaky-rerope:window=8,scale=4", "self-extend:window=8,group=4"]


def _step(model, ids, cache, mask=None):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True, attention_mask=mask).logits


def _decode(model, ids, mask, cache, prefill):
    """Logits of a prefill of `prefill` tokens, then one token per step, with the growing mask."""
    steps = [_step(model, ids[:, :prefill], cache, mask[:, :prefill])]
    steps += [_step(model, ids[:, t : t + 1], cache, mask[:, : t + 1]) for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, 1)


def _batch():
    return left_pad([tokens(30, seed=2)[0], tokens(21, seed=3)[0]])[:2]


# family -> layer types: mistral (sliding: DynamicSlidingWindowLayer), gemma2 under a
# StaticCache (layer 0 StaticSlidingWindowLayer, layer 1 StaticLayer)
CACHES = {
    "dynamic-sliding": ("mistral", lambda m: DynamicCache(config=m.config),
                        ["DynamicSlidingWindowLayer", "DynamicSlidingWindowLayer"]),
    "static": ("gemma2", lambda m: StaticCache(config=m.config, max_cache_len=40),
               ["StaticSlidingWindowLayer", "StaticLayer"]),
}


@pytest.mark.parametrize("kind", list(CACHES))
@pytest.mark.parametrize("spec", SPECS)
def test_cached_decode_equals_prefill_on_each_layer_type(monkeypatch, kind, spec):
    family, make, layer_types = CACHES[kind]
    model = build(family)
    ids, mask = _batch()
    with P.patched(model, spec):
        full = logits(model, ids, attention_mask=mask)
        # prefill 5 < WINDOW, so the sliding layers fill, then slide, within the decode
        cache = make(model)
        assert [type(layer).__name__ for layer in cache.layers] == layer_types
        steps = [_step(model, ids[:, :5], cache, mask[:, :5])]
        rotated, original = [], plan.rotate
        monkeypatch.setattr(plan, "rotate", lambda x, *a, **k: rotated.append(x.shape[2]) or original(x, *a, **k))
        steps += [_step(model, ids[:, t : t + 1], cache, mask[:, : t + 1]) for t in range(5, ids.shape[1])]
    assert rotated and set(rotated) == {1}  # each decode step rotates its query and key rows only
    assert all(kept_forms(layer) is not None for layer in cache.layers)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


def test_sliding_layers_keep_only_the_forms_of_keys_they_keep():
    model = build("mistral")
    ids, mask = _batch()
    with P.patched(model, "self-extend:window=4,group=2"):
        cache = DynamicCache(config=model.config)
        _decode(model, ids, mask, cache, prefill=5)
    forms = kept_forms(cache.layers[0])
    # the layer keeps its last WINDOW - 1 keys; the forms the same ones (plus spare rows)
    assert (forms.first, forms.stop) == (ids.shape[1] - WINDOW + 1, ids.shape[1])
    assert forms.view()["near"].shape[2] == cache.layers[0].keys.shape[2] == WINDOW - 1


@pytest.mark.parametrize("implementation,spec", [("static", s) for s in SPECS] + [("dynamic", SPECS[2])])
def test_beam_search_on_sliding_and_static_layers(implementation, spec):
    model = build("gemma2")  # one sliding layer, one full
    ids, mask, _ = left_pad([tokens(16, seed=2)[0], tokens(11, seed=3)[0]])
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0, attention_mask=mask)
    with P.patched(model, spec), torch.no_grad():
        cached = model.generate(ids, use_cache=True, cache_implementation=implementation, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.tolist() == uncached.tolist()


def test_crop_follows_a_sliding_layer_recording_its_past():
    model = build("mistral")
    ids, mask = _batch()
    with P.patched(model, "leaky-rerope:window=4,scale=2"):
        full = logits(model, ids, attention_mask=mask)
        cache = DynamicCache(config=model.config)
        for layer in cache.layers:
            layer.activate_past_recording()
        _decode(model, ids[:, :27], mask[:, :27], cache, prefill=20)
        cache.crop(-3)  # back to 24 keys, past the window: the layer restores its older keys
        steps = [_step(model, ids[:, t : t + 1], cache, mask[:, : t + 1]) for t in range(24, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 24:], atol=ATOL, rtol=0)


class ChannelQuantizedLayer(cu.QuantizedLayer):
    """KIVI-style keys: 4-bit, one scale per channel over the whole sequence, so every flush
    of the residual re-quantises (and changes) the earlier keys."""

    def _quantize(self, tensor, axis):
        lo, hi = tensor.amin(-2, keepdim=True), tensor.amax(-2, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        return torch.round((tensor - lo) / scale), lo, scale

    def _dequantize(self, q_tensor):
        q, lo, scale = q_tensor
        return q * scale + lo


QUANTISED = {"channel": lambda: ChannelQuantizedLayer(residual_length=4)}
if hasattr(cu, "Fp8QuantizedLayer"):  # transformers ≥ 5.2x
    QUANTISED["fp8"] = cu.Fp8QuantizedLayer


@pytest.mark.parametrize("layer", list(QUANTISED))
@pytest.mark.parametrize("spec", SPECS)
def test_quantised_layers_keep_forms_of_the_dequantised_keys(layer, spec):
    model = build("llama")
    ids, mask = _batch()
    out = {}
    for mode in ("lean", "kept"):
        with P.patched(model, spec, key_cache=mode):
            cache = cu.Cache(layers=[QUANTISED[layer]() for _ in range(2)])
            first = _decode(model, ids[:, :24], mask[:, :24], cache, prefill=9)
            swap = [1, 0]
            cache.reorder_cache(torch.tensor(swap))  # as a beam step does: the two sequences swap rows
            rest = torch.cat([_step(model, ids[swap, t : t + 1], cache, mask[swap, : t + 1]) for t in range(24, 30)], 1)
            out[mode] = torch.cat([first, rest[swap]], 1)
            assert (kept_forms(cache.layers[0]) is None) == (mode == "lean")
    torch.testing.assert_close(out["kept"], out["lean"], atol=ATOL, rtol=0)


def test_lean_mode_keeps_no_copies_and_decodes_the_same():
    model = build("gemma2")
    ids, mask = _batch()
    with P.patched(model, "self-extend:window=8,group=4", key_cache="lean") as handle:
        full = logits(model, ids, attention_mask=mask)
        cache = DynamicCache(config=model.config)
        decoded = _decode(model, ids, mask, cache, prefill=12)
        assert "per call, none kept" in handle.describe()
    assert all(kept_forms(layer) is None for layer in cache.layers)
    torch.testing.assert_close(decoded, full, atol=ATOL, rtol=0)


def test_a_bad_key_cache_mode_is_refused_before_anything_changes():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^key_cache='copy': must be one of \('kept', 'lean'\)"):
        P.patch(model, "rerope:window=8", key_cache="copy")
    assert P.current_patch(model) is None and model.config._attn_implementation == "eager"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
