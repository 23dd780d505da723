"""The attention route: a relative map, a length-dependent method (dynamic-ntk, longrope),
per-query frequencies (dynamic-ntk with per_query=true) or log-n makes the rotary return
cos = 1, sin = 0 and switches the model's `_attn_implementation` to ropelab's attention
function (patches/attention_fn.py), which applies RoPE itself, so the KV cache holds keys
before RoPE. A family that computes attention itself (Falcon) gets its attention forward
replaced too (patches/falcon.py). The check probes that every attention layer went through
ropelab's attention."""

from __future__ import annotations

import importlib

from torch import nn

from ...method import Method
from .. import architectures as arch
from .. import attention_fn as afn
from ..changes import Changes
from .frequencies import neutralise_all
from .plan import Plan
from .probe import probe


def plan(model: nn.Module, method: Method, model_type: str, family: arch.Family, key_cache: str = "kept") -> Plan:
    sites = arch.find_rotary_sites(model)
    attentions = arch.find_attention_layers(model, family)
    positions = afn.PositionState()
    by_type = {s.layer_type: s for s in sites}
    routes = {}
    for attention in attentions:
        layer_type = arch.layer_type_of(model, attention) if None not in by_type else None
        if layer_type not in by_type:
            raise NotImplementedError(f"{type(attention).__name__} layer {attention.layer_idx}: layer type "
                                      f"{layer_type!r} has no rotary frequencies ({sorted(map(str, by_type))})")
        site = by_type[layer_type]
        m = site.method_for(method)
        freq = m.frequencies(site.dim, site.base, site.train_length)  # validates now, for dynamic too
        static = not (m.length_dependent or m.per_query_frequencies)  # else frequencies per length, in the call
        routes[attention] = afn.Route(m, family.layout, site.dim, site.base, freq.inv_freq if static else None,
                                      float(freq.attention_factor), positions, key_cache=key_cache)
    # a family that needs more than the dispatch switch has its own file with `route_attention`
    # (Falcon computes attention itself; Qwen2-MoE's window must be passed on)
    own = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.{family.module}") if family.module else None
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    rotaries = {id(s.module): s.module for s in sites}

    def apply(changes: Changes) -> None:
        neutralise_all(changes, sites)
        afn.register()
        for attention, route in routes.items():
            changes.call(lambda a=attention, r=route: afn.ROUTES.__setitem__(a, r),
                         lambda a=attention: afn.ROUTES.pop(a, None))
            changes.call(*afn.capture_cache(attention, route))  # rotated keys kept with the KV cache
        for module in rotaries.values():
            changes.set_attr(module, "forward", afn.identity_rotary_forward(module.forward, positions))
        for config in configs.values():
            changes.set_attr(config, "_attn_implementation_internal", afn.NAME)
        if own is not None:
            own.route_attention(changes, attentions)

    def check() -> None:
        before = {a: afn.ROUTES[a].calls for a in attentions if a in afn.ROUTES}
        probe(model, attentions)
        skipped = [getattr(a, "layer_idx", i) for i, a in enumerate(attentions) if afn.ROUTES[a].calls == before[a]]
        if skipped:
            raise RuntimeError(f"patch check: attention layers {skipped} did not go through the ropelab attention; "
                               f"the model does not dispatch on config._attn_implementation")

    where = (f"{afn.NAME!r} attention function, rotary returns identity, KV cache holds keys before RoPE"
             f" (rotated keys: {'kept with the cache' if key_cache == 'kept' else 'per call, none kept'})")
    return Plan("attention", model_type, sites[0].method_for(method), apply, check, where, sites)
