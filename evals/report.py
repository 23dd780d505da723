"""A markdown report per run directory, from its result files alone: the table of methods ×
lengths with 95% intervals and the paired tie marks (evals/evidence.py), per-position bucket
means, passkey accuracy, RULER-style scores by task, length and depth, a section tying loss
and retrieval by context length with each method's effective length, failures, the protocol
and the environment."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import summary
from .evidence import dense_rows, effective_lengths, loss_comparisons, ruler_by_length, ruler_intervals
from .passkey import accuracy
from .ruler_run import RELATIVE_FRACTION, RULER_THRESHOLD, task_table
from .uncertainty import Interval, accuracy_interval


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _cell(cell) -> str:
    text = f"{cell.mean:.3f}" + (f" [{cell.interval.low:.3f}, {cell.interval.high:.3f}]" if cell.interval else "")
    return f"**{text}**" if cell.tied else text


def loss_table(protocol: dict, records: list[dict]) -> list[str]:
    """The methods × lengths table (markdown lines): the headline of a run.

    Each loss has its 95% interval; bold marks the best method at a length and every method
    the paired bootstrap cannot tell from it (evals/evidence.py). A row's loss is the
    token-weighted mean of `summary.table`; rows without kept losses show that mean alone.
    """
    rows = summary.table(protocol, records)
    cells = loss_comparisons(records)
    lengths = summary.lengths_in(records)
    body = []
    for m, row in rows.items():
        mine = cells.get(m, {})
        body.append([f"`{m}`"] + [_cell(mine[n]) if n in mine else (f"{row[n]:.3f}" if n in row else "–")
                                  for n in lengths])
    return _table(["method"] + [_k(n) for n in lengths], body)


def interval_note(records: list[dict]) -> str:
    """What the table's intervals and marks mean, and what they cover (one document or several)."""
    documents = len({r["document"] for r in records if r.get("status") == "ok"})
    cover = ("They cover token blocks of one window of one document only: they say how much these tokens' "
             "loss could move, not how the methods compare on other text." if documents == 1 else
             f"They cover {documents} documents and blocks of tokens inside each.")
    return ("Loss in nats with its 95% interval (bootstrap over documents and blocks of contiguous scored tokens, "
            "evals/uncertainty.py). Bold: the best method at that length and every method whose paired difference "
            f"from it (same documents and blocks) has a 95% interval containing 0. {cover}")


def print_loss_table(run_dir) -> None:
    """Print the loss table of `run_dir` (nothing if it has no perplexity results)."""
    protocol, records = summary.load(Path(run_dir))
    if protocol is not None and records:
        print(f"Loss versus context, {protocol['name']} protocol, training length {protocol.get('train_length')}:")
        print("\n".join(loss_table(protocol, records)))
        print(interval_note(records))


def _perplexity_section(protocol: dict, records: list[dict]) -> list[str]:
    lines = [f"## Loss versus context ({protocol['name']} protocol)", "",
             f"Mean next-token loss, token-weighted over {len({r['document'] for r in records})} document(s). "
             f"Training length: {protocol.get('train_length')}.", ""]
    lines += loss_table(protocol, records) + ["", interval_note(records), ""]
    dense, points = dense_rows(records)
    if dense:
        lines += [f"Figure `loss_vs_context`: markers with 95% bars are the table's {protocol['name']} scores; the "
                  "lines with bands are the loss at each position of each method's longest forward, mean per "
                  "quarter octave of context length, read from the losses that forward already kept (no extra "
                  "forward). Lines for the prefix-consistent methods: " + ", ".join(f"`{m}`" for m in dense) + "."
                  + (" Points only (not prefix-consistent: a position's loss depends on the forward's length): "
                     + ", ".join(f"`{m}`" for m in points) + "." if points else ""), ""]
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
    by_length = passkey_by_length(records)
    lengths = sorted({n for row in by_length.values() for n in row})
    lines += ["", "By length, all depths and trials together: correct / trials, with the Wilson 95% interval.", ""]
    lines += _table(["method"] + [_k(n) for n in lengths],
                    [[f"`{m}`"] + [f"{round(row[n].mean * row[n].blocks)}/{row[n].blocks} [{row[n].low:.2f}, "
                                   f"{row[n].high:.2f}]" if n in row else "–" for n in lengths]
                     for m, row in by_length.items()])
    return lines + [""]


def passkey_by_length(records: list[dict]) -> dict[str, dict[int, Interval]]:
    """{row label: {length: fraction correct with its Wilson interval}} over successful passkey trials."""
    names = summary.labels(records)
    cells: dict[str, dict[int, list[bool]]] = {}
    for r in records:
        if r.get("status") == "ok":
            cells.setdefault(names[summary.group_of(r)], {}).setdefault(r["length"], []).append(bool(r["correct"]))
    return {m: {n: accuracy_interval(v) for n, v in sorted(row.items())} for m, row in cells.items()}


