"""Models for the harness: loading by name or path, the training length, applying a method.

Methods reach a model only through `ropelab.patches` (docs/design.md, "Layers"). The harness
takes that step as a parameter, `apply_method(model, method) -> context manager`, so it can
be tested on an unpatched model; the default is `ropelab.patches.patched`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys

import torch

import ropelab

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_model_name(name) -> str:
    """`name` if it can be loaded (a default's name or an existing folder), else ValueError naming `model`."""
    if not isinstance(name, str) or not (name == "default" or name in DEFAULT_MODELS or os.path.isdir(name)):
        raise ValueError(
            f"model={name!r}: not 'default', one of {', '.join(DEFAULT_MODELS)}, or a local folder "
            "written by save_pretrained (no model hub is reached)"
        )
    return name


def check_dtype(dtype) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    return dtype


def load_model(name: str, dtype: str = "float32"):
    """(model, tokenizer, source) for `default`, an embedded default's name, or a local folder.

    `source` says where the weights came from (`{"kind": "embedded", "name": ...}` or
    `{"kind": "local", "path": ...}`); `identity.model_identity(model, source)` turns it into
    the identity recorded with the results (with the dtype, so bf16 and fp32 never mix).
    `dtype` is 'float32' (exact; the default) or 'bfloat16' (about 20% faster on this
    machine's CPU, losses within ~0.003 nats of float32 on SmolLM2 at 16k).
    """
    check_dtype(dtype)
    check_model_name(name)
    if name == "default":
        name = DEFAULT_MODELS[0]
    if name in DEFAULT_MODELS:
        try:
            from ropelab.patches import load_default_model
        except ImportError:
            raise RuntimeError(
                f"model={name!r}: ropelab.patches.load_default_model is not available in this install"
            ) from None
        model, tokenizer = load_default_model(name, dtype=DTYPES[dtype])
        source = {"kind": "embedded", "name": name}
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(name)
        source = {"kind": "local", "path": os.path.realpath(name)}
    model.eval()
    return model, tokenizer, source


def train_length(model) -> int:
    """L, by ropelab.patches.model_facts' rule (original_max_position_embeddings, else max_position_embeddings)."""
    from ropelab.patches.model_facts import train_length as model_train_length

    return model_train_length(model.config)


def default_apply_method(model, method):
    """`ropelab.patches.patched(model, method)`; plain `rope` runs unpatched if patches is absent."""
    try:
        from ropelab.patches import patched
    except ImportError:
        if method.spec() == "rope":
            return contextlib.nullcontext(model)
        raise RuntimeError(
            f"method={method.spec()!r}: ropelab.patches.patched is not available, so only 'rope' can run"
        ) from None
    return patched(model, method)


def environment() -> dict:
    """What a result depends on besides the protocol (recorded with every run)."""
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "ropelab": ropelab.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
