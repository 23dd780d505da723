"""Readers for the local corpus formats `--data` names; `data.iter_documents` reads every local
file or folder through `read_documents` (the one reader of eval, tune and the lab).

- a plain-text file (any name not below): one document;
- a folder of plain-text files (`.txt`, `.md`, `.tex`, …: every UTF-8 file, recursive,
  sorted; binary files skipped), one document per file: PG-19's layout (one book per
  `.txt` file in `train/`, `validation/`, `test/`; Rae et al. 2020, "Compressive
  Transformers for Long-Range Sequence Modelling") and a folder of arXiv `.tex` sources;
- JSONL (`.jsonl`, `.jsonl.gz`): one JSON object per line with a text field (`text` by
  default; `file.jsonl:FIELD` names another), one document per line;
- Parquet (`.parquet`): a text column (`text` or `file.parquet:COLUMN`), one document per
  row; needs pyarrow (`pip install 'ropelab[parquet]'`).

A folder mixing these reads each file by its suffix. A JSONL line that is not JSON, lacks
the field or holds a non-string there is refused (ValueError naming the file, the line
number and, for a missing field, the keys the line has), never read as text. Documents come
out in a fixed order with ids `NAME#HASH` (the first 12 hex digits of the text's SHA-256), so
a changed text never reuses old results. Empty texts are skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Document:
    id: str  # stable name plus a hash of the text: a changed text never reuses old results
    text: str


def document(name: str, text: str) -> Document:
    """A document whose id is `NAME#` and the first 12 hex digits of the text's SHA-256."""
    return Document(f"{name}#{hashlib.sha256(text.encode()).hexdigest()[:12]}", text)


def named_field(source: str) -> str | None:
    """The FIELD of 'file.jsonl:FIELD' (or 'file.parquet:COLUMN'), None when none is named."""
    for suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        head, sep, tail = source.rpartition(suffix + ":")
        if sep and tail:
            return tail
    return None


def split_field(source: str) -> tuple[Path, str]:
    """'file.jsonl:FIELD' -> (file.jsonl, FIELD); no field -> 'text'."""
    field = named_field(source)
    if field is None:
        return Path(source), "text"
    return Path(source[: -len(field) - 1]), field


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def require_pyarrow(source) -> None:
    if importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f"data={str(source)!r}: reading Parquet needs pyarrow: pip install 'ropelab[parquet]'")


def read_jsonl(path: Path, field: str = "text", name: str | None = None):
    """Documents from a JSONL file, one per line with a non-empty `field`."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    name = name or path.name
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in _lines(f, path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"data={str(path)!r}: line {number} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"data={str(path)!r}: line {number} has no {field!r} field (has: {keys}); "
                                 f"name the field as {path.name}:FIELD")
            if not isinstance(row[field], str):
                raise ValueError(f"data={str(path)!r}: line {number}: {field!r} must be a string, "
                                 f"not {type(row[field]).__name__}")
            if row[field].strip():
                yield document(f"{name}/{number}", row[field])


def _lines(f, path: Path):
    """(number, line) of an open text file; bytes that are not UTF-8 (or a broken gzip stream)
    are a ValueError naming the file and the line, not a crash."""
    number = 0
    try:
        for number, line in enumerate(f, 1):
            yield number, line
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise ValueError(f"data={str(path)!r}: line {number + 1} cannot be read ({type(exc).__name__}: {exc})") from None


def read_parquet(path: Path, column: str = "text", name: str | None = None):
    """Documents from a Parquet file's `column`, one per non-empty row; read one row group at a time."""
    require_pyarrow(path)
    import pyarrow.parquet as pq

    name = name or path.name
    reader = pq.ParquetFile(path)
    columns = reader.schema_arrow.names
    if column not in columns:
        raise ValueError(f"data={str(path)!r}: no {column!r} column (columns: {', '.join(columns)}); "
                         f"name the column as {path.name}:COLUMN")
    row = 0
    for group in range(reader.num_row_groups):
        for text in reader.read_row_group(group, columns=[column]).column(0).to_pylist():
            row += 1
            if isinstance(text, str) and text.strip():
                yield document(f"{name}/{row}", text)


def read_folder(path: Path):
    """Every file under `path` (recursive, sorted), each by its suffix; undecodable files skipped."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if any(_kind(f) == "parquet" for f in files):
        require_pyarrow(path)  # refuse before reading anything
    for f in files:
        rel = f.relative_to(path).as_posix()
        kind = _kind(f)
        if kind == "jsonl":
            yield from read_jsonl(f, name=rel)
        elif kind == "parquet":
            yield from read_parquet(f, name=rel)
        else:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # binary files in a folder are not documents
            if text.strip():
                yield document(rel, text)


def check_local(source: str) -> Path:
    """The file or folder `source` names (without a `:FIELD`), checked without reading it: it
    exists, and Parquet can be read (pyarrow installed). ValueError naming `data` otherwise."""
    path, _ = split_field(str(source))
    if not (path.is_file() or path.is_dir()):
        raise ValueError(f"data={str(source)!r}: no such file or folder")
    if path.is_dir():
        if any(_kind(f) == "parquet" for f in path.rglob("*") if f.is_file()):
            require_pyarrow(source)
    elif _kind(path) == "parquet":
        require_pyarrow(source)
    return path


def read_documents(source: str):
    """Documents from a text file, a folder, a JSONL file or a Parquet file (module docstring),
    lazily, in a fixed order; the path is checked (`check_local`) before anything is read."""
    path = check_local(source)
    _, field = split_field(str(source))
    if path.is_dir():
        return read_folder(path)
    kind = _kind(path)
    if kind == "parquet":
        return read_parquet(path, field)
    if kind == "jsonl":
        return read_jsonl(path, field)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"data={str(source)!r}: not a UTF-8 text file (nor .jsonl, .jsonl.gz or .parquet)") from None
    return iter([document(path.name, text)] if text.strip() else [])
