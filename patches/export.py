"""Export a method as transformers' own rope parameters, so that plain transformers, vLLM
and SGLang serve what ropelab measured (`ropelab export`).

The mapping (each an identity of the frequency formulas in rope/frequencies.py against
transformers' `modeling_rope_utils.ROPE_INIT_FUNCTIONS`):

| ropelab              | config `rope_parameters`                                          |
|----------------------|-------------------------------------------------------------------|
| rope (base=b)        | default, rope_theta = b                                           |
| linear:scale=s       | linear, factor = s                                                |
| ntk:scale=s          | default, rope_theta = θ·s^(d/(d-2)): bloc97's NTK-aware scaling   |
|                      | is exactly plain RoPE on that base (d = rotary dim)               |
| ntk-old:scale=s      | default, rope_theta = θ·s                                         |
| dynamic-ntk:scale=α  | dynamic, factor = α (one length per forward; only where the       |
|                      | model's training length is its max_position_embeddings)           |
| yarn                 | yarn, factor, beta_fast, beta_slow, attention_factor,             |
|                      | original_max_position_embeddings = L                              |
| llama3               | llama3, factor, low/high_freq_factor, original_max_position_embeddings = L |
| longrope             | longrope, short_factor, long_factor, attention_factor (resolved), |
|                      | factor = s when known, original_max_position_embeddings = L       |
|                      | (lists left out of the spec come from a 'longrope' config)        |

Refused, with the reason: relative-position maps (rerope, leaky-rerope, self-extend: no
rope_type changes which positions a query and key are rotated at), log-n (no rope_type
scales queries by position), per-query dynamic NTK (transformers' `dynamic` uses one length
per forward), beta-base (no rope_type computes its frequencies), sinusoidal tables.

Before anything is written, the model's own rotary class is built from the exported config
and must reproduce the method's frequencies and attention factor (dynamic: at 1×, 2× and 4×
the training length); a family whose config class rejects the parameters (Phi3 takes only
longrope) is refused there.

Weights: the model's own, as loaded. A model loaded from a GGUF file (the embedded
defaults: transformers dequantises the quantized blocks on load but leaves its GGUF quantizer
on the model, and refuses to save such a model) is written with those float weights in the
dtype it was loaded in, and ropelab_export.json says so (`weights`); the exported folder
loads with plain `from_pretrained`, no GGUF reader. The folder is written under a temporary
name beside `out` and renamed when complete, so a failed export leaves `out` as it was.

Caveat for `dynamic`: transformers caches keys after RoPE, so its cached decoding past L
differs from ropelab's (which caches keys before RoPE; YaRN paper §3.3); a single forward
(perplexity) is the same. The export note records this.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from torch import nn

from ..method import Method
from . import architectures as arch
from .model_facts import SINUSOIDAL_FAMILIES
from .handle import current_patch, resolve_method
from .loading import as_float_model, gguf_loaded

# float32 frequencies computed by transformers against ropelab's float64 cast to float32:
# a few float32 ulp apart (the bound tests/rope/test_frequencies_vs_transformers.py uses).
RTOL = 2e-6

REFUSALS = {
    "rerope": "a relative-position map (far keys at a fixed distance) that no transformers rope_type expresses",
    "leaky-rerope": "a relative-position map (compressed far distances) that no transformers rope_type expresses",
    "self-extend": "a relative-position map (grouped far positions) that no transformers rope_type expresses",
    "beta-base": "its frequencies θ_i·exp(-a·(i+1)^β) match no transformers rope_type",
    "sinusoidal": "it changes a sinusoidal position table, which transformers configs do not parameterise",
}


def refusal(method: Method) -> str | None:
    """Why `method` has no native equivalent, or None if it has one."""
    if method.name in REFUSALS:
        return REFUSALS[method.name]
    if method.logn:
        return "log-n query scaling (logn=true): no transformers rope_type scales queries by their position"
    if method.per_query_frequencies:
        return "per-query frequencies (per_query=true): transformers' dynamic uses one length for a whole forward"
    if method.name not in ("rope", "linear", "ntk", "ntk-old", "dynamic-ntk", "yarn", "llama3", "longrope"):
        return "ropelab has no mapping to a transformers rope_type for it"
    return None


def native_parameters(method: Method, site: arch.RotarySite, old: dict) -> dict:
    """rope_parameters for one rotary site (one layer type) that reproduce `method` there."""
    m = site.method_for(method)
    keep = {k: old[k] for k in ("partial_rotary_factor",) if k in old}
    theta, d, length = site.base, site.dim, site.train_length
    if m.name == "longrope":
        frequencies = m.frequencies(d, theta)  # ValueError naming the field if the lists are missing or short
        factor = {} if m.scale is None else {"factor": float(m.scale)}
        return {"rope_type": "longrope", "rope_theta": theta, **keep, **factor,
                "short_factor": [float(x) for x in m.short_factor], "long_factor": [float(x) for x in m.long_factor],
                "attention_factor": float(frequencies.attention_factor), "original_max_position_embeddings": length}
    p = m.params
    if m.name == "rope":
        return {"rope_type": "default", "rope_theta": float(p["base"] or theta), **keep}
    if m.name == "ntk":
        return {"rope_type": "default", "rope_theta": theta * p["scale"] ** (d / (d - 2)), **keep}
    if m.name == "ntk-old":
        return {"rope_type": "default", "rope_theta": theta * p["scale"], **keep}
    common = {"rope_theta": theta, **keep, "factor": float(p["scale"])}
    if m.name == "linear":
        return {"rope_type": "linear", **common}
    if m.name == "dynamic-ntk":
        return {"rope_type": "dynamic", **common}
    if m.name == "yarn":
        factor = m.frequencies(d, theta).attention_factor
        return {"rope_type": "yarn", **common, "beta_fast": float(p["beta_fast"]), "beta_slow": float(p["beta_slow"]),
                "attention_factor": float(factor), "original_max_position_embeddings": length}
    if m.name == "llama3":
        return {"rope_type": "llama3", **common, "low_freq_factor": float(p["low_freq_factor"]),
                "high_freq_factor": float(p["high_freq_factor"]), "original_max_position_embeddings": length}
    raise NotImplementedError(f"method={m.spec()!r}: {refusal(m)}")


def exported_config(model: nn.Module, method: Method | str, **params):
    """A copy of `model.config` whose rope_parameters carry `method`, checked against the
    model's rotary class. NotImplementedError (naming the method and the reason) if none can."""
    method = resolve_method(method, params)
    given = method.spec()  # named as the user wrote it, before the model's training length is filled in
    if getattr(model.config, "model_type", None) in SINUSOIDAL_FAMILIES:
        raise NotImplementedError(f"method={given!r}: {REFUSALS['sinusoidal']}")
    arch.family_of(model)
    sites = arch.find_rotary_sites(model)
    method = sites[0].method_for(method)
    reason = refusal(method)
    if reason:
        raise NotImplementedError(f"method={given!r}: cannot export: {reason}")
    if method.name == "dynamic-ntk" and sites[0].train_length != model.config.max_position_embeddings:
        raise NotImplementedError(
            f"method={given!r}: cannot export: transformers' dynamic measures length from "
            f"max_position_embeddings={model.config.max_position_embeddings}, ropelab from the training length "
            f"{sites[0].train_length}")
    config = copy.deepcopy(model.config)
    old = config.rope_parameters
    if all(s.layer_type is None for s in sites):
        new = native_parameters(method, sites[0], old)
    else:
        new = {**old, **{s.layer_type: native_parameters(method, s, old[s.layer_type]) for s in sites}}
    try:
        config.rope_parameters = new
        validate = getattr(config, "validate", None)  # what save_pretrained runs (Phi3Config takes only longrope)
        if validate is not None:
            validate()
    except Exception as e:
        raise NotImplementedError(f"method={given!r}: cannot export to {type(config).__name__}: "
                                  f"{one_line(e)}") from None
    if method.name in ("yarn", "llama3", "longrope"):
        if hasattr(config, "original_max_position_embeddings"):
            config.original_max_position_embeddings = sites[0].train_length  # transformers prefers the top-level one
        # the extended context, for servers that cap lengths by it; L stays in original_max_position_embeddings
        scale = method.params.get("scale")  # longrope's may be unknown (no factor in the config)
        if scale:
            config.max_position_embeddings = max(config.max_position_embeddings, int(sites[0].train_length * scale))
    check_reproduces(method, sites, config, given)
    return config


