#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Run from outside the checkout root so tests import the installed package.
python -m pytest -q -p no:cacheprovider "$@"
