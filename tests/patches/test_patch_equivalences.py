"""Every method reduces to something known, on every family (docs/methods.md,
"Equivalences every implementation must pass"), checked on the logits of tiny random models.

Tolerance 1e-5 absolute on logits: the unpatched model computes angles `position × θ` in
float32 and attends with an eager softmax; ropelab computes angles in float64 and attends
with torch's flash kernel (a different float32 summation order), and the frequencies
differ by a float32 ulp. On these models (logits up to ~5, positions < 64) that moves
logits by at most ~6e-6 (measured), while a real change of positions moves them by
0.1 to 5 (test_scaled_methods_change_the_logits).
"""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

import ropelab.patches as P
from tiny_models import FAMILIES, TRAIN_LENGTH, build, config, logits, rebuild_like, rope_parameters, tokens

ATOL = 1e-5
LONG = 48  # past the training length (32) and the sliding window (8)
SHORT = 24  # within the training length, past the sliding window

# method spec -> sequence length at which it must equal the unpatched model; on every family
NO_OPS = {
    "rope": LONG,
    "yarn:scale=1": LONG,  # frequency route, attention factor path
    "rerope:window=64": LONG,  # window ≥ length: no far pair
    "leaky-rerope:window=4,scale=1": LONG,  # k = 1: the far part is plain RoPE (exercises the merge)
    "self-extend:window=4,group=1": LONG,  # G = 1: likewise
    "dynamic-ntk:scale=2": SHORT,  # within the training length
    "rope:logn=true": TRAIN_LENGTH,  # every position < L
}
# the same route as one above, so on one family only (keeps the suite fast)
NO_OPS_LLAMA = {
    "linear:scale=1": LONG,
    "ntk:scale=1": LONG,
    "ntk-old:scale=1": LONG,
    "beta-base:scale=1": LONG,
    "llama3:scale=1": LONG,
    "leaky-rerope:window=64": LONG,
    "self-extend:window=64,group=4": LONG,
    "rerope:window=64,frequency_method=ntk(scale=1)": LONG,
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build(request.param)


def _assert_no_op(model, spec, length):
    ids = tokens(length)
    reference = logits(model, ids)
    with P.patched(model, spec):
        out = logits(model, ids)
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", list(NO_OPS))
def test_no_op_settings_equal_the_unpatched_model(family_model, spec):
    _assert_no_op(family_model[1], spec, NO_OPS[spec])


@pytest.mark.parametrize("spec", list(NO_OPS_LLAMA))
def test_more_no_op_settings_on_llama(spec):
    _assert_no_op(build("llama"), spec, NO_OPS_LLAMA[spec])


NATIVE = {  # ropelab spec -> transformers rope_parameters scaling with the same meaning
    "linear:scale=2": {"rope_type": "linear", "factor": 2.0},
    "dynamic-ntk:scale=2": {"rope_type": "dynamic", "factor": 2.0},
    "yarn:scale=2": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": TRAIN_LENGTH},
    "llama3:scale=2": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": TRAIN_LENGTH},
}


def accepts(family: str, scaling: dict) -> bool:
    """Whether transformers builds this family's config with `scaling` (Phi3Config takes only
    'longrope' besides the default; longrope's own comparison is test_patch_longrope.py)."""
    try:
        config(family, rope_parameters=rope_parameters(family, **scaling))
    except (ValueError, KeyError, StrictDataclassClassValidationError):  # Phi3 reads "yarn" as longrope: KeyError
        return False
    return True


NATIVE_CASES = [(f, spec) for spec in NATIVE for f in FAMILIES if accepts(f, NATIVE[spec])]


def test_only_phi3_refuses_the_native_scalings():
    assert {f for f in FAMILIES for spec in NATIVE if (f, spec) not in NATIVE_CASES} == {"phi3"}


@pytest.mark.parametrize("family,spec", NATIVE_CASES)
def test_scaled_methods_equal_transformers_native(family, spec):
    model = build(family)
    native = rebuild_like(model, rope_parameters=rope_parameters(family, **NATIVE[spec]))
    ids = tokens(LONG)  # past L, so dynamic is scaling
    with P.patched(model, spec):
        out = logits(model, ids)
    torch.testing.assert_close(out, logits(native, ids), atol=ATOL, rtol=0)


def test_scaled_methods_change_the_logits(family_model):
    """The other side of the no-op tests: a real setting must move the logits."""
    family, model = family_model
    ids = tokens(LONG)
    reference = logits(model, ids)
    for spec in ("ntk:scale=4", "rerope:window=4", "dynamic-ntk:scale=4", "rope:logn=true"):
        with P.patched(model, spec):
            assert (logits(model, ids) - reference).abs().max() > 1e-2, spec
