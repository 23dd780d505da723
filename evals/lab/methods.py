"""Which inference-time methods apply to a model of each training position, and how each
reaches the model (shared by `lab eval` and its tests).

- RoPE models (`rope`, `rope-logn`, `inverse-leaky`): every method of the family. The default
  set is Su's table (Transformer升级之路 10-13): plain RoPE, position interpolation, NTK,
  β-base (NTK-mixed), ReRoPE (w = L/2), Leaky ReRoPE (w = L/4, k by Su's rule
  w + (N-1-w)/k ≤ L/2 at the longest length N), and post-hoc log-n ("logn†") on RoPE, NTK and
  ReRoPE. Scaled methods use s = N/L for the longest N. A `rope-logn` model runs every method
  with its training log-n (L0 = its `logn_length`) added.
- `sinusoidal` (XGLM): the frequency maps on its table (ropelab.patches.xglm); no relative
  map or log-n (they act inside attention, an additive table cannot express them).
- `learned`, `alibi`, `nope`: no method applies; the model runs as trained, spelled `rope`.
  A learned table has no row past L - 1: positions beyond are clamped to L - 1 (the rule
  this lab documents; the alternative, evaluating in range only, is the 1×L column).
"""

from __future__ import annotations

import contextlib
import dataclasses

import ropelab

from .positions import AS_TRAINED, ROTARY, leaky_scale_for

AS_TRAINED_SPEC = "rope"


def default_methods(position: str, train_length: int, longest: int) -> list[str]:
    s = f"{longest / train_length:g}"
    if position in AS_TRAINED:
        return [AS_TRAINED_SPEC]
    frequency = [f"linear:scale={s}", f"ntk:scale={s}", f"beta-base:scale={s}"]
    if position == "sinusoidal":
        return [ropelab.parse_method(m).spec() for m in ("rope", *frequency)]
    leaky_w = max(1, train_length // 4)
    k = leaky_scale_for(train_length, leaky_w, longest)
    methods = ["rope", *frequency, f"rerope:window={train_length // 2}", f"leaky-rerope:window={leaky_w},scale={k:g}"]
    if position != "rope-logn":
        methods += ["rope:logn=true", f"ntk:scale={s},logn=true", f"rerope:window={train_length // 2},logn=true"]
    return [ropelab.parse_method(m).spec() for m in methods]  # canonical text, as records hold it


def check_method(position: str, spec: str) -> ropelab.Method:
    """The method for `spec` if it applies to a model of this training position, else ValueError with the reason."""
    method = ropelab.parse_method(spec)
    if position in AS_TRAINED:
        if method.spec() != AS_TRAINED_SPEC:
            raise ValueError(f"method={spec!r}: a {position!r} model has no rotary positions to change; only "
                             f"{AS_TRAINED_SPEC!r} (the model as trained) applies")
        return method
    if position == "sinusoidal":
        if method.needs_attention_route:
            raise ValueError(f"method={spec!r}: needs rotary positions inside attention; a sinusoidal model takes "
                             "frequency maps only (rope, linear, ntk, ntk-old, beta-base, yarn, llama3)")
        return method
    if position not in ROTARY:
        raise ValueError(f"position={position!r}: unknown position module")
    if position == "rope-logn" and method.uses_train_length:
        raise ValueError(f"method={spec!r}: uses the training length, which a rope-logn model's log-n "
                         "(train_length = its logn_length) would override; use a method without it")
    return method


def applied(position: str, method: ropelab.Method, logn_length: int | None) -> ropelab.Method | None:
    """The method actually patched in (None: the model runs as trained)."""
    if position in AS_TRAINED:
        return None
    if position == "rope-logn":
        return dataclasses.replace(method, logn=True, train_length=logn_length)
    return method


@contextlib.contextmanager
def clamped_positions(model, train_length: int):
    """GPT-2 with positions ≥ L read from the table's last row (the learned table's rule here)."""
    table = model.transformer.wpe
    original = table.forward
    table.forward = lambda ids: original(ids.clamp(max=train_length - 1))
    try:
        yield model
    finally:
        del table.forward  # the instance attribute goes; the class's forward is back


def apply_to(model, position: str, method: ropelab.Method, train_length: int, logn_length: int | None):
    """A context manager in which `model` runs `method` (as the harness's `apply_method`)."""
    patched_method = applied(position, method, logn_length)
    if patched_method is None:
        return clamped_positions(model, train_length) if position == "learned" else contextlib.nullcontext(model)
    return ropelab.patched(model, patched_method)
