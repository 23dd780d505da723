"""Running RULER-style samples (evals/ruler.py) on a patched model, and what to make of them.

- `ruler`: every method × task × length × depth × sample as jobs of the one runner
  (evals/runner.py) into `ruler.jsonl` of the run directory (evals/results.py): resumable,
  locked, keyed by (model identity, canonical method, parameters, job). The parameters are
  `protocol: ruler`, the seed and the chat template actually used (`on`/`off`, `auto`
  resolved), so one run directory holds runs of several tasks, seeds and templates and
  their rows never mix; the job fields are task, length, depth and sample index;
- `answer`: greedy generation for one sample, tokenized as the sample says;
- `task_table` / `depth_table`: per task and row (summary.labels), the mean score by length
  with a 95% interval (evals/uncertainty.py; none, and said so, where partial scores are too
  few for a bootstrap: any records make a report), and by length and depth for the heatmap;
- `effective_length`: RULER's effective length (Hsieh et al. 2024, "RULER: What's the Real
  Context Size of Your Long-Context Language Models?"): the longest length whose score, and
  every shorter length's, stays at or above a threshold. RULER's threshold is 85.6, the
  score of Llama-2-7B at 4k (`RULER_THRESHOLD`); for small models far below it,
  `relative_threshold` gives a model-relative one: a fraction of the model's own score at
  its shortest tested length;
- `add_parser`: the `ropelab ruler` command (listed in evals/cli.py's SUBCOMMANDS).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from .checks import check_depths, check_int, check_lengths, split_list, split_methods
from .identity import display_name, identity_key, model_identity
from .loading import add_loading_arguments
from .models import default_apply_method, environment
from .results import ResultStore, check_out
from .ruler import CHAT_TEMPLATES, CPU_TASKS, TASKS, Sample, get_task, make_samples, min_words, score, uses_template
from .runner import Job, canonical_methods, run_jobs
from .summary import group_of, labels
from .uncertainty import MIN_BLOCKS, Interval, accuracy_interval

RULER_THRESHOLD = 85.6  # percent: Llama-2-7B's 4k score in the RULER paper
RELATIVE_FRACTION = 0.85  # model-relative threshold: this fraction of the model's own shortest-length score
SCORING = "RULER string match (all: fraction of expected strings in the prediction, case-insensitive)"


def ruler(model, tokenizer, tasks, methods, lengths, depths=(0.5,), samples: int = 1, *, seed: int = 0,
          chat_template: str = "off", out=None, model_id: str = "model", model_source: dict | None = None,
          shard: str | None = None, apply_method=None, progress: bool = True) -> list[dict]:
    """Run (or resume) RULER-style samples for every method; return the latest record of each job.

    tasks: names in `ruler.TASKS` (one name counts as one). Every prompt is built, and so every
    length checked against every task, before anything is written.
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError(f"tasks=[]: give at least one of {', '.join(TASKS)}")
    for t in tasks:
        get_task(t)
    lengths, depths = check_lengths(lengths), check_depths(depths)
    check_int("samples", samples)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: must be an integer")
    templated = uses_template(tokenizer, chat_template)
    entries = canonical_methods(methods)
    if out is not None:
        check_out(out)
    built = make_samples(tokenizer, tasks, lengths, depths, samples, seed, chat_template)
    identity = model_identity(model, model_source or model_id)
    key = identity_key(identity)
    params = {"protocol": "ruler", "seed": seed, "chat_template": "on" if templated else "off"}
    header = {"kind": "ruler", "model": display_name(identity), "model_identity": identity, "model_key": key,
              "decoding": "greedy", "scoring": SCORING, "environment": environment()}

    def make_jobs(entry):
        return [Job({"task": s.task, "length": s.length, "depth": s.depth, "index": s.index}, s,
                    {"prompt_tokens": s.tokens, "answers": s.answers, "metric": s.metric}) for s in built]

    def execute(method, job):
        start = time.perf_counter()
        prediction = answer(model, tokenizer, job.payload)
        return {"prediction": prediction, "score": score(prediction, job.payload.answers, job.payload.metric),
                "seconds": time.perf_counter() - start}

    with ResultStore(out, "ruler", shard) as store:
        store.begin(header)
        return run_jobs(model, store, entries, make_jobs, execute, model_key=key, params=params,
                        base={"type": "ruler", "model": display_name(identity), "params": params},
                        apply_method=apply_method or default_apply_method, desc="ruler", progress=progress)


