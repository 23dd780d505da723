"""The one shape every route returns: what will change and how to check it took effect.

A route (patches/routes/frequencies.py, attention.py, sinusoidal.py) turns (model, method)
into a `Plan` having resolved and validated everything, without touching the model. The
transaction (patches/handle.py) then calls `apply`, which records each change in a
`Changes`, and `check`, which probes the patched model; `describe` says what is in force.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ...method import Method
from ..architectures import RotarySite
from ..changes import Changes


@dataclass
class Plan:
    route: str  # "frequencies", "attention" or "sinusoidal"
    model_type: str
    method: Method  # with what it leaves to the model filled in (training length, ...)
    apply: Callable[[Changes], None]  # make every change, each recorded
    check: Callable[[], None]  # probe the patched model; RuntimeError if the patch is not in force
    where: str  # what the route changed, in words, for describe()
    sites: list[RotarySite] = field(default_factory=list)

    def describe(self) -> str:
        if not self.sites:
            return f"ropelab patch {self.method.spec()!r} on {self.model_type} ({self.where})"
        bases = ", ".join(f"{s.layer_type or 'all'}: base {s.base:g}, dim {s.dim}" for s in self.sites)
        native = {s.rope_type for s in self.sites} - {"default"}
        replaced = f"; replaces the model's own rope_type {sorted(native)}" if native else ""
        return (f"ropelab patch {self.method.spec()!r} on {self.model_type} ({self.where}; {bases}; "
                f"train_length {self.sites[0].train_length}{replaced})")