def one_line(error: Exception) -> str:
    """The last line of an error (transformers' config validation errors span several)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def check_reproduces(method: Method, sites: list[arch.RotarySite], config, given: str) -> None:
    """Build each rotary from `config` and compare its frequencies with the method's."""
    for site in sites:
        try:
            rotary = type(site.module)(config=config)
        except Exception as e:  # the family's config or rotary rejects the parameters
            raise NotImplementedError(f"method={given!r}: cannot export to {type(site.module).__name__}: "
                                      f"{one_line(e)}") from None
        m = site.method_for(method)
        lengths = [site.train_length, 2 * site.train_length, 4 * site.train_length] if m.length_dependent else [None]
        for length in lengths:
            if length is not None:  # run the rotary so its dynamic update sees this length
                x = torch.zeros(1, 1, site.dim)
                kwargs = {"layer_type": site.layer_type} if site.layer_type else {}
                rotary(x, torch.arange(length)[None], **kwargs)
            got = getattr(rotary, site.buffer).float()
            want = m.frequencies(site.dim, site.base, length).inv_freq.float()
            factor = float(getattr(rotary, site.scaling_attr))
            want_factor = float(m.frequencies(site.dim, site.base, length).attention_factor)
            close = got.shape == want.shape and torch.allclose(got, want, rtol=RTOL, atol=0)
            if not close or abs(factor - want_factor) > 1e-12 * max(1.0, abs(want_factor)):
                error = (got - want).abs().div(want).max().item() if got.shape == want.shape else "shape"
                raise NotImplementedError(
                    f"method={given!r}: cannot export: {config.rope_parameters} in "
                    f"{type(site.module).__name__} does not reproduce it (length {length}: frequency relative "
                    f"error {error}, attention factor {factor} vs {want_factor})")