@torch.inference_mode()
def answer(model, tokenizer, sample: Sample) -> str:
    enc = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=sample.add_special_tokens)
    ids = enc["input_ids"].to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _scores(records: list[dict], cell) -> dict[str, dict[str, dict]]:
    """{task: {row label: {cell(record): [scores]}}} over successful records."""
    names = labels(records)
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            row = out.setdefault(r["task"], {}).setdefault(names[group_of(r)], {})
            row.setdefault(cell(r), []).append(r["score"])
    return out


@dataclass(frozen=True)
class TaskScore:
    """A cell of the task table: the mean score over its samples and, when one can be made,
    its 95% interval (`uncertainty.accuracy_interval`: Wilson for 0/1 scores; a bootstrap for
    partial scores, which needs `MIN_BLOCKS` samples, so fewer give none and `why_none` says so)."""

    mean: float
    samples: int
    interval: Interval | None

    @property
    def why_none(self) -> str:
        return "" if self.interval else (f"{self.samples} samples with partial scores: a bootstrap interval "
                                         f"needs at least {MIN_BLOCKS}")

    def __str__(self) -> str:
        return str(self.interval) if self.interval else f"{self.mean:.4f} (no interval: {self.why_none})"


def task_score(scores: list[float]) -> TaskScore:
    try:
        interval = accuracy_interval(scores)
    except ValueError:  # partial scores from too few samples for a bootstrap: the mean alone, said so
        interval = None
    return TaskScore(sum(scores) / len(scores), len(scores), interval)


def task_table(records: list[dict]) -> dict[str, dict[str, dict[int, TaskScore]]]:
    """{task: {row label: {length: mean score with its 95% interval over samples (all depths), when
    one can be made}}}: any ok records make a table."""
    return {t: {m: {n: task_score(v) for n, v in sorted(rows.items())} for m, rows in ms.items()}
            for t, ms in _scores(records, lambda r: r["length"]).items()}


def depth_table(records: list[dict]) -> dict[str, dict[str, dict[tuple[int, float | None], float]]]:
    """{task: {row label: {(length, depth): mean score}}}: the cells of a task's heatmap."""
    return {t: {m: {c: sum(v) / len(v) for c, v in cells.items()} for m, cells in ms.items()}
            for t, ms in _scores(records, lambda r: (r["length"], r["depth"])).items()}


def effective_length(scores: dict[int, float], threshold: float) -> int | None:
    """The longest length whose score, and every shorter tested length's, is >= threshold; None if the shortest fails."""
    best = None
    for n in sorted(scores):
        if scores[n] < threshold:
            break
        best = n
    return best


def relative_threshold(scores: dict[int, float], fraction: float = RELATIVE_FRACTION) -> float:
    """`fraction` of the score at the shortest tested length (the model-relative threshold)."""
    if not scores:
        raise ValueError("scores={}: need at least one length's score")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: must be in (0, 1]")
    return fraction * scores[min(scores)]


# --- the `ropelab ruler` command ------------------------------------------------------------------


