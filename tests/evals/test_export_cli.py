"""`ropelab export` on the embedded (GGUF) default model writes its dequantised float weights,
which plain transformers loads and serves as the patched model; a failed export leaves --out as
it found it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from evals_helpers import make_llama
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from ropelab.evals.cli import main
from ropelab.patches.export import export

CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 4


@pytest.mark.slow  # loads the default model twice and writes 540 MB (1.5-3 min on 2 shared cores)
def test_export_of_the_default_model_is_served_by_plain_transformers(tmp_path, capsys):
    import ropelab

    out = tmp_path / "smollm2-yarn4"
    assert main(["export", "--method", "yarn:scale=4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "weights: float32, dequantized from the GGUF file" in printed
    note = json.loads((out / "ropelab_export.json").read_text())
    assert note["weights"].startswith("float32, dequantized") and note["rope_parameters"]["rope_type"] == "yarn"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    model, tokenizer = ropelab.load_default_model()
    served = AutoModelForCausalLM.from_pretrained(out).eval()  # no gguf_file: a plain float folder
    ours, theirs = model.state_dict(), served.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = tokenizer(CODE, return_tensors="pt").input_ids  # 144 tokens
    with torch.no_grad(), ropelab.patched(model, "yarn:scale=4"):
        want = model(ids).logits
        frequencies = model.model.rotary_emb.inv_freq.clone()
    with torch.no_grad():
        got = served(ids).logits
        # transformers computes yarn's frequencies in float32, ropelab in float64 then rounds:
        # 1.1e-7 apart at most here (export checks 2e-6), which moves these logits by 1.5e-4
        # (measured) over 30 layers; with ropelab's frequencies copied in they are bit-identical.
        torch.testing.assert_close(served.model.rotary_emb.inv_freq, frequencies, rtol=2e-6, atol=0)
        torch.testing.assert_close(got, want, rtol=0, atol=3e-4)
        served.model.rotary_emb.inv_freq.copy_(frequencies)
        assert torch.equal(served(ids).logits, want)


def failing_tokenizer_save(monkeypatch):
    """Make the tokenizer's save fail, after the weights and config are written."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)


def test_a_failed_export_leaves_out_as_it_found_it(model_dir, tmp_path, monkeypatch, capsys):
    failing_tokenizer_save(monkeypatch)
    absent = tmp_path / "new" / "deeper" / "out"  # neither it nor its parents exist
    assert main(["export", "--model", str(model_dir), "--method", "yarn:scale=2", "--out", str(absent)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the parents made for it are gone too
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--model", str(model_dir), "--method", "yarn:scale=2", "--out", str(empty)]) == 1
    assert empty.is_dir() and not any(empty.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary folder left beside it
    monkeypatch.undo()
    assert main(["export", "--model", str(model_dir), "--method", "yarn:scale=2", "--out", str(empty)]) == 0
    assert (empty / "ropelab_export.json").is_file() and (empty / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_an_out_under_a_file_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    import ropelab.evals.export_command as command

    monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    assert main(["export", "--method", "yarn:scale=2", "--out", str(tmp_path / "file" / "out")]) == 2
    assert "is not a folder this process can write into" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def as_if_loaded_from_gguf(model):
    """The marks transformers leaves on a model loaded from a GGUF file (its weights already float)."""
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.hf_quantizer, model.quantization_method, model.is_quantized = quantizer, "gguf", True
    model.config.quantization_config = quantizer.quantization_config
    return quantizer


def test_gguf_marks_are_lifted_for_the_save_and_put_back(tokenizer, tmp_path):
    model = make_llama(len(tokenizer))
    quantizer = as_if_loaded_from_gguf(model)
    export(model, "yarn:scale=2", tmp_path / "out")
    assert model.hf_quantizer is quantizer and model.is_quantized  # the loaded model is as it was
    assert model.config.quantization_config is quantizer.quantization_config
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert "dequantized from the GGUF file" in json.loads((tmp_path / "out" / "ropelab_export.json").read_text())["weights"]
    model.register_buffer("packed_blocks", torch.zeros(4, dtype=torch.uint8))  # a layer still packed
    with pytest.raises(ValueError, match="1 modules still hold packed GGUF blocks"):
        export(model, "yarn:scale=2", tmp_path / "packed")
    assert not (tmp_path / "packed").exists() and model.hf_quantizer is quantizer