def _ruler_section(records: list[dict]) -> list[str]:
    tables = task_table(records)
    if not tables:
        return []
    lines = ["## RULER-style tasks", "",
             "Mean score per task (RULER's string match) with its 95% interval over samples (Wilson for 0/1 "
             "scores), all depths together; the heatmaps (`ruler_TASK.png`) show length × depth.", ""]
    missing = []
    for task, rows in tables.items():
        lengths = sorted({n for row in rows.values() for n in row})
        lines += [f"### {task}", ""]
        lines += _table(["method"] + [_k(n) for n in lengths],
                        [[f"`{m}`"] + [_score_cell(row[n]) if n in row else "–" for n in lengths]
                         for m, row in rows.items()])
        lines += [""]
        missing += [f"{task} `{m}` {_k(n)}: {cell.why_none}" for m, row in rows.items() for n, cell in row.items()
                    if cell.interval is None]
    if missing:
        lines += ["No interval (the mean alone) where partial scores are too few for a bootstrap: "
                  + "; ".join(missing) + ". Run more samples (`--samples`) for intervals.", ""]
    return lines


def _score_cell(cell) -> str:
    if cell.interval is None:
        return f"{cell.mean:.2f} (no interval)"
    return f"{cell.mean:.2f} [{cell.interval.low:.2f}, {cell.interval.high:.2f}]"


def _evidence_section(ppl: list[dict], ruler: list[dict]) -> list[str]:
    """Loss and retrieval by context length side by side, with each method's effective length."""
    scores = ruler_by_length(ruler)
    if not scores:
        return []
    losses = summary.table(None, ppl) if ppl else {}
    loss_cells = loss_comparisons(ppl) if ppl else {}
    score_cells = ruler_intervals(ruler)
    relative, effective = effective_lengths(scores)
    lengths = sorted({n for row in scores.values() for n in row} | {n for row in losses.values() for n in row})
    lines = ["## Loss and retrieval by context length", "",
             "Per method: the loss table's mean loss (nats) and the RULER-style score (percent; the mean over "
             "tasks of each task's mean over samples and depths) at each length, and the effective length: "
             f"the longest length whose score, and every shorter one's, stays at or above a threshold. RULER's "
             f"threshold is {RULER_THRESHOLD} (Llama-2-7B's 4k score; Hsieh et al. 2024); the model-relative one "
             f"is {RELATIVE_FRACTION:g} × the best method's score at the shortest length"
             + (f" = {relative:.1f}." if relative is not None else " (none: no method scores there).")
             + " Brackets: 95% intervals (the loss table's; for the score, a bootstrap over samples stratified by "
             "task, Wilson for one task of 0/1 scores; none with fewer than 10 samples over several tasks).", ""]
    body = []
    for m in dict.fromkeys([*losses, *scores]):
        cells = []
        for n in lengths:
            loss = f"{losses[m][n]:.3f}" if n in losses.get(m, {}) else "–"
            if (cell := loss_cells.get(m, {}).get(n)) is not None and cell.interval is not None:
                loss += f" [{cell.interval.low:.3f}, {cell.interval.high:.3f}]"
            score = f"{scores[m][n]:.0f}%" if n in scores.get(m, {}) else "–"
            if (iv := score_cells.get(m, {}).get(n)) is not None:
                score += f" [{100 * iv.low:.0f}, {100 * iv.high:.0f}]"
            cells.append(f"{loss} / {score}")
        ruler_len, relative_len = effective.get(m, (None, None))
        show = lambda n: _k(n) if n else "–"  # noqa: E731
        body.append([f"`{m}`", *cells, show(ruler_len), show(relative_len)])
    lines += _table(["method"] + [f"{_k(n)} loss / score" for n in lengths]
                    + [f"effective ({RULER_THRESHOLD})", "effective (relative)"], body)
    return lines + ["", "An effective length of – means the shortest tested length is already below the threshold.", ""]


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
    ruler_protocol, ruler = summary.load(run_dir, "ruler.jsonl")
    if ppl_protocol is None and pk_protocol is None and ruler_protocol is None:
        return None
    lines = [f"# ropelab run: {run_dir.name}", ""]
    if ppl_protocol:
        lines += _perplexity_section(ppl_protocol, ppl)
    if pk_protocol:
        lines += _passkey_section(pk_protocol, pk)
    if ruler_protocol:
        lines += _ruler_section(ruler) + _evidence_section(ppl, ruler)
    lines += _failures(ppl + pk + ruler)
    skipped = summary.skipped_lines(run_dir)
    if skipped:
        lines += ["## Lines skipped (not records)", ""] + [f"- {s}" for s in skipped] + [""]
    figures = sorted(p.name for p in run_dir.glob("*.png"))
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    for title, protocol in (("perplexity", ppl_protocol), ("passkey", pk_protocol), ("ruler", ruler_protocol)):
        if protocol:
            env = protocol.get("environment", {})
            shown = {k: v for k, v in protocol.items() if k not in ("environment", "type")}
            lines += [f"## Protocol ({title})", "", "```json", json.dumps(shown, indent=2), "```", "",
                      "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
