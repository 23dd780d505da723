"""The record of what a patch changed in a model, each change with how to revert it.

A route's `apply` makes every change through a `Changes` (patches/routes/), so that
`PatchHandle.undo()` can revert them in reverse order and leave the model bit for bit as it
was, and so that a failure halfway through reverts what was already done (the transaction
in patches/handle.py, after lm-evaluation-harness's lesson).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Changes:
    """Changes made to a model, revertible in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def set_attr(self, obj, name: str, value) -> None:
        """`setattr(obj, name, value)`; reverting restores the instance attribute, or removes
        it when the instance had none (so the class attribute shows through again)."""
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def set_buffer(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        """Replace a registered buffer (the same tensor object comes back on revert)."""
        old = module._buffers[name]
        module._buffers[name] = value

        def revert():  # follow a later model.to(device)
            module._buffers[name] = old.to(device=module._buffers[name].device)

        self._undo.append(revert)

    def call(self, do: Callable[[], None], undo: Callable[[], None]) -> None:
        """Any other change: `do()` now, `undo()` on revert."""
        do()
        self._undo.append(undo)

    def revert(self) -> list[Exception]:
        """Revert every change, newest first; keep going past failures and return them."""
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep reverting the rest; the caller reports
                errors.append(e)
        return errors
