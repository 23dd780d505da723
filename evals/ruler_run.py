"""Running RULER-style samples (evals/ruler.py) on a patched model, and what to make of them.

- `answer`: greedy generation for one sample, tokenized as the sample says;
- `evaluate`: every method × sample, each record handed to `on_record` (the caller stores
  it) and skipped when its key is already done, so a run resumes;
- `task_table`: per task, method and length, the mean score with a 95% interval
  (evals/uncertainty.py);
- `effective_length`: RULER's effective length (Hsieh et al. 2024, "RULER: What's the Real
  Context Size of Your Long-Context Language Models?"): the longest length whose score, and
  every shorter length's, stays at or above a threshold. RULER's threshold is 85.6, the
  score of Llama-2-7B at 4k (`RULER_THRESHOLD`); for small models far below it,
  `relative_threshold` gives a model-relative one: a fraction of the model's own score at
  its shortest tested length;
- `add_parser`: the `ropelab ruler` command (wired into the CLI by evals/cli.py).
"""

from __future__ import annotations

import json
import sys
import time

import torch

import ropelab

from .ruler import CHAT_TEMPLATES, TASKS, Sample, get_task, make_samples, score
from .uncertainty import Interval, accuracy_interval

RULER_THRESHOLD = 85.6  # percent: Llama-2-7B's 4k score in the RULER paper
RELATIVE_FRACTION = 0.85  # model-relative threshold: this fraction of the model's own shortest-length score


def sample_key(model_id: str, method: str, s: Sample) -> str:
    """A record's identity: everything that changes the prompt or its scoring."""
    return json.dumps([model_id, method, s.task, s.length, s.depth, s.index, s.seed, s.chat_template],
                      separators=(",", ":"))


@torch.inference_mode()
def answer(model, tokenizer, sample: Sample) -> str:
    enc = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=sample.add_special_tokens)
    ids = enc["input_ids"].to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def evaluate(model, tokenizer, samples: list[Sample], methods, *, model_id: str = "model", apply_method,
             on_record=None, done=frozenset()) -> list[dict]:
    """Score every sample under every method; returns the new records.

    apply_method: `(model, method) -> context manager` (e.g. `ropelab.patches.patched`).
    on_record: called with each record as soon as it exists. done: keys to skip.
    A method that fails to parse or patch is recorded as an error for each of its samples.
    """
    records = []
    for entry in methods:
        try:
            method, error = ropelab.parse_method(entry), None
            spec = method.spec()
        except (ValueError, TypeError) as exc:
            method, error, spec = None, exc, str(entry)
        todo = [s for s in samples if sample_key(model_id, spec, s) not in done]
        if not todo:
            continue
        context = None
        if error is None:
            try:
                context = apply_method(model, method)
                context.__enter__()
            except Exception as exc:  # the patch refused: recorded, the other methods go on
                error, context = exc, None
        try:
            for s in todo:
                record = {"type": "ruler", "key": sample_key(model_id, spec, s), "model": model_id, "method": spec,
                          "task": s.task, "length": s.length, "depth": s.depth, "index": s.index, "seed": s.seed,
                          "chat_template": s.chat_template, "prompt_tokens": s.tokens, "answers": s.answers,
                          "metric": s.metric}
                if error is not None:
                    record.update(status="error", error=f"{type(error).__name__}: {error}")
                else:
                    start = time.perf_counter()
                    prediction = answer(model, tokenizer, s)
                    record.update(status="ok", prediction=prediction, score=score(prediction, s.answers, s.metric),
                                  seconds=time.perf_counter() - start)
                records.append(record)
                if on_record is not None:
                    on_record(record)
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    return records


def task_table(records: list[dict]) -> dict[str, dict[str, dict[int, Interval]]]:
    """{task: {method: {length: mean score with its 95% interval over samples (all depths)}}}."""
    scores: dict[str, dict[str, dict[int, list[float]]]] = {}
    for r in records:
        if r.get("status") == "ok":
            scores.setdefault(r["task"], {}).setdefault(r["method"], {}).setdefault(r["length"], []).append(r["score"])
    return {t: {m: {n: accuracy_interval(v) for n, v in sorted(rows.items())} for m, rows in ms.items()}
            for t, ms in scores.items()}


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
    p.add_argument("--tasks", default="niah-single,niah-multikey,variable-tracking",
                   help=f"comma-separated tasks: {', '.join(TASKS)}")
    p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens, e.g. 1k,2k,4k")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=5, help="samples per task x length x depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template", default="auto", choices=CHAT_TEMPLATES,
                   help="auto: the tokenizer's chat template when it has one; on: require it; off: plain text")
    p.add_argument("--out", required=True, help="run directory (ruler.jsonl, resumable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p


def run_command(args) -> int:
    """Validate everything, then load the model, then run; records go to OUT/ruler.jsonl."""
    from ropelab.spec import parse_int_with_suffix

    from .models import default_apply_method, load_model
    from .results import ResultStore

    lengths = [parse_int_with_suffix(t) for t in args.lengths.split(",") if t.strip()]
    depths = [float(t) for t in args.depths.split(",") if t.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    methods = [m for text in (args.methods or ["rope"]) for m in text.split(",") if m.strip()]
    for t in tasks:
        get_task(t)  # an unknown name raises with did-you-mean, before the model loads
    for d in depths:
        if not 0 <= d <= 1:
            raise ValueError(f"--depths {args.depths!r}: depth={d} must be between 0 and 1")
    model, tokenizer, model_id = load_model(args.model, args.dtype)
    samples = make_samples(tokenizer, tasks, lengths, depths, args.samples, args.seed, args.chat_template)
    store = ResultStore(f"{args.out}/ruler.jsonl")
    # tasks, seed and template are in every record and its key: one directory can hold several runs
    store.set_protocol({"kind": "ruler", "model": model_id, "decoding": "greedy",
                        "scoring": "RULER string match (all: fraction of expected strings in the prediction)"})
    records = evaluate(model, tokenizer, samples, methods, model_id=model_id, apply_method=default_apply_method,
                       on_record=store.append, done=store.done())
    for task, rows in task_table(store.latest()).items():
        print(f"\n{task} (mean score, 95% interval)")
        for method, cells in rows.items():
            print(f"  {method}: " + "  ".join(f"{n}: {iv}" for n, iv in cells.items()))
    failed = [r for r in records if r.get("status") == "error"]
    if failed:
        print(f"{len(failed)} samples failed; first: {failed[0]['error'][:200]}", file=sys.stderr)
        return 1
    return 0
