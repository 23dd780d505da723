"""ropelab.patches: apply any position method of the family to a loaded HuggingFace model,
reversibly and verified (issue 3; shared/docs/design.md, "How a method gets into a model").

    >>> handle = patch(model, "rerope", window=2048, logn=True)
    >>> describe(model)
    >>> handle.undo()                      # bit-identical model back
    >>> with patched(model, "ntk", scale=2): ...

Files: handle.py (patch/undo, transactional), architectures.py (supported families and
where their rotary and attention modules are), attention_fn.py (the attention function
registered with transformers for relative, dynamic and log-n methods), falcon.py (Falcon's
own attention dispatch), xglm.py (frequency maps on XGLM's sinusoidal table), loading.py
(the embedded offline models).
"""

from .architectures import supported_families
from .handle import PatchHandle, current_patch, describe, patch, patched
from .loading import default_models, load_default_model

__all__ = [
    "PatchHandle",
    "current_patch",
    "default_models",
    "describe",
    "load_default_model",
    "patch",
    "patched",
    "supported_families",
]
