"""A model's identity in the results: it names the weights, never just a folder's basename.

Sources (a loader says where the weights came from: `loading.load_model` returns a
`ModelSource`, which `model_identity` takes as it is; or one of these dicts):
- `{"kind": "embedded", "name": "smollm2-135m"}`: one of ropelab's embedded defaults;
- `{"kind": "hub", "id": "org/name", "revision": ..., "commit": ...}`: a hub snapshot, named
  by its id and commit (the revision is kept only when no commit is known: a branch, a tag
  and a commit hash that resolve to one snapshot are one model);
- `{"kind": "local", "path": folder}`: a save_pretrained folder, identified by its resolved
  path plus `fingerprint(folder)`;
- `{"kind": "named", "name": ...}`: a model object handed to the Python API, named by the
  caller and fingerprinted in memory by `weights_fingerprint(model)`: sha256 over every
  parameter's name, shape, dtype and first 256 values, so two different models given the
  same name (or the default name) still differ.

The dtype and the attention implementation are part of the identity (they change the numbers);
the device placement is not. Memory mode (`memory_chunk`, ropelab.patches.memory) is, when in
force: slicing the MLPs changes losses at float32 rounding on mixture-of-experts models (each
expert's matmul gets other row counts) and on dense ones with slices under 8 rows (measured:
README, "Memory mode"); off, the identity is as it was without it. `identity_key` is the text used in job keys and headers, so
results of different weights, dtypes or attention paths never share a key.

The fingerprint of a local folder is cheap even for 100 GB of weights. It hashes (sha256):
the bytes of `config.json`, `generation_config.json` and the tokenizer files (`tokenizer*.json`,
`special_tokens_map.json`, `vocab*`, `merges.txt`, `*.model`); every weight file's name and
size (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`, `*.gguf`); each safetensors header; and a
sample of the weights themselves: the first 4 KiB of every tensor's data in a safetensors file,
or 64 KiB at the start, middle and end of other weight files. Two folders with the same
architecture and sizes but different weights therefore differ; a change confined to bytes
outside every sample (past a tensor's first 4 KiB) would not be seen.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .loading import ModelSource

SOURCE_KINDS = ("embedded", "hub", "local", "named")
_SMALL_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "merges.txt")
_SMALL_GLOBS = ("tokenizer*.json", "vocab*", "*.model")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
_TENSOR_SAMPLE = 4096
_BLOCK_SAMPLE = 65536


def _safetensors_sample(f, digest) -> None:
    (size,) = struct.unpack("<Q", f.read(8))
    header = f.read(size)
    digest.update(header)
    base = 8 + size
    for name, info in sorted(json.loads(header).items()):
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        f.seek(base + begin)
        digest.update(f.read(min(_TENSOR_SAMPLE, end - begin)))


def _block_sample(f, size: int, digest) -> None:
    for offset in sorted({0, max(0, size // 2 - _BLOCK_SAMPLE // 2), max(0, size - _BLOCK_SAMPLE)}):
        f.seek(offset)
        digest.update(f.read(_BLOCK_SAMPLE))


def fingerprint(folder) -> str:
    """sha256 (hex) over a folder's config, tokenizer files and a sample of its weights (module docstring)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    small = sorted({p for g in _SMALL_GLOBS for p in folder.glob(g)} | {folder / n for n in _SMALL_FILES})
    for path in small:
        if path.is_file():
            digest.update(f"file {path.name}\n".encode())
            digest.update(path.read_bytes())
    weights = sorted({p for g in _WEIGHT_GLOBS for p in folder.glob(g) if p.is_file()})
    for path in weights:
        size = path.stat().st_size
        digest.update(f"weights {path.name} {size}\n".encode())
        with open(path, "rb") as f:
            if path.suffix == ".safetensors" and size >= 8:
                _safetensors_sample(f, digest)
            else:
                _block_sample(f, size, digest)
    return digest.hexdigest()


def weights_fingerprint(model) -> str:
    """sha256 (hex) over each parameter's name, shape, dtype and first 256 values (a few KB per tensor)."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name} {tuple(param.shape)} {param.dtype}\n".encode())
            digest.update(param.detach().reshape(-1)[:256].to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


def _attention(model) -> str | None:
    config = getattr(model, "config", None)
    # transformers keeps the chosen implementation on the config (eager, sdpa, flash_attention_2, ...)
    value = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    return str(value) if value is not None else None


def _dtype(model) -> str | None:
    dtype = getattr(model, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def source_dict(source: ModelSource) -> dict:
    """A loader's ModelSource as a source dict (its placement dropped: it changes no number)."""
    if source.kind == "default":
        return {"kind": "embedded", "name": source.name}
    if source.kind == "hub":
        return {"kind": "hub", "id": source.name, "revision": source.revision, "commit": source.commit}
    return {"kind": "local", "path": source.path}


def model_identity(model, source: ModelSource | dict | str) -> dict:
    """The identity dict of `model` loaded from `source` (a ModelSource, a source dict, or a
    caller's name for 'named'). The dtype and attention implementation are read from the model."""
    if isinstance(source, str):
        source = {"kind": "named", "name": source}
    elif isinstance(source, ModelSource):
        source = source_dict(source)
    if not isinstance(source, dict) or source.get("kind") not in SOURCE_KINDS:
        raise ValueError(f"model_source={source!r}: must be a dict with kind one of {', '.join(SOURCE_KINDS)}")
    kind = source["kind"]
    identity: dict = {"kind": kind}
    if kind == "local":
        path = Path(source["path"]).resolve()
        identity.update(path=str(path), fingerprint=source.get("fingerprint") or fingerprint(path))
    elif kind == "hub":
        if not source.get("id"):
            raise ValueError(f"model_source={source!r}: a hub source needs its id")
        pin = {"commit": source["commit"]} if source.get("commit") else {"revision": source.get("revision")}
        identity.update(id=source["id"], **pin)
    else:
        if not source.get("name") or not isinstance(source["name"], str):
            raise ValueError(f"model_source={source!r}: needs a non-empty name")
        identity["name"] = source["name"]
        if kind == "named":
            identity["weights"] = weights_fingerprint(model)
    identity.update(dtype=_dtype(model), attention=_attention(model))
    from ropelab.patches.memory import active_memory_mode  # here: ropelab.patches loads transformers

    if (mode := active_memory_mode(model)) is not None:
        identity["memory_chunk"] = mode.chunk
    return identity


def identity_key(identity: dict) -> str:
    """The identity as one line of text (what job keys and headers compare)."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


def display_name(identity: dict) -> str:
    """A short name for titles and tables (not an identity: two models may share it)."""
    kind = identity["kind"]
    if kind == "local":
        name = f"{Path(identity['path']).name}#{identity['fingerprint'][:8]}"
    elif kind == "hub":
        name = identity["id"] + (f"@{identity['commit'][:8]}" if identity.get("commit") else "")
    else:
        name = identity["name"]
    if identity.get("dtype") not in (None, "float32"):
        name += f"@{identity['dtype']}"
    return name
