"""The frequency route: a frequency-only method (rope, linear, ntk, ntk-old, beta-base,
yarn, llama3) rewrites each rotary `*inv_freq` buffer (float32 from the method's float64)
and its `attention_scaling`; the model's own cos/sin computation then runs unchanged.
The check probes that every rotary produced the new cos at position 1."""

from __future__ import annotations

import torch
from torch import nn

from ...method import Method
from .. import architectures as arch
from ..changes import Changes
from .plan import Plan
from .probe import probe


def neutralise_native_rope_type(changes: Changes, module: nn.Module) -> None:
    """transformers' dynamic/longrope forward rewrites inv_freq itself; mark the rotary 'default'."""
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        if any(v != "default" for v in rope_type.values()):
            changes.set_attr(module, "rope_type", {k: "default" for k in rope_type})
    elif rope_type not in (None, "default"):
        changes.set_attr(module, "rope_type", "default")


def neutralise_all(changes: Changes, sites: list[arch.RotarySite]) -> None:
    for module in {id(s.module): s.module for s in sites}.values():
        neutralise_native_rope_type(changes, module)


def plan(model: nn.Module, method: Method, model_type: str, family: arch.Family) -> Plan:
    sites = arch.find_rotary_sites(model)
    attentions = arch.find_attention_layers(model, family)
    new = []
    for site in sites:
        freq = site.method_for(method).frequencies(site.dim, site.base)
        inv_freq, factor = freq.inv_freq, float(freq.attention_factor)
        if inv_freq.shape != (site.dim // 2,) or not torch.isfinite(inv_freq).all():
            raise ValueError(f"{method.spec()}: frequencies of shape {tuple(inv_freq.shape)} for dim {site.dim} "
                             "must be dim/2 finite values")
        _, device = arch.dtype_device(site)
        new.append((site, inv_freq.to(device=device, dtype=torch.float32), factor))

    def apply(changes: Changes) -> None:
        neutralise_all(changes, sites)
        for site, inv_freq, factor in new:
            changes.set_buffer(site.module, site.buffer, inv_freq)
            changes.set_attr(site.module, site.scaling_attr, factor)

    def check() -> None:
        cos_seen: list[tuple[arch.RotarySite, torch.Tensor]] = []

        def hook(site):
            def record(mod, args, kwargs, out):
                layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
                if layer_type == site.layer_type:
                    cos_seen.append((site, out[0]))
            return lambda: site.module.register_forward_hook(record, with_kwargs=True)

        probe(model, attentions, [hook(site) for site in sites])
        for site, inv_freq, factor in new:
            seen = [cos for s, cos in cos_seen if s is site]
            if not seen:
                raise RuntimeError(f"patch check: {type(site.module).__name__}.{site.buffer} was never used in a probe forward")
            expected = torch.cat([torch.cos(inv_freq) * factor] * 2).sort().values  # position 1, either layout
            got = seen[0][0, 1, : site.dim].float().sort().values.to(expected.device)
            # cos comes back in the model's dtype: allow its rounding (bf16: ≤ 0.004 at |cos·factor| < 2)
            tolerance = max(1e-5, torch.finfo(seen[0].dtype).eps)
            if not torch.allclose(got, expected, atol=tolerance, rtol=0):
                raise RuntimeError(f"patch check: {type(site.module).__name__} did not produce the patched frequencies "
                                   f"({site.buffer}); max error {(got - expected).abs().max():.3g}")

    return Plan("frequencies", model_type, sites[0].method_for(method), apply, check, "rotary frequencies rewritten", sites)
