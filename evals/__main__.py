"""`python -m ropelab.evals ...` is the `ropelab` command."""

import sys

from .cli import main

sys.exit(main())