def add_parser(subparsers):
    """Add `ruler` to an argparse subparsers object; the handler is `run_command`."""
    p = subparsers.add_parser("ruler", help="RULER-style retrieval and tracking tasks, generated locally",
                              description="RULER-style tasks (Hsieh et al. 2024) at the given lengths and depths.")
    p.set_defaults(func=run_command)
    p.add_argument("--model", default="default", help="'default' (smollm2-135m), 'gemma3-270m', or a local folder")
    p.add_argument("--methods", action="append", help="comma-separated method specs (repeatable; default rope)")
    p.add_argument("--tasks", default=",".join(CPU_TASKS),
                   help=f"comma-separated tasks: {', '.join(TASKS)}")
    p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens, e.g. 1k,2k,4k")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=5, help="samples per task x length x depth")
    p.add_argument("--seed", type=int, default=0)
    # Plain text by default, as lm-evaluation-harness does without --apply_chat_template: on
    # the default (base) model the template cost passkey 26/36 -> 11/36 at 1k-8k (README).
    p.add_argument("--chat-template", default="off", choices=CHAT_TEMPLATES,
                   help="off (default): plain text; auto: the tokenizer's chat template when it has one; on: require it")
    p.add_argument("--out", required=True, help="run directory (ruler.jsonl, resumable; one writer at a time)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_loading_arguments(p)
    return p


def _split(text: str, flag: str, parse, example: str) -> list:
    items = split_list(text, flag, example)  # empty items refused
    try:
        return [parse(t) for t in items]
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r}: {exc}") from None


def check_command(args) -> dict:
    """The run's inputs from the command line, or ValueError naming the flag, the value and the rule.

    Needs no model: task names, lengths (against each task's smallest prompt, `ruler.min_words`),
    depths in [0, 1], samples, methods, the model name, the dtype and `--out`.
    """
    import ropelab
    from ropelab.spec import parse_int_with_suffix

    from .loading import checked_model_options
    from .results import check_can_write

    tasks = _split(args.tasks, "--tasks", str, "niah-single,passkey")
    for t in tasks:
        try:
            get_task(t)
        except ValueError as exc:
            raise ValueError(f"--tasks: {exc}") from None
    lengths = _split(args.lengths, "--lengths", parse_int_with_suffix, "1k,2k,4k")
    depths = _split(args.depths, "--depths", float, "0.1,0.5,0.9")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"--depths {args.depths!r}: depth={d:g} must be between 0 and 1 "
                             "(fraction of the context before the needle)")
    for t in tasks:
        for n in lengths:
            if n < (need := min_words(t, depths[0], args.seed)):
                raise ValueError(f"--lengths {args.lengths!r}: length={n} is too short for task {t!r}: its needles "
                                 f"and question alone have {need} words (at least {need} tokens)")
    if args.samples < 1:
        raise ValueError(f"--samples {args.samples}: must be an integer >= 1")
    specs = [m for text in (args.methods or ["rope"]) for m in split_methods(text)]
    methods = []
    for spec in specs:
        try:
            methods.append(ropelab.parse_method(spec).spec())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--methods {spec!r}: {exc}") from None
    loading = checked_model_options(args)
    try:
        check_can_write(args.out, "ruler")
    except ValueError as exc:
        raise ValueError(f"--out: {exc}") from None
    return {"tasks": tasks, "lengths": lengths, "depths": depths, "methods": list(dict.fromkeys(methods)),
            "loading": loading}


def run_command(args) -> int:
    """Validate everything, then load the model, then run; records go to OUT/ruler.jsonl."""
    from .models import load_model

    given = check_command(args)
    model, tokenizer, source = load_model(args.model, **given["loading"])
    records = ruler(model, tokenizer, given["tasks"], given["methods"], given["lengths"], given["depths"],
                    args.samples, seed=args.seed, chat_template=args.chat_template, out=args.out, model_source=source,
                    progress=not args.quiet)
    for task, rows in task_table(records).items():
        print(f"\n{task} (mean score, 95% interval)")
        for method, cells in rows.items():
            print(f"  {method}: " + "  ".join(f"{n}: {iv}" for n, iv in cells.items()))
    print(f"results: {args.out}/ruler.jsonl; figures and report.md: ropelab plot {args.out}", file=sys.stderr)
    failed = [r for r in records if r.get("status") == "error"]
    if failed:
        print(f"{len(failed)} samples failed; first: {failed[0]['error'][:200]}", file=sys.stderr)
        return 1
    return 0
