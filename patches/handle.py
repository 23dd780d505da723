"""`patch(model, method)`: apply a position method to a loaded HuggingFace model, reversibly.

Two routes (shared/docs/design.md, "How a method gets into a model"):

- **frequencies**: a frequency-only method (rope, linear, ntk, ntk-old, beta-base, yarn,
  llama3) rewrites each rotary `*inv_freq` buffer (float32 from the method's float64) and
  its `attention_scaling`; the model's own cos/sin computation then runs unchanged.
- **attention**: a relative map, a length-dependent method (dynamic-ntk), per-query
  frequencies (dynamic-ntk with per_query=true) or log-n makes the rotary return cos = 1,
  sin = 0 and switches the model's `_attn_implementation` to ropelab's attention function
  (patches/attention_fn.py), which applies RoPE itself.
- **sinusoidal** (XGLM only, patches/xglm.py): frequency maps applied to the additive
  sinusoidal position table.

Transactional, after lm-evaluation-harness's lesson: everything is resolved and validated
before the model is touched; each change records how to revert it; if any change or the
final check fails, the recorded changes are reverted in reverse order and the model is
exactly as it was. The final check runs a two-token probe forward and fails loudly if an
attention layer was not routed through the method or the rotary did not use the new
frequencies (a patch that silently does nothing is the most common complaint against
SelfExtend's patches).

Each site's frequencies come from its own rotary: base = that rotary's rope_theta (Gemma3:
one per layer type), dim = head_dim × partial_rotary_factor, training length =
original_max_position_embeddings else max_position_embeddings. The method *replaces* the
model's own rope_type (`describe()` names it when it was not "default").
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..method import Method
from ..registry import methods
from ..spec import parse_method
from . import architectures as arch
from . import attention_fn as afn

# model -> its active handle. Weak, so patching never keeps a model alive.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PatchHandle] = weakref.WeakKeyDictionary()


class PatchHandle:
    """A patch in force on a model. `undo()` restores it bit for bit; usable as a context manager."""

    def __init__(self, model: nn.Module, method: Method, model_type: str, route: str, sites: list[arch.RotarySite]):
        self.model = model
        self.method = method
        self.model_type = model_type
        self.route = route  # "frequencies", "attention" or "sinusoidal" (XGLM, patches/xglm.py)
        self.sites = sites
        self._undo: list[Callable[[], None]] = []
        self.active = False
        # (id(rotary), buffer name) -> (inv_freq float32, attention factor) the rotary must use (frequency route)
        self.expected: dict[tuple[int, str], tuple[torch.Tensor, float]] = {}

    def describe(self) -> str:
        if not self.active:
            return f"undone ropelab patch {self.method.spec()!r} on {self.model_type}"
        if self.route == "sinusoidal":
            return f"ropelab patch {self.method.spec()!r} on {self.model_type} (sinusoidal position table recomputed)"
        where = (
            "rotary frequencies rewritten" if self.route == "frequencies"
            else f"{afn.NAME!r} attention function, rotary returns identity, KV cache holds keys before RoPE"
        )
        bases = ", ".join(f"{s.layer_type or 'all'}: base {s.base:g}, dim {s.dim}" for s in self.sites)
        native = {s.rope_type for s in self.sites} - {"default"}
        replaced = f"; replaces the model's own rope_type {sorted(native)}" if native else ""
        return (f"ropelab patch {self.method.spec()!r} on {self.model_type} ({where}; {bases}; "
                f"train_length {self.sites[0].train_length}{replaced})")

    __repr__ = describe

    def undo(self) -> None:
        """Revert every change in reverse order. A second call does nothing."""
        if not self.active and not self._undo:
            return
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep reverting the rest; report at the end
                errors.append(e)
        self.active = False
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        if errors:
            raise RuntimeError(f"undo of {self.method.spec()!r} failed to revert {len(errors)} change(s)") from errors[0]

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    # -- recorded changes -------------------------------------------------------------
    def _set_attr(self, obj, name: str, value) -> None:
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def _set_buffer(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        old = module._buffers[name]
        module._buffers[name] = value

        def revert():  # follow a later model.to(device)
            module._buffers[name] = old.to(device=module._buffers[name].device)

        self._undo.append(revert)

    def _call(self, do: Callable[[], None], undo: Callable[[], None]) -> None:
        do()
        self._undo.append(undo)


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


def _needs_attention(method: Method) -> bool:
    return method.relative is not None or method.length_dependent or method.per_query_frequencies or method.logn


def patch(model: nn.Module, method: Method | str | None = None, **params) -> PatchHandle:
    """Apply `method` (a Method, a name with `params`, or a spec 'name:key=value,...') to `model`."""
    # 1. resolve and validate everything; nothing is touched yet
    arch.check_transformers_version()
    if model in _ACTIVE:
        raise RuntimeError(f"model is already patched: {_ACTIVE[model].describe()}; call its undo() first")
    method = resolve_method(method, params)
    if getattr(getattr(model, "config", None), "model_type", None) == "xglm":
        from . import xglm

        handle = PatchHandle(model, method.with_train_length(model.config.max_position_embeddings), "xglm", "sinusoidal", [])
        apply, check = xglm.plan(model, method)
        return _apply(handle, apply, check)
    if method.name == "sinusoidal":
        raise ValueError(f"method='sinusoidal': applies to sinusoidal-position models, not rotary ones "
                         f"({type(model).__name__}); use a frequency method such as 'ntk'")
    model_type, family = arch.family_of(model)
    sites = arch.find_rotary_sites(model)
    attentions = arch.find_attention_layers(model, family)
    method = method.with_train_length(sites[0].train_length)
    route = "attention" if _needs_attention(method) else "frequencies"
    if route == "attention" and family.own_dispatch:
        from . import falcon  # noqa: F401  (raises NotImplementedError until written)
    handle = PatchHandle(model, method, model_type, route, sites)
    if route == "frequencies":
        plan, handle.expected = _plan_frequencies(method, sites)
    else:
        plan = _plan_attention(model, method, family, sites, attentions)


    def apply(handle: PatchHandle) -> None:
        for module in {id(s.module): s.module for s in sites}.values():
            _neutralise_native_rope_type(handle, module)
        plan(handle)

    return _apply(handle, apply, lambda handle: _verify(handle, attentions))


def _apply(handle: PatchHandle, apply, check) -> PatchHandle:
    """Change the model (each change records its undo), check it took effect; on any
    failure revert every recorded change and re-raise."""
    try:
        apply(handle)
        handle.active = True
        check(handle)
    except BaseException:
        handle.active = True  # let undo run
        handle.undo()
        raise
    _ACTIVE[handle.model] = handle
    return handle


@contextlib.contextmanager
def patched(model: nn.Module, method: Method | str | None = None, **params) -> Iterator[PatchHandle]:
    """`with patched(model, "ntk", scale=2): ...` patches for the block and undoes after it."""
    handle = patch(model, method, **params)
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


# -- the two routes -------------------------------------------------------------------


def _neutralise_native_rope_type(handle: PatchHandle, module: nn.Module) -> None:
    """transformers' dynamic/longrope forward rewrites inv_freq itself; mark the rotary 'default'."""
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        if any(v != "default" for v in rope_type.values()):
            handle._set_attr(module, "rope_type", {k: "default" for k in rope_type})
    elif rope_type not in (None, "default"):
        handle._set_attr(module, "rope_type", "default")


