"""`ropelab tune`: evals/tune.py's search applied to a model.

The objective is the fixed-target loss (bojone/rerope's protocol, evals/protocols.py): the
mean loss on the last `targets` tokens of `target_length`-token windows, with a 95% interval
over documents and token blocks (evals/uncertainty.py). Tuning uses documents *after* the
first `skip` ones, which are the ones the main job reports on (`--skip-documents`, default
1), so the setting is not chosen on the tokens it is judged on.

Every evaluation is a record of the run's result store (`OUT/tune.jsonl`, evals/results.py:
locked, schema-versioned), keyed by (model identity, canonical method spec, the search's
parameters, the documents); a rerun reads the records back as the search's cache and so
resumes where it stopped. The parameters (method, target length, targets, data, documents,
held values) live in each record, not the header, so one directory can hold several searches.
Rule-based starting points without compute are `ropelab suggest` (evals/suggest.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .checks import split_list
from .data import DATA_HELP
from .loading import add_loading_arguments
from .tune import Continuous, Grid, Search, tunable, tune_figure
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


def suggested_setting(method: str, train_length: int, target_length: int, head_dim: int, base: float) -> dict:
    """The rule-based setting of `method` (`ropelab suggest`, evals/suggest.py) as {parameter: value}, or {}.

    The tuning figure marks it as the default the search is judged against."""
    import dataclasses

    import ropelab

    from .suggest import suggest

    for s in suggest(train_length, target_length, head_dim, base):
        m = ropelab.parse_method(s.spec)
        if m.name == method:
            return {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name != "train_length"}
    return {}


def add_parser(subparsers):
    """Add `tune` to an argparse subparsers object; the handler is `run_tune`."""
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
    p.add_argument("--data", default="stdlib", help=DATA_HELP)
    p.add_argument("--out", required=True, help="run directory (tune.jsonl, resumable; tune_<param>.png)")
    add_loading_arguments(p)
    return p


def _fixed(text: str) -> dict:
    out = {}
    for part in split_list(text, "--fixed", "beta=0.625,logn=1") if text.strip() else []:
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--fixed {text!r}: expected name=value,...")
        try:
            out[name] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"--fixed {text!r}: {name}={value!r} is not a number") from None
    return out


def check_command(args) -> dict:
    """The search's inputs from the command line, or ValueError naming the flag (no model loaded, nothing written)."""
    import ropelab
    from ropelab.spec import parse_int_with_suffix

    from .data import check_source
    from .loading import checked_model_options
    from .results import check_can_write

    try:
        length = parse_int_with_suffix(args.target_length)
    except ValueError as exc:
        raise ValueError(f"--target-length {args.target_length!r}: {exc}") from None
    ropelab.method_class(args.method)  # unknown name: did-you-mean
    given = dict(parse_param(t) for t in args.param or [])
    fixed = _fixed(args.fixed)
    if given:
        Search(args.method, given, lambda m: 0.0, fixed=fixed)  # checks the ranges against the method's rules
    elif args.method not in DEFAULT_SPACES:
        default_space(args.method, 2, 2)  # raises: nothing to tune by default
    if not 0 < args.targets < length:
        raise ValueError(f"--targets {args.targets}: must be between 1 and --target-length - 1 = {length - 1}")
    if args.documents < 1:
        raise ValueError(f"--documents {args.documents}: must be an integer >= 1")
    if args.skip_documents < 0:
        raise ValueError(f"--skip-documents {args.skip_documents}: must be an integer >= 0")
    data = check_source(args.data)
    loading = checked_model_options(args)
    try:
        check_can_write(args.out, "tune")
    except ValueError as exc:
        raise ValueError(f"--out: {exc}") from None
    return {"length": length, "given": given, "fixed": fixed, "data": data, "loading": loading}


def run_tune(args) -> int:
    """Validate the search (ranges against the method's rules) before loading anything; then search."""
    from .data import select_documents
    from .identity import display_name, identity_key, model_identity
    from .models import default_apply_method, environment, load_model, train_length
    from .results import ResultStore, job_key

    c = check_command(args)
    length = c["length"]
    model, tokenizer, source = load_model(args.model, **c["loading"])
    space = c["given"] or default_space(args.method, train_length(model), length)
    Search(args.method, space, lambda m: 0.0, fixed=c["fixed"])  # the default space against the rules, before writing
    docs = select_documents(args.data, tokenizer, length, args.documents + args.skip_documents)[args.skip_documents:]
    identity = model_identity(model, source)
    key, name = identity_key(identity), display_name(identity)
    params = {"protocol": "tune", "objective": "fixed-target", "method": args.method, "target_length": length,
              "targets": args.targets, "data": c["data"], "documents": args.documents,
              "skip_documents": args.skip_documents, "fixed": c["fixed"]}
    fields = {"documents": [d.id for d in docs]}
    objective = loss_objective(model, [d.ids for d in docs], length, args.targets, default_apply_method)
    with ResultStore(args.out, "tune") as store:
        store.begin({"kind": "tune", "model": name, "model_identity": identity, "model_key": key,
                     "loss": "next-token cross-entropy, nats, token-weighted means", "environment": environment()})
        cache = {r["method"]: Interval(**r["interval"]) for r in store.latest()
                 if r.get("status") == "ok" and r["key"] == job_key(key, r["method"], params, fields)}

        def timed(method):
            start = time.perf_counter()
            value = objective(method)
            seconds[method.spec()] = time.perf_counter() - start
            return value

        def on_result(spec, setting, value):
            store.append({"type": "tune", "key": job_key(key, spec, params, fields), "model_key": key, "model": name,
                          "method": spec, "params": params, **fields, "text_starts": [d.start for d in docs],
                          "setting": setting, "status": "ok",
                          "interval": value.as_dict(), "seconds": seconds.get(spec)})
            print(f"  {spec}: {value}", file=sys.stderr)

        seconds: dict[str, float] = {}
        search = Search(args.method, space, timed, fixed=c["fixed"], cache=cache, on_result=on_result)
        best = search.run()
    from .suggest import facts_from_config

    facts = facts_from_config(model.config, "the loaded model")
    suggested = suggested_setting(args.method, facts.train_length, length, facts.head_dim, facts.base)
    for p in space:
        tune_figure(search.evaluations, p, default=suggested.get(p),
                    title=f"{name}: {args.method} at {length} tokens").savefig(
            Path(args.out) / f"tune_{p}.png", dpi=120, bbox_inches="tight")
    print(json.dumps({"best": best.spec, "loss": best.value.as_dict(),
                      "suggested": {p: suggested[p] for p in space if p in suggested}}))
    return 0
