"""ropelab.evals: perplexity-versus-length, passkey, lm-eval bridge, plots, CLI (issue 4).

    >>> from ropelab.evals import perplexity, passkey, plot_run, write_report
    >>> records = perplexity(model, tok, "stdlib", ["rope", "ntk:scale=2"], [4096, 16384],
    ...                      protocol="fixed-target", targets=2048, out="runs/demo")
    >>> plot_run("runs/demo"); write_report("runs/demo")

Files: data.py (corpora), losses.py (chunked LM-head losses), perplexity.py (the three
protocols, the resumable sweep), results.py (append-only JSONL), passkey.py, lmeval.py
(lm-evaluation-harness bridge, optional), summary.py / plots.py / report.py (drawn from the
result files alone), sweep.py (the main job and its budget), cli.py (`ropelab`).
"""

from .data import Document, TokenizedDocument, iter_documents, select_documents
from .losses import token_losses
from .passkey import make_prompt, passkey
from .perplexity import PROTOCOLS, Protocol, perplexity
from .plots import plot_run
from .report import write_report
from .results import ResultStore

__all__ = [
    "PROTOCOLS",
    "Document",
    "Protocol",
    "ResultStore",
    "TokenizedDocument",
    "iter_documents",
    "make_prompt",
    "passkey",
    "perplexity",
    "plot_run",
    "select_documents",
    "token_losses",
    "write_report",
]
