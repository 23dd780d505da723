"""ropelab.evals.lab: train small decoder-only models with each position module, then measure
how they extrapolate with every inference-time method (issue 13; Su, Transformer升级之路
10-13, whose tables come from models trained at 512 tokens and tested at 4096).

    >>> from ropelab.evals.lab import TrainConfig, train, evaluate
    >>> train(TrainConfig(position="rope", size="tiny", tokens=50_000), "runs/lab/rope")
    >>> evaluate(["runs/lab/rope"], "runs/lab/eval")          # tables, figures

Files: positions.py (the position modules as transformers configurations), corpus.py
(training and held-out text), train.py (the resumable, accelerate-driven loop),
methods.py (which inference methods apply to which model), evaluate.py (runner jobs, tables,
paired per-seed differences),
figures.py, cli.py (`ropelab lab train|eval`; `python -m ropelab.evals.lab`).
"""

from .evaluate import evaluate, losses_and_hits, paired
from .methods import check_method, default_methods
from .positions import POSITIONS, SIZES
from .train import TrainConfig, train

__all__ = ["POSITIONS", "SIZES", "TrainConfig", "check_method", "default_methods", "evaluate", "losses_and_hits",
           "paired", "train"]
