"""How to find the parts of a loaded model that a patch touches; what is known about each
family (the table) lives in patches/model_facts.py.

Every supported rotary family has a model-level `*RotaryEmbedding` module holding `inv_freq`
(Gemma3: one `{layer_type}_inv_freq` per layer type, each from its own `rope_theta`) and
attention modules of one known class. A family is matched by `config.model_type` and its
attention class is looked up by exact name: if transformers renames it, `patch` finds none
and raises instead of silently doing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version
from torch import nn

from ..method import Method
from . import model_facts
from .model_facts import FAMILIES, Family, supported_families  # noqa: F401  (the table lives there)

# Mirrors `transformers>=5.17,<5.24` in pyproject.toml (tests/patches check they agree).
# The patch points were measured on 5.23; scripts/test.sh runs the patch tests on the
# newest release of the range and again on the oldest (5.17.0). 5.10.4 fails 8 of them
# (StableLM crashes inside transformers, native comparisons differ), 5.0.0 fails most.
TRANSFORMERS_MIN, TRANSFORMERS_BELOW = "5.17", "5.24"


def check_transformers_version(version: str | None = None) -> None:
    version = version or transformers.__version__
    v = Version(version)
    if not (Version(TRANSFORMERS_MIN) <= v < Version(TRANSFORMERS_BELOW)):
        raise RuntimeError(
            f"transformers=={version}: ropelab.patches supports transformers>={TRANSFORMERS_MIN},"
            f"<{TRANSFORMERS_BELOW} (the range its patches were measured on); install "
            f"'transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}'"
        )


def family_of(model: nn.Module) -> tuple[str, Family]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"model_type={model_type!r} ({type(model).__name__}): not a supported family. "
            f"supported: {', '.join(supported_families())}"
        )
    if model_type == "falcon" and getattr(config, "alibi", False):
        raise NotImplementedError("model_type='falcon' with alibi=True: ALiBi models have no rotary embedding to patch")
    return model_type, FAMILIES[model_type]


@dataclass(frozen=True)
class RotarySite:
    """One set of rotary frequencies: a buffer of a rotary module and what it was built from."""

    module: nn.Module
    buffer: str  # "inv_freq" or "{layer_type}_inv_freq"
    scaling_attr: str  # "attention_scaling" or "{layer_type}_attention_scaling"
    layer_type: str | None  # None unless the rotary keeps one set per layer type (Gemma3)
    base: float  # rope_theta
    dim: int  # rotary dimension: head_dim × partial_rotary_factor
    train_length: int  # original_max_position_embeddings, else max_position_embeddings
    rope_type: str  # the model's own rope_type for this site (replaced by the method)
    rope_parameters: dict = field(default_factory=dict, compare=False)  # the config's, for this site
    max_positions: int | None = None  # config.max_position_embeddings

    def method_for(self, method: Method) -> Method:
        """`method` with what it leaves to the model filled in from this site (training
        length; longrope's factor lists from a 'longrope' config)."""
        return method.with_model(self.train_length, self.rope_parameters, self.max_positions)


def _rope_params(config, layer_type: str | None) -> dict:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        raise NotImplementedError(f"config.rope_parameters={params!r}: expected a dict (transformers 5.x)")
    if layer_type is not None:
        params = params.get(layer_type)
        if not isinstance(params, dict):
            raise NotImplementedError(f"config.rope_parameters[{layer_type!r}]={params!r}: expected a dict")
    return params


def rotary_dim(config, params: dict) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim * factor)


def find_rotary_sites(model: nn.Module) -> list[RotarySite]:
    """Every `*inv_freq` buffer of every `*RotaryEmbedding` module (skipping the
    `original_inv_freq` copies dynamic RoPE keeps), with its base, dim and training length."""
    sites = []
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        config = module.config
        for name, buf in module.named_buffers(recurse=False):
            if not name.endswith("inv_freq") or "original" in name:
                continue
            prefix = name[: -len("inv_freq")]
            layer_type = prefix[:-1] if prefix else None
            params = _rope_params(config, layer_type)
            dim = rotary_dim(config, params)
            if dim % 2 or buf.numel() != dim // 2:
                raise NotImplementedError(
                    f"{type(module).__name__}.{name}: has {buf.numel()} frequencies but the config gives rotary "
                    f"dim {dim}; expected an even dim with dim/2 frequencies"
                )
            sites.append(
                RotarySite(module, name, prefix + "attention_scaling", layer_type, float(params["rope_theta"]),
                           dim, model_facts.train_length(config, params), params.get("rope_type", "default"),
                           dict(params), getattr(config, "max_position_embeddings", None))
            )
    if not sites:
        raise NotImplementedError(
            f"{type(model).__name__}: found no *RotaryEmbedding module with an inv_freq buffer; "
            "this transformers version may have moved it"
        )
    return sites


def find_attention_layers(model: nn.Module, family: Family) -> list[nn.Module]:
    layers = [m for m in model.modules() if type(m).__name__ == family.attention_class]
    if not layers:
        raise NotImplementedError(
            f"{type(model).__name__}: found no {family.attention_class} modules; "
            "this transformers version may have renamed the attention class"
        )
    return layers


def layer_type_of(model: nn.Module, attention: nn.Module) -> str | None:
    """The layer type ("sliding_attention", ...) of an attention module, where the model has them."""
    layer_types = getattr(getattr(attention, "config", model.config), "layer_types", None)
    index = getattr(attention, "layer_idx", None)
    if layer_types is None or index is None:
        return None
    return layer_types[index]


def dtype_device(site: RotarySite) -> tuple[torch.dtype, torch.device]:
    buf = getattr(site.module, site.buffer)
    return buf.dtype, buf.device
