"""ropelab.patches.export: the exported folder, loaded by plain transformers, gives the
patched model's logits; methods without a native rope_type are refused by name, and nothing
is written then."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import build, logits, tokens
from transformers import AutoModelForCausalLM

from ropelab.patches import architectures as arch
from ropelab.patches import patch
from ropelab.patches.export import export, exported_config

# transformers builds the exported model's frequencies in float32, ropelab in float64 then
# rounds them: a few float32 ulp apart, which moves logits at position 47 by ≤ 7e-6 here;
# the bound tests/patches/test_patch_equivalences.py uses for transformers' native types.
ATOL = 1e-5
IDS = tokens(48)  # past the training length (32): dynamic scales, yarn/llama3 interpolate
EXPORTABLE = ["rope:base=5000", "linear:scale=2", "ntk:scale=2", "ntk-old:scale=3", "dynamic-ntk:scale=2",
              "yarn:scale=2", "yarn:scale=4,beta_fast=16,attention_factor=1.3", "llama3:scale=4"]
# llama (GQA), gemma3 (one rotary per layer type), phi (partial rotary), cohere (interleaved pairs), gpt_neox
FAMILIES = ["llama", "gemma3", "phi", "cohere", "gpt_neox"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build(request.param)


@pytest.mark.parametrize("spec", EXPORTABLE)
def test_exported_folder_gives_the_patched_logits(family_model, spec, tmp_path):
    family, model = family_model
    export(model, spec, tmp_path / "out")
    with patch(model, spec):
        expected = logits(model, IDS)
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(served, IDS), expected, atol=ATOL, rtol=0)
    record = json.loads((tmp_path / "out" / "ropelab_export.json").read_text())
    assert record["method"].startswith(spec.split(":")[0])
    assert bool(record["note"]) == spec.startswith("dynamic-ntk")  # the cached-decoding caveat, for dynamic only


def test_config_carries_the_native_types():
    model = build("llama")  # head_dim 16, rope_theta 10000, max_position_embeddings 32
    assert exported_config(model, "ntk:scale=2").rope_parameters == {"rope_type": "default", "rope_theta": 10000 * 2 ** (16 / 14)}
    yarn = exported_config(model, "yarn:scale=4")
    assert yarn.rope_parameters == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "attention_factor": pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1),
                                    "original_max_position_embeddings": 32}
    assert yarn.max_position_embeddings == 128  # the extended context; L stays in original_max_position_embeddings
    assert exported_config(model, "dynamic-ntk:scale=2").rope_parameters["rope_type"] == "dynamic"
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}  # the model's own is untouched


@pytest.mark.parametrize("family, spec, reason", [
    ("llama", "rerope:window=8", r"method='rerope:window=8': cannot export: a relative-position map"),
    ("llama", "leaky-rerope:window=8,scale=4", r"method='leaky-rerope:window=8,scale=4': cannot export: a relative-position map"),
    ("llama", "self-extend:window=8,group=4", r"cannot export: a relative-position map \(grouped far positions\)"),
    ("llama", "beta-base:scale=2", r"method='beta-base:scale=2': cannot export: its frequencies .* match no transformers rope_type"),
    ("llama", "ntk:scale=2,logn=true", r"cannot export: log-n query scaling"),
    ("llama", "dynamic-ntk:scale=2,per_query=true", r"cannot export: per-query frequencies"),
    ("phi3", "yarn:scale=2", r"method='yarn:scale=2': cannot export to Phi3Config: .*must be one of \['longrope'\], got yarn$"),
])
def test_no_native_equivalent_is_refused_by_name_and_nothing_is_written(family, spec, reason, tmp_path):
    with pytest.raises(NotImplementedError, match=reason):
        export(build(family), spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_used_folder_and_a_patched_model(tmp_path):
    model = build("llama")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep")
    with pytest.raises(ValueError, match=r"out=.*used': exists and is not an empty folder"):
        export(model, "linear:scale=2", tmp_path / "used")
    with patch(model, "linear:scale=2"), pytest.raises(ValueError, match=r"patched with 'linear:scale=2[,'].*undo it first"):
        export(model, "linear:scale=2", tmp_path / "new")
    assert not (tmp_path / "new").exists() and (tmp_path / "used" / "x").read_text() == "keep"


def longrope_lists(dim: int) -> dict:
    """Distinct per-pair factors (the shape of Phi-3's: short near 1, long growing to ~8)."""
    half = dim // 2
    return {"short_factor": [1.0 + 0.02 * i for i in range(half)],
            "long_factor": [1.0 + 7.0 * i / max(half - 1, 1) for i in range(half)]}


@pytest.mark.parametrize("family", ["llama", "phi3"])  # phi3: its config takes no other scaling
def test_longrope_exports_as_native_longrope(family, tmp_path):
    model = build(family)
    lists = longrope_lists(arch.find_rotary_sites(model)[0].dim)
    export(model, "longrope", tmp_path / "out", scale=4.0, **lists)
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    params = served.config.rope_parameters
    assert params["rope_type"] == "longrope" and params["short_factor"] == lists["short_factor"]
    assert params["attention_factor"] == pytest.approx((1 + math.log(4) / math.log(32)) ** 0.5, rel=1e-15)
    for ids in (IDS, tokens(24)):  # past L = 32 (the long list) and within it (the short list)
        with patch(model, "longrope", scale=4.0, **lists):
            expected = logits(model, ids)
        torch.testing.assert_close(logits(served, ids), expected, atol=ATOL, rtol=0)


def test_a_longrope_model_exports_its_own_lists_and_without_lists_is_refused(tmp_path):
    lists = longrope_lists(16)
    native = build("llama", max_position_embeddings=128, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32, **lists})
    export(native, "longrope", tmp_path / "out")  # the lists from the model's config
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(served, IDS), logits(native, IDS), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"short_factor=None: longrope needs per-pair factors"):
        export(build("llama"), "longrope:scale=4", tmp_path / "none")
    assert not (tmp_path / "none").exists()
