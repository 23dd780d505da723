"""Perplexity versus length: a resumable sweep over methods × documents × lengths.

Three protocols (design.md, "Perplexity versus length"); every record says which:

- `fixed-target` (the headline curve; bojone/rerope's protocol, as in its README table
  "loss on the last 4096 tokens"): each document is cut to a window of W = max(lengths)
  tokens; for each context length N the model reads the last N tokens of the window and
  the score is the mean loss on the window's last K = `targets` tokens — the same tokens
  for every N, so only the context changes. One forward per N.
- `position`: one forward over the W-token window keeps the loss at every position; the
  score for length N is the token-weighted mean over the first N - 1 predictions. For a
  prefix-consistent method one forward at W serves every N; a length-dependent method
  (`method.length_dependent`, e.g. `dynamic-ntk`) gets one forward per N.
- `sliding` (YaRN's eval, jquesnelle/yarn `eval/perplexity.py`, after the HF perplexity
  guide): windows of N tokens advanced by `stride` over each W-token document; each token
  is scored once, in the first window that reaches it. We report the token-weighted mean;
  yarn's script averages the window means, which weights short windows more.

Every record keeps all per-position losses of its forward(s) (so any curve can be redrawn
from the file), its score, seconds, tokens per second and peak memory. A failing job (bad
method spec, a patch that refuses the model, out of memory) is recorded with its error and
the sweep goes on.
"""

from __future__ import annotations

import resource
import time
import traceback
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

import ropelab

from .data import SHORT_POLICIES, TokenizedDocument, select_documents
from .losses import check_head, token_losses
from .models import default_apply_method, environment, train_length
from .results import ResultStore, job_key

PROTOCOLS = ("fixed-target", "position", "sliding")

_DESCRIPTIONS = {
    "fixed-target": "fixed targets, growing context (bojone/rerope): for each N, one forward over the last N "
    "tokens of each document's W-token window; score = mean loss on the window's last K tokens",
    "position": "per position: one forward over each W-token window (one per N for length-dependent methods); "
    "score for N = token-weighted mean loss of the predictions of tokens 1..N-1",
    "sliding": "sliding window (YaRN eval): windows of N tokens, advanced by the stride over each W-token document; "
    "every token scored once; score = token-weighted mean over the document",
}


@dataclass(frozen=True)
class Protocol:
    """How the numbers are made; recorded as the first line of the result file."""

    name: str = "fixed-target"
    window: int = 16384  # W: tokens taken from each document
    targets: int = 2048  # K, fixed-target only
    stride: int = 512  # sliding only
    data: str = "stdlib"
    short: str = "skip"  # policy for documents shorter than W: skip | concatenate

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f"protocol={self.name!r}: must be one of {', '.join(PROTOCOLS)}")
        if self.short not in SHORT_POLICIES:
            raise ValueError(f"short={self.short!r}: must be one of {', '.join(SHORT_POLICIES)}")
        for field in ("window", "targets", "stride"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)!r}: must be an integer >= 1")

    def params(self) -> dict:
        """The parameters that change a job's numbers (part of every job key)."""
        extra = {"fixed-target": {"targets": self.targets}, "sliding": {"stride": self.stride}}.get(self.name, {})
        return {"protocol": self.name, "window": self.window, **extra}

    def check_lengths(self, lengths: list[int]) -> None:
        for n in lengths:
            if not 2 <= n <= self.window:
                raise ValueError(f"length={n}: must be between 2 and the window W={self.window}")
            if self.name == "fixed-target" and n <= self.targets:
                raise ValueError(
                    f"length={n}: fixed-target needs every length > targets={self.targets} "
                    "(the K scored tokens need at least one token of context)"
                )


