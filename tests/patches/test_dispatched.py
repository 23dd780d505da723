"""Patching models dispatched by accelerate (hooks on every module, weights on the meta
device until a forward pulls them from CPU or disk): the patch applies, its probe verifies,
the logits are the non-dispatched patched model's, and undo() gives the dispatched model back
bit for bit. On this CPU-only machine the split is CPU + disk offload (device_map with a
small max_memory) and accelerate's cpu_offload hooks; the execution device is the CPU.

Logits are compared with torch.equal: the dispatched forward runs the same float32 ops on
the same device in the same order (accelerate only moves weights in), so nothing may differ.
"""

from __future__ import annotations

import pytest
import torch
import tiny_models as tm
from safetensors.torch import load_file

from ropelab.evals.loading import load_model
from ropelab.patches import patch

METHODS = ["ntk:scale=2", "yarn:scale=2", "rerope:window=8", "dynamic-ntk:scale=2"]
IDS = tm.tokens(48)  # past the training length (32) and the rerope window


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-layer tiny Llama in a folder, with its unpatched and patched logits (not dispatched)."""
    model = tm.build("llama", num_hidden_layers=4)
    folder = tmp_path_factory.mktemp("tiny-llama-4")
    model.save_pretrained(folder)
    save_tokenizer(folder)
    expected = {"unpatched": tm.logits(model, IDS)}
    for spec in METHODS:
        with torch.no_grad():
            handle = patch(model, spec)
            expected[spec] = tm.logits(model, IDS)
            handle.undo()
    return folder, expected


def save_tokenizer(folder) -> None:
    """A word-level tokenizer over the tiny vocabulary (the loader loads one with every model)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(tm.VOCAB)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")), unk_token="w0").save_pretrained(folder)


def dispatched(folder, how: str):
    if how == "cpu+disk":  # 150 kB of "CPU" for a 224 kB model: the first layers stay, the rest go to disk
        model, _, _ = load_model(str(folder), device_map="sequential", max_memory="cpu=150000", attn_implementation="eager")
        assert {"cpu", "disk"} <= set(model.hf_device_map.values()), model.hf_device_map
    elif how == "all-disk":  # even the embeddings are on the meta device between forwards
        model, _, _ = load_model(str(folder), device_map="sequential", max_memory="cpu=20KB", attn_implementation="eager")
        assert set(model.hf_device_map.values()) == {"disk"}
        assert model.get_input_embeddings().weight.device.type == "meta"
    else:  # accelerate.cpu_offload: every weight kept in a CPU state dict, moved in per module
        from accelerate import cpu_offload

        model = tm.build("llama", num_hidden_layers=4)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        cpu_offload(model, execution_device="cpu")
        assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    return model


def snapshot(model) -> dict:
    """What a patch may change: rotary buffers and attributes, instance forwards, the attention implementation."""
    rotary = model.model.rotary_emb
    return {
        "buffers": {k: (v.clone(), v.device) for k, v in rotary._buffers.items()},
        "rotary": dict(vars(rotary)),
        "forwards": {name: vars(m).get("forward") for name, m in model.named_modules()},
        "attn": model.config._attn_implementation,
    }


def same(a: dict, b: dict) -> bool:
    buffers = a["buffers"].keys() == b["buffers"].keys() and all(
        torch.equal(a["buffers"][k][0], b["buffers"][k][0]) and a["buffers"][k][1] == b["buffers"][k][1] for k in a["buffers"])
    rotary = {k: v for k, v in a["rotary"].items() if k != "_buffers"} == {k: v for k, v in b["rotary"].items() if k != "_buffers"}
    return buffers and rotary and a["forwards"] == b["forwards"] and a["attn"] == b["attn"]


@pytest.mark.parametrize("how", ["cpu+disk", "all-disk", "cpu_offload"])
@pytest.mark.parametrize("spec", METHODS)
def test_patch_verify_and_undo_on_a_dispatched_model(saved, how, spec):
    folder, expected = saved
    model = dispatched(folder, how)
    assert torch.equal(tm.logits(model, IDS), expected["unpatched"])
    before = snapshot(model)
    handle = patch(model, spec)  # raises if its probe forward does not see the method
    assert torch.equal(tm.logits(model, IDS), expected[spec])
    handle.undo()
    assert same(snapshot(model), before)
    assert torch.equal(tm.logits(model, IDS), expected["unpatched"])
