"""Patching a torchao-quantized model (int8 weights, CPU): the patch applies and its probe
verifies, the logits equal quantizing the patched model instead (the same int8 weights; the
rotary buffers are never quantized), and undo() gives the quantized model back bit for bit.
torchao is the `quant` extra; without it these tests skip."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, logits, tokens

from ropelab.patches import patch

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_  # noqa: E402

IDS = tokens(48)
CONFIGS = {"int8-weight-only": Int8WeightOnlyConfig, "int8-dynamic-activation": Int8DynamicActivationInt8WeightConfig}


def quantized(config: str, spec: str | None = None):
    model = build("llama")
    handle = patch(model, spec) if spec else None
    quantize_(model, CONFIGS[config]())
    assert type(model.model.layers[0].mlp.up_proj.weight).__module__.startswith("torchao")
    return model, handle


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("spec", ["ntk:scale=2", "yarn:scale=2", "rerope:window=8", "dynamic-ntk:scale=2"])
def test_patch_verify_undo_on_a_quantized_model(config, spec):
    model, _ = quantized(config)
    before = logits(model, IDS)
    handle = patch(model, spec)
    oracle, _ = quantized(config, spec)  # patched first, then quantized: same int8 weights, same method
    assert torch.equal(logits(model, IDS), logits(oracle, IDS))  # same ops on the same tensors
    handle.undo()
    assert torch.equal(logits(model, IDS), before)
