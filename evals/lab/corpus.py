"""Training text and held-out text from one corpus (`ropelab.evals.data` sources; default
the Python standard library's own source, embedded on every machine).

A document is held out when the hash of its id falls in one residue class
(`heldout_every`: 1 in 20 by default), so the split is fixed by the corpus alone, never by
the order or the budget. Training reads the other documents in the corpus's fixed order,
each followed by the end-of-text token, until the token budget is met; evaluation joins
held-out documents (a blank line between them) into windows of the length it needs.
"""

from __future__ import annotations

import hashlib

import torch

from ..data import TokenizedDocument, iter_documents


def is_heldout(doc_id: str, every: int) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % every == 0


def check_every(every: int) -> None:
    if not isinstance(every, int) or every < 2:
        raise ValueError(f"heldout_every={every!r}: must be an integer >= 2 (1 document in N is held out)")


def training_tokens(source: str, tokenizer, budget: int, heldout_every: int) -> torch.Tensor:
    """The first `budget` tokens of the training documents (fewer when the corpus is smaller), int64."""
    check_every(heldout_every)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer.eos_token_id=None: the lab separates documents with an end-of-text token")
    pieces, total = [], 0
    for doc in iter_documents(source):
        if is_heldout(doc.id, heldout_every) or not doc.text.strip():
            continue
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [eos]
        pieces.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if total >= budget:
            break
    if not pieces:
        raise ValueError(f"data={source!r}: no training documents (every document is held out or empty)")
    return torch.cat(pieces)[:budget]


def heldout_documents(source: str, tokenizer, length: int, count: int, heldout_every: int) -> list[TokenizedDocument]:
    """`count` windows of `length` tokens, each joined from consecutive held-out documents."""
    check_every(heldout_every)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    chosen, ids, names = [], [], []
    for doc in iter_documents(source):
        if not is_heldout(doc.id, heldout_every) or not doc.text.strip():
            continue
        ids += (sep if ids else []) + tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        names.append(doc.id)
        if len(ids) >= length:
            name = names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"
            chosen.append(TokenizedDocument(name, ids[:length]))
            ids, names = [], []
            if len(chosen) == count:
                return chosen
    raise ValueError(
        f"data={source!r}: the held-out documents (1 in {heldout_every}) give only {len(chosen)} of {count} "
        f"windows of {length} tokens; use fewer documents, shorter lengths or a larger corpus"
    )


def train_tokenizer(source: str, vocab_size: int, heldout_every: int, max_chars: int = 8_000_000):
    """A byte-level BPE tokenizer of `vocab_size` trained on the training documents only (the
    first `max_chars` characters of them), with one special token `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or not 300 <= vocab_size <= 200_000:
        raise ValueError(f"tokenizer vocabulary={vocab_size!r}: must be an integer in [300, 200000] "
                         "(256 bytes plus merges)")
    check_every(heldout_every)

    def texts():
        seen = 0
        for doc in iter_documents(source):
            if is_heldout(doc.id, heldout_every):
                continue
            yield doc.text
            seen += len(doc.text)
            if seen >= max_chars:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
