#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests included, on the newest
# transformers release of the declared range; then the patch tests again on the oldest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Run from outside the checkout root so tests import the installed package.
python -m pytest -q -p no:cacheprovider "$@"
deactivate
# Only with no arguments: a caller selecting tests wants just those.
if [ "$#" -eq 0 ]; then
    oldest=$(bash scripts/setup_oldest.sh | tail -n 1)
    echo "patch tests on transformers==$oldest (oldest of the declared range):"
    # Not the slow real-model tests: they check the embedded models, on the newest release.
    .venv-oldest/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests/patches
fi
