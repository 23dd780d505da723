"""`ropelab export --model M --method SPEC --out DIR`: write a model folder whose config carries
the method as transformers' own rope parameters (ropelab.patches.export), for serving.

evals/cli.py adds it with `add_export_parser(subparsers)`; the handler returns an
exit code and raises ValueError for bad input (exit 2 in the CLI), before anything is loaded.
The embedded (GGUF) models are written with their dequantised float weights, and the output
line says so; a failed export leaves --out as it found it (ropelab.patches.export).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .loading import add_loading_arguments, load_model, loading_options


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    text = "write a model folder with the method as native rope parameters (for transformers, vLLM, SGLang)"
    p = subparsers.add_parser("export", help=text, description=text)
    p.add_argument("--model", default="default", help="embedded default, local folder or hub id org/name")
    p.add_argument("--method", required=True, help="e.g. yarn:scale=4 (relative methods and log-n are refused)")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    add_loading_arguments(p, forwards=False)  # export runs no forward: no --memory-chunk
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    import ropelab
    from ropelab.patches.export import export, refusal

    try:
        method = ropelab.parse_method(args.method)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--method {args.method!r}: {e}") from None
    reason = refusal(method)
    if reason:  # refuse before loading a model
        raise ValueError(f"--method {args.method!r}: cannot export: {reason}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {args.out!r}: exists and is not an empty folder; export writes a new folder")
    ancestor = next(p for p in [out.absolute().parent, *out.absolute().parents] if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out!r}: {str(ancestor)!r} is not a folder this process can write into")
    options = loading_options(args)
    if options["device_map"] is not None:
        raise ValueError(f"--device-map {options['device_map']!r}: export saves the whole model; load it on one device")
    model, tokenizer, source = load_model(args.model, **options)
    try:
        export(model, method, out, tokenizer=tokenizer)
    except NotImplementedError as e:  # the family's config rejects the rope type (e.g. Phi3)
        raise ValueError(str(e)) from None
    weights = json.loads((out / "ropelab_export.json").read_text())["weights"]
    print(f"wrote {out} ({source.name} with {method.spec()} as native rope parameters; weights: {weights})")
    return 0
