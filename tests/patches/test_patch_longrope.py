"""`longrope` against transformers' own `longrope` on every supported family (all accept it;
Phi-3's config accepts no other scaling), both ways the factors reach the method: given in the spec, and read from
a 'longrope' config.

Tolerance 1e-5 absolute on logits, as in test_patch_equivalences.py: transformers computes
1/(λ_i·b^(2i/d)) in float32 and attends eagerly; ropelab computes it in float64, casts, and
attends with its own kernel (float32, another summation order). On these models that moves
logits by at most ~6e-6, while switching the list moves them by 0.1 or more
(test_the_list_follows_the_length).
"""

import pytest
import torch

import ropelab.patches as P
from ropelab.patches import architectures as arch
from tiny_models import FAMILIES, TRAIN_LENGTH, build, logits, rope_parameters, tokens

ATOL = 1e-5
LONG, SHORT = 48, 24  # past L = 32 (the long list), within it (the short list)
MAX_POSITIONS = 4 * TRAIN_LENGTH  # s = 4 by transformers' ratio rule


def factor_lists(dim: int) -> tuple[list[float], list[float]]:
    """Distinct per-pair factors: short near 1, long growing to ~8 (the shape of Phi-3's)."""
    half = dim // 2
    return [1.0 + 0.02 * i for i in range(half)], [1.0 + 7.0 * i / max(half - 1, 1) for i in range(half)]


def rotary_dim(family: str) -> int:
    return arch.find_rotary_sites(build(family))[0].dim


def longrope_parameters(family: str) -> dict:
    short, long = factor_lists(rotary_dim(family))
    return rope_parameters(family, rope_type="longrope", short_factor=short, long_factor=long,
                           original_max_position_embeddings=TRAIN_LENGTH)


def native_model(family: str):
    return build(family, rope_parameters=longrope_parameters(family), max_position_embeddings=MAX_POSITIONS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [LONG, SHORT])
def test_factors_from_the_config_equal_transformers_longrope(family, length):
    """Patching a 'longrope' model with plain `longrope` reproduces the model itself."""
    model = native_model(family)
    ids = tokens(length)
    reference = logits(model, ids)
    with P.patched(model, "longrope") as handle:
        assert handle.route == "attention" and handle.method.short_factor is not None
        out = logits(model, ids)
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_given_factors_equal_transformers_longrope(family):
    """A default-RoPE model patched with the lists in the spec equals the native model."""
    native = native_model(family)
    model = build(family)
    model.load_state_dict(native.state_dict())
    short, long = factor_lists(rotary_dim(family))
    spec = {"short_factor": short, "long_factor": long, "scale": MAX_POSITIONS / TRAIN_LENGTH, "train_length": TRAIN_LENGTH}
    ids = tokens(LONG)
    with P.patched(model, "longrope", **spec):
        out = logits(model, ids)
    torch.testing.assert_close(out, logits(native, ids), atol=ATOL, rtol=0)


def test_the_list_follows_the_length():
    """The other side of the comparisons: the long list must change the logits at L + 1."""
    model = native_model("llama")
    ids = tokens(TRAIN_LENGTH + 1)
    short, _ = factor_lists(rotary_dim("llama"))
    with P.patched(model, "longrope", short_factor=short, long_factor=short):
        only_short = logits(model, ids)
    with P.patched(model, "longrope"):
        assert (logits(model, ids) - only_short).abs().max() > 1e-1


@pytest.mark.parametrize(
    "spec,message",
    [
        ("longrope:short_factor=[1,2],long_factor=[1,2]", r"short_factor=\(1, 2\): must have dim/2 = 8 values \(rotary dim 16\), not 2"),
        ("longrope", r"short_factor=None: longrope needs per-pair factors"),
    ],
)
def test_unusable_factors_are_refused_before_the_model_is_touched(spec, message):
    from test_patch_handle import assert_untouched, snapshot

    model = build("llama")  # default RoPE: no factors in its config
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        P.patch(model, spec)
    assert_untouched(model, before)


@torch.no_grad()
def test_cached_decoding_across_L_equals_the_uncached_forward():
    """Keys are cached before RoPE, so a step past L rotates every cached key with the long
    list, as an uncached forward over the same tokens does. One layer: with more, a cache keeps
    deeper-layer states from shorter lengths, as for dynamic-ntk (README, `dynamic-ntk`).
    Tolerance 1e-5: as above (ropelab's kernel over a cache vs over the full sequence)."""
    model = build("llama", num_hidden_layers=1, rope_parameters=longrope_parameters("llama"),
                  max_position_embeddings=MAX_POSITIONS)
    ids = tokens(TRAIN_LENGTH + 8)
    start = TRAIN_LENGTH - 4  # the prefill fits L (short list); the steps cross it
    with P.patched(model, "longrope"):
        out = model(input_ids=ids[:, :start], use_cache=True)
        cache = out.past_key_values
        for t in range(start, ids.shape[1]):
            step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            torch.testing.assert_close(step.logits[:, -1], logits(model, ids[:, : t + 1])[:, -1], atol=ATOL, rtol=0)


def test_longrope_as_the_frequency_method_of_a_relative_method():
    """`rerope` over `longrope()` reads the factors from the config too; a window past the
    sequence makes it plain longrope, so it must equal the native model (tolerance as above)."""
    model = native_model("llama")
    ids = tokens(LONG)
    reference = logits(model, ids)
    with P.patched(model, "rerope:window=64,frequency_method=longrope()") as handle:
        assert handle.method.frequency_method.long_factor is not None
        out = logits(model, ids)
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