def _peak_memory_mb() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # process high-water mark
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _run_job(model, protocol: Protocol, ids: list[int], length: int, chunk: int) -> dict:
    """One job's losses and score. Positions: losses[i] scores token i+1 of the forward's input."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if protocol.name == "sliding":
        losses, forwards, prev_end = [float("nan")] * (len(ids) - 1), 0, 0
        for begin in range(0, len(ids), protocol.stride):
            end = min(begin + length, len(ids))
            window = token_losses(model, ids[begin:end], chunk)  # window[i] scores token begin+i+1
            for pos in range(max(prev_end, begin + 1), end):
                losses[pos - 1] = float(window[pos - begin - 1])
            forwards, prev_end = forwards + 1, end
            if end == len(ids):
                break
        scored, tokens = losses, len(ids)
    else:
        first = len(ids) - length if protocol.name == "fixed-target" else 0
        losses = token_losses(model, ids[first : first + length], chunk).tolist()
        forwards, tokens = 1, length
        scored = losses[-protocol.targets :] if protocol.name == "fixed-target" else losses
    seconds = time.perf_counter() - start
    loss = sum(scored) / len(scored)
    return {
        "loss": loss,
        "ppl": float(torch.tensor(loss).exp()),
        "scored_tokens": len(scored),
        "forwards": forwards,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,  # sliding: document tokens (each scored once) per second
        **_peak_memory_mb(),
        "losses": [float(f"{x:.6g}") for x in losses],
    }


def _train_length(model) -> int | None:
    try:
        return train_length(model)
    except ValueError:
        return None


def _jobs(method, protocol: Protocol, lengths: list[int]) -> list[int]:
    """Forward lengths this method needs (position protocol: one at W unless length-dependent)."""
    if protocol.name == "position" and method is not None and not method.length_dependent:
        return [protocol.window]
    return sorted(lengths)


def perplexity(
    model,
    tokenizer,
    documents,
    methods,
    lengths,
    *,
    protocol: str | Protocol = "fixed-target",
    targets: int = 2048,
    stride: int = 512,
    num_documents: int = 1,
    window: int | None = None,
    short: str = "skip",
    out=None,
    model_id: str = "model",
    chunk: int = 1024,
    apply_method=None,
    progress: bool = True,
) -> list[dict]:
    """Run (or resume) a perplexity sweep; return the latest record of every job in it.

    documents: a source text for `data.select_documents` ('stdlib', a file, a folder,
      'hf:NAME'), or a list of `TokenizedDocument`. methods: specs ('ntk:scale=2') or
      Method objects. lengths: ints (context lengths N). window: tokens per document W
      (default max(lengths); give more for `sliding`). out: a run directory (results go to
      `out/results.jsonl`, appended, resumable) or None (memory only). apply_method:
      `(model, method) -> context manager`, default `ropelab.patches.patched`.
    """
    lengths = sorted({int(n) for n in lengths})
    if not lengths:
        raise ValueError("lengths=[]: give at least one length")
    if not isinstance(protocol, Protocol):
        data = documents if isinstance(documents, str) else "given"
        protocol = Protocol(protocol, window=window or lengths[-1], targets=targets, stride=stride, data=data, short=short)
    protocol.check_lengths(lengths)
    apply_method = apply_method or default_apply_method
    store = ResultStore(f"{out}/results.jsonl" if out is not None else None)
    store.set_protocol(
        {"kind": "perplexity", "model": model_id, "train_length": _train_length(model), **asdict(protocol), "description": _DESCRIPTIONS[protocol.name],
         "loss": "next-token cross-entropy, nats, token-weighted means", "environment": environment()}
    )
    if isinstance(documents, str):
        documents = select_documents(documents, tokenizer, protocol.window, num_documents, protocol.short)
    for doc in documents:
        if len(doc.ids) < protocol.window:
            raise ValueError(f"document={doc.id!r}: {len(doc.ids)} tokens < window W={protocol.window}")
    check_head(model)

    plan = []  # (spec, method or exception, [(document, length, key)])
    for entry in methods:
        try:
            method, error = ropelab.parse_method(entry), None
            spec = method.spec()
        except (ValueError, TypeError) as exc:
            method, error, spec = None, exc, str(entry)
        jobs = [
            (doc, n, job_key(model_id, spec, protocol.params(), doc.id, n))
            for doc in documents
            for n in _jobs(method, protocol, lengths)
        ]
        plan.append((spec, method, error, jobs))

    done = store.done()
    pending = sum(1 for *_, jobs in plan for *_, key in jobs if key not in done)
    bar = tqdm(total=pending, desc="perplexity", unit="job", disable=not progress)
    for spec, method, error, jobs in plan:
        jobs = [j for j in jobs if j[2] not in done]
        if not jobs:
            continue
        base = {"type": "perplexity", "model": model_id, "method": spec, **protocol.params()}

        def record_failure(exc: BaseException) -> None:
            for doc, n, key in jobs:
                store.append({**base, "key": key, "document": doc.id, "length": n, "status": "error",
                              "error": f"{type(exc).__name__}: {exc}"})
                bar.update()

        if error is not None:  # the spec did not parse or validate
            record_failure(error)
            continue
        try:
            context = apply_method(model, method)
            context.__enter__()
        except Exception as exc:  # the patch refused this model or method: record, go on
            record_failure(exc)
            continue
        try:
            for doc, n, key in jobs:
                bar.set_postfix_str(f"{spec} N={n}")
                served = [m for m in lengths if m <= n] if protocol.name == "position" and not method.length_dependent else [n]
                record = {**base, "key": key, "document": doc.id, "length": n, "lengths": served,
                          "prefix_consistent": not method.length_dependent}
                try:
                    ids = doc.ids[: protocol.window]
                    record.update(status="ok", **_run_job(model, protocol, ids, n, chunk))
                except Exception as exc:  # OOM, kernel limits: recorded, the sweep goes on
                    record.update(status="error", error=f"{type(exc).__name__}: {exc}",
                                  traceback=traceback.format_exc(limit=4))
                store.append(record)
                bar.update()
        finally:
            context.__exit__(None, None, None)
    bar.close()
    wanted = {key for *_, jobs in plan for *_, key in jobs}
    return [r for r in store.latest() if r.get("key") in wanted]
