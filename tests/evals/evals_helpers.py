"""Tiny random models and a tiny byte-level tokenizer for the evals tests, built offline in ~1 s."""

from __future__ import annotations

import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commits of the `hub` fixture (conftest.py)
OTHER = "fedcba9876543210fedcba9876543210fedcba98"

TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "def main():\n    return 0\n\nclass A:\n    pass\n0123456789 The pass key is 12345. Remember it. "
    "What is the pass key?"
)


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_llama(vocab_size: int, max_positions: int = 64, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=max_positions, eos_token_id=0, bos_token_id=0,
        pad_token_id=0, tie_word_embeddings=False, **overrides,
    )
    return LlamaForCausalLM(config).eval()