def export(model: nn.Module, method: Method | str, out: str | Path, tokenizer=None, **params) -> Path:
    """Write `model` (unpatched weights) with `method` as native rope parameters into the new folder `out`.

    A model loaded from a GGUF file (the embedded defaults) is written with the float weights
    transformers dequantised on load, in the dtype it was loaded in (`weights` in
    ropelab_export.json says so). The folder is written under a temporary name beside `out`
    and renamed to `out` when complete: an export that fails leaves `out` as it was (absent, or
    the empty folder it was) and no temporary folder behind.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out={str(out)!r}: exists and is not an empty folder; export writes a new folder")
    if current_patch(model) is not None:
        raise ValueError(f"model: patched with {current_patch(model).method.spec()!r}; undo it first "
                         "(export writes the model's own weights, the method goes into the config)")
    config = exported_config(model, method, **params)
    spec = arch.find_rotary_sites(model)[0].method_for(resolve_method(method, params)).spec()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    weights = f"{dtype}, as loaded"
    if gguf_loaded(model):
        weights = f"{dtype}, dequantized from the GGUF file's quantized blocks when the model was loaded"
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the folder holds plain float weights: nothing to dequantise on load
    caveat = ("transformers' dynamic caches keys after RoPE: cached decoding past the training length "
              "differs from ropelab's; one forward is the same") if spec.startswith("dynamic-ntk") else ""
    note = {"method": spec, "rope_parameters": config.rope_parameters, "weights": weights, "note": caveat}
    with as_float_model(model), staged_folder(out) as folder:
        model.save_pretrained(folder)
        config.save_pretrained(folder)  # overwrites the copy save_pretrained wrote
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "ropelab_export.json").write_text(json.dumps(note, indent=2, default=str) + "\n")
    return out


@contextlib.contextmanager
def staged_folder(out: Path):
    """A new folder beside `out` to write into; renamed to `out` (absent or an empty folder) when
    the block ends without error, removed with every parent folder made for it otherwise."""
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    folder.mkdir()  # the umask's mode, as `out` would have had
    try:
        yield folder
        os.replace(folder, out)  # POSIX: replaces an empty folder; a failure leaves `out` as it was
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        for parent in made:  # deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
