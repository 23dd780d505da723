"""dca, string, lm-infinite and sinks patched into real model families through the attention
route (patches/routes/attention.py): cached decoding equals prefill (the KV cache keeps the
keys' rotated forms, "near" or DCA's "chunk", patches/key_cache.py), a left-padded batch
equals each sequence alone, parameters at the sequence reduce to the unpatched model, the
authors' defaults come from the model's training length, and a family that cannot take
them is refused before it is touched, naming both.

The kernel itself is checked against the float64 maps in tests/rope/test_key_range_methods.py.
Tolerance as in test_patch_decoding.py (1e-5 on logits): both sides run the same float32
model, only summation order differs.
"""

import pytest
import torch
import transformers
from transformers import DynamicCache

import ropelab.patches as P
from tiny_models import TRAIN_LENGTH, build, left_pad, logits, tokens

ATOL = 1e-5
# Parameters below the 40 tokens used, so every part has pairs (L = 32 in the tiny models).
SPECS = {
    "dca": "dca:chunk_size=12,local_window=3",
    "string": "string:shift=10,local_window=3",
    "lm-infinite": "lm-infinite:n_global=3,n_local=10",
    "sinks": "sinks:sinks=2,window=9",
}
# Llama (plain), Gemma-2 (soft-cap, sliding-window layers), Mistral (every layer slides),
# Qwen2 (mixed layer types), Falcon (its own attention forward), GPT-NeoX (partial rotary).
DECODE_CASES = [(f, s) for f in ("llama", "gemma2") for s in SPECS.values()]
DECODE_CASES += [("mistral", SPECS["dca"]), ("qwen2", SPECS["sinks"]), ("falcon", SPECS["lm-infinite"]),
                 ("gpt_neox", SPECS["string"])]


@pytest.mark.parametrize("family,spec", DECODE_CASES)
def test_prefill_equals_token_by_token_decoding(family, spec):
    model = build(family)
    ids, start = tokens(40), 20
    with P.patched(model, spec):
        expected = logits(model, ids)[:, start - 1 : -1]
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            steps = [model(ids[:, :start], past_key_values=cache, use_cache=True).logits[:, -1:]]
            for t in range(start, ids.shape[1] - 1):
                steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,spec", [("llama", SPECS["dca"]), ("llama", SPECS["sinks"]),
                                         ("gemma2", SPECS["lm-infinite"]), ("qwen2", SPECS["string"])])
def test_left_padded_batch_matches_each_sequence_alone(family, spec):
    model = build(family)
    long, short = tokens(44, seed=2)[0], tokens(30, seed=3)[0]
    ids, mask, positions = left_pad([long, short])
    with P.patched(model, spec):
        batch = logits(model, ids, attention_mask=mask, position_ids=positions)
        alone = [logits(model, s[None]) for s in (long, short)]
    torch.testing.assert_close(batch[0], alone[0][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[1, -len(short) :], alone[1][0], atol=ATOL, rtol=0)


# At the boundary every pair among 32 tokens (positions ≤ 31) is plain RoPE; one past it not.
REDUCTIONS = [
    ("dca:chunk_size=31,local_window=3", "dca:chunk_size=30,local_window=3"),
    ("sinks:sinks=4,window=28", "sinks:sinks=4,window=26"),
    ("lm-infinite:n_global=0,n_local=32", "lm-infinite:n_global=0,n_local=31"),
    ("string:shift=32,local_window=3,attention_factor=1", "string:shift=31,local_window=3,attention_factor=1"),
]


@pytest.mark.parametrize("at,past", REDUCTIONS)
def test_parameters_at_the_sequence_reproduce_the_unpatched_model(at, past):
    model = build("llama")
    ids = tokens(TRAIN_LENGTH)
    reference = logits(model, ids)
    with P.patched(model, at):
        same = logits(model, ids)
    with P.patched(model, past):
        other = logits(model, ids)
    torch.testing.assert_close(same, reference, atol=ATOL, rtol=0)
    assert float((other - reference).abs().max()) > 1e-3


@pytest.mark.parametrize("name,expected", [("dca", "chunk_size=24,local_window=4"), ("sinks", "window=28"),
                                           ("lm-infinite", "n_local=32"), ("string", "shift=10,local_window=10")])
def test_defaults_come_from_the_models_training_length(name, expected):
    model = build("llama")
    with P.patched(model, name) as handle:
        params = handle.method.map_params()
        assert handle.method.train_length == TRAIN_LENGTH
    want = dict(item.split("=") for item in expected.split(","))
    assert {k: str(params[k]) for k in want} == want


def test_bad_parameters_for_the_model_are_refused_before_it_is_touched():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"sinks \+ window = 34 must be <= train_length=32"):
        P.patch(model, "sinks:sinks=2,window=32")
    assert P.describe(model).startswith("no ropelab patch")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config._attn_implementation != "ropelab"


def test_a_sinusoidal_family_is_refused_naming_both():
    config = transformers.XGLMConfig(vocab_size=101, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4,
                                     max_position_embeddings=32, pad_token_id=1)
    model = transformers.XGLMForCausalLM(config).eval()
    for spec in SPECS.values():
        with pytest.raises(ValueError, match=rf"^method='{spec.split(':')[0]}.*XGLM adds absolute sinusoidal"):
            P.patch(model, spec)
