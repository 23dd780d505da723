"""ropelab: long-context positional-encoding experiments on pretrained decoder-only models.

The position math lives here (torch only, no transformers): a family of registered
methods, each the composition of a frequency map, a relative-position map and a query
scale (docs/methods.md), and the kernels that apply them.

    >>> import ropelab
    >>> ropelab.methods()
    ['beta-base', 'dca', 'dynamic-ntk', 'inverse-leaky-rerope', 'leaky-rerope', 'linear', 'llama3', 'lm-infinite', 'longrope', 'ntk', 'ntk-old', 'rerope', 'rope', 'self-extend', 'sinks', 'sinusoidal', 'string', 'yarn']
    >>> m = ropelab.get_method("yarn", scale=4, train_length=4096)
    >>> round(m.frequencies(dim=128, base=1e4).attention_factor, 4)
    1.1386
"""

from . import family as _family  # noqa: F401  (registers the methods)
from .method import BorrowedFrequencies, Frequencies, Method, RelativeMap, RelativeMethod
from .registry import get_method, method_class, methods, register
from .rotary import apply_rotary, cos_sin, sinusoidal_table
from .spec import parse_method

__version__ = "0.1.0"

# The patching layer imports transformers; load it only when asked for, so the position
# math stays importable (and fast to import) without it.
_FROM_PATCHES = ("patch", "patched", "describe", "load_default_model", "supported_families", "PatchHandle")


def __getattr__(name: str):
    if name in _FROM_PATCHES:
        from . import patches

        return getattr(patches, name)
    raise AttributeError(f"module 'ropelab' has no attribute {name!r}")

__all__ = [
    *_FROM_PATCHES,
    "BorrowedFrequencies",
    "Frequencies",
    "Method",
    "RelativeMap",
    "RelativeMethod",
    "apply_rotary",
    "cos_sin",
    "get_method",
    "method_class",
    "methods",
    "parse_method",
    "register",
    "sinusoidal_table",
]
