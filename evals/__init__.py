"""ropelab.evals: perplexity-versus-length, passkey, lm-eval bridge, plots, CLI (issue 4).

    >>> from ropelab.evals import perplexity, passkey, plot_run, write_report
    >>> records = perplexity(model, tok, "stdlib", ["rope", "ntk:scale=2"], [4096, 16384],
    ...                      protocol="fixed-target", targets=2048, out="runs/demo")
    >>> plot_run("runs/demo"); write_report("runs/demo")

Files: runner.py (the one job runner every eval kind uses), results.py (the locked,
schema-versioned result store), protocols.py (the registered perplexity protocols),
identity.py (a model's identity: names the weights), checks.py (input checks), data.py
(corpora), losses.py (chunked LM-head losses), perplexity.py, passkey.py, lmeval.py
(lm-evaluation-harness bridge, optional), summary.py / plots.py / report.py (drawn from the
result files alone), sweep.py (the main job), loading.py (the one model loader: embedded,
folder or hub id, dtype, device, device map), distributed.py (torchrun ranks and their share
of a sweep), cli.py (`ropelab`; `python -m ropelab`); ruler.py / ruler_run.py
(RULER-style tasks, `ruler`), uncertainty.py / evidence.py (intervals, paired ties, effective
lengths), tune.py / tune_run.py (`ropelab tune`), suggest.py, formats.py, lab/ (`ropelab lab`).
"""

from .data import Document, TokenizedDocument, iter_documents, select_documents
from .loading import load_model
from .losses import token_losses
from .passkey import make_prompt, passkey
from .perplexity import PROTOCOLS, perplexity
from .plots import plot_run
from .protocols import Protocol
from .report import write_report
from .results import SCHEMA, ResultStore, RunLocked, read_run
from .ruler_run import ruler

__all__ = [
    "PROTOCOLS",
    "Document",
    "Protocol",
    "ResultStore",
    "RunLocked",
    "SCHEMA",
    "TokenizedDocument",
    "iter_documents",
    "load_model",
    "make_prompt",
    "passkey",
    "perplexity",
    "plot_run",
    "read_run",
    "ruler",
    "select_documents",
    "token_losses",
    "write_report",
]
