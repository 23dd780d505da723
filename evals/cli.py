"""The `ropelab` command (also `python -m ropelab.evals`).

    ropelab methods                                   the family, with parameters
    ropelab info                                      versions, default models, optional parts
    ropelab eval --methods rope,ntk:scale=2 --lengths 4k,16k --out runs/demo
    ropelab sweep-default --out runs/default          the main job (see sweep.py)
    ropelab passkey --methods rope,rerope:window=4k --lengths 4k,8k,16k --out runs/pk
    ropelab plot runs/demo                            figures and report.md from the files
    ropelab lm-eval --method ntk:scale=2 --tasks ropelab_passkey --limit 4
    ropelab ruler --methods rope,yarn:scale=2 --tasks niah-single --lengths 1k,2k --out runs/ruler
    ropelab tune --method beta-base --target-length 16k --out runs/tune
    ropelab suggest --target-length 16k               rule-based starting settings, no weights loaded
    ropelab export --method yarn:scale=4 --out DIR    the method as native rope parameters, for serving
    ropelab lab train --position rope --out runs/lab/rope   train a small model (lab eval: test it long)

Model-running commands take --model (a default, a folder or a hub id org/name) and the
loading flags --revision --dtype --device --device-map --max-memory --attn-implementation
--trust-remote-code (ropelab.evals.loading), and --memory-chunk N (memory mode: each layer's
MLP and norms over the sequence in slices of N tokens; part of the model identity).

Under torchrun (`torchrun --nproc-per-node N -m ropelab eval ...`) eval, passkey and
sweep-default split their jobs over the ranks (distributed.py, runner.py), each rank writing
its own shard of --out. lm-eval runs under torchrun with lm-eval's own data-parallel split
(lmeval.py); rank 0 writes its results.

Exit codes: 0 ok; 1 a runtime failure (including jobs recorded as failed); 2 bad input,
including an --out that another ropelab process is writing (reported in one line, no
traceback; set ROPELAB_DEBUG=1 for the traceback). Bad input that needs no model is refused
before the model loads, and a refused run leaves --out as it found it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from datetime import timedelta

import ropelab
from ropelab.spec import parse_int_with_suffix

from .checks import check_depths, check_int, split_list, split_methods
from .data import DATA_HELP, check_source
from .distributed import Rank, check_same_parameters, default_shard, init_process_group, local_devices
from .export_command import add_export_parser
from .loading import add_loading_arguments, check_model_name, loading_options, parse_max_memory
from .protocols import Protocol
from .protocols import get as get_protocol
from .protocols import names as protocol_names
from .results import check_can_write
from .ruler_run import add_parser as add_ruler
from .tune_run import add_parser as add_tune
from .suggest import add_parser as add_suggest
from .lab.cli import add_parser as add_lab


class BadInput(ValueError):
    """An input error found before any work started (exit code 2)."""


def parse_methods(texts: list[str], flag: str = "--methods") -> list[str]:
    """Split, validate and deduplicate by canonical spec (`--methods rope --methods rope` runs once)."""
    try:
        specs = [m for text in texts for m in split_methods(text, flag)]
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    canonical = []
    for spec in specs:
        try:
            canonical.append(ropelab.parse_method(spec).spec())
        except (ValueError, TypeError) as exc:
            raise BadInput(f"{flag} {spec!r}: {exc}") from None
    if not canonical:
        raise BadInput(f"{flag}: give at least one method (see `ropelab methods`)")
    return list(dict.fromkeys(canonical))


def parse_lengths(text: str, flag: str = "--lengths") -> list[int]:
    items = checked_list(text, flag, "4k,8k,16k")
    try:
        lengths = [parse_int_with_suffix(t) for t in items]
    except ValueError as exc:
        raise BadInput(f"{flag} {text!r}: {exc}") from None
    if not lengths or min(lengths) < 2:
        raise BadInput(f"{flag} {text!r}: give lengths >= 2, like 4k,8k,16k")
    return lengths


def parse_length(text: str, flag: str) -> int:
    if "," in text:
        raise BadInput(f"{flag} {text!r}: give one length, like 16k")
    return parse_lengths(text, flag)[0]


def parse_floats(text: str, flag: str) -> list[float]:
    items = checked_list(text, flag, "0.1,0.5,0.9")
    try:
        return [float(t) for t in items]
    except ValueError:
        raise BadInput(f"{flag} {text!r}: expected numbers like 0.1,0.5,0.9") from None


def checked_list(text: str, flag: str, example: str) -> list[str]:
    try:
        return split_list(text, flag, example)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def checked(flag: str, check, *args):
    """`check(*args)`, its ValueError turned into BadInput naming the command-line flag."""
    try:
        return check(*args)
    except ValueError as exc:
        raise BadInput(f"{flag}: {exc}") from None


def launch(args) -> Rank:
    """Under torchrun: join the process group and refuse, on every rank, ranks given different
    command lines (before anything is checked, loaded or run). A single process: rank 0 of 1."""
    rank = checked("torchrun's environment", Rank.from_environment)
    if rank.launched:
        # Only Python objects and barriers travel between ranks, so gloo serves on GPUs too.
        # A rank done with its share waits at the last barrier for the slowest: allow a day.
        init_process_group(rank, "gloo", timedelta(days=1))
        check_same_parameters({k: v for k, v in vars(args).items() if k != "func"})
    return rank


def check_common(args, kind: str, rank: Rank = Rank()) -> dict:
    """What every model-running command checks before loading the model (nothing is created);
    returns `load_model`'s keyword arguments from the loading flags, with this rank's device."""
    try:
        options = loading_options(args)  # its messages already name the flag
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    checked("--model", check_model_name, args.model, options["revision"], options["device_map"])
    checked("--out", check_can_write, args.out, kind, default_shard(rank))
    if rank.launched:
        memory = parse_max_memory(options["max_memory"]) if options["max_memory"] else None
        options.update(checked("--device", local_devices, rank, options["device"], options["device_map"], memory))
    return options


def _load(args, options: dict):
    from .loading import load_model

    print(f"loading model {args.model!r} ...", file=sys.stderr)
    return load_model(args.model, **options)


def _finish(out, records, rank: Rank = Rank()) -> int:
    from .plots import plot_run
    from .report import print_loss_table, write_report
    from .summary import skipped_lines

    failed = [r for r in records if r.get("status") == "error"]
    if rank.rank != 0:  # the records are the whole run's; rank 0 draws and reports them
        return 1 if failed else 0
    for line in skipped_lines(out):
        print(f"skipped {line}", file=sys.stderr)
    plot_run(out)
    report = write_report(out)
    print_loss_table(out)
    print(f"results: {out}  report: {report}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(records)} jobs failed (errors recorded in {out}); first: "
              f"{failed[0]['method']}: {failed[0]['error'][:200]}", file=sys.stderr)
        return 1
    return 0


def cmd_methods(args) -> int:
    for name in ropelab.methods():
        cls = ropelab.method_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("train_length",)]
        flag = " [length-dependent]" if isinstance(cls.length_dependent, bool) and cls.length_dependent else ""
        if "per_query" in fields:  # dynamic-ntk: length_dependent is a property of the instance
            flag = " [length-dependent unless per_query=true]"
        print(f"{name:14s} {', '.join(fields)}{flag}\n{'':14s} {doc}")
    return 0


def cmd_info(args) -> int:
    from .models import environment

    info = {"environment": environment(), "default_models": {}, "patches": None, "lm_eval": None}
    try:
        from ropelab.patches import default_models, supported_families
        from ropelab.patches.loading import gguf_path

        info["patches"] = {"families": supported_families()}
        for name in default_models():
            try:
                info["default_models"][name] = str(gguf_path(name)) if name == "smollm2-135m" else "installed"
            except Exception as exc:
                info["default_models"][name] = f"missing: {exc}"
    except ImportError as exc:
        info["patches"] = f"not available: {exc}"
    try:
        import lm_eval

        info["lm_eval"] = lm_eval.__version__
    except ImportError:
        info["lm_eval"] = "not installed (pip install 'ropelab[lmeval]')"
    print(json.dumps(info, indent=2))
    return 0


def cmd_eval(args) -> int:
    from .perplexity import perplexity

    rank = launch(args)
    methods = parse_methods(args.methods or ["rope"])
    lengths = parse_lengths(args.lengths)
    window = parse_length(args.window, "--window") if args.window else max(lengths)
    checked("--documents", check_int, "documents", args.documents)
    checked("--chunk", check_int, "chunk", args.chunk)
    data = checked("--data", check_source, args.data)
    protocol = checked("--protocol", Protocol, args.protocol, window, args.targets, args.stride, data, args.short)
    checked("--lengths", protocol.check_lengths, lengths)
    options = check_common(args, "perplexity", rank)
    model, tokenizer, source = _load(args, options)
    records = perplexity(model, tokenizer, args.data, methods, lengths, protocol=protocol,
                         num_documents=args.documents, out=args.out, model_source=source, chunk=args.chunk,
                         shard=default_shard(rank), progress=not args.quiet)
    return _finish(args.out, records, rank)


def cmd_sweep_default(args) -> int:
    from .sweep import run_default_sweep

    rank = launch(args)
    lengths = parse_lengths(args.lengths)
    methods = parse_methods(args.methods) if args.methods else None
    checked("--lengths", Protocol("fixed-target", window=max(lengths), targets=args.targets).check_lengths, lengths)
    options = check_common(args, "perplexity", rank)
    records = run_default_sweep(args.out, model=args.model, lengths=lengths, methods=methods, targets=args.targets,
                                progress=not args.quiet, shard=default_shard(rank), **options)
    return _finish(args.out, records, rank)


def cmd_passkey(args) -> int:
    from .passkey import passkey

    rank = launch(args)
    methods = parse_methods(args.methods or ["rope"])
    lengths = parse_lengths(args.lengths)
    depths = checked("--depths", check_depths, parse_floats(args.depths, "--depths"))
    checked("--trials", check_int, "trials", args.trials)
    options = check_common(args, "passkey", rank)
    model, tokenizer, source = _load(args, options)
    records = passkey(model, tokenizer, methods, lengths, depths, args.trials, seed=args.seed, out=args.out,
                      model_source=source, shard=default_shard(rank), progress=not args.quiet)
    return _finish(args.out, records, rank)


def cmd_plot(args) -> int:
    from .plots import plot_run
    from .report import write_report

    if not os.path.isdir(args.run):
        raise BadInput(f"run={args.run!r}: not a directory")
    from .summary import skipped_lines

    for line in skipped_lines(args.run):
        print(f"skipped {line}", file=sys.stderr)
    paths = plot_run(args.run)
    report = write_report(args.run)
    if report is None:
        raise BadInput(f"run={args.run!r}: no results.jsonl, passkey.jsonl or ruler.jsonl in it")
    for p in [*paths, report]:
        print(p)
    return 0


def cmd_lm_eval(args) -> int:
    from .distributed import barrier, from_rank0
    from .lmeval import PASSKEY_TASK, RankFailed, lm_eval_run, require_lm_eval, write_passkey_task
    from .ruler_lmeval import ruler_tasks_named, write_ruler_tasks

    ranks = checked("torchrun's environment", Rank.from_environment).world_size
    if args.limit is not None and args.limit >= 1 and int(args.limit) < ranks:  # every rank refuses alike
        raise BadInput(f"--limit {args.limit:g}: fewer documents than the {ranks} ranks; lm-eval fails on a rank "
                       "without documents, so give --limit >= the number of ranks")
    rank = launch(args)  # several ranks: lm-eval's data-parallel mode (lmeval.py), rank 0 writes
    method, *more = parse_methods([args.method], "--method")
    if more:
        raise BadInput(f"--method {args.method!r}: give one method (lm-eval runs one model at a time)")
    tasks = checked_list(args.tasks, "--tasks", "ropelab_passkey,hellaswag")
    ruler_tasks = checked("--tasks", ruler_tasks_named, tasks)  # ropelab_ruler_*: generated below
    if args.limit is not None and args.limit <= 0:
        raise BadInput(f"--limit: limit={args.limit!r}: must be > 0 (>= 1: examples per task; < 1: a fraction)")
    passkey_lengths = parse_lengths(args.passkey_lengths, "--passkey-lengths")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise BadInput(f"--include-path: include_path={args.include_path!r}: not a directory")
    options = check_common(args, "lm-eval", rank)
    require_lm_eval()
    barrier()  # every rank checked --out before rank 0 takes it (lm_eval_run)
    model, tokenizer, source = _load(args, options)
    include = args.include_path

    def write_tasks() -> str:
        folder = os.path.join(args.out, "tasks")
        if PASSKEY_TASK in tasks:
            write_passkey_task(folder, tokenizer, passkey_lengths)
        if ruler_tasks:
            write_ruler_tasks(folder, tokenizer, ruler_tasks, passkey_lengths)
        return folder

    if (PASSKEY_TASK in tasks or ruler_tasks) and include is None:  # written once, by rank 0, for all
        include = from_rank0(write_tasks)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit  # < 1: a fraction
    try:
        records = lm_eval_run(model, tokenizer, tasks, [method], out=args.out, model_source=source,
                              include_path=include, limit=limit, max_length=args.max_length,
                              progress=not args.quiet)
    except RankFailed as exc:  # torchrun stops the other ranks; a rerun resumes
        print(f"ropelab lm-eval: failed: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in records if r.get("status") == "error"]
    if rank.rank != 0:  # the records are rank 0's, the whole run's; rank 0 reports them
        return 1 if failed else 0
    results = {r["task"]: r.get("results", {}) for r in records if r.get("status") == "ok"}
    path = os.path.join(args.out, "lm_eval.json")  # a summary of lm_eval.jsonl, rewritten each run
    with open(path, "w") as f:
        json.dump({"model": records[0]["model"] if records else None, "method": method, "limit": args.limit,
                   "results": results}, f, indent=2, default=str)
    print(json.dumps(results, indent=2, default=str))
    print(f"written: {path}", file=sys.stderr)
    for r in failed:
        print(f"task {r['task']} failed: {r['error'][:200]}", file=sys.stderr)
    return 1 if failed else 0


def _common(p, methods=True, out_default=None, dtype_default="float32"):
    p.add_argument("--model", default="default",
                   help="'default' (smollm2-135m), 'gemma3-270m', a local save_pretrained folder, or a hub id "
                   "org/name (from the local cache; downloaded only where HF_HUB_OFFLINE is not set)")
    if methods:
        p.add_argument("--methods", action="append",
                       help="comma-separated specs name:key=value,... (repeatable; default rope; duplicates run "
                       "once); see `ropelab methods`")
    p.add_argument("--out", default=out_default, required=out_default is None,
                   help="run directory (resumable; one writer at a time, a second is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_loading_arguments(p, dtype_default)


def _add(subparsers, name, func, help_text):
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func)
    return p


def add_methods(subparsers):
    _add(subparsers, "methods", cmd_methods, "list the position methods and their parameters")


def add_info(subparsers):
    _add(subparsers, "info", cmd_info, "versions, default models and optional components")


def add_eval(subparsers):
    p = _add(subparsers, "eval", cmd_eval, "perplexity versus context length (resumable JSONL, plots, report)")
    _common(p)
    p.add_argument("--data", default="stdlib", help=DATA_HELP)
    p.add_argument("--lengths", default="2k,4k,8k", help="context lengths N, e.g. 4k,8k,16k")
    p.add_argument("--protocol", default="fixed-target", choices=protocol_names(),
                   help="; ".join(f"{n}: {get_protocol(n).description}" for n in protocol_names()))
    p.add_argument("--targets", type=int, default=1024, help="K: scored tokens under fixed-target")
    p.add_argument("--stride", type=int, default=512, help="window stride under sliding (must be < every length)")
    p.add_argument("--documents", type=int, default=1, help="number of documents")
    p.add_argument("--window", default=None, help="tokens per document W (default: the largest length; "
                   "give more for --protocol sliding)")
    p.add_argument("--short", default="skip", choices=["skip", "concatenate"],
                   help="documents shorter than the largest length: skip them or join consecutive ones")
    p.add_argument("--chunk", type=int, default=1024, help="LM-head rows per chunk (memory only)")


def add_sweep_default(subparsers):
    p = _add(subparsers, "sweep-default", cmd_sweep_default,
             "the main job: SmolLM2-135M (bf16) on stdlib, 7 methods at 2x training length, plot and table (~14 min)")
    # bf16 keeps the main job inside 15 minutes on 2 cores (13.6 min measured; float32 16.9 min)
    _common(p, out_default="runs/default", dtype_default="bfloat16")
    p.add_argument("--lengths", default="4k,16k", help="context lengths (budget: see ropelab.evals.sweep)")
    p.add_argument("--targets", type=int, default=2048, help="K: the fixed scored tokens")


def add_passkey(subparsers):
    p = _add(subparsers, "passkey", cmd_passkey, "passkey retrieval accuracy by length and depth (greedy)")
    _common(p)
    p.add_argument("--lengths", default="1k,2k,4k")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="fractions of the filler before the key")
    p.add_argument("--trials", type=int, default=1, help="trials per length and depth (>= 1)")
    p.add_argument("--seed", type=int, default=0)


def add_plot(subparsers):
    p = _add(subparsers, "plot", cmd_plot, "draw figures (PNG, SVG) and report.md from a run directory's files")
    p.add_argument("run", help="run directory")


def add_lm_eval(subparsers):
    p = _add(subparsers, "lm-eval", cmd_lm_eval,
             "run lm-evaluation-harness tasks on a patched model (needs ropelab[lmeval])")
    _common(p, methods=False, out_default="runs/lm-eval")
    p.add_argument("--method", default="rope", help="one method spec")
    p.add_argument("--tasks", default="ropelab_passkey", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="folder of local task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="examples per task (for quick checks)")
    p.add_argument("--max-length", type=int, default=None, help="HFLM max_length")
    p.add_argument("--passkey-lengths", default="1k,2k",
                   help="lengths of the generated tasks (ropelab_passkey, ropelab_ruler_*)")


# Each entry adds one subcommand: `add(subparsers)`. A new eval kind appends its own here.
SUBCOMMANDS = [add_methods, add_info, add_eval, add_sweep_default, add_passkey, add_plot, add_lm_eval, add_suggest,
               add_export_parser, add_ruler, add_tune, add_lab]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropelab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad input.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (BadInput, ValueError) as exc:
        if os.environ.get("ROPELAB_DEBUG"):
            traceback.print_exc()
        print(f"ropelab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # runtime failure: one line unless debugging
        if os.environ.get("ROPELAB_DEBUG"):
            traceback.print_exc()
        print(f"ropelab {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
