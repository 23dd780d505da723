"""Models for the harness: loading by name or path, the training length, applying a method.

Methods reach a model only through `ropelab.patches` (design.md, "Layers"). The harness
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


def load_model(name: str, dtype: str = "float32"):
    """(model, tokenizer, model_id) for `default`, an embedded default's name, or a local path.

    `dtype` is 'float32' (exact; the default) or 'bfloat16' (about 20% faster on this
    machine's CPU, losses within ~0.003 nats of float32 on SmolLM2 at 16k). A non-float32
    dtype is part of the model id (`smollm2-135m@bfloat16`), hence of every job key, so
    results of different precisions never mix in one file.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    model, tokenizer, model_id = _load(name, DTYPES[dtype])
    return model, tokenizer, model_id if dtype == "float32" else f"{model_id}@{dtype}"


def _load(name: str, dtype: torch.dtype):
    if name == "default":
        name = DEFAULT_MODELS[0]
    if name in DEFAULT_MODELS:
        try:
            from ropelab.patches import load_default_model
        except ImportError:
            raise RuntimeError(
                f"model={name!r}: ropelab.patches.load_default_model is not available in this install"
            ) from None
        model, tokenizer = load_default_model(name, dtype=dtype)
        model_id = name
    elif os.path.isdir(name):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
        model_id = os.path.basename(os.path.abspath(name))
    else:
        raise ValueError(
            f"model={name!r}: not 'default', one of {', '.join(DEFAULT_MODELS)}, or a local folder "
            "written by save_pretrained (no model hub is reached)"
        )
    model.eval()
    return model, tokenizer, model_id


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
