"""Patched models decode with the KV cache exactly as they prefill, batch with left padding
as they run alone, and keep their sliding windows. Tolerance as in test_patch_equivalences
(1e-5 on logits): both sides run the same patched model, so only summation order differs
(flash kernel over 1 query vs over many).

dynamic-ntk (default mode, per_query=false) is checked on one-layer models. Its frequencies
follow the current length, and the cache keeps keys before RoPE, so every cached key is
re-rotated for the current length (exact, where transformers' own `dynamic` keeps stale
rotations). But a cache also keeps the *inputs* of layers 2.. for earlier tokens, computed
when those tokens were processed, i.e. at their own shorter lengths; a full forward
recomputes them at the current length. No cache can agree with a recomputation there (a
length-dependent method changes every token's hidden states as the sequence grows), so in
this mode exactness is a one-layer statement. `dynamic-ntk:per_query=true` gives each row
its own length's frequencies and is exact at any depth: test_patch_dynamic_per_query.py.
"""

import pytest
import torch
from transformers import DynamicCache

import ropelab.patches as P
from tiny_models import FAMILIES, WINDOW, build, left_pad, logits, tokens

ATOL = 1e-5
# windows below the lengths used here (8 < 40), so the far parts are not empty
METHODS = [
    "rerope:window=8",
    "leaky-rerope:window=8,scale=4",
    "self-extend:window=8,group=4",
    "dynamic-ntk:scale=2",
    "rerope:window=8,logn=true",
    "ntk:scale=2",
    "yarn:scale=2",
]
# on every family: one relative method and the length-dependent one; the rest on Llama
FAMILY_METHODS = [(f, m) for f in FAMILIES for m in ("rerope:window=8,logn=true", "dynamic-ntk:scale=2")]
FAMILY_METHODS += [("llama", m) for m in METHODS if m not in ("rerope:window=8,logn=true", "dynamic-ntk:scale=2")]
FAMILY_METHODS += [("gemma3", "self-extend:window=8,group=4"), ("gemma2", "leaky-rerope:window=8,scale=4")]


def _one_layer_if_length_dependent(spec):
    return {"num_hidden_layers": 1, "layer_types": None} if spec.startswith("dynamic") else {}


def _reference_step_logits(model, ids, start, length_dependent):
    """Logits at positions start.. from full forwards: one forward for a prefix-consistent
    method; for a length-dependent one, a forward of each prefix (its frequencies follow the
    current length, so position t's logits come from the sequence of length t + 1)."""
    if not length_dependent:
        return logits(model, ids)[:, start:]
    return torch.cat([logits(model, ids[:, : t + 1])[:, -1:] for t in range(start, ids.shape[1])], dim=1)


@pytest.mark.parametrize("family,spec", FAMILY_METHODS)
def test_prefill_equals_token_by_token_decoding(family, spec):
    model = build(family, **_one_layer_if_length_dependent(spec))
    ids = tokens(40)
    start = 28  # prefill 28 tokens (< L = 32), then decode past L one token at a time
    with P.patched(model, spec) as handle:
        expected = _reference_step_logits(model, ids, start - 1, handle.method.length_dependent)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            steps = [model(ids[:, :start], past_key_values=cache, use_cache=True).logits[:, -1:]]
            for t in range(start, ids.shape[1] - 1):
                steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected[:, : len(steps)], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3", "cohere", "falcon"])
@pytest.mark.parametrize("spec", ["rerope:window=8", "dynamic-ntk:scale=2"])
def test_generate_same_tokens_cached_and_uncached(family, spec):
    model = build(family, **_one_layer_if_length_dependent(spec))
    prompt = tokens(26)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with P.patched(model, spec), torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.tolist() == uncached.tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma3", "phi", "glm", "falcon"])
@pytest.mark.parametrize("spec", ["rerope:window=8,logn=true", "self-extend:window=8,group=4", "dynamic-ntk:scale=2", "ntk:scale=2"])
def test_left_padded_batch_matches_each_sequence_alone(family, spec):
    model = build(family)
    long, short = tokens(44, seed=2)[0], tokens(30, seed=3)[0]  # both past L for dynamic
    ids, mask, positions = left_pad([long, short])
    with P.patched(model, spec):
        batch = logits(model, ids, attention_mask=mask, position_ids=positions)
        alone = [logits(model, s[None]) for s in (long, short)]
    torch.testing.assert_close(batch[0], alone[0][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[1, -len(short) :], alone[1][0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", ["rerope:window=4", "dynamic-ntk:scale=2", "ntk:scale=2"])
def test_sliding_layers_keep_their_window(spec):
    """Mistral's layers all slide (window 8): over 2 layers the last token sees at most
    2·7 tokens back, so changing token 0 of 48 must leave the last logits untouched, and it
    must change them in the unpatched full-attention Llama (the test can fail)."""
    ids = tokens(48)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 100 + 1
    for family, must_see in (("mistral", False), ("llama", True)):
        model = build(family)
        with P.patched(model, spec):
            diff = (logits(model, ids)[0, -1] - logits(model, changed)[0, -1]).abs().max()
        assert (diff > 1e-4) == must_see, (family, spec, float(diff))
    assert 2 * (WINDOW - 1) < 47


def _cached_step_logits(model, ids, start):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(ids[:, :start], past_key_values=cache, use_cache=True).logits[:, -1:]]
        for t in range(start, ids.shape[1] - 1):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(steps, dim=1)


def test_dynamic_ntk_cache_is_exact_where_transformers_own_is_not():
    """One layer, where exactness is well defined (module docstring): ropelab's cached
    decoding equals recomputation, transformers' own `dynamic` does not (it keeps keys
    rotated at the length they were cached at; transformers issue 25104)."""
    from tiny_models import rebuild_like, rope_parameters

    model = build("llama", num_hidden_layers=1, layer_types=None)
    ids, start = tokens(48), 28
    native = rebuild_like(
        model, num_hidden_layers=1, layer_types=None,
        rope_parameters=rope_parameters("llama", rope_type="dynamic", factor=2.0),
    )

    def gap(net):
        cached = _cached_step_logits(net, ids, start)
        return float((cached - _reference_step_logits(net, ids, start - 1, True)[:, : cached.shape[1]]).abs().max())

    native_gap = gap(native)
    with P.patched(model, "dynamic-ntk:scale=2"):
        ours_gap = gap(model)
    assert ours_gap <= ATOL and native_gap > 1e-2, (ours_gap, native_gap)
