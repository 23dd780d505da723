"""`ropelab tune` and `ropelab suggest`: evals/tune.py's search applied to a model.

The objective is the fixed-target loss (bojone/rerope's protocol, evals/perplexity.py): the
mean loss on the last `targets` tokens of `target_length`-token windows, with a 95% interval
over documents and token blocks (evals/uncertainty.py). Tuning uses documents *after* the
first `skip` ones, which are the ones the main job reports on (`--skip-documents`, default
1), so the setting is not chosen on the tokens it is judged on. Evaluations go to
`OUT/tune.jsonl` as they finish; a rerun reads them back as the search's cache.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from .tune import Continuous, Grid, Search, suggest, tunable, tune_figure
from .uncertainty import Interval, loss_interval


DEFAULT_SPACES = ("linear", "ntk", "ntk-old", "dynamic-ntk", "llama3", "yarn", "beta-base", "rerope", "leaky-rerope",
                  "self-extend")


def default_space(method: str, train_length: int, target_length: int) -> dict:
    """The search space when none is given: the parameters the method's sources say matter."""
    s = max(1.0, target_length / train_length)
    scale = {"scale": Continuous(1.0, max(2.0, 4 * s), log=True)}
    windows = Grid(tuple(train_length * k // 8 for k in (1, 2, 3, 4)))
    spaces = {
        "linear": scale, "ntk": scale, "ntk-old": scale, "dynamic-ntk": scale, "llama3": scale, "yarn": scale,
        "beta-base": scale,
        "rerope": {"window": windows},
        "leaky-rerope": {"window": Grid((train_length // 8, train_length // 4, train_length // 2)),
                         "scale": Continuous(2.0, 64.0, log=True, evaluations=6)},
        "self-extend": {"window": Grid((train_length // 8, train_length // 4)),
                        "group": Grid(tuple(sorted({max(1, math.ceil(s) * k) for k in (1, 2, 4)})))},
    }
    if method not in DEFAULT_SPACES:
        names = tunable(method)
        raise ValueError(f"method={method!r}: nothing to tune by default" + (f"; give --param for {', '.join(names)}" if names else ""))
    return spaces[method]


def parse_param(text: str) -> tuple[str, object]:
    """'scale=1:8' (continuous), 'scale=1:8:log', 'window=1024|2048' (grid) -> (name, range)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--param {text!r}: expected name=low:high[:log] or name=v1|v2|...")
    try:
        if "|" in rest or ":" not in rest:
            values = tuple(int(v) if v.strip().lstrip("-").isdigit() else float(v) for v in rest.split("|"))
            return name, Grid(values)
        parts = rest.split(":")
        log = len(parts) == 3 and parts[2] == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ValueError("bad form")
        return name, Continuous(float(parts[0]), float(parts[1]), log=log)
    except ValueError as exc:
        detail = "" if str(exc) == "bad form" or str(exc).startswith("could not") else f" ({exc})"
        raise ValueError(f"--param {text!r}: expected name=low:high[:log] or name=v1|v2|...{detail}") from None


def loss_objective(model, documents: list[list[int]], length: int, targets: int, apply_method, chunk: int = 1024):
    """Method -> Interval of the fixed-target loss at `length` over `documents` (token id lists)."""
    from .losses import token_losses

    if not 0 < targets < length:
        raise ValueError(f"targets={targets}: must be between 1 and length-1={length - 1}")
    short = [len(d) for d in documents if len(d) < length]
    if short:
        raise ValueError(f"documents: {len(short)} have fewer than length={length} tokens")

    def objective(method):
        with apply_method(model, method):
            losses = [token_losses(model, d[-length:], chunk)[-targets:].numpy().astype(np.float64) for d in documents]
        return loss_interval(losses)

    return objective


def add_parser(subparsers):
    """Add `tune` and `suggest` to an argparse subparsers object."""
    p = subparsers.add_parser("tune", help="search a method's parameters by fixed-target loss at a target length")
    p.set_defaults(func=run_tune)
    p.add_argument("--model", default="default")
    p.add_argument("--method", required=True, help="a method name, e.g. beta-base")
    p.add_argument("--target-length", required=True, help="context length to tune for, e.g. 16k")
    p.add_argument("--param", action="append", help="name=low:high[:log] or name=v1|v2 (repeatable; default: the method's)")
    p.add_argument("--fixed", default="", help="held parameters, e.g. beta=0.625")
    p.add_argument("--targets", type=int, default=2048, help="scored tokens at the end of each window")
    p.add_argument("--documents", type=int, default=2, help="tuning documents")
    p.add_argument("--skip-documents", type=int, default=1, help="documents left for reporting (not tuned on)")
    p.add_argument("--data", default="stdlib")
    p.add_argument("--out", required=True, help="run directory (tune.jsonl, resumable; tune_<param>.png)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    q = subparsers.add_parser("suggest", help="rule-based settings for every method, no compute")
    q.set_defaults(func=run_suggest)
    q.add_argument("--model", default="default", help="model to read the training length from")
    q.add_argument("--train-length", default=None, help="skip loading: the training length, e.g. 8k")
    q.add_argument("--target-length", required=True)
    return p, q


def _fixed(text: str) -> dict:
    out = {}
    for part in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--fixed {text!r}: expected name=value,...")
        out[name] = int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def run_tune(args) -> int:
    """Validate the search (ranges against the method's rules) before loading anything; then search."""
    import ropelab
    from ropelab.spec import parse_int_with_suffix

    from .data import select_documents
    from .models import default_apply_method, load_model, train_length
    from .results import ResultStore

    length = parse_int_with_suffix(args.target_length)
    ropelab.method_class(args.method)  # unknown name: did-you-mean, before loading
    given = dict(parse_param(t) for t in args.param or [])
    fixed = _fixed(args.fixed)
    if given:
        Search(args.method, given, lambda m: 0.0, fixed=fixed)  # checks the ranges against the method's rules
    elif args.method not in DEFAULT_SPACES:
        default_space(args.method, 2, 2)  # raises: nothing to tune by default
    if args.documents < 1 or args.skip_documents < 0:
        raise ValueError(f"--documents {args.documents} / --skip-documents {args.skip_documents}: need >= 1 and >= 0")
    model, tokenizer, model_id = load_model(args.model, args.dtype)
    train = train_length(model)
    space = given or default_space(args.method, train, length)
    store = ResultStore(Path(args.out) / "tune.jsonl")
    store.set_protocol({"kind": "tune", "model": model_id, "method": args.method, "target_length": length,
                        "targets": args.targets, "data": args.data, "documents": args.documents,
                        "skip_documents": args.skip_documents, "fixed": fixed,
                        "space": {k: repr(v) for k, v in space.items()}})
    docs = select_documents(args.data, tokenizer, length, args.documents + args.skip_documents)[args.skip_documents:]
    objective = loss_objective(model, [d.ids for d in docs], length, args.targets, default_apply_method)
    cache = {r["spec"]: Interval(**r["interval"]) for r in store.latest() if r.get("status") == "ok"}

    def on_result(spec, params, value):
        store.append({"type": "tune", "key": spec, "spec": spec, "params": params, "status": "ok", "interval": value.as_dict()})
        print(f"  {spec}: {value}", file=sys.stderr)

    search = Search(args.method, space, objective, fixed=fixed,
                    cache=cache, on_result=on_result)
    best = search.run()
    for p in space:
        tune_figure(search.evaluations, p, title=f"{model_id}: {args.method} at {length} tokens").savefig(
            Path(args.out) / f"tune_{p}.png", dpi=120, bbox_inches="tight")
    print(json.dumps({"best": best.spec, "loss": best.value.as_dict()}))
    return 0


def run_suggest(args) -> int:
    from ropelab.spec import parse_int_with_suffix

    target = parse_int_with_suffix(args.target_length)
    if args.train_length:
        train = parse_int_with_suffix(args.train_length)
    else:
        from .models import load_model, train_length

        train = train_length(load_model(args.model)[0])
    for s in suggest(train, target):
        print(f"{s.spec:45s} {s.rule}  [{s.source}]")
    return 0
