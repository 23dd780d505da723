"""Evaluation corpora: where documents come from and how a requested length is met.

Sources (the `--data` text of eval, tune and the lab, all read by `iter_documents`):
- `stdlib` (default): the Python standard library's own `.py` files, found on every machine
  with Python (docs/design.md, "The embedded default"). Test and data directories
  are left out; order is the sorted relative path, so the selection is deterministic for a
  given Python version (the version is recorded with the protocol, and every document id
  carries a hash of its text).
- a local file or folder, read by `formats.read_documents`: a text file (one document), a
  JSONL file (`FILE.jsonl[.gz][:FIELD]`, one document per line), a Parquet file
  (`FILE.parquet[:COLUMN]`, one per row), or a folder of any of these, each file read by its
  kind;
- `hf:NAME[:CONFIG[:SPLIT]]`: a HuggingFace dataset's `text` column (split `test` unless
  named), when reachable: a hub dataset in the local cache, or a local dataset folder.

Documents shorter than the requested length follow an explicit policy, recorded with
the results: `skip` drops them; `concatenate` joins consecutive documents (separated by a
blank line) until the length is met, so one "document" may span several files.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .formats import Document, check_local, document, named_field, read_documents, split_field

SHORT_POLICIES = ("skip", "concatenate")
START_CHARS = 40  # characters of a document's text kept with its records: which text was scored, at a glance
SOURCE_RULE = ("must be 'stdlib', a text/JSONL/Parquet file (FILE.jsonl:FIELD, FILE.parquet:COLUMN), a folder, "
               "or 'hf:NAME[:CONFIG[:SPLIT]]'")
DATA_HELP = ("'stdlib' (default), a text file, FILE.jsonl[.gz][:FIELD] (default field text), "
             "FILE.parquet[:COLUMN], a folder of these (each file by its kind), or hf:NAME[:CONFIG[:SPLIT]]")
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "data", "lib2to3", "turtledemo"}

__all__ = ["DATA_HELP", "Document", "TokenizedDocument", "check_source", "iter_documents", "select_documents",
           "stdlib_files"]


@dataclass(frozen=True)
class TokenizedDocument:
    id: str
    ids: list[int]  # token ids, exactly `length` of them after select_documents
    start: str = ""  # the first START_CHARS characters of its text (of the first document when joined)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f
        for f in root.rglob("*.py")
        if not _STDLIB_EXCLUDED_DIRS.intersection(f.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def iter_documents(source: str):
    """Yield `Document`s from a source text (see the module docstring), lazily, in a fixed order."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        for f in stdlib_files():
            yield document(f"stdlib/{f.relative_to(root).as_posix()}", f.read_text(encoding="utf-8", errors="replace"))
        return
    if source.startswith("hf:"):
        yield from _hf_documents(source)
        return
    check_source(source)
    yield from read_documents(source)


def check_source(source) -> str:
    """The `--data` text to record: 'stdlib' and 'hf:...' as given, a file or folder as its
    resolved path (with its `:FIELD` when one is named).

    ValueError (naming `data`) when it is none of these; reads nothing but the path's kind
    (and, for Parquet, whether pyarrow is installed).
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"data={source!r}: {SOURCE_RULE}")
    if source == "stdlib":
        return source
    if source.startswith("hf:"):
        if not source[3:].split(":")[0]:
            raise ValueError(f"data={source!r}: no dataset name after 'hf:'; {SOURCE_RULE}")
        return source
    path, field = split_field(source)
    if not (path.is_file() or path.is_dir()):
        raise ValueError(f"data={source!r}: no such file or folder; {SOURCE_RULE}")
    check_local(source)  # Parquet without pyarrow
    return str(path.resolve()) + (f":{field}" if named_field(source) is not None else "")


def _hf_documents(source: str):
    parts = source[3:].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None) or None, parts[2] if len(parts) > 2 else "test"
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data={source!r}: HuggingFace datasets need `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, bad split: all the same to the user
        raise ValueError(
            f"data={source!r}: could not load the dataset ({type(exc).__name__}: {str(exc)[:200]}); "
            "offline machines can use 'stdlib', a text file or a folder"
        ) from None
    if "text" not in ds.column_names:
        raise ValueError(f"data={source!r}: no 'text' column (columns: {', '.join(ds.column_names)})")
    for index, row in enumerate(ds):
        if isinstance(row["text"], str) and row["text"].strip():
            yield document(f"{name}/{split}/{index}", row["text"])


def select_documents(source: str, tokenizer, length: int, count: int, short: str = "skip") -> list[TokenizedDocument]:
    """The first `count` documents of `source` with at least `length` tokens, cut to `length`.

    `short` is the policy for shorter documents: `skip` or `concatenate` (module docstring).
    Raises ValueError when the source cannot supply `count` documents.
    """
    if short not in SHORT_POLICIES:
        raise ValueError(f"short={short!r}: must be one of {', '.join(SHORT_POLICIES)}")
    if length < 2 or count < 1:
        raise ValueError(f"length={length}, count={count}: need length >= 2 and count >= 1")
    chosen: list[TokenizedDocument] = []
    pending_ids: list[int] = []
    pending_names: list[str] = []
    pending_start = ""
    for doc in iter_documents(source):
        if short == "skip" and len(doc.text) < length:
            continue  # a token is at least one character: surely too short, skip tokenizing
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if short == "skip":
            if len(ids) >= length:
                chosen.append(TokenizedDocument(doc.id, ids[:length], doc.text[:START_CHARS]))
        else:
            sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"] if pending_ids else []
            pending_ids += sep + ids
            pending_names.append(doc.id)
            pending_start = pending_start if len(pending_names) > 1 else doc.text[:START_CHARS]
            if len(pending_ids) >= length:
                name = pending_names[0] if len(pending_names) == 1 else f"{pending_names[0]}+{len(pending_names) - 1}"
                chosen.append(TokenizedDocument(name, pending_ids[:length], pending_start))
                pending_ids, pending_names = [], []
        if len(chosen) == count:
            return chosen
    raise ValueError(
        f"data={source!r}: only {len(chosen)} of {count} documents reach {length} tokens under "
        f"short={short!r}; use fewer documents, shorter lengths, or short='concatenate'"
    )
