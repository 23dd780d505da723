"""Family facts (patches/model_facts.py): the table of supported families, what a family
cannot serve, the LM head's logits transform and the training-length rule."""

import pytest
import torch

import ropelab.patches as P
from ropelab.patches import model_facts
from test_patch_handle import assert_untouched, snapshot
from tiny_models import FAMILIES, TRAIN_LENGTH, WINDOW, build, config, logits, rebuild_like, tokens

NEW = ["mixtral", "qwen2_moe", "qwen3_moe", "olmo", "olmoe", "starcoder2"]


def test_every_tiny_family_is_supported_and_the_new_ones_are_listed():
    supported = P.supported_families()
    assert {config(f).model_type for f in FAMILIES} <= set(supported)
    assert set(NEW) <= set(supported)


def test_qwen2_moe_sliding_layers_keep_their_window_on_both_routes():
    """Qwen2-MoE applies its window only through the mask; patches/qwen2_moe.py passes it on.
    Without that, the attention route attends past the window (logits off by ~3.9, seen).
    1e-5: as in test_patch_equivalences.py (float32 frequencies one ulp apart, another kernel)."""
    model = build("qwen2_moe")
    assert model.config.layer_types == ["full_attention", "sliding_attention"] and model.config.sliding_window == WINDOW
    before = snapshot(model)
    ids = tokens(48)  # past the window of 8
    reference = logits(model, ids)
    with P.patched(model, "rerope:window=64") as handle:  # window past the sequence: plain RoPE
        assert handle.route == "attention"
        torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=0)
    assert_untouched(model, before)
    native = rebuild_like(model, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with P.patched(model, "linear:scale=2"):  # the frequency route keeps transformers' own mask
        torch.testing.assert_close(logits(model, ids), logits(native, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,field,value", [("gemma2", "final_logit_softcapping", 3.0), ("cohere", "logit_scale", 0.5),
                                                ("granite", "logits_scaling", 4.0), ("gemma3", "final_logit_softcapping", 2.0)])
def test_logits_transform_reproduces_the_model_head(family, field, value):
    model = build(family, **{field: value})
    ids = tokens(12)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        ours = model_facts.logits_transform(model)(model.get_output_embeddings()(hidden))
        plain = model.get_output_embeddings()(hidden)
    # the same float32 operations in the same order as the model's forward: equal bits
    torch.testing.assert_close(ours, logits(model, ids), atol=0, rtol=0)
    assert (ours - plain).abs().max() > 1e-2  # the transform does something at this setting


def test_families_without_a_head_transform_get_the_identity():
    model = build("llama")
    x = torch.randn(3, 5)
    assert torch.equal(model_facts.logits_transform(model)(x), x)


def test_train_length_rule():
    assert model_facts.train_length(config("llama")) == TRAIN_LENGTH
    # Phi-3 keeps the pretraining length at the top of its config; it wins over max_position_embeddings
    assert model_facts.train_length(config("phi3", max_position_embeddings=128)) == TRAIN_LENGTH
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 16}
    assert model_facts.train_length(config("llama", rope_parameters=yarn, max_position_embeddings=64)) == 16
    assert model_facts.train_length(config("gemma3")) == TRAIN_LENGTH  # per-layer-type parameters
    with pytest.raises(ValueError, match="max_position_embeddings=None"):
        model_facts.train_length(type("Config", (), {"max_position_embeddings": None})())
