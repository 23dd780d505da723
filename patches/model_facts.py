"""What ropelab knows about model families, in one table: for each `config.model_type`, its
attention class (the entry point the patch routes), its rotary layout, whether it dispatches
attention itself, and how its LM head post-processes logits; plus the training-length rule
and the embedded default models. Nothing outside `ropelab.patches` names a model family.

Sources: each family's `modeling_*.py` in transformers 5.23 (the attention class, the rotary
module, and the lines after `lm_head` in its `*ForCausalLM.forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitsTransform:
    """What a family's LM head does after the projection, read from its config:
    `kind` is "softcap" (c·tanh(x/c), Gemma 2/3), "multiply" (x·s, Cohere) or "divide"
    (x/s, Granite); `field` is the config field holding c or s (None there: no transform)."""

    kind: str
    field: str

    def apply(self, logits: torch.Tensor, config) -> torch.Tensor:
        value = getattr(config, self.field, None)
        if not value:
            return logits
        if self.kind == "softcap":
            return torch.tanh(logits / value) * value
        if self.kind == "multiply":
            return logits * value
        return logits / value


SOFTCAP = LogitsTransform("softcap", "final_logit_softcapping")


@dataclass(frozen=True)
class Family:
    attention_class: str  # exact class name of the attention modules
    layout: str = "half"  # "half" (rotate_half) or "interleaved" (pairs 2i, 2i+1)
    # True: the attention forward computes attention itself instead of dispatching through
    # ALL_ATTENTION_FUNCTIONS, so the relative route replaces that forward (patches/falcon.py).
    own_dispatch: bool = False
    logits: LogitsTransform | None = None
    # "rotary" (frequency or attention route) or "sinusoidal" (an additive absolute table)
    positions: str = "rotary"
    # the family's own file in patches/, where one is needed: `route_attention(changes,
    # attentions)` for the attention route (own dispatch: Falcon; a window passed on:
    # Qwen2-MoE), or `plan(model, method)` for a sinusoidal table (XGLM)
    module: str | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaAttention"),
    "mistral": Family("MistralAttention"),
    "mixtral": Family("MixtralAttention"),
    "qwen2": Family("Qwen2Attention"),
    "qwen2_moe": Family("Qwen2MoeAttention", module="qwen2_moe"),  # window only in the mask
    "qwen3": Family("Qwen3Attention"),
    "qwen3_moe": Family("Qwen3MoeAttention"),
    "gemma": Family("GemmaAttention"),
    "gemma2": Family("Gemma2Attention", logits=SOFTCAP),
    "gemma3_text": Family("Gemma3Attention", logits=SOFTCAP),
    "phi": Family("PhiAttention"),
    "phi3": Family("Phi3Attention"),
    "gpt_neox": Family("GPTNeoXAttention"),
    "stablelm": Family("StableLmAttention"),
    "olmo": Family("OlmoAttention"),
    "olmo2": Family("Olmo2Attention"),
    "olmoe": Family("OlmoeAttention"),
    "starcoder2": Family("Starcoder2Attention"),
    "cohere": Family("CohereAttention", layout="interleaved", logits=LogitsTransform("multiply", "logit_scale")),
    "glm": Family("GlmAttention", layout="interleaved"),
    "granite": Family("GraniteAttention", logits=LogitsTransform("divide", "logits_scaling")),
    "falcon": Family("FalconAttention", own_dispatch=True, module="falcon"),
    # frequency maps only, applied to the absolute sinusoidal table
    "xglm": Family("XGLMAttention", positions="sinusoidal", module="xglm"),
}

SINUSOIDAL_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.positions == "sinusoidal")


def supported_families() -> list[str]:
    """The `config.model_type` values `patch` accepts, sorted."""
    return sorted(FAMILIES)


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logits_transform(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function the model's LM head applies after the projection (identity for most
    families and for families not in the table; `ropelab.evals.losses.check_head` compares
    against the model's own logits, so an unknown one fails loudly there)."""
    config = text_config(model)
    family = FAMILIES.get(getattr(config, "model_type", None))
    transform = family.logits if family is not None else None
    if transform is None:
        return lambda logits: logits
    return lambda logits: transform.apply(logits, config)


def train_length(config, rope_parameters: Mapping | None = None) -> int:
    """L, the length the model was trained at: `original_max_position_embeddings` at the top
    of the config (Phi-3 keeps it there, and transformers gives it priority), else in the
    rope parameters (one dict, or the first per layer type that has it), else
    `max_position_embeddings`."""
    config = text_config(config)
    params = rope_parameters if rope_parameters is not None else getattr(config, "rope_parameters", None) or {}
    dicts = [params] if "rope_type" in params or "rope_theta" in params else [p for p in params.values() if isinstance(p, Mapping)]
    candidates = [getattr(config, "original_max_position_embeddings", None)]
    candidates += [p.get("original_max_position_embeddings") for p in dicts]
    candidates.append(getattr(config, "max_position_embeddings", None))
    for value in candidates:
        if value:
            return int(value)
    raise ValueError("config.max_position_embeddings=None: the model's training length is unknown")
