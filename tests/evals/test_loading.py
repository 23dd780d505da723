"""ropelab.evals.loading: hub ids from a local HF cache (offline), local folders, dtypes,
devices, device maps and their refusals. No network: the hub cache is a temporary folder in
huggingface_hub's layout (models--org--name/{refs/main, snapshots/<commit>/})."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from ropelab.evals import loading
from ropelab.evals.identity import model_identity
from ropelab.evals.loading import load_model, loading_options, parse_max_memory

from evals_helpers import COMMIT, OTHER  # the commits of the `hub` fixture (conftest.py)


def logits(model, n=12):
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 3 + n)[None], use_cache=False).logits


def test_hub_id_resolves_from_cache_with_its_commit(hub, model):
    loaded, tokenizer, source = load_model("org/tiny")
    assert (source.kind, source.revision, source.commit) == ("hub", "main", COMMIT)
    assert source.path == str(hub / "models--org--tiny" / "snapshots" / COMMIT)
    assert model_identity(loaded, source) == {"kind": "hub", "id": "org/tiny", "commit": COMMIT, "dtype": "float32",
                                              "attention": loaded.config._attn_implementation}
    assert torch.equal(logits(loaded), logits(model))  # the same weights, bit for bit
    assert len(tokenizer) > 0


@pytest.mark.parametrize("revision, commit", [("v1", OTHER), (OTHER, OTHER), (COMMIT, COMMIT)])
def test_revision_by_tag_or_commit(hub, revision, commit):
    _, _, source = load_model("org/tiny", revision=revision)
    assert (source.revision, source.commit) == (revision, commit)


def test_offline_and_not_cached_is_one_line_naming_the_id_and_the_fetch(hub):
    with pytest.raises(ValueError) as e:
        load_model("org/missing")
    message = str(e.value)
    assert "\n" not in message
    assert "model='org/missing'" in message and "HF_HUB_OFFLINE=1" in message and "hf download org/missing" in message


def test_revision_not_cached_names_the_revision_and_what_is_cached(hub):
    with pytest.raises(ValueError, match=r"revision='v9' of model='org/tiny'.*main -> 0123456789ab.*--revision v9"):
        load_model("org/tiny", revision="v9")


def test_online_errors_become_one_line_value_errors(hub, monkeypatch):
    """Online (no HF_HUB_OFFLINE), an uncached id goes to snapshot_download; its errors are translated."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    def fake(error):
        def snapshot_download(repo_id, **kwargs):
            asked.append((repo_id, kwargs))
            raise error
        return snapshot_download

    response = SimpleNamespace(headers={}, request=None, status_code=404)  # what the errors read of a reply
    cases = [(RepositoryNotFoundError("404", response=response), "no such model on the hub"),
             (RevisionNotFoundError("404", response=response), "has no such branch, tag or commit"),
             (ConnectionError("refused"), "the hub could not be reached")]
    for error, text in cases:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake(error))
        with pytest.raises(ValueError, match=text):
            load_model("org/elsewhere", revision="dev")
    assert asked[0][0] == "org/elsewhere" and asked[0][1]["revision"] == "dev"
    assert asked[0][1]["cache_dir"] == str(hub) and "*.py" not in asked[0][1]["allow_patterns"]  # no remote code


def test_local_folder_records_its_resolved_path(model_dir, model):
    loaded, _, source = load_model(str(model_dir))
    assert (source.kind, source.path, source.commit) == ("local", str(model_dir.resolve()), None)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_is_loaded_and_part_of_the_identity(model_dir, dtype, torch_dtype):
    loaded, _, source = load_model(str(model_dir), dtype=dtype)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch_dtype
    assert model_identity(loaded, source)["dtype"] == dtype and source.placement == "cpu"


def test_attn_implementation_is_recorded(model_dir):
    loaded, _, source = load_model(str(model_dir), attn_implementation="eager")
    assert loaded.config._attn_implementation == "eager" == model_identity(loaded, source)["attention"]


