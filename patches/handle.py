"""`patch(model, method)`: apply a position method to a loaded HuggingFace model, reversibly.

This module is only the transaction (after lm-evaluation-harness's lesson): resolve and
validate the method, ask the model's route for a plan (patches/routes/: frequencies,
attention or sinusoidal; nothing is touched while planning), apply it with every change
recorded in the handle's public `changes` (patches/changes.py), verify it with the plan's
probe, and on any failure revert the recorded changes in reverse order, leaving the model
exactly as it was. `undo()` reverts them the same way.

Each site's frequencies come from its own rotary: base = that rotary's rope_theta (Gemma3:
one per layer type), dim = head_dim × partial_rotary_factor, training length by
patches/model_facts.py's rule. The method *replaces* the model's own rope_type
(`describe()` names it when it was not "default").
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

from torch import nn

from ..method import Method
from ..registry import methods
from ..spec import parse_method
from . import architectures as arch
from . import routes
from .changes import Changes
from .key_cache import check_mode as check_key_cache
from .routes.probe import probe_device  # noqa: F401  (public: evals send inputs there)

# model -> its active handle. Weak, so patching never keeps a model alive.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PatchHandle] = weakref.WeakKeyDictionary()


class PatchHandle:
    """A patch in force on a model. `undo()` restores it bit for bit; usable as a context manager.

    `plan` is what the route planned (patches/routes/plan.py); `changes` records every change
    made to the model, each with its revert (patches/changes.py)."""

    def __init__(self, model: nn.Module, plan: routes.Plan):
        self.model = model
        self.plan = plan
        self.changes = Changes()
        self.active = False

    @property
    def method(self) -> Method:
        return self.plan.method

    @property
    def route(self) -> str:  # "frequencies", "attention" or "sinusoidal"
        return self.plan.route

    @property
    def model_type(self) -> str:
        return self.plan.model_type

    @property
    def sites(self) -> list[arch.RotarySite]:
        return self.plan.sites

    def describe(self) -> str:
        if not self.active:
            return f"undone ropelab patch {self.method.spec()!r} on {self.model_type}"
        return self.plan.describe()

    __repr__ = describe

    def undo(self) -> None:
        """Revert every change in reverse order. A second call does nothing."""
        if not self.active and not len(self.changes):
            return
        errors = self.changes.revert()
        self.active = False
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        if errors:
            raise RuntimeError(f"undo of {self.method.spec()!r} failed to revert {len(errors)} change(s)") from errors[0]

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def resolve_method(method: Method | str | None, params: dict) -> Method:
    if method is None:
        raise ValueError("method=None: name a method, e.g. patch(model, 'rerope', window=2048); "
                         f"available: {', '.join(methods())}")
    if isinstance(method, Method):
        if params:
            raise ValueError(f"{next(iter(params))}={next(iter(params.values()))!r}: pass parameters either in the "
                             "Method object or as keywords with a method name, not both")
        return method
    if not isinstance(method, str):
        raise ValueError(f"method={method!r}: must be a method name, a spec 'name:key=value' or a ropelab Method")
    return parse_method(method, **params)


def patch(model: nn.Module, method: Method | str | None = None, *, key_cache: str = "kept", **params) -> PatchHandle:
    """Apply `method` (a Method, a name with `params`, or a spec 'name:key=value,...') to `model`.

    `key_cache` (methods that rotate inside attention; patches/key_cache.py): "kept" keeps
    each cached key's rotated forms with the KV cache, so a decoding step rotates only its
    new key; "lean" keeps no copies and rotates every cached key in each call."""
    # 1. resolve, validate and plan; nothing is touched yet
    arch.check_transformers_version()
    check_key_cache(key_cache)
    if model in _ACTIVE:
        raise RuntimeError(f"model is already patched: {_ACTIVE[model].describe()}; call its undo() first")
    method = resolve_method(method, params)
    handle = PatchHandle(model, routes.plan_for(model, method, key_cache=key_cache))
    # 2. apply (each change recorded), 3. verify; on any failure revert what was recorded
    try:
        handle.plan.apply(handle.changes)
        handle.active = True
        handle.plan.check()
    except BaseException:
        handle.active = True  # let undo run
        handle.undo()
        raise
    _ACTIVE[model] = handle
    return handle


@contextlib.contextmanager
def patched(model: nn.Module, method: Method | str | None = None, *, key_cache: str = "kept",
            **params) -> Iterator[PatchHandle]:
    """`with patched(model, "ntk", scale=2): ...` patches for the block and undoes after it."""
    handle = patch(model, method, key_cache=key_cache, **params)
    try:
        yield handle
    finally:
        handle.undo()


def describe(model: nn.Module) -> str:
    """What ropelab has applied to `model`, or that nothing is."""
    handle = _ACTIVE.get(model)
    return handle.describe() if handle is not None else f"no ropelab patch on {type(model).__name__}"


def current_patch(model: nn.Module) -> PatchHandle | None:
    return _ACTIVE.get(model)
