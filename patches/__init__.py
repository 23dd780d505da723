"""ropelab.patches: apply any position method of the family to a loaded HuggingFace model,
reversibly and verified (issue 3; docs/design.md, "How a method gets into a model").

    >>> handle = patch(model, "rerope", window=2048, logn=True)
    >>> describe(model)
    >>> handle.undo()                      # bit-identical model back
    >>> with patched(model, "ntk", scale=2): ...

Files: handle.py (patch/undo: only the transaction), changes.py (the public record of
changes a patch made, each with its revert), routes/ (one module per route, each turning
(model, method) into a Plan with apply/check/describe: frequencies, attention, sinusoidal),
model_facts.py (the family table: attention class, layout, own dispatch, logits transform;
the training-length rule), architectures.py (finding a model's rotary and attention modules),
attention_fn.py (the attention function registered with transformers for relative, dynamic
and log-n methods), key_cache.py (which keys a cache layer hands attention; rotated keys kept
with the cache, `patch(..., key_cache="kept" | "lean")`), evict.py (an opt-in cache that drops
the keys no later query sees, for sinks and lm-infinite), falcon.py (Falcon's own attention dispatch), xglm.py (frequency maps on
XGLM's sinusoidal table), loading.py (the embedded offline models).
"""

from .changes import Changes
from .evict import evicting_cache
from .handle import PatchHandle, current_patch, describe, patch, patched
from .loading import default_models, load_default_model
from .model_facts import supported_families
from .routes.probe import probe_device

__all__ = [
    "Changes",
    "PatchHandle",
    "current_patch",
    "default_models",
    "describe",
    "evicting_cache",
    "load_default_model",
    "patch",
    "patched",
    "probe_device",
    "supported_families",
]
