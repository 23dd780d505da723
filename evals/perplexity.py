"""Perplexity versus length: a resumable sweep over methods × documents × lengths.

The protocols (how a job's forward lengths and score are made) are registered objects in
`protocols.py`; the jobs run on the one runner (`runner.py`) into the result store
(`results.py`). Every record keeps all per-position losses of its forward(s), so any curve
can be redrawn from the file, with its score, seconds, tokens per second and peak memory.
A failing job (bad method spec, a patch that refuses the model, out of memory, a score over
no token or a non-finite loss) is recorded with its error and the sweep goes on.
Design notes: docs/design.md, "Perplexity versus length".
"""

from __future__ import annotations

from dataclasses import asdict

from .data import TokenizedDocument, check_source, select_documents
from .identity import display_name, identity_key, model_identity
from .losses import check_head
from .models import default_apply_method, environment, train_length
from .protocols import Protocol, names
from .results import ResultStore, check_out
from .checks import as_list, check_int, check_lengths
from .runner import Job, canonical_methods, run_jobs

PROTOCOLS = names()


def _train_length(model) -> int | None:
    try:
        return train_length(model)
    except ValueError:
        return None


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
    model_source: dict | None = None,
    shard: str | None = None,
    chunk: int = 1024,
    apply_method=None,
    progress: bool = True,
) -> list[dict]:
    """Run (or resume) a perplexity sweep; return the latest record of every job in it.

    documents: a source text for `data.select_documents` ('stdlib', a file, a folder,
      'hf:NAME'), or a list of `TokenizedDocument`. methods: specs ('ntk:scale=2') or Method
      objects (one spec alone counts as one; duplicates by canonical spec run once).
      lengths: ints (context lengths N). window: tokens per document W (default max(lengths)).
      out: a run directory (results in `out/results.jsonl`, appended, resumable, locked) or
      None (memory only). model_source: where the weights came from (see identity.py; default
      `{"kind": "named", "name": model_id}`). apply_method: `(model, method) -> context
      manager`, default `ropelab.patches.patched`. shard: under torchrun,
      `distributed.default_shard()`: this rank then runs only its share of the jobs, into
      its own shard of `out` (runner.py).
    Everything is checked before anything is written: a rejected call leaves `out` as it was.
    """
    lengths = check_lengths(lengths)
    entries = canonical_methods(methods)
    check_int("chunk", chunk)
    if out is not None:
        check_out(out)
    if not isinstance(protocol, Protocol):
        check_int("num_documents", num_documents)
        data = check_source(documents) if isinstance(documents, str) else "given"
        protocol = Protocol(protocol, window=window or lengths[-1], targets=targets, stride=stride, data=data,
                            short=short)
    protocol.check_lengths(lengths)
    identity = model_identity(model, model_source or model_id)
    if isinstance(documents, str):
        documents = select_documents(documents, tokenizer, protocol.window, num_documents, protocol.short)
    documents = as_list(documents, "documents", (TokenizedDocument,))
    for doc in documents:
        if not isinstance(doc, TokenizedDocument):
            raise ValueError(f"documents: {doc!r} is not a TokenizedDocument")
        if len(doc.ids) < protocol.window:
            raise ValueError(f"document={doc.id!r}: {len(doc.ids)} tokens < window W={protocol.window}")
    check_head(model)
    key, params = identity_key(identity), protocol.params()
    header = {"kind": "perplexity", "model": display_name(identity), "model_identity": identity, "model_key": key,
              "train_length": _train_length(model), **asdict(protocol), "description": protocol.description,
              "loss": "next-token cross-entropy, nats, token-weighted means", "environment": environment()}

    def make_jobs(entry):
        forward = protocol.kind.forward_lengths(protocol, entry.method, lengths) if entry.method else lengths
        jobs = []
        for doc in documents:
            for n in forward:
                extra = {"text_start": doc.start} if doc.start else {}
                if entry.method is not None:
                    extra.update(lengths=protocol.kind.served(protocol, entry.method, n, lengths),
                                 prefix_consistent=not entry.method.length_dependent)
                jobs.append(Job({"document": doc.id, "length": n}, doc.ids[: protocol.window], extra))
        return jobs

    def execute(method, job):
        return protocol.score(model, job.payload, job.fields["length"], chunk)

    with ResultStore(out, "perplexity", shard) as store:
        store.begin(header)
        return run_jobs(model, store, entries, make_jobs, execute, model_key=key, params=params,
                        base={"type": "perplexity", "model": display_name(identity), "params": params},
                        apply_method=apply_method or default_apply_method, desc="perplexity", progress=progress)
