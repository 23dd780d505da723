"""One rank of tests/evals/test_sharded.py, started by torchrun: the `ropelab` CLI with a fault.

    shard_worker.py kill ARGS...     rank 1 kills itself (SIGKILL) as it enters its second method
    shard_worker.py differ ARGS...   rank r runs with `--documents r+1` (ranks that disagree)
"""

import importlib
import os
import signal
import sys

from ropelab.evals.cli import main

perplexity = importlib.import_module("ropelab.evals.perplexity")  # the module (the package exports the function)

mode, argv, rank = sys.argv[1], sys.argv[2:], int(os.environ["RANK"])
if mode == "kill":
    original, entered = perplexity.default_apply_method, []

    def dying(model, method):
        entered.append(method)
        if rank == 1 and len(entered) == 2:  # its first method's records are all on disk
            os.kill(os.getpid(), signal.SIGKILL)
        return original(model, method)

    perplexity.default_apply_method = dying
elif mode == "differ":
    argv += ["--documents", str(rank + 1)]
sys.exit(main(argv))
