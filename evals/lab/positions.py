"""The lab's position modules: each a standard transformers configuration, so a trained
model loads with `AutoModelForCausalLM` and everything ropelab can patch applies to it.

| module | configuration | positions during training | at inference |
|---|---|---|---|
| `rope` | Llama | RoPE (Su et al., RoFormer) | frequency maps, relative maps, log-n |
| `rope-logn` | Llama | RoPE + log-n through ropelab's attention | the same, each with the training log-n |
| `inverse-leaky` | Llama | inverse Leaky ReRoPE through ropelab's attention (Su, Transformer升级之路 13) | plain RoPE and the rest |
| `sinusoidal` | XGLM | additive sinusoidal table (Vaswani et al. 2017) | frequency maps on the table |
| `learned` | GPT-2 | a learned table of `train_length` rows | in range; past it positions are clamped to the last row |
| `alibi` | BLOOM | ALiBi biases (Press et al. 2022) | as trained (ALiBi extrapolates by construction) |
| `nope` | SmolLM3 with `no_rope_layers` all 0 | none (Kazemnejad et al. 2023) | as trained |

Log-n during training: ropelab's log-n is Su's post-hoc form, max(1, ln(p+1)/ln L0), which is
the identity below L0. Trained with L0 = the training length it would do nothing, so
`rope-logn` trains with L0 = `logn_length` (default a quarter of the training length): the
query scale grows over the last three quarters of every training sequence, and inference
applies the same L0 on top of every method.

Dropout is 0 everywhere (deterministic runs; the models are far too small to need it) and
input and output embeddings are tied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

POSITIONS = ("rope", "rope-logn", "inverse-leaky", "sinusoidal", "learned", "alibi", "nope")
ROTARY = ("rope", "rope-logn", "inverse-leaky")  # Llama models: every rotary method applies
# Positions whose models take no ropelab method at all: they run as trained ("as-trained").
AS_TRAINED = ("learned", "alibi", "nope")


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def text(self) -> str:
        return f"{self.hidden}x{self.layers}x{self.heads}"


SIZES = {
    "micro": Size(32, 2, 4, 64),  # tests: a few seconds per run
    "tiny": Size(64, 2, 4, 128),  # the default (README, "The lab")
    "small": Size(128, 4, 4, 512),
}


def parse_size(text: str) -> Size:
    """A preset name (micro, tiny, small) or `HIDDENxLAYERSxHEADS` (MLP width 4×hidden)."""
    if text in SIZES:
        return SIZES[text]
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size={text!r}: must be one of {', '.join(SIZES)} or HIDDENxLAYERSxHEADS like 256x6x8")
    hidden, layers, heads = map(int, parts)
    return Size(hidden, layers, heads, 4 * hidden)


def check_size(size: Size, position: str) -> None:
    """Refuse shapes the configurations cannot build (rotary needs an even head dimension)."""
    if size.hidden % size.heads:
        raise ValueError(f"size={size.text()!r}: hidden {size.hidden} must be divisible by heads {size.heads}")
    head_dim = size.hidden // size.heads
    if position in ROTARY + ("nope",) and head_dim % 2:
        raise ValueError(f"size={size.text()!r}: head dimension {head_dim} must be even for rotary positions")
    if position == "sinusoidal" and size.hidden < 4:
        raise ValueError(f"size={size.text()!r}: hidden {size.hidden} is too small for a sinusoidal table (>= 4)")


def parameter_count(size: Size, vocab: int, train_length: int, position: str) -> int:
    """Parameters of the built model, to within the norms and biases (used for the memory check)."""
    per_layer = 4 * size.hidden**2 + 3 * size.hidden * size.intermediate
    table = train_length * size.hidden if position == "learned" else 0
    return vocab * size.hidden + size.layers * per_layer + table


def training_bytes(size: Size, vocab: int, train_length: int, batch: int, position: str) -> int:
    """A rough upper bound of training memory: fp32 weights, grads and two Adam moments
    (16 bytes per parameter), activations kept for backward (~24 hidden-size tensors and
    the attention matrix per layer) and the logits with their gradient."""
    tokens = batch * train_length
    weights = 16 * parameter_count(size, vocab, train_length, position)
    activations = 4 * tokens * size.layers * (24 * size.hidden + 2 * size.heads * train_length)
    logits = 3 * 4 * tokens * vocab
    return weights + activations + logits


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(size: Size, vocab: int, train_length: int, batch: int, position: str, limit: int | None) -> None:
    if limit is None:
        return
    need = training_bytes(size, vocab, train_length, batch, position)
    if need > limit:
        raise ValueError(
            f"size={size.text()!r}: training needs about {need / 2**30:.1f} GiB (batch {batch} × {train_length} tokens, "
            f"vocabulary {vocab}) but {limit / 2**30:.1f} GiB is available; use a smaller size or batch"
        )


def default_logn_length(train_length: int) -> int:
    return max(2, train_length // 4)


def default_inverse(train_length: int) -> tuple[int, float]:
    """(window, stretch) of the inverse Leaky ReRoPE: w = L/4 and s = 16, Su's choice in part 13
    (w = 128 at L = 512, k = 1/16); the longest distance seen is then w + (L-1-w)·16 ≈ 12·L."""
    return max(1, train_length // 4), 16.0


def training_method(position: str, train_length: int, logn_length: int, inverse_window: int, inverse_scale: float):
    """The ropelab method spec to train through, or None for the model's own positions."""
    if position == "rope-logn":
        return f"rope:logn=true,train_length={logn_length}"
    if position == "inverse-leaky":
        return f"inverse-leaky-rerope:window={inverse_window},scale={inverse_scale:g}"
    return None


