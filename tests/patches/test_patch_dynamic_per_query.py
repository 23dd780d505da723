"""dynamic-ntk with per_query=true: exact cached decoding on models of any depth.

In the default mode (transformers' `dynamic`) a forward over l tokens gives every row the
frequencies for length l, so on two or more layers a prefill cannot equal token-by-token
decoding: the cache keeps token j's deeper-layer states from step j, at length j + 1
(test_patch_decoding's docstring). With per_query=true row p uses the frequencies for
length p + 1 with every key it attends to, i.e. exactly what decoding step p computes. So,
on the 2-layer tiny models (L = 32, lengths up to 44): prefill == decoding, cached
`generate()` == uncached, a prefix's logits never change, plain RoPE while p + 1 ≤ L, and
a left-padded batch gives each sequence its logits alone. Tolerance 1e-5 as in
test_patch_decoding (same model both sides; only the kernels' summation order differs).
"""

import pytest
import torch
from transformers import DynamicCache

import ropelab.patches as P
from tiny_models import FAMILIES, TRAIN_LENGTH as L, build, left_pad, logits, tokens

ATOL = 1e-5
PER_QUERY = "dynamic-ntk:scale=2,per_query=true"
DEFAULT = "dynamic-ntk:scale=2"


def _cached_logits(model, ids, start):
    """Logits of every position: a cached prefill of `start` tokens, then one token per step."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(ids[:, :start], past_key_values=cache, use_cache=True).logits]
        for t in range(start, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_equals_decoding_and_prefixes_keep_their_logits(family):
    model = build(family)  # 2 layers
    ids = tokens(44)
    plain = logits(model, ids)
    with P.patched(model, PER_QUERY) as handle:
        assert handle.route == "attention" and not handle.method.length_dependent
        full = logits(model, ids)
        for start in (20, 36):  # steps from within L to past it; a prefill past L, then steps
            torch.testing.assert_close(_cached_logits(model, ids, start), full, atol=ATOL, rtol=0)
        torch.testing.assert_close(logits(model, ids[:, :38]), full[:, :38], atol=ATOL, rtol=0)
    torch.testing.assert_close(full[:, :L], plain[:, :L], atol=ATOL, rtol=0)  # lengths ≤ L: plain RoPE
    assert (full[:, L:] - plain[:, L:]).abs().max() > 1e-3  # past L it scales (min measured: 0.010, Cohere)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: sliding window and soft-capping
def test_relative_method_over_per_query_frequencies(family):
    model = build(family)
    ids = tokens(44)
    with P.patched(model, "rerope:window=8,logn=true,frequency_method=dynamic-ntk(scale=2,per_query=true)"):
        full = logits(model, ids)
        torch.testing.assert_close(_cached_logits(model, ids, 30), full, atol=ATOL, rtol=0)
        torch.testing.assert_close(logits(model, ids[:, :38]), full[:, :38], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_row_p_is_the_default_modes_last_row_over_p_plus_one_tokens(family):
    """The two modes agree where the default mode's one length is the query's own: on one
    layer, row p of a per-query prefill is the last row of a default prefill of p + 1 tokens."""
    model = build(family, num_hidden_layers=1, layer_types=None)
    ids = tokens(44)
    with P.patched(model, PER_QUERY):
        rows = logits(model, ids)
    with P.patched(model, DEFAULT):
        last = torch.cat([logits(model, ids[:, : p + 1])[:, -1:] for p in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(rows, last, atol=ATOL, rtol=0)


def test_default_mode_is_not_exact_on_two_layers():
    """Why per_query exists: decoding after a 28-token prefill, against what a full forward
    gives the newest token (default: the last row of each prefix; per-query: one forward)."""
    model = build("llama")
    ids, start = tokens(44), 28
    with P.patched(model, DEFAULT):
        reference = torch.cat([logits(model, ids[:, : t + 1])[:, -1:] for t in range(start, ids.shape[1])], dim=1)
        default_gap = (_cached_logits(model, ids, start)[:, start:] - reference).abs().max()
    with P.patched(model, PER_QUERY):
        per_query_gap = (_cached_logits(model, ids, start) - logits(model, ids)).abs().max()
    assert default_gap > 0.1 and per_query_gap <= ATOL, (float(default_gap), float(per_query_gap))


# sliding window, soft-capping, per-layer-type rotary, partial rotary, interleaved, own dispatch
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3", "phi", "glm", "falcon"])
def test_left_padded_batch_matches_each_sequence_alone(family):
    model = build(family)
    # past L, within L, and crossing L inside the forward: three offsets, three row splits
    sequences = [tokens(44, seed=2)[0], tokens(30, seed=3)[0], tokens(38, seed=4)[0]]
    ids, mask, positions = left_pad(sequences)
    with P.patched(model, PER_QUERY):
        batch = logits(model, ids, attention_mask=mask, position_ids=positions)
        for row, s in enumerate(sequences):
            torch.testing.assert_close(batch[row, -len(s) :], logits(model, s[None])[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "falcon"])  # one of each rotary/dispatch kind
def test_generate_cached_equals_uncached_and_alone(family):
    model = build(family)
    prompts = [tokens(26, seed=5)[0], tokens(23, seed=6)[0]]  # 10 new tokens take both past L
    ids, mask, _ = left_pad(prompts)
    # min_new_tokens: no sequence stops early, so the batch rows line up with the lone runs
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with P.patched(model, PER_QUERY), torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, use_cache=True, **kwargs)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
        alone = [model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs) for p in prompts]
    assert cached.tolist() == uncached.tolist()
    assert [row[ids.shape[1] :] for row in cached.tolist()] == [a[0, len(p) :].tolist() for a, p in zip(alone, prompts)]
