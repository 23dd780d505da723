"""`ropelab lab train|eval`: the command-line face of the lab. `add_parser(subparsers)` adds
the `lab` command to an argparse parser (evals/cli.py adds it to `ropelab`);
meanwhile `python -m ropelab.evals.lab train|eval ...` runs it on its own.

Exit codes as the `ropelab` command: 0 ok, 1 runtime failure, 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from ..checks import split_list, split_methods
from ..data import DATA_HELP
from .positions import POSITIONS, SIZES


def _int_list(text: str, flag: str) -> list[int]:
    items = split_list(text, flag, "1,4,8,16")
    try:
        return [int(t) for t in items]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected integers like 1,4,8,16") from None


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(position=args.position, size=args.size, train_length=args.train_length,
                         batch_size=args.batch_size, tokens=args.tokens, lr=args.lr, seed=args.seed, data=args.data,
                         heldout_every=args.heldout_every, tokenizer=args.tokenizer, logn_length=args.logn_length,
                         inverse_window=args.inverse_window, inverse_scale=args.inverse_scale)
    record = train(config, args.out, device=args.device, progress=not args.quiet, save_every=args.save_every,
                   stop_after=args.stop_after)
    summary = record.get("summary")
    if summary is None:
        print(f"stopped at a checkpoint; run the same command to resume: {args.out}", file=sys.stderr)
    else:
        print(json.dumps(summary, indent=2))
        print(f"model: {os.path.join(args.out, 'model')}  loss curve: {os.path.join(args.out, 'loss_curve.png')}",
              file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, markdown

    methods = None
    if args.methods:
        methods = [m for text in args.methods for m in split_methods(text)]
    table = evaluate(args.runs, args.out, factors=_int_list(args.factors, "--factors"), methods=methods,
                     documents=args.documents, device=args.device, progress=not args.quiet)
    print(markdown(table))
    print(f"tables and figures: {args.out}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `lab` (with `train` and `eval`) to an argparse subparsers object; returns the `lab` parser."""
    lab = subparsers.add_parser("lab", help="train small models per position module, then test them long",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="train|eval")

    p = sub.add_parser("train", help="train one small model (resumable; rerun to resume)")
    p.add_argument("--position", required=True, help=f"position module: {', '.join(POSITIONS)}")
    p.add_argument("--out", required=True, help="run folder (one run per folder; resumable)")
    p.add_argument("--size", default="tiny", help=f"{', '.join(SIZES)} or HIDDENxLAYERSxHEADS")
    p.add_argument("--train-length", type=int, default=128, help="training sequence length L")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (over all processes)")
    p.add_argument("--tokens", type=int, default=2_097_152, help="token budget (steps = tokens / (batch × L))")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="stdlib", help=DATA_HELP)
    p.add_argument("--heldout-every", type=int, default=20, help="1 document in N is held out for evaluation")
    p.add_argument("--tokenizer", default="corpus:4096", help="corpus:V (a BPE of V tokens trained on the training documents; the default), a default model's name, or a tokenizer folder")
    p.add_argument("--logn-length", type=int, default=None, help="rope-logn: L0 of the log-n scale (default L/4)")
    p.add_argument("--inverse-window", type=int, default=None, help="inverse-leaky: window w (default L/4)")
    p.add_argument("--inverse-scale", type=float, default=None, help="inverse-leaky: stretch s = 1/k (default 16)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda (under torchrun: each process's GPU), cuda:N")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps, as an interruption would")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test trained runs at k× their training length with every method that applies")
    p.add_argument("runs", nargs="+", help="run folders written by `lab train`")
    p.add_argument("--out", required=True, help="folder for lab_results.jsonl, tables and figures (resumable)")
    p.add_argument("--factors", default="1,4,8,16", help="lengths as multiples of each run's training length")
    p.add_argument("--methods", action="append", help="method specs (default: every one that applies)")
    p.add_argument("--documents", type=int, default=4, help="held-out windows per run")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)
    return lab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ropelab.evals.lab")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except ValueError as exc:
        if os.environ.get("ROPELAB_DEBUG"):
            traceback.print_exc()
        print(f"ropelab lab {args.lab_command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("ROPELAB_DEBUG"):
            traceback.print_exc()
        print(f"ropelab lab {args.lab_command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