def _plan_frequencies(method: Method, sites: list[arch.RotarySite]):
    """(apply, expected): the change to make and, per buffer, the frequencies it must produce."""
    new = []
    for site in sites:
        freq = method.with_train_length(site.train_length).frequencies(site.dim, site.base)
        inv_freq, factor = freq.inv_freq, float(freq.attention_factor)
        if inv_freq.shape != (site.dim // 2,) or not torch.isfinite(inv_freq).all():
            raise ValueError(f"{method.spec()}: frequencies of shape {tuple(inv_freq.shape)} for dim {site.dim} "
                             "must be dim/2 finite values")
        _, device = arch.dtype_device(site)
        new.append((site, inv_freq.to(device=device, dtype=torch.float32), factor))

    def apply(handle: PatchHandle) -> None:
        for site, inv_freq, factor in new:
            handle._set_buffer(site.module, site.buffer, inv_freq)
            handle._set_attr(site.module, site.scaling_attr, factor)

    return apply, {(id(site.module), site.buffer): (inv_freq, factor) for site, inv_freq, factor in new}


def _plan_attention(model, method, family, sites, attentions) -> Callable[[PatchHandle], None]:
    positions = afn.PositionState()
    by_type = {s.layer_type: s for s in sites}
    routes = {}
    for attention in attentions:
        layer_type = arch.layer_type_of(model, attention) if None not in by_type else None
        if layer_type not in by_type:
            raise NotImplementedError(f"{type(attention).__name__} layer {attention.layer_idx}: layer type "
                                      f"{layer_type!r} has no rotary frequencies ({sorted(map(str, by_type))})")
        site = by_type[layer_type]
        m = method.with_train_length(site.train_length)
        freq = m.frequencies(site.dim, site.base, site.train_length)  # validates now, for dynamic too
        static = not (m.length_dependent or m.per_query_frequencies)  # else frequencies per length, in the call
        routes[attention] = afn.Route(m, family.layout, site.dim, site.base, freq.inv_freq if static else None,
                                      float(freq.attention_factor), positions)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    rotaries = {id(s.module): s.module for s in sites}

    def apply(handle: PatchHandle) -> None:
        afn.register()
        for attention, route in routes.items():
            handle._call(lambda a=attention, r=route: afn.ROUTES.__setitem__(a, r),
                         lambda a=attention: afn.ROUTES.pop(a, None))
            handle._call(*afn.capture_cache(attention, route))  # rotated keys kept with the KV cache
        for module in rotaries.values():
            handle._set_attr(module, "forward", afn.identity_rotary_forward(module.forward, positions))
        for config in configs.values():
            handle._set_attr(config, "_attn_implementation_internal", afn.NAME)
        if family.own_dispatch:
            from . import falcon
            falcon.route_attention(handle, attentions)

    return apply


# -- the check ------------------------------------------------------------------------


def _verify(handle: PatchHandle, attentions: list[nn.Module]) -> None:
    """Run a two-token probe; raise RuntimeError unless every attention layer ran through the method."""
    model = handle.model
    calls = {a: 0 for a in attentions}
    cos_seen: list[tuple[arch.RotarySite, torch.Tensor]] = []
    hooks = [a.register_forward_hook(lambda mod, args, out: calls.__setitem__(mod, calls[mod] + 1)) for a in attentions]
    if handle.route == "frequencies":
        for site in handle.sites:
            def record(mod, args, kwargs, out, site=site):
                layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
                if layer_type == site.layer_type:
                    cos_seen.append((site, out[0]))
            hooks.append(site.module.register_forward_hook(record, with_kwargs=True))
    before = {a: afn.ROUTES[a].calls for a in attentions if a in afn.ROUTES}
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2]], device=device), use_cache=False)
    except Exception as e:
        raise RuntimeError(f"patch check: a two-token probe forward of the patched model failed ({e!r}); "
                           "the model is restored") from e
    finally:
        for h in hooks:
            h.remove()
    missing = [getattr(a, "layer_idx", i) for i, a in enumerate(attentions) if calls[a] == 0]
    if missing:
        raise RuntimeError(f"patch check: attention layers {missing} did not run in a probe forward")
    if handle.route == "attention":
        skipped = [getattr(a, "layer_idx", i) for i, a in enumerate(attentions) if afn.ROUTES[a].calls == before[a]]
        if skipped:
            raise RuntimeError(f"patch check: attention layers {skipped} did not go through the ropelab attention; "
                               f"the model does not dispatch on config._attn_implementation")
        return
    for site in handle.sites:
        seen = [cos for s, cos in cos_seen if s is site]
        if not seen:
            raise RuntimeError(f"patch check: {type(site.module).__name__}.{site.buffer} was never used in a probe forward")
        inv_freq, factor = handle.expected[(id(site.module), site.buffer)]
        expected = torch.cat([torch.cos(inv_freq) * factor] * 2).sort().values  # position 1, either layout
        got = seen[0][0, 1, : site.dim].float().sort().values.to(expected.device)
        # cos comes back in the model's dtype: allow its rounding (bf16: ≤ 0.004 at |cos·factor| < 2)
        tolerance = max(1e-5, torch.finfo(seen[0].dtype).eps)
        if not torch.allclose(got, expected, atol=tolerance, rtol=0):
            raise RuntimeError(f"patch check: {type(site.module).__name__} did not produce the patched frequencies "
                               f"({site.buffer}); max error {(got - expected).abs().max():.3g}")