def build_config(position: str, size: Size, vocab: int, train_length: int, eos_id: int):
    """The transformers configuration of a position module (dropout 0, tied embeddings)."""
    common = dict(vocab_size=vocab, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                  tie_word_embeddings=True)
    if position in ROTARY or position == "nope":
        llama = dict(hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                     num_attention_heads=size.heads, num_key_value_heads=size.heads,
                     max_position_embeddings=train_length, attention_dropout=0.0, **common)
        if position == "nope":
            from transformers import SmolLM3Config

            return SmolLM3Config(no_rope_layers=[0] * size.layers, use_sliding_window=False, **llama)
        from transformers import LlamaConfig

        return LlamaConfig(**llama)
    if position == "sinusoidal":
        from transformers import XGLMConfig

        return XGLMConfig(d_model=size.hidden, num_layers=size.layers, attention_heads=size.heads,
                          ffn_dim=size.intermediate, max_position_embeddings=train_length, dropout=0.0,
                          attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, decoder_start_token_id=eos_id,
                          **common)
    if position == "learned":
        from transformers import GPT2Config

        return GPT2Config(n_embd=size.hidden, n_layer=size.layers, n_head=size.heads, n_inner=size.intermediate,
                          n_positions=train_length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if position == "alibi":
        from transformers import BloomConfig

        # BLOOM's MLP is fixed at 4×hidden; `intermediate` is ignored.
        return BloomConfig(hidden_size=size.hidden, n_layer=size.layers, n_head=size.heads,
                           hidden_dropout=0.0, attention_dropout=0.0, **common)
    raise ValueError(f"position={position!r}: unknown position module; choose one of {', '.join(POSITIONS)}")


def check_position(position: str) -> None:
    if position not in POSITIONS:
        import difflib

        close = difflib.get_close_matches(position, POSITIONS, n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"position={position!r}: unknown position module.{hint} choose one of {', '.join(POSITIONS)}")


def leaky_scale_for(train_length: int, window: int, longest: int) -> float:
    """Su's rule for Leaky ReRoPE's k (part 13): w + (N - 1 - w)/k ≤ L/2 at the test length N."""
    room = train_length / 2 - window
    if room <= 0:
        raise ValueError(f"window={window}: must be below half the training length {train_length}")
    return float(max(1, math.ceil((longest - 1 - window) / room)))
