"""Routes: how a method gets into a model. Each route module turns (model, method) into a
`Plan` (patches/routes/plan.py) with `apply`, `check` and `describe`, touching nothing:

- frequencies.py: rewrite the rotary frequencies (frequency-only methods);
- attention.py: apply RoPE inside ropelab's attention function (relative maps,
  length-dependent or per-query frequencies, log-n);
- sinusoidal.py: recompute an additive sinusoidal table (XGLM).

Which route a model takes comes from its family's facts (patches/model_facts.py) and the
method's capabilities (`Method.needs_attention_route`).
"""

from __future__ import annotations

from torch import nn

from ...method import Method
from .. import architectures as arch
from . import attention, frequencies, sinusoidal
from .plan import Plan

__all__ = ["Plan", "plan_for"]


def plan_for(model: nn.Module, method: Method, key_cache: str = "kept") -> Plan:
    """The plan that applies `method` to `model`; raises (ValueError for the method,
    NotImplementedError for the model) before anything is touched. `key_cache` ("kept" or
    "lean") matters to the attention route only: the others rotate no keys in attention."""
    model_type, family = arch.family_of(model)
    if family.positions == "sinusoidal":
        return sinusoidal.plan(model, method, model_type, family)
    if method.name == "sinusoidal":
        raise ValueError(f"method='sinusoidal': applies to sinusoidal-position models, not rotary ones "
                         f"({type(model).__name__}); use a frequency method such as 'ntk'")
    if method.needs_attention_route:
        return attention.plan(model, method, model_type, family, key_cache=key_cache)
    return frequencies.plan(model, method, model_type, family)
