"""The result store: append-only, locked, schema-versioned JSONL files in a run directory.

Layout (docs/design.md, "Results"): a run directory holds one file per eval kind
(`results.jsonl` for perplexity, `passkey.jsonl`, `lm_eval.jsonl`, `ruler.jsonl`, `tune.jsonl`), and, for the ranks of a
sharded run, `KIND.shard-NAME.jsonl` beside it. Every file begins with a header line
(`"type": "protocol"`, `"schema": SCHEMA`): exactly how every number in the file was made,
including the model's identity. Each later line is one job's record, keyed by `key` =
(model identity, canonical method spec, parameters, job fields). A record is flushed and
fsynced on its own, so `kill -9` loses at most the line being written.

Locks (fcntl advisory, so they vanish with the process that held them): a writer takes a
*shared* lock on `RUN/.ropelab.lock` (the ranks of one sharded run share it; an operation on
the whole run would take it exclusively) and an *exclusive* lock on its own file's
`.KIND[.shard-NAME].jsonl.lock`. A shard writer also takes a *shared* lock on the kind's main
lock `.KIND.jsonl.lock`, which an unsharded writer holds exclusively: the ranks of a sharded
run write together, but never beside an unsharded run of the same kind (which would run the
same jobs). A second independent writer of the same file is refused at once with a
`RunLocked` error naming the run directory; it does not wait.

Shards: what is done, and what a reader sees, is merged over the main file and every shard
(`read_run`, `ResultStore.done`, `ResultStore.merged`), so a run resumed with another number
of ranks, or with none, neither repeats nor loses a job. Per key the last successful record
wins over failures, whichever file holds it (a job is run again only while it has no success).

Readers (`read_run`) never modify a file: they parse up to the last newline and leave a torn
tail alone. Only the writer holding the file's lock cuts a torn tail, when it opens the file.
A complete line that is not a record (`[1,2,3]`, `{"hello": 1}`) is skipped and reported with
its line number. A file from another schema is read when it is older (schema 1: the files of
ropelab before the runner) but never written to: resuming into it is refused with a message.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = 2
KINDS = {"perplexity": "results", "passkey": "passkey", "lm-eval": "lm_eval", "ruler": "ruler", "tune": "tune",
         "lab": "lab_results"}
RUN_LOCK = ".ropelab.lock"


class RunLocked(ValueError):
    """Another writer holds this result file's lock (the CLI reports it with exit code 2)."""


def job_key(model: str, method: str, params: dict, fields: dict) -> str:
    """The identity of a job, as text: model identity key, canonical method, parameters, job fields."""
    return json.dumps([model, method, params, fields], sort_keys=True, separators=(",", ":"))


def file_name(kind: str, shard: str | None = None) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(KINDS)}")
    if shard is not None and not (shard and shard.replace("-", "").replace("_", "").isalnum()):
        raise ValueError(f"shard={shard!r}: use letters, digits, '-' and '_'")
    return KINDS[kind] + (f".shard-{shard}" if shard is not None else "") + ".jsonl"


def check_out(out) -> Path:
    """`out` as a Path, or ValueError naming `out` when it cannot be a run directory (nothing created)."""
    path = Path(out)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"out={str(out)!r}: exists and is not a directory; give a run directory")
        if not os.access(path, os.W_OK | os.X_OK) or os.statvfs(path).f_flag & os.ST_RDONLY:
            raise ValueError(f"out={str(out)!r}: the directory is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    writable = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    if not writable or os.statvfs(parent).f_flag & os.ST_RDONLY:  # root passes os.access even on read-only mounts
        raise ValueError(f"out={str(out)!r}: cannot create it ({str(parent)!r} is not a writable directory)")
    return path


def _locks(kind: str, shard: str | None) -> list[tuple[str, int]]:
    """(lock file name, flock mode) a writer of `kind` (and `shard`) takes, in order (module docstring)."""
    main = f".{file_name(kind)}.lock"
    if shard is None:
        return [(RUN_LOCK, fcntl.LOCK_SH), (main, fcntl.LOCK_EX)]
    return [(RUN_LOCK, fcntl.LOCK_SH), (main, fcntl.LOCK_SH), (f".{file_name(kind, shard)}.lock", fcntl.LOCK_EX)]


def check_can_write(out, kind: str, shard: str | None = None) -> None:
    """Refuse early (before a model loads) what opening a writer would refuse: an unusable `out`,
    a file another process is writing, a file of another schema. Creates and changes nothing."""
    run = check_out(out)
    name = file_name(kind, shard)
    for lock_name, mode in _locks(kind, shard):
        lock = run / lock_name
        if not lock.exists():
            continue
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)  # released by the close below
        except BlockingIOError:
            raise RunLocked(
                f"out={str(out)!r}: another ropelab process is writing this run ({lock.name} is locked); "
                "wait for it to finish or use another --out"
            ) from None
        finally:
            os.close(fd)
    if (run / name).exists() and schema_of(read_file(run / name).header) != SCHEMA:
        raise ValueError(
            f"out={str(out)!r}: {name} was written with result schema {schema_of(read_file(run / name).header)} "
            f"and this ropelab writes schema {SCHEMA}; it is not resumed or run again. Its results stay "
            "readable (`ropelab plot`); use a new --out"
        )


