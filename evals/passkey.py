"""Passkey retrieval, generated locally (Mohtashami & Jaggi 2023, "Landmark Attention";
the YaRN paper's passkey test): a random 5-digit key hidden at a chosen depth in repeated
filler ("The grass is green. The sky is blue. …"), then "What is the pass key?".

Prompts are deterministic for (seed, length, depth, trial). Generation is greedy; a trial is
correct when the first 5-digit number in the answer equals the key. The trials run on the
one runner (`runner.py`) into `passkey.jsonl` in the run directory, resumable and locked
like the perplexity results.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import torch

from ropelab.patches.handle import probe_device

from .identity import display_name, identity_key, model_identity
from .models import default_apply_method, environment
from .checks import check_depths, check_int, check_lengths
from .results import ResultStore, check_out
from .runner import Job, canonical_methods, run_jobs
from .summary import group_of, labels

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
_DIGITS = re.compile(r"\d{5}")


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: str
    tokens: int  # prompt length in tokens (≤ the requested length)
    length: int
    depth: float
    trial: int


def make_prompt(tokenizer, length: int, depth: float, trial: int = 0, seed: int = 0) -> PasskeyPrompt:
    """The longest prompt of at most `length` tokens with the key after `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must be between 0 and 1 (fraction of the filler before the key)")
    key = str(random.Random(f"{seed}:{length}:{depth}:{trial}").randint(10000, 99999))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])  # as `answer` feeds it

    def build(n: int) -> str:
        before = round(depth * n)
        return INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n - before) + QUESTION

    fixed = count(build(0))
    if fixed > length:
        raise ValueError(f"length={length}: a passkey prompt needs at least {fixed} tokens")
    n = max(0, (length - fixed) // max(1, count(FILLER * 8) // 8))
    while n > 0 and count(build(n)) > length:  # BPE merges across joins: shrink until it fits
        n -= 1
    text = build(n)
    return PasskeyPrompt(text, key, count(text), length, depth, trial)


def score(answer: str, key: str) -> tuple[str | None, bool]:
    """(the first 5-digit number in the answer or None, whether it is the key)."""
    found = _DIGITS.search(answer)
    return (found.group(0) if found else None), bool(found and found.group(0) == key)


@torch.inference_mode()
def answer(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"].to(probe_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def passkey(model, tokenizer, methods, lengths, depths=(0.1, 0.5, 0.9), trials: int = 1, *, seed: int = 0,
            out=None, model_id: str = "model", model_source: dict | None = None, shard: str | None = None,
            max_new_tokens: int = 8, apply_method=None, progress: bool = True) -> list[dict]:
    """Run (or resume) passkey trials for every method × length × depth × trial; return the records.

    Everything is checked (and every prompt built) before anything is written.
    """
    lengths = check_lengths(lengths)
    depths = check_depths(depths)
    check_int("trials", trials)
    check_int("max_new_tokens", max_new_tokens)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: must be an integer")
    entries = canonical_methods(methods)
    if out is not None:
        check_out(out)
    identity = model_identity(model, model_source or model_id)
    prompts = [make_prompt(tokenizer, n, d, t, seed) for n in lengths for d in depths for t in range(trials)]
    key, params = identity_key(identity), {"protocol": "passkey", "seed": seed, "max_new_tokens": max_new_tokens}
    header = {"kind": "passkey", "model": display_name(identity), "model_identity": identity, "model_key": key,
              "seed": seed, "max_new_tokens": max_new_tokens, "filler": FILLER, "needle": NEEDLE,
              "question": QUESTION, "decoding": "greedy", "scoring": "first 5-digit number in the answer equals the key",
              "environment": environment()}

    def make_jobs(entry):
        return [Job({"document": f"depth={p.depth},trial={p.trial}", "length": p.length, "depth": p.depth,
                     "trial": p.trial}, p, {"prompt_tokens": p.tokens, "passkey": p.key}) for p in prompts]

    def execute(method, job):
        start = time.perf_counter()
        text = answer(model, tokenizer, job.payload.text, max_new_tokens)
        found, correct = score(text, job.payload.key)
        return {"answer": text, "found": found, "correct": correct, "seconds": time.perf_counter() - start}

    with ResultStore(out, "passkey", shard) as store:
        store.begin(header)
        return run_jobs(model, store, entries, make_jobs, execute, model_key=key, params=params,
                        base={"type": "passkey", "model": display_name(identity), "params": params},
                        apply_method=apply_method or default_apply_method, desc="passkey", progress=progress)


def accuracy(records: list[dict]) -> dict[str, dict[tuple[int, float], float]]:
    """{row label: {(length, depth): fraction correct}} over successful trials (rows as in summary.labels)."""
    names = labels(records)
    cells: dict[str, dict[tuple[int, float], list[bool]]] = {}
    for r in records:
        if r.get("status") == "ok":
            cells.setdefault(names[group_of(r)], {}).setdefault((r["length"], r["depth"]), []).append(r["correct"])
    return {m: {c: sum(v) / len(v) for c, v in cs.items()} for m, cs in cells.items()}
