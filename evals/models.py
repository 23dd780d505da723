"""Models for the harness: the training length, applying a method, the environment.
Loading by name, folder or hub id is `loading.load_model` (the one loader; importable here too).

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

from .loading import load_model  # noqa: F401  (the one loader, kept importable from here)


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
