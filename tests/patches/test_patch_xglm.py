"""Frequency maps on the sinusoidal-position decoder XGLM (patches/xglm.py). Tolerance
1e-5 on logits: the patched table is computed with float64 angles, XGLM's with float32."""

import pytest
import torch
import transformers

import ropelab.patches as P
from tiny_models import logits, tokens


@pytest.fixture(scope="module")
def xglm():
    torch.manual_seed(0)
    config = transformers.XGLMConfig(vocab_size=101, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4,
                                     max_position_embeddings=32, init_std=0.2, pad_token_id=1)
    return transformers.XGLMForCausalLM(config).eval()


@pytest.mark.parametrize("spec", ["rope", "sinusoidal", "ntk:scale=1", "linear:scale=1", "beta-base:scale=1"])
def test_no_op_settings_reproduce_xglm(xglm, spec):
    ids = tokens(48)
    reference = logits(xglm, ids)
    with P.patched(xglm, spec):
        torch.testing.assert_close(logits(xglm, ids), reference, atol=1e-5, rtol=0)
    assert torch.equal(logits(xglm, ids), reference)


def test_frequency_maps_change_xglm_and_cache_agrees(xglm):
    prompt = tokens(20)
    reference = logits(xglm, prompt)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=1)
    with P.patched(xglm, "linear:scale=2"), torch.no_grad():
        assert (logits(xglm, prompt) - reference).abs().max() > 1e-2
        assert xglm.generate(prompt, use_cache=True, **kwargs).tolist() == xglm.generate(prompt, use_cache=False, **kwargs).tolist()
    assert "xglm" in P.supported_families()


@pytest.mark.parametrize("spec,message", [("rerope:window=4", "only frequency maps"), ("dynamic-ntk:scale=2", "only frequency maps"),
                                          ("dynamic-ntk:scale=2,per_query=true", "only frequency maps"),
                                          ("rope:logn=true", "only frequency maps"), ("yarn:scale=2", "attention_factor")])
def test_methods_that_need_attention_are_refused_on_xglm(xglm, spec, message):
    with pytest.raises(ValueError, match=message):
        P.patch(xglm, spec)
    assert P.describe(xglm).startswith("no ropelab patch")
