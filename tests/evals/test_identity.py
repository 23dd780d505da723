"""A model's identity names its weights (issue 8, item 1)."""

import shutil

import torch

from evals_helpers import make_llama
from ropelab.evals.cli import main
from ropelab.evals.identity import display_name, fingerprint, identity_key, model_identity
from run_helpers import snapshot


def save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_same_folder_name_different_weights_is_refused(tmp_path, tokenizer, text_dir, capsys):
    """Today's failure: a second model under the same basename reused the first model's numbers."""
    first = save(make_llama(len(tokenizer), seed=0), tokenizer, tmp_path / "a" / "tiny")
    second = save(make_llama(len(tokenizer), seed=1), tokenizer, tmp_path / "b" / "tiny")
    out = tmp_path / "run"
    argv = ["--data", str(text_dir), "--lengths", "32", "--targets", "8", "--short", "concatenate", "--quiet",
            "--out", str(out)]
    assert main(["eval", "--model", str(first), *argv]) == 0
    before = snapshot(out)
    assert main(["eval", "--model", str(second), *argv]) == 2
    err = capsys.readouterr().err
    assert "different model" in err and "model_key" in err
    assert snapshot(out) == before


def test_fingerprint_sees_the_weights_not_the_place(tmp_path, tokenizer):
    a = save(make_llama(len(tokenizer), seed=0), tokenizer, tmp_path / "a")
    b = save(make_llama(len(tokenizer), seed=1), tokenizer, tmp_path / "b")  # same config, sizes and headers
    copy = shutil.copytree(a, tmp_path / "elsewhere" / "a")
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(copy)  # a copy has the same fingerprint (its path still differs)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("silu", "gelu"))
    assert fingerprint(a) != fingerprint(copy)


def test_dtype_and_attention_are_part_of_it_device_is_not(tokenizer):
    model = make_llama(len(tokenizer))
    fp32 = model_identity(model, "tiny")
    assert fp32 == {"kind": "named", "name": "tiny", "dtype": "float32", "attention": fp32["attention"],
                    "weights": fp32["weights"]}
    assert fp32["attention"] is not None
    bf16 = model_identity(make_llama(len(tokenizer)).to(torch.bfloat16), "tiny")
    assert identity_key(bf16) != identity_key(fp32) and display_name(bf16) == "tiny@bfloat16"
    eager = make_llama(len(tokenizer))
    eager.config._attn_implementation = "eager"  # what from_pretrained(attn_implementation="eager") sets
    assert fp32["attention"] == "sdpa" and model_identity(eager, "tiny")["attention"] == "eager"
    assert "device" not in fp32


def test_the_python_api_default_name_still_tells_weights_apart(tokenizer):
    a, b = make_llama(len(tokenizer), seed=0), make_llama(len(tokenizer), seed=1)
    assert identity_key(model_identity(a, "model")) != identity_key(model_identity(b, "model"))
    assert identity_key(model_identity(a, "model")) == identity_key(model_identity(make_llama(len(tokenizer)), "model"))


def test_hub_identity_carries_revision_and_commit(tokenizer):
    model = make_llama(len(tokenizer))
    hub = model_identity(model, {"kind": "hub", "id": "org/m", "revision": "main", "commit": "0123456789abcdef"})
    assert hub["commit"] == "0123456789abcdef" and display_name(hub) == "org/m@01234567"
    other = model_identity(model, {"kind": "hub", "id": "org/m", "revision": "main", "commit": "fedcba"})
    assert identity_key(hub) != identity_key(other)