@dataclass
class FileContents:
    """What one result file holds, as read (nothing repaired)."""

    path: Path
    header: dict | None = None
    records: list[dict] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)
    torn_tail: int = 0  # bytes after the last newline (a write cut short)


def _upgrade(record: dict) -> dict:
    """Schema 1 records kept their protocol parameters at the top level: gather them in `params`."""
    if "params" not in record:
        names = ("protocol", "window", "targets", "stride", "seed")
        record = {**record, "params": {k: record[k] for k in names if k in record}}
    return record


def read_file(path) -> FileContents:
    """Parse a result file without modifying it."""
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a write still under way or torn
    contents = FileContents(path, torn_tail=len(data) - end)
    for number, line in enumerate(data[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            contents.skipped.append((number, "not JSON"))
            continue
        if not isinstance(item, dict):
            contents.skipped.append((number, f"a JSON {type(item).__name__}, not a record"))
        elif item.get("type") == "protocol":
            if contents.header is not None:
                contents.skipped.append((number, "a second header"))
            else:
                contents.header = item
        elif isinstance(item.get("key"), str) and isinstance(item.get("method"), str) and "status" in item:
            contents.records.append(_upgrade(item) if schema_of(contents.header) < SCHEMA else item)
        else:
            contents.skipped.append((number, "a JSON object without key, method and status"))
    return contents


def schema_of(header: dict | None) -> int:
    return SCHEMA if header is None else int(header.get("schema", 1))


def latest(records: list[dict]) -> list[dict]:
    """The last successful record per key, else its last record, in first-seen order (a failed
    job retried later: the retry wins; across shard files, whose order says nothing, a success
    wins over a failure)."""
    last: dict[str, dict] = {}
    for r in records:
        if r.get("status") == "ok" or last.get(r["key"], {}).get("status") != "ok":
            last[r["key"]] = r
    return list(last.values())


@dataclass
class RunContents:
    """One eval kind of a run directory, merged over its shard files."""

    header: dict | None
    records: list[dict]  # the latest record per key
    skipped: list[tuple[str, int, str]]  # (file name, line number, why)


def run_files(run_dir, kind: str) -> list[Path]:
    """The result files of `kind` in `run_dir`: the main file, then the shards by name."""
    run_dir, base = Path(run_dir), KINDS[kind]
    return sorted(run_dir.glob(f"{base}.jsonl")) + sorted(run_dir.glob(f"{base}.shard-*.jsonl"))


def read_run(run_dir, kind: str = "perplexity") -> RunContents:
    """Read every file of `kind` in `run_dir` (main file and shards); never modifies anything."""
    paths = run_files(run_dir, kind)
    header, records, skipped = None, [], []
    for path in paths:
        contents = read_file(path)
        header = header or contents.header
        records += contents.records
        skipped += [(path.name, n, why) for n, why in contents.skipped]
    return RunContents(header, latest(records), skipped)


def _comparable(header: dict) -> dict:
    return {k: v for k, v in header.items() if k not in ("environment", "type", "schema")}


def _lock(path: Path, mode: int, out) -> tuple[int, bool]:
    """(fd, created) holding `mode` on `path`; RunLocked when another process holds a conflicting lock."""
    while True:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(
                f"out={str(out)!r}: another ropelab process is writing this run ({path.name} is locked); "
                "wait for it to finish or use another --out"
            ) from None
        try:  # the file we locked must still be the one at `path` (not unlinked by a cleanup)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)


class ResultStore:
    """The writer of one result file. Use as a context manager; `out=None` keeps records in memory.

        with ResultStore(out, "perplexity") as store:
            store.begin(header)          # writes the header, or checks it against the file's
            store.done(); store.append(record)

    Opening takes the locks (RunLocked if another writer holds them) and cuts a torn tail.
    If the run is rejected before anything is written (`discard()`, or leaving the `with`
    block by an exception before `begin`), the lock files and directories this store
    created are removed again, so `out` is as it was.
    """

    def __init__(self, out, kind: str = "perplexity", shard: str | None = None):
        self.out = out
        self.kind = kind
        self.shard = shard
        self.name = file_name(kind, shard)
        self.header: dict | None = None
        self.records: list[dict] = []
        self.skipped: list[tuple[int, str]] = []
        self._fds: list[int] = []
        self._created: list[Path] = []
        self._file = None
        self.path = None if out is None else Path(out) / self.name
        if out is not None:
            self._open()

    def _open(self) -> None:
        run = check_out(self.out)
        try:
            missing = []
            parent = run.absolute()
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            try:
                run.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"out={str(self.out)!r}: cannot create the run directory ({exc})") from None
            self._created += missing  # deepest first after the reverse below
            self._created.reverse()
            for lock_name, mode in _locks(self.kind, self.shard):
                fd, created = _lock(run / lock_name, mode, self.out)
                self._fds.append(fd)
                if created:
                    self._created.append(run / lock_name)
            if self.path.exists():
                contents = read_file(self.path)
                if contents.torn_tail:  # only the lock holder may repair the file
                    with open(self.path, "r+b") as f:
                        f.truncate(self.path.stat().st_size - contents.torn_tail)
                        f.flush()
                        os.fsync(f.fileno())
                self.header, self.records, self.skipped = contents.header, contents.records, contents.skipped
                if schema_of(self.header) != SCHEMA:
                    raise ValueError(
                        f"out={str(self.out)!r}: {self.name} was written with result schema {schema_of(self.header)} "
                        f"and this ropelab writes schema {SCHEMA}; it is not resumed or run again. Its results stay "
                        "readable (`ropelab plot`); use a new --out"
                    )
        except BaseException:
            self.discard()
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self._file is None:
            self.discard()
        else:
            self.close()
        return False

    def begin(self, header: dict) -> None:
        """Write the header to a new file, or refuse a header that differs from the file's (or a shard's)."""
        header = {"type": "protocol", "schema": SCHEMA, **header}
        others = []
        if self.out is not None:
            base = KINDS[self.kind]
            for path in sorted(Path(self.out).glob(f"{base}*.jsonl")):
                if path != self.path and (h := read_file(path).header) is not None:
                    others.append(h)
        for existing in [self.header, *others]:
            if existing is None:
                continue
            mine, theirs = _comparable(existing), _comparable(header)
            if mine != theirs:
                changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ValueError(
                    f"out={str(self.out)!r}: this run directory was made with a different "
                    f"{'model or protocol' if 'model_key' in changed else 'protocol'} "
                    f"(differs in: {', '.join(changed)}); use a new --out directory"
                )
        if self.header is None:
            self._write(header)
            self.header = header

    def _others(self) -> list[dict]:
        """The records of the run's other files of this kind (the main file and the shards), read now."""
        if self.out is None:
            return []
        return [r for path in run_files(self.out, self.kind) if path != self.path for r in read_file(path).records]

    def done(self) -> set[str]:
        """Keys with a successful record in any file of this kind in the run (this one and every shard)."""
        return {r["key"] for r in latest(self._others() + self.records) if r.get("status") == "ok"}

    def latest(self) -> list[dict]:
        """The latest record per key of this file alone."""
        return latest(self.records)

    def merged(self) -> list[dict]:
        """The latest record per key over every file of this kind in the run, read now."""
        return latest(self._others() + self.records)

    def append(self, record: dict) -> None:
        if self.header is None:
            raise RuntimeError("ResultStore.append before begin(header)")
        self._write(record)
        self.records.append(record)

    def _write(self, item: dict) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(item, separators=(",", ":"), allow_nan=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def discard(self) -> None:
        """Release the locks and remove what this store created (only while nothing was written)."""
        self.close()
        if self._file is not None:
            return
        for path in reversed(self._created):
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                pass
        self._created = []
