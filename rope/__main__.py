"""`python -m ropelab ...` is the `ropelab` command (so `torchrun --nproc-per-node N -m ropelab eval ...` works)."""

import sys

from ropelab.evals.cli import main

sys.exit(main())