def test_device_map_with_disk_offload_gives_the_same_logits(model_dir, model):
    # 20 kB of CPU for a ~100 kB model: accelerate sends the rest to disk (a temporary folder).
    loaded, _, source = load_model(str(model_dir), device_map="sequential", max_memory="cpu=20KB")
    assert "disk" in set(loaded.hf_device_map.values())
    assert source.placement == "device_map=sequential"
    _, _, whole = load_model(str(model_dir))
    assert model_identity(loaded, source) == model_identity(model, whole)  # placement is not in the identity
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float64"), r"dtype='float64': must be one of float32, bfloat16, float16"),
    (dict(device="tpu"), r"device='tpu': must be cpu, cuda, cuda:N or mps"),
    (dict(device="cuda:x"), r"device='cuda:x': must be cpu, cuda, cuda:N or mps"),
    (dict(device_map="auto", device="cpu"), r"device_map='auto' with device='cpu': give one"),
    (dict(device_map="everywhere"), r"device_map='everywhere': must be one of auto, balanced, sequential"),
    (dict(max_memory="cpu=1GiB"), r"max_memory='cpu=1GiB': only applies with a device_map"),
    (dict(device_map="auto", max_memory="cpu:1GiB"), r"'cpu:1GiB' is not KEY=SIZE; the rule: KEY=SIZE"),
    (dict(device_map="auto", max_memory="gpu=1GiB"), r"key 'gpu' is not a GPU index, cpu, mps or disk"),
    (dict(device_map="auto", max_memory="0=lots"), r"size 'lots' for 0 is not a size"),
    (dict(device_map="auto", max_memory="0=1GiB,0=2GiB"), r"0 is given twice"),
    (dict(attn_implementation="flash"), r"attn_implementation='flash': must be one of eager, sdpa, flash_attention_2"),
    (dict(trust_remote_code="yes"), r"trust_remote_code='yes': must be True or False"),
])
def test_bad_options_are_refused_before_loading(kwargs, message, monkeypatch):
    monkeypatch.setattr(loading, "_from_folder", lambda *a: pytest.fail("loaded despite a bad option"))
    with pytest.raises(ValueError, match=message):
        load_model("org/never-resolved", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_by_name():
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available here"):
        load_model("org/tiny", device="cuda")


def test_names_that_are_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"model='no/such/folder': not an embedded default"):
        load_model("no/such/folder")
    with pytest.raises(ValueError, match=r"revision='main': .* is a local folder"):
        load_model(str(tmp_path), revision="main")
    with pytest.raises(ValueError, match=r"device_map='auto': the embedded default 'smollm2-135m' loads whole"):
        load_model("default", device_map="auto")


def test_max_memory_parses_keys_and_sizes():
    assert parse_max_memory("0=2GiB, 1=2.5GB,cpu=8GiB,disk=1000") == {0: "2GiB", 1: "2.5GB", "cpu": "8GiB", "disk": 1000}
    with pytest.raises(ValueError, match=r"size '2.5' for 0 is not a size"):  # accelerate wants a unit with a fraction
        parse_max_memory("0=2.5")
    assert parse_max_memory({0: 10**9, "cpu": "1GiB"}) == {0: 10**9, "cpu": "1GiB"}


def test_flags_parse_and_errors_name_the_flag():
    parser = argparse.ArgumentParser()
    loading.add_loading_arguments(parser)
    args = parser.parse_args(["--dtype", "bfloat16", "--device-map", "auto", "--max-memory", "0=2GiB,cpu=8GiB",
                              "--revision", "v1", "--attn-implementation", "eager"])
    assert loading_options(args) == dict(revision="v1", dtype="bfloat16", device=None, device_map="auto",
                                         max_memory="0=2GiB,cpu=8GiB", attn_implementation="eager",
                                         trust_remote_code=False)
    assert parser.parse_args(["--trust-remote-code"]).trust_remote_code is True
    with pytest.raises(ValueError, match=r"^--max-memory '0=2x': size '2x' for 0 is not a size"):
        loading_options(parser.parse_args(["--device-map", "auto", "--max-memory", "0=2x"]))
    with pytest.raises(ValueError, match=r"^--device-map 'auto' with device='cpu'"):
        loading_options(parser.parse_args(["--device-map", "auto", "--device", "cpu"]))


def test_export_command_writes_a_folder_transformers_serves(model_dir, model, tmp_path):
    from transformers import AutoModelForCausalLM

    from ropelab.evals.export_command import add_export_parser
    from ropelab.patches import patched

    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--model", str(model_dir), "--method", "linear:scale=2", "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    with patched(model, "linear:scale=2"):
        torch.testing.assert_close(logits(served, 80), logits(model, 80), atol=1e-5, rtol=0)  # as tests/patches/test_export.py
    for argv, message in [(["--method", "rerope:window=8"], r"^--method 'rerope:window=8': cannot export: a relative"),
                          (["--method", "linear:scale=2", "--device-map", "auto"], r"^--device-map 'auto': export saves")]:
        args = parser.parse_args(["export", "--model", str(model_dir), "--out", str(tmp_path / "p"), *argv])
        with pytest.raises(ValueError, match=message):
            args.func(args)
    assert not (tmp_path / "p").exists()
