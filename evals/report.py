"""A markdown report per run directory, from its result files alone: the table of methods ×
lengths, per-position bucket means, passkey accuracy, failures, the protocol and the
environment."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import summary
from .passkey import accuracy


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def loss_table(protocol: dict, records: list[dict]) -> list[str]:
    """The methods × lengths table (markdown lines): the headline of a run."""
    rows = summary.table(protocol, records)
    lengths = summary.lengths_in(records)
    body = [[f"`{m}`"] + [f"{row[n]:.3f} ({math.exp(row[n]):.1f})" if n in row else "–" for n in lengths]
            for m, row in rows.items()]
    return _table(["method"] + [_k(n) for n in lengths], body)


def print_loss_table(run_dir) -> None:
    """Print the loss table of `run_dir` (nothing if it has no perplexity results)."""
    protocol, records = summary.load(Path(run_dir))
    if protocol is not None and records:
        print(f"Loss versus context, {protocol['name']} protocol (nats; perplexity in brackets), "
              f"training length {protocol.get('train_length')}:")
        print("\n".join(loss_table(protocol, records)))


def _perplexity_section(protocol: dict, records: list[dict]) -> list[str]:
    lines = [f"## Loss versus context ({protocol['name']} protocol)", "",
             f"Mean next-token loss in nats (perplexity in brackets), token-weighted over "
             f"{len({r['document'] for r in records})} document(s). Training length: {protocol.get('train_length')}.", ""]
    lines += loss_table(protocol, records) + [""]
    curves = summary.position_curves(records)
    if curves:
        size = 2 ** int(math.log2(max(1.0, max(len(c) for c in curves.values()) / 6)))  # 2k buckets at 16k
        buckets = {m: summary.bucket_means(c, size) for m, c in curves.items()}
        heads = [f"{_k(a - 1)}–{_k(b)}" for a, b, _ in max(buckets.values(), key=len)]
        lines += ["### Per-position loss, bucket means (each method's longest forward)", ""]
        lines += _table(["method"] + heads, [[f"`{m}`"] + [f"{v:.3f}" for *_, v in b] for m, b in buckets.items()])
        lines += [""]
    timing = [r for r in records if r.get("status") == "ok"]
    if timing:
        lines += ["### Cost", ""]
        lines += _table(["method", "N", "seconds", "tokens/s", "peak RSS MB"],
                        [[f"`{r['method']}`", _k(r["length"]), f"{r['seconds']:.1f}", f"{r['tokens_per_second']:.0f}",
                          f"{r['peak_rss_mb']:.0f}"] for r in timing])
        lines += ["", "Peak RSS is the process high-water mark so far (it never decreases).", ""]
    return lines


def _passkey_section(protocol: dict, records: list[dict]) -> list[str]:
    acc = accuracy(records)
    if not acc:
        return []
    cells = sorted({c for v in acc.values() for c in v})
    lines = ["## Passkey retrieval", "", f"Greedy; {protocol['scoring']}; seed {protocol['seed']}.", ""]
    lines += _table(["method"] + [f"{_k(n)} @ {d:g}" for n, d in cells],
                    [[f"`{m}`"] + [f"{v[c]:.2f}" if c in v else "–" for c in cells] for m, v in acc.items()])
    return lines + [""]


def _failures(records: list[dict]) -> list[str]:
    failed = summary.failures(records)
    if not failed:
        return []
    lines = ["## Failed jobs", ""]
    lines += [f"- `{r['method']}` N={r['length']} {r.get('document', '')}: {r['error'][:300]}" for r in failed]
    return lines + [""]


def write_report(run_dir) -> Path | None:
    """Write `report.md` into `run_dir`; None when the directory has no result files."""
    run_dir = Path(run_dir)
    ppl_protocol, ppl = summary.load(run_dir)
    pk_protocol, pk = summary.load(run_dir, "passkey.jsonl")
    if ppl_protocol is None and pk_protocol is None:
        return None
    lines = [f"# ropelab run: {run_dir.name}", ""]
    if ppl_protocol:
        lines += _perplexity_section(ppl_protocol, ppl)
    if pk_protocol:
        lines += _passkey_section(pk_protocol, pk)
    lines += _failures(ppl + pk)
    skipped = summary.skipped_lines(run_dir)
    if skipped:
        lines += ["## Lines skipped (not records)", ""] + [f"- {s}" for s in skipped] + [""]
    figures = sorted(p.name for p in run_dir.glob("*.png"))
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    for title, protocol in (("perplexity", ppl_protocol), ("passkey", pk_protocol)):
        if protocol:
            env = protocol.get("environment", {})
            shown = {k: v for k, v in protocol.items() if k not in ("environment", "type")}
            lines += [f"## Protocol ({title})", "", "```json", json.dumps(shown, indent=2), "```", "",
                      "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
