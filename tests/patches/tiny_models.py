"""Tiny random decoder models built from configs, one per supported family.

Each is fp32, 2 layers, hidden 32, 4 query heads over 2 key/value heads (GQA where the
family has it), head_dim 16 (8 where the family derives it), vocab 101, weights drawn
with std 0.2, so a forward over 64 tokens takes milliseconds.
The training length is 32 (`max_position_embeddings`) so a 48-token sequence is already
past it and length-dependent methods (dynamic-ntk, log-n) change something. Sliding
layers get a window of 8 so a 24-token sequence crosses it.
"""

from __future__ import annotations

import torch
import transformers

TRAIN_LENGTH = 32
WINDOW = 8
VOCAB = 101

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=TRAIN_LENGTH,
    tie_word_embeddings=False,
    # 10× transformers' default, so attention is sharp and logits are O(1): with 0.02 the
    # attention is near uniform and moving every position changes logits by only ~1e-3.
    initializer_range=0.2,
)

# family -> (config class, extra config fields). Families without GQA drop num_key_value_heads.
_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"head_dim": 16, "sliding_window": WINDOW}),
    "qwen2": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
         "layer_types": ["full_attention", "sliding_attention"]},
    ),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
         "layer_types": ["sliding_attention", "full_attention"]},  # softcap 50 (the default) kept
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
         "layer_types": ["sliding_attention", "full_attention"],
         "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}},
    ),
    "phi": ("PhiConfig", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    "phi3": ("Phi3Config", {"original_max_position_embeddings": TRAIN_LENGTH, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gpt_neox": (
        "GPTNeoXConfig",
        {"num_key_value_heads": None, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    ),
    "stablelm": (
        "StableLmConfig",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    ),
    "olmo2": ("Olmo2Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "cohere": ("CohereConfig", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "glm": ("GlmConfig", {"head_dim": 16, "pad_token_id": 0, "eos_token_id": 2}),
    "granite": ("GraniteConfig", {"attention_multiplier": 0.2}),
    "falcon": ("FalconConfig", {"num_key_value_heads": None, "num_kv_heads": 2, "new_decoder_architecture": True}),
    # mixture-of-experts and later families: 4 small experts, 2 per token
    "mixtral": ("MixtralConfig", {"head_dim": 16, "sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
         "layer_types": ["full_attention", "sliding_attention"], "num_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "olmo": ("OlmoConfig", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "clip_qkv": 8.0}),
    "olmoe": ("OlmoeConfig", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "num_experts": 4, "num_experts_per_tok": 2}),
    "starcoder2": ("Starcoder2Config", {"sliding_window": WINDOW, "bos_token_id": 1, "eos_token_id": 2}),
}

FAMILIES = list(_FAMILIES)


def config(family: str, **overrides) -> transformers.PretrainedConfig:
    cls_name, extra = _FAMILIES[family]
    fields = {**_COMMON, **extra, **overrides}
    fields = {k: v for k, v in fields.items() if v is not None}
    return getattr(transformers, cls_name)(**fields)


def build(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A seeded random *ForCausalLM of `family` in eval mode; `overrides` go to the config."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(family, **overrides), attn_implementation="eager")
    return model.eval()


def rebuild_like(model: transformers.PreTrainedModel, **overrides) -> transformers.PreTrainedModel:
    """The same weights in a model built natively from a config with `overrides` (the oracle)."""
    family = next(f for f in FAMILIES if config(f).model_type == model.config.model_type)
    twin = build(family, **overrides)
    twin.load_state_dict(model.state_dict())
    return twin


def tokens(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def rope_parameters(family: str, **scaling) -> dict:
    """The family's rope_parameters with a transformers scaling (rope_type=..., factor=...) added
    to every layer type."""
    params = config(family).rope_parameters
    if "rope_type" in params:
        return {**params, **scaling}
    return {layer_type: {**p, **scaling} for layer_type, p in params.items()}


@torch.no_grad()
def logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, **kwargs).logits


def left_pad(sequences, pad=0):
    """(ids, attention mask, position ids) of a left-padded batch, positions as generate() builds them."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)
