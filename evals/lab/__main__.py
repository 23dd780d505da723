"""`python -m ropelab.evals.lab train|eval ...` (until `ropelab lab` is wired into the main CLI)."""

import sys

from .cli import main

sys.exit(main())
