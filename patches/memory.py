"""Memory mode: run each decoder layer's position-wise parts (the MLP and the norms) over the
sequence in chunks, so one forward over a very long sequence needs activation memory beyond
attention's own O(S) of only O(chunk).

Position-wise means row p of the output depends on row p of the input only, so computing
rows in chunks gives the same rows (up to the summation order of the matrix products,
i.e. float rounding). The MLP's intermediate tensors are the reason: for Llama-3-8B
(hidden 4096, intermediate 14336) gate, up and their product are 3·14336 values per token,
86 KB in bfloat16, so 86 GB at 1M tokens, against 8 KB per token for the residual stream
(see README, "Running at scale"). Norms upcast to float32 internally (S·hidden·4 bytes).

    >>> with memory_mode(model, chunk=4096):
    ...     losses = token_losses(model, ids)

Reversible like a patch: each wrapped module gets an instance `forward` (or, under an
accelerate hook, an `_old_forward`, so the hook still moves the weights once per call, not
once per chunk) and `undo()` restores exactly what was there. Sequences of at most `chunk`
tokens (decoding) take the module's own path unchanged. Composes with `ropelab.patch`,
which touches rotary and attention modules only. `active_memory_mode(model)` is the mode in
force on a model (the command line's `--memory-chunk`, evals/loading.py, applies one at load).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

# model -> its memory mode in force. Weak, so the mode never keeps a model alive.
ACTIVE: weakref.WeakKeyDictionary[nn.Module, MemoryMode] = weakref.WeakKeyDictionary()

NORM_SUFFIXES = ("norm", "layernorm", "ln_1", "ln_2", "ln_attn", "ln_mlp")  # Falcon: ln_attn, ln_mlp


def position_wise_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every decoder layer's `mlp` and its direct norms (input_layernorm,
    post_attention_layernorm, pre/post_feedforward_layernorm, ...). Norms inside attention
    (q_norm, k_norm) act on heads, not on the (batch, sequence, hidden) stream, and are left out."""
    found = []
    for name, module in model.named_modules():
        if not hasattr(module, "mlp") or not isinstance(module.mlp, nn.Module):
            continue
        found.append((f"{name}.mlp", module.mlp))
        for child_name, child in module.named_children():
            if child_name != "mlp" and child_name.lower().endswith(NORM_SUFFIXES) and not list(child.children()):
                found.append((f"{name}.{child_name}", child))
    return found


def chunked(forward: Callable, chunk: int) -> Callable:
    """`forward(x)` on (B, S, H) computed over S in slices of `chunk`, into one preallocated output."""

    def run(hidden_states, *args, **kwargs):
        if not torch.is_tensor(hidden_states) or hidden_states.dim() != 3 or hidden_states.shape[1] <= chunk:
            return forward(hidden_states, *args, **kwargs)
        length = hidden_states.shape[1]
        first = forward(hidden_states[:, :chunk], *args, **kwargs)
        out = first.new_empty((first.shape[0], length, *first.shape[2:]))
        out[:, :chunk] = first
        del first
        for start in range(chunk, length, chunk):
            out[:, start : start + chunk] = forward(hidden_states[:, start : start + chunk], *args, **kwargs)
        return out

    return run


class MemoryMode:
    """Chunked position-wise modules in force on a model; `undo()` restores them exactly."""

    def __init__(self, model: nn.Module, chunk: int):
        # A weak reference: ACTIVE's value must not keep its own key (the model) alive.
        self.model_ref, self.chunk = weakref.ref(model), chunk
        self.modules: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def wrap(self, name: str, module: nn.Module) -> None:
        # Under an accelerate hook, `forward` moves the weights in and out: chunk inside it.
        attr = "_old_forward" if "_old_forward" in vars(module) else "forward"
        had = attr in vars(module)
        old = vars(module).get(attr)
        setattr(module, attr, chunked(getattr(module, attr), self.chunk))
        self._undo.append(lambda: setattr(module, attr, old) if had else delattr(module, attr))
        self.modules.append(name)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
        model = self.model_ref()
        if model is not None and ACTIVE.get(model) is self:
            del ACTIVE[model]

    def __enter__(self) -> MemoryMode:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "in force" if self._undo else "undone"
        return f"memory mode ({state}): {len(self.modules)} position-wise modules in chunks of {self.chunk} tokens"


def memory_mode(model: nn.Module, chunk: int = 4096) -> MemoryMode:
    """Run `model`'s MLPs and decoder-layer norms in sequence chunks of `chunk` tokens."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}: must be an integer >= 1 (tokens per slice)")
    targets = position_wise_modules(model)
    if not targets:
        raise NotImplementedError(f"{type(model).__name__}: found no decoder layer with an `mlp` module to chunk")
    if any(getattr(m, "_ropelab_chunked", False) for _, m in targets):
        raise RuntimeError("memory mode is already in force on this model; undo it first")
    mode = MemoryMode(model, chunk)
    try:
        for name, module in targets:
            mode.wrap(name, module)
            marker_had = "_ropelab_chunked" in vars(module)
            module._ropelab_chunked = True
            mode._undo.append(lambda m=module, h=marker_had: None if h else delattr(m, "_ropelab_chunked"))
    except BaseException:
        mode.undo()
        raise
    ACTIVE[model] = mode
    return mode


def active_memory_mode(model: nn.Module) -> MemoryMode | None:
    """The memory mode in force on `model`, or None (also for objects that are no module)."""
    try:
        return ACTIVE.get(model)
    except TypeError:  # not weakly referenceable (None, a dict): no mode can be in force on it
        return None


@contextlib.contextmanager
def chunked_position_wise(model: nn.Module, chunk: int = 4096) -> Iterator[MemoryMode]:
    """`with chunked_position_wise(model, 4096): ...` (memory_mode as a block)."""
    mode = memory_mode(model, chunk)
    try:
        yield mode
    finally:
        mode.undo()
