"""Passkey retrieval, generated locally (Mohtashami & Jaggi 2023, "Landmark Attention";
the YaRN paper's passkey test): a random 5-digit key hidden at a chosen depth in repeated
filler ("The grass is green. The sky is blue. …"), then "What is the pass key?".

Prompts are deterministic for (seed, length, depth, trial). Generation is greedy; a trial is
correct when the first 5-digit number in the answer equals the key. Results go to
`passkey.jsonl` in the run directory, resumable like the perplexity results.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import ropelab

from .models import default_apply_method, environment
from .results import ResultStore, job_key

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
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"].to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def passkey(model, tokenizer, methods, lengths, depths=(0.1, 0.5, 0.9), trials: int = 1, *, seed: int = 0,
            out=None, model_id: str = "model", max_new_tokens: int = 8, apply_method=None,
            progress: bool = True) -> list[dict]:
    """Run (or resume) passkey trials for every method × length × depth × trial; return the records."""
    apply_method = apply_method or default_apply_method
    store = ResultStore(f"{out}/passkey.jsonl" if out is not None else None)
    store.set_protocol({"kind": "passkey", "model": model_id, "seed": seed, "max_new_tokens": max_new_tokens,
                        "filler": FILLER, "needle": NEEDLE, "question": QUESTION, "decoding": "greedy",
                        "scoring": "first 5-digit number in the answer equals the key", "environment": environment()})
    params = {"protocol": "passkey", "seed": seed}
    prompts = [make_prompt(tokenizer, n, d, t, seed) for n in lengths for d in depths for t in range(trials)]
    done = store.done()
    keyed = []
    for entry in methods:
        try:
            method, error = ropelab.parse_method(entry), None
        except (ValueError, TypeError) as exc:
            method, error = None, exc
        spec = method.spec() if method else str(entry)
        jobs = [(p, job_key(model_id, spec, params, f"depth={p.depth},trial={p.trial}", p.length)) for p in prompts]
        keyed.append((spec, method, error, jobs))
    pending = sum(1 for *_, jobs in keyed for _, k in jobs if k not in done)
    bar = tqdm(total=pending, desc="passkey", unit="prompt", disable=not progress)
    for spec, method, error, jobs in keyed:
        jobs = [(p, k) for p, k in jobs if k not in done]
        if not jobs:
            continue
        context = None
        if error is None:
            try:
                context = apply_method(model, method)
                context.__enter__()
            except Exception as exc:
                error = exc
        try:
            for p, k in jobs:
                bar.set_postfix_str(f"{spec} N={p.length} depth={p.depth}")
                record = {"type": "passkey", "key": k, "model": model_id, "method": spec, "length": p.length,
                          "depth": p.depth, "trial": p.trial, "prompt_tokens": p.tokens, "passkey": p.key}
                if error is not None:
                    record.update(status="error", error=f"{type(error).__name__}: {error}")
                else:
                    try:
                        start = time.perf_counter()
                        text = answer(model, tokenizer, p.text, max_new_tokens)
                        found, correct = score(text, p.key)
                        record.update(status="ok", answer=text, found=found, correct=correct,
                                      seconds=time.perf_counter() - start)
                    except Exception as exc:  # recorded; the sweep goes on
                        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
                store.append(record)
                bar.update()
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    bar.close()
    wanted = {k for *_, jobs in keyed for _, k in jobs}
    return [r for r in store.latest() if r.get("key") in wanted]


def accuracy(records: list[dict]) -> dict[str, dict[tuple[int, float], float]]:
    """{method: {(length, depth): fraction correct}} over successful trials."""
    cells: dict[str, dict[tuple[int, float], list[bool]]] = {}
    for r in records:
        if r.get("status") == "ok":
            cells.setdefault(r["method"], {}).setdefault((r["length"], r["depth"]), []).append(r["correct"])
    return {m: {c: sum(v) / len(v) for c, v in cs.items()} for m, cs in cells.items()}
