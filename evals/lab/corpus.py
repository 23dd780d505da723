"""Training text and held-out text from one corpus (`ropelab.evals.data` sources; default
the Python standard library's own source, embedded on every machine).

A document is held out when the hash of its id falls in one residue class
(`heldout_every`: 1 in 20 by default), so the split is fixed by the corpus alone, never by
the order or the budget. Training samples the whole training split: every training document
(followed by the end-of-text token) is tokenized into one stream, the stream is cut into
blocks of the training length, and a seeded permutation picks the budget's blocks from all
of them, so a small budget sees every part of the corpus (not its alphabetically first
files, as reading the corpus in order would) while held-out documents stay apart.
Evaluation joins held-out documents (a blank line between them) into windows of the length
it needs.
"""

from __future__ import annotations

import hashlib

import torch

from ..data import START_CHARS, TokenizedDocument, iter_documents


def is_heldout(doc_id: str, every: int) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % every == 0


def check_every(every: int) -> None:
    if not isinstance(every, int) or every < 2:
        raise ValueError(f"heldout_every={every!r}: must be an integer >= 2 (1 document in N is held out)")


def training_stream(source: str, tokenizer, heldout_every: int) -> torch.Tensor:
    """Every training document's tokens, each followed by the end-of-text token, in the corpus's order (int64)."""
    check_every(heldout_every)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer.eos_token_id=None: the lab separates documents with an end-of-text token")
    texts = [doc.text for doc in iter_documents(source)
             if not is_heldout(doc.id, heldout_every) and doc.text.strip()]
    if not texts:
        raise ValueError(f"data={source!r}: no training documents (every document is held out or empty)")
    pieces = []
    for start in range(0, len(texts), 64):  # batches: the fast tokenizer's threads; Python ints kept briefly
        rows = tokenizer(texts[start : start + 64], add_special_tokens=False)["input_ids"]
        pieces.append(torch.tensor([t for row in rows for t in (*row, eos)], dtype=torch.long))
    return torch.cat(pieces)


def sample_blocks(stream: torch.Tensor, length: int, count: int, seed: int) -> torch.Tensor:
    """`count` distinct blocks of `length` tokens drawn from all of `stream` (cut at multiples of
    `length`) by a permutation seeded with `seed`, in that permutation's order: shape
    (min(count, blocks), length). Fewer when the stream holds fewer blocks (then all of them)."""
    blocks = len(stream) // length
    if blocks < 1:
        return stream.new_empty((0, length))
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))[:count]
    return stream[: blocks * length].view(blocks, length)[order]


def training_blocks(source: str, tokenizer, budget: int, length: int, heldout_every: int, seed: int) -> torch.Tensor:
    """The budget's blocks (`budget // length` of them, fewer when the corpus is smaller), sampled
    from the whole training split with the run's seed: shape (blocks, length), int64."""
    return sample_blocks(training_stream(source, tokenizer, heldout_every), length, budget // length, seed)


def heldout_documents(source: str, tokenizer, length: int, count: int, heldout_every: int) -> list[TokenizedDocument]:
    """`count` windows of `length` tokens, each joined from consecutive held-out documents."""
    check_every(heldout_every)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    chosen, ids, names, start = [], [], [], ""
    for doc in iter_documents(source):
        if not is_heldout(doc.id, heldout_every) or not doc.text.strip():
            continue
        ids += (sep if ids else []) + tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        names.append(doc.id)
        start = start if len(names) > 1 else doc.text[:START_CHARS]
        if len(ids) >= length:
            name = names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"
            chosen.append(TokenizedDocument(name, ids[:length], start))
            ids, names = [], []
            if len(chosen) == count:
                return chosen
    raise ValueError(
        f"data={source!r}: the held-out documents (1 in {heldout_every}) give only {len(chosen)} of {count} "
        f"windows of {length} tokens; use fewer documents, shorter lengths or a larger corpus"
    )


def train_tokenizer(source: str, vocab_size: int, heldout_every: int, max_chars: int = 8_000_000):
    """A byte-level BPE tokenizer of `vocab_size` trained on the training documents only (the
    first `max_chars` characters of them, taken in the order of a hash of their ids so they
    span the corpus), with one special token `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or not 300 <= vocab_size <= 200_000:
        raise ValueError(f"tokenizer vocabulary={vocab_size!r}: must be an integer in [300, 200000] "
                         "(256 bytes plus merges)")
    check_every(heldout_every)

    def texts():  # in the order of a hash of the ids: the first max_chars come from the whole corpus
        docs = sorted((hashlib.sha256(d.id.encode()).hexdigest(), d.text) for d in iter_documents(source)
                      if not is_heldout(d.id, heldout_every))
        seen = 0
        for _, text in docs:
            yield text
            seen += len(text)
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
